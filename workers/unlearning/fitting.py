"""Training from scratch the way the original model was trained — for retrains, oracles, the re-trained originals
KLoM compares and the datamodel's subset models — epoch by epoch, as `train/supervised` does it."""
import math
import time
from dataclasses import dataclass
from typing import Any, Protocol

import torch
import torch.nn.functional as F

from core.methods.train import TrainParams
from workers.checkpoints import optimizer_tensors, restore_optimizer
from workers.data import Dataset
from workers.evaluation import predict_logits
from workers.inputs import input_stats
from workers.methods.train import AUTO_MAX_EPOCHS, shift_images
from workers.models import Classifier, build_model
from workers.runtime import Stop
from workers.training import auto_batch_size, lr_factor, make_optimizer, set_lr, train_one_epoch


class Budget(Protocol):
    """What a loop asks every step: a JobRun in the job's process, a Deadline in a helper process."""
    def check(self, step: int | None = None) -> None: ...


class Deadline:
    """The budget of a loop that runs in a helper process: stop at a wall-clock time (the job's own deadline)."""

    def __init__(self, at: float):
        self.at = at

    def check(self, step: int | None = None) -> None:
        if time.time() >= self.at:
            raise Stop("budget", step)


@dataclass(frozen=True)
class Recipe:
    """How the original model was trained: its architecture and the `train` job's parameters."""
    arch: str
    args: dict[str, Any]
    params: TrainParams


def fresh_model(recipe: Recipe, rows: Dataset, seed: int) -> Classifier:
    """A new model seeded like a `train` job's; input standardisation comes from the rows it will be trained on."""
    torch.manual_seed(seed)
    mean, std = input_stats(rows)
    return build_model(recipe.arch, recipe.args, tuple(rows.x.shape[1:]), len(rows.classes), mean, std)


class Fitting:
    """Cross-entropy training with the recipe's optimizer, schedule and batch rule; keeps the epoch with the best
    validation accuracy (ties: lower validation loss), as `train/supervised` does."""

    def __init__(self, model: Classifier, params: TrainParams, x: torch.Tensor, y: torch.Tensor,
                 val_x: torch.Tensor, val_y: torch.Tensor, seed: int):
        self.model, self.p, self.seed = model, params, seed
        self.x, self.y, self.val_x, self.val_y = x, y, val_x, val_y
        self.optimizer = make_optimizer(params.optimizer, model, params.lr, params.weight_decay, params.momentum)
        self.epochs = AUTO_MAX_EPOCHS if params.epochs == "auto" else params.epochs
        self.batch_size = params.batch_size if params.batch_size != "auto" else auto_batch_size(len(y))
        self.best_key, self.best_epoch, self.best_state = (-1.0, -math.inf), -1, None

    def run_epoch(self, budget: Budget, epoch: int, step: int) -> tuple[dict[str, float], int]:
        p = self.p
        set_lr(self.optimizer, p.lr * (lr_factor(p.schedule, epoch, self.epochs) if p.epochs != "auto" else 1.0))

        def loss_of_batch(index: torch.Tensor) -> torch.Tensor:
            xb = self.x[index]
            if p.augment and xb.ndim == 4:
                xb = shift_images(xb)
            return F.cross_entropy(self.model(xb), self.y[index], label_smoothing=p.label_smoothing)

        loss, step = train_one_epoch(budget, self.model, self.optimizer, len(self.y), self.batch_size, loss_of_batch,
                                     seed=self.seed, epoch=epoch, step=step, lr_hint=p.lr)
        logits = predict_logits(self.model, self.val_x)
        accuracy = (logits.argmax(1) == self.val_y).float().mean().item()
        val_loss = F.cross_entropy(logits, self.val_y).item()
        if (accuracy, -val_loss) > self.best_key:
            self.best_key, self.best_epoch = (accuracy, -val_loss), epoch
            self.best_state = {k: v.detach().clone() for k, v in self.model.state_dict().items()}
        return {"train_loss": loss, "val_loss": val_loss, "val_accuracy": accuracy}, step

    def done(self, epoch: int) -> bool:
        """After `epoch` epochs: "auto" stops once validation has not improved for `patience` epochs."""
        return epoch >= self.epochs or (self.p.epochs == "auto" and epoch - self.best_epoch > self.p.patience)

    def result(self) -> Classifier:
        if self.best_state is not None:
            self.model.load_state_dict(self.best_state)
        return self.model.eval()

    def state(self) -> tuple[dict[str, dict[str, torch.Tensor]], dict[str, Any]]:
        tensors, meta = optimizer_tensors(self.optimizer)
        groups = {"model": self.model.state_dict(), "optimizer": tensors}
        if self.best_state is not None:
            groups["best"] = self.best_state
        return groups, {"optimizer": meta, "best_key": list(self.best_key), "best_epoch": self.best_epoch}

    def load_state(self, groups: dict[str, dict[str, torch.Tensor]], meta: dict[str, Any]) -> None:
        self.model.load_state_dict(groups["model"])
        restore_optimizer(self.optimizer, groups.get("optimizer", {}), meta["optimizer"], self.x.device)
        self.best_state = groups.get("best")
        self.best_key, self.best_epoch = tuple(meta["best_key"]), meta["best_epoch"]


def run_to_end(loop: Any, budget: Budget) -> Classifier:
    """Every epoch of a loop (a Fitting or an unlearning loop), for helper processes that report nothing."""
    epoch, step = 0, 0
    while not loop.done(epoch):
        _, step = loop.run_epoch(budget, epoch, step)
        epoch += 1
    return loop.result()
