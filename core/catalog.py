"""Methods, their algorithms and each algorithm's parameter model: what `GET /v1/methods` publishes and specs obey.

Each method's entry lives in its own module under `core/methods/` (found by discovery, so adding a method touches no
shared file); its training code lives in `workers/methods/`. Only torch-free pydantic models live here, so the API
validates specs without importing torch."""
import importlib
import logging
import pkgutil
from collections.abc import Callable, Iterator, Mapping
from dataclasses import dataclass, field

from pydantic import BaseModel, ConfigDict


class Params(BaseModel):
    """Base of every algorithm's parameters: frozen, unknown keys refused."""
    model_config = ConfigDict(extra="forbid", frozen=True)


class SpecProblem(ValueError):
    """A spec that is well-formed but wrong for its method, e.g. `unlearn` without `forget`; `param` names the field."""

    def __init__(self, param: str, message: str):
        super().__init__(message)
        self.param = param
        self.message = message


@dataclass(frozen=True)
class Algorithm:
    name: str
    params: type[Params]
    summary: str


@dataclass(frozen=True)
class Method:
    name: str
    default_algorithm: str
    algorithms: dict[str, Algorithm]
    summary: str
    # Called with the JobSpec after its params validated; raises SpecProblem for method-specific rules.
    check_spec: Callable[..., None] | None = field(default=None)


def _discover() -> dict[str, Method]:
    import core.methods
    found: dict[str, Method] = {}
    for info in sorted(pkgutil.iter_modules(core.methods.__path__), key=lambda i: i.name):
        try:
            module = importlib.import_module(f"core.methods.{info.name}")
        except Exception:  # one broken method must not hide the others; its name is simply not offered
            logging.getLogger("refinery").exception("method catalog module %s failed to import", info.name)
            continue
        method = getattr(module, "METHOD", None)
        if isinstance(method, Method):
            found[method.name] = method
    order = ["train", "distill", "prune", "unlearn"]
    return dict(sorted(found.items(), key=lambda kv: order.index(kv[0]) if kv[0] in order else len(order)))


class _Catalog(Mapping[str, Method]):
    """Discovered on first use, not at import: a method module imports this one for `Method`, so discovering during
    that import would miss the very module being imported."""

    def __init__(self) -> None:
        self._methods: dict[str, Method] | None = None

    def _all(self) -> dict[str, Method]:
        if self._methods is None:
            self._methods = _discover()
        return self._methods

    def __getitem__(self, name: str) -> Method:
        return self._all()[name]

    def __iter__(self) -> Iterator[str]:
        return iter(self._all())

    def __len__(self) -> int:
        return len(self._all())


METHODS: Mapping[str, Method] = _Catalog()


def find_algorithm(method: str, algorithm: str | None) -> Algorithm | None:
    entry = METHODS.get(method)
    if entry is None:
        return None
    return entry.algorithms.get(algorithm or entry.default_algorithm)
