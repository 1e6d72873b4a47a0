"""Deletion requests as a stream, evaluated as they happened: `evaluate.oracles: K` on a chained request trains K
originals and replays the whole chain on each — every request's algorithm, parameters and cumulative forget set, in
order — then compares them with 2K oracles retrained on the cumulative retain set (oracles.klom_report)."""
import multiprocessing
import time
import traceback
from collections.abc import Callable
from dataclasses import dataclass, replace
from typing import Any

import numpy as np
import torch

from workers.errors import JobFailure
from workers.evaluation import predict_logits
from workers.runtime import Stop
from workers.unlearning.algorithms import PARAMS, build_loop, make_rows
from workers.unlearning.ensemble import CPU, HelperError, Order, Shared, Trained, train_many, usable_cpus
from workers.unlearning.fitting import Deadline, Fitting, fresh_model, run_to_end
from workers.unlearning.oracles import klom_report, seed_for


@dataclass(frozen=True)
class Step:
    """One request of the chain as its job ran it. `forget` is the cumulative forget set after the request (bool over
    training rows); for dmm and oracle_matching, `match` are the matched rows and `match_shift` what a retrain
    without `forget` changes in the chain's first model's logits on them (the targets are that model's logits plus
    the shift, so errors of earlier requests are not carried forward)."""
    algorithm: str
    params: dict[str, Any]
    forget: np.ndarray
    match: np.ndarray | None = None
    match_shift: np.ndarray | None = None


def evaluate_chain(shared: Shared, steps: list[Step], k: int, job_seed: int, forget_class: int | None,
                   watch: Callable[[int], None]) -> dict:
    """The `evaluate.oracles: K` section of a chained request's report; `shared.forget` is the cumulative set. The
    seeds are evaluate_with_oracles', so a one-request chain is judged against the same oracles."""
    oracles = train_many([Order("oracle", seed_for("oracle", job_seed, j)) for j in range(2 * k)],
                         replace(shared, algorithm=None), watch)
    originals = replay_many([Order("original", seed_for("original", job_seed, i)) for i in range(k)], shared, steps,
                            lambda done: watch(2 * k + done))
    report = klom_report(shared, k, originals, oracles, forget_class)
    report["replayed_requests"] = len(steps)
    return report


def replay_many(orders: list[Order], shared: Shared, steps: list[Step],
                watch: Callable[[int], None]) -> list[Trained]:
    """Train each original in a helper process (one thread each) and run the chain on it; the shape of
    ensemble.train_many, whose helpers unlearn once."""
    context = multiprocessing.get_context("spawn")
    results: list[Trained] = []
    with context.Pool(min(len(orders), usable_cpus()), initializer=_start, initargs=(shared, steps)) as pool:
        pending = pool.imap(_replay, orders)
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


_state: tuple[Shared, list[Step]] | None = None


def _start(shared: Shared, steps: list[Step]) -> None:
    global _state
    torch.set_num_threads(1)
    _state = (shared, steps)


def _replay(order: Order) -> Trained | HelperError:
    """In a helper process."""
    try:
        return replay_one(order, *_state)
    except Stop:
        return HelperError("budget")
    except JobFailure as failure:
        return HelperError(failure.code, failure.message, failure.error_class)
    except Exception:
        return HelperError("internal_error", traceback.format_exc(limit=4))


def replay_one(order: Order, s: Shared, steps: list[Step]) -> Trained:
    budget = Deadline(s.deadline)
    train_x, test_x = torch.from_numpy(s.train.x).float(), torch.from_numpy(s.test.x).float()
    started = time.perf_counter()
    model = fresh_model(s.recipe, s.train, order.seed)
    model = run_to_end(Fitting(model, s.recipe.params, train_x, torch.from_numpy(s.train.y).long(), test_x,
                               torch.from_numpy(s.test.y).long(), order.seed), budget)
    first = predict_logits(model, train_x).numpy()
    trained = Trained("original", order.seed, first, predict_logits(model, test_x).numpy(),
                      seconds=time.perf_counter() - started)
    started = time.perf_counter()
    for number, step in enumerate(steps):
        targets = None if step.match is None else first[step.match] + step.match_shift
        rows = make_rows(s.train, step.forget, s.test, CPU, step.match, targets)
        params = PARAMS[step.algorithm].model_validate(step.params)
        model = run_to_end(build_loop(step.algorithm, params, model, s.recipe, rows, order.seed + number), budget)
    trained.unlearn_seconds = time.perf_counter() - started
    trained.unlearned_train_logits = predict_logits(model, train_x).numpy()
    trained.unlearned_test_logits = predict_logits(model, test_x).numpy()
    return trained
