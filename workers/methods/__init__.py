"""Method recipes, registered by (method, algorithm). A recipe is a small strategy with one protocol:

    setup(run)            load data and models, build what the loop needs
    load_checkpoint(...)  continue a previous attempt from its newest checkpoint
    run(run) -> Outcome   the loop: calls run.check(step) every step, save_checkpoint when due
    save_checkpoint()     state as safetensors groups + JSON
    evaluate()            metrics on the validation data

Parameters are the frozen pydantic model registered for the algorithm in core.catalog."""
import importlib
import logging
import pkgutil
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any, Protocol

import torch

from workers.errors import JobFailure
from workers.runtime import JobRun

log = logging.getLogger("refinery.worker")


@dataclass
class Outcome:
    stopped_by: str  # "completed" | "budget"
    metrics: dict[str, Any]
    extra: dict[str, Any] = field(default_factory=dict)


class Recipe(Protocol):
    def setup(self, run: JobRun) -> None: ...
    def load_checkpoint(self, groups: dict[str, dict[str, torch.Tensor]], meta: dict[str, Any]) -> None: ...
    def run(self, run: JobRun) -> Outcome: ...
    def save_checkpoint(self) -> tuple[dict[str, dict[str, torch.Tensor]], dict[str, Any]]: ...
    def evaluate(self) -> dict[str, Any]: ...


RECIPES: dict[tuple[str, str], Callable[[], Recipe]] = {}
BROKEN: dict[str, str] = {}  # method module name → why it failed to import


def register(method: str, algorithm: str):
    def decorate(factory):
        RECIPES[(method, algorithm)] = factory
        return factory
    return decorate


def _import_recipes() -> None:
    """Each module under workers/methods/ registers its recipes when imported. A module that fails to import is
    logged and skipped, so one broken method cannot take the others down; its jobs fail with the import error."""
    import workers.methods
    for info in pkgutil.iter_modules(workers.methods.__path__):
        try:
            importlib.import_module(f"workers.methods.{info.name}")
        except Exception as exc:
            log.exception("method module %s failed to import", info.name)
            BROKEN[info.name] = f"{type(exc).__name__}: {exc}"


def get_recipe(method: str, algorithm: str) -> Recipe | None:
    if not RECIPES and not BROKEN:
        _import_recipes()
    factory = RECIPES.get((method, algorithm))
    if factory is None and method in BROKEN:
        raise JobFailure("method_unavailable", f"The {method} method failed to load on this worker "
                         f"({BROKEN[method]}); it has been logged.", "infra_error")
    return factory() if factory else None
