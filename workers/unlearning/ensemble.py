"""Many small models trained at once in helper processes with one thread each (on a few CPU cores that beats one
process with several threads by far): the datamodel's subset models, the oracles, and the re-trained originals and
their unlearned copies that KLoM compares. The job's process waits, checking its budget and cancel flag."""
import multiprocessing
import os
import time
import traceback
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any

import numpy as np
import torch

from workers.data import Dataset
from workers.errors import JobFailure
from workers.evaluation import predict_logits
from workers.runtime import Stop
from workers.unlearning import trak
from workers.unlearning.algorithms import PARAMS, build_loop, make_rows, matching_targets
from workers.unlearning.fitting import Deadline, Fitting, Recipe, fresh_model, run_to_end

CPU = torch.device("cpu")


@dataclass(frozen=True)
class Shared:
    """What every helper process needs, sent once per process. For the matching algorithms, `match` holds the
    matched training rows and `match_shift` what a retrain changes in their logits: each model's target is its own
    logits plus the shift (predicted by dmm's datamodel, measured on retrains by oracle_matching)."""
    train: Dataset
    test: Dataset
    forget: np.ndarray  # bool over training rows
    recipe: Recipe
    deadline: float  # time.time() at which every helper stops
    algorithm: str | None = None
    params: dict[str, Any] = field(default_factory=dict)
    match: np.ndarray | None = None
    match_shift: np.ndarray | None = None


@dataclass(frozen=True)
class Order:
    """One model to train. role: "original" (all training rows, then unlearned when Shared names an algorithm),
    "oracle" (the retain rows) or "subset" (the rows in `rows`). `features` > 0: also return the trained model's
    TRAK gradient features of that width (trak.gradient_features)."""
    role: str
    seed: int
    rows: np.ndarray | None = None
    features: int = 0
    features_dtype: str = "float32"


@dataclass
class Trained:
    role: str
    seed: int
    train_logits: np.ndarray  # [N, C] on every training row
    test_logits: np.ndarray  # [T, C]
    seconds: float  # training time, one thread
    unlearned_train_logits: np.ndarray | None = None
    unlearned_test_logits: np.ndarray | None = None
    unlearn_seconds: float | None = None
    gradient_features: tuple[np.ndarray, np.ndarray] | None = None  # (W [N, k], q [N]), see trak.py


def usable_cpus() -> int:
    return len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else (os.cpu_count() or 1)


def train_many(orders: list[Order], shared: Shared, watch: Callable[[int], None]) -> list[Trained]:
    """Train every order in helper processes; `watch(done)` is called about twice a second and may raise (Stop on
    cancel or budget), which ends the helpers at once. Returns results in the orders' order."""
    if not orders:
        return []
    # spawn, not fork: the job's process has a heartbeat thread and database connections a fork would copy.
    context = multiprocessing.get_context("spawn")
    results: list[Trained] = []
    with context.Pool(min(len(orders), usable_cpus()), initializer=_start, initargs=(shared,)) as pool:
        pending = pool.imap(_train, orders)
        while len(results) < len(orders):
            try:
                outcome = pending.next(timeout=0.5)
            except multiprocessing.TimeoutError:
                watch(len(results))
                continue
            if isinstance(outcome, HelperError):
                outcome.raise_it()
            results.append(outcome)
            watch(len(results))
    return results


@dataclass(frozen=True)
class HelperError:
    """A failure in a helper process, sent back as data: exceptions with custom constructors do not survive
    pickling. code "budget" means the helper reached the job's deadline."""
    code: str
    message: str = ""
    error_class: str = "infra_error"

    def raise_it(self) -> None:
        if self.code == "budget":
            raise Stop("budget")
        raise JobFailure(self.code, f"While training models in helper processes: {self.message}", self.error_class)


_shared: Shared | None = None


def _start(shared: Shared) -> None:
    global _shared
    torch.set_num_threads(1)
    _shared = shared


def _train(order: Order) -> Trained | HelperError:
    """In a helper process."""
    try:
        return _train_one(order, _shared)
    except Stop:
        return HelperError("budget")
    except JobFailure as failure:
        return HelperError(failure.code, failure.message, failure.error_class)
    except Exception:
        return HelperError("internal_error", traceback.format_exc(limit=4))


def _train_one(order: Order, s: Shared) -> Trained:
    budget = Deadline(s.deadline)
    rows = {"original": np.ones(len(s.train), dtype=bool), "oracle": ~s.forget, "subset": order.rows}[order.role]
    data = s.train.subset(rows)
    test_x, test_y = torch.from_numpy(s.test.x).float(), torch.from_numpy(s.test.y).long()
    started = time.perf_counter()
    model = fresh_model(s.recipe, data, order.seed)
    fitting = Fitting(model, s.recipe.params, torch.from_numpy(data.x).float(), torch.from_numpy(data.y).long(),
                      test_x, test_y, order.seed)
    model = run_to_end(fitting, budget)
    trained = Trained(order.role, order.seed, *_logits(model, s), seconds=time.perf_counter() - started)
    if order.features:
        trained.gradient_features = trak.gradient_features(model, s.train, order.features, order.seed,
                                                           order.features_dtype)
    if order.role == "original" and s.algorithm is not None:
        started = time.perf_counter()
        unlearned = unlearn(model, s, order.seed, budget)
        trained.unlearn_seconds = time.perf_counter() - started
        trained.unlearned_train_logits, trained.unlearned_test_logits = _logits(unlearned, s)
    return trained


def unlearn(model: torch.nn.Module, s: Shared, seed: int, budget: Deadline) -> torch.nn.Module:
    targets = None
    if s.match is not None and s.match_shift is not None:
        targets = matching_targets(model, s.train, s.match, s.match_shift)
    rows = make_rows(s.train, s.forget, s.test, CPU, s.match, targets)
    params = PARAMS[s.algorithm].model_validate(s.params)
    return run_to_end(build_loop(s.algorithm, params, model, s.recipe, rows, seed), budget)


def _logits(model: torch.nn.Module, s: Shared) -> tuple[np.ndarray, np.ndarray]:
    return (predict_logits(model, torch.from_numpy(s.train.x).float()).numpy(),
            predict_logits(model, torch.from_numpy(s.test.x).float()).numpy())
