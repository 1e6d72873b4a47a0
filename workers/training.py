"""Building blocks every recipe's loop shares: device choice, optimizers and schedules, seeded epoch shuffles, and
one epoch of optimisation with the per-step budget/cancel check and a NaN guard. The loss is the recipe's own. The
same epoch runs data-parallel on every rank of a multi-device job (workers/distributed.py)."""
import math
from collections.abc import Callable, Iterable, Iterator
from typing import Any

import torch

from workers import distributed
from workers.errors import JobFailure
from workers.runtime import JobRun


def pick_device(setting: str) -> torch.device:
    rank_device = distributed.device()
    if rank_device is not None:  # a rank of a multi-device job trains on its own device
        return rank_device
    if setting == "cuda" or (setting == "auto" and torch.cuda.is_available()):
        return torch.device("cuda")
    return torch.device("cpu")


def make_optimizer(name: str, model: torch.nn.Module, lr: float, weight_decay: float = 0.0,
                   momentum: float = 0.9) -> torch.optim.Optimizer:
    if name == "sgd":
        return torch.optim.SGD(model.parameters(), lr=lr, momentum=momentum, weight_decay=weight_decay,
                               nesterov=momentum > 0)
    cls = torch.optim.AdamW if name == "adamw" else torch.optim.Adam
    return cls(model.parameters(), lr=lr, weight_decay=weight_decay)


def lr_factor(schedule: str, epoch: int, epochs: int) -> float:
    if schedule == "cosine":
        return 0.5 * (1 + math.cos(math.pi * epoch / epochs))
    if schedule == "step":
        return 0.1 ** (epoch // max(1, epochs // 3))
    return 1.0


def set_lr(optimizer: torch.optim.Optimizer, lr: float) -> None:
    for group in optimizer.param_groups:
        group["lr"] = lr


def auto_batch_size(rows: int) -> int:
    """min(64, max(8, rows // 16)): small tables still get enough optimizer steps per epoch."""
    return min(64, max(8, rows // 16))


def epoch_batches(rows: int, batch_size: int, seed: int, epoch: int, device: torch.device) -> Iterator[torch.Tensor]:
    """Index batches of one epoch. Seeded by (seed, epoch), so a resumed attempt replays exactly the shuffles the
    lost attempt would have made; dropout's RNG is reseeded the same way."""
    generator = torch.Generator().manual_seed(seed * 100003 + epoch)
    torch.manual_seed(seed * 100003 + epoch)
    order = torch.randperm(rows, generator=generator).to(device)
    for start in range(0, rows, batch_size):
        yield order[start:start + batch_size]


def train_one_epoch(run: JobRun, model: torch.nn.Module, optimizer: torch.optim.Optimizer, rows: int,
                    batch_size: int, loss_of_batch: Callable[[Any], torch.Tensor], *, seed: int, epoch: int,
                    step: int, lr_hint: float | None = None, batches: Iterable[Any] | None = None,
                    rows_of: Callable[[Any], int] = len) -> tuple[float, int]:
    """One pass over `rows` in seeded batches: `loss_of_batch(indices)` gives the loss to minimise (a mean over the
    batch's rows). Checks the budget and cancel flag before every step. Returns (mean loss, new global step).

    `batches` replaces the seeded index batches with another source (a streamed dataset's (x, y) batches);
    `rows_of(batch)` then says how many rows each one holds.

    In a multi-device job every rank makes the same call: each takes its slice of every seeded global batch (batches
    from another source are already this rank's), DDP averages the gradients, and all ranks stop at the step rank 0
    decides; the loss returned is the mean over every rank's rows."""
    model.train()
    total, seen = 0.0, 0
    if batches is None:
        batches = distributed.rank_slices(epoch_batches(rows, batch_size, seed, epoch, next(model.parameters()).device))
    replica = distributed.replica(model, optimizer, loss_of_batch)
    for batch, rows_here, rows_all in replica.steps(run, batches, step, rows_of):
        loss, step_loss = replica.loss(batch, rows_here, rows_all)
        if not torch.isfinite(step_loss):
            hint = f" (now {lr_hint})" if lr_hint is not None else ""
            raise JobFailure("nan_loss", f"The loss became {step_loss.item()} at step {step}; lower params.lr{hint} "
                             "or check the inputs for extreme values.")
        optimizer.zero_grad(set_to_none=True)
        loss.backward()
        optimizer.step()
        step += 1
        total += step_loss.item() * rows_all
        seen += rows_all
        if isinstance(run, JobRun):  # a helper process's Deadline has no heartbeat to report throughput through
            run.count_samples(rows_all)
    replica.close()
    return total / max(1, seen), step
