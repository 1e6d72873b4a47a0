"""Method recipes, registered by (method, algorithm). A recipe is a small strategy with one protocol:

    setup(run)            load data and models, build what the loop needs
    load_checkpoint(...)  continue a previous attempt from its newest checkpoint
    run(run) -> Outcome   the loop: calls run.check(step) every step, save_checkpoint when due
    save_checkpoint()     state as safetensors groups + JSON
    evaluate()            metrics on the validation data

Parameters are the frozen pydantic model registered for the algorithm in core.catalog."""
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any, Protocol

import torch

from workers.runtime import JobRun


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


def register(method: str, algorithm: str):
    def decorate(factory):
        RECIPES[(method, algorithm)] = factory
        return factory
    return decorate


def _import_recipes() -> None:
    """Each module under workers/methods/ registers its recipes when imported."""
    import importlib
    import pkgutil

    import workers.methods
    for info in pkgutil.iter_modules(workers.methods.__path__):
        importlib.import_module(f"workers.methods.{info.name}")


def get_recipe(method: str, algorithm: str) -> Recipe | None:
    if not RECIPES:
        _import_recipes()
    factory = RECIPES.get((method, algorithm))
    return factory() if factory else None
