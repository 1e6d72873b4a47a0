"""The unlearning loops, one small class per algorithm, all with the same shape: `run_epoch`, `done`, `result`,
`state`/`load_state`. Each starts from the original model except `retrain`, which starts from scratch."""
import copy
from dataclasses import dataclass
from typing import Any

import numpy as np
import torch
import torch.nn.functional as F

from core.catalog import Params
from core.methods.unlearn import (
    DmmParams,
    FinetuneParams,
    NegGradPlusParams,
    OracleMatchingParams,
    RetrainParams,
    ScrubParams,
)
from workers.checkpoints import optimizer_tensors, restore_optimizer
from workers.data import Dataset
from workers.evaluation import predict_logits
from workers.models import Classifier
from workers.training import auto_batch_size, lr_factor, make_optimizer, set_lr, train_one_epoch
from workers.unlearning.class_head import deleted_classes, refit_deleted_class
from workers.unlearning.fitting import Budget, Fitting, Recipe, fresh_model

PARAMS: dict[str, type[Params]] = {"retrain": RetrainParams, "finetune": FinetuneParams,
                                   "neggrad_plus": NegGradPlusParams, "scrub": ScrubParams, "dmm": DmmParams,
                                   "oracle_matching": OracleMatchingParams}
MATCHING = ("dmm", "oracle_matching")


@dataclass
class Rows:
    """The tensors a loop reads, on the training device. `retain` is kept as a Dataset for a retrain's input
    statistics; `match_x`/`match_y`/`match_margins` are the rows, labels and target margins of the matching
    algorithms."""
    retain: Dataset
    retain_x: torch.Tensor
    retain_y: torch.Tensor
    forget_x: torch.Tensor
    forget_y: torch.Tensor
    val_x: torch.Tensor
    val_y: torch.Tensor
    match_x: torch.Tensor | None = None
    match_y: torch.Tensor | None = None
    match_margins: torch.Tensor | None = None


def batch_size_for(value: int | str, rows: int) -> int:
    return value if value != "auto" else auto_batch_size(rows)


class Loop:
    """What every loop that starts from the original shares: an AdamW optimizer on `model` only, a cosine schedule
    over `epochs`, and checkpoint state."""

    def __init__(self, model: Classifier, epochs: int, lr: float, weight_decay: float, seed: int):
        self.model, self.epochs, self.lr, self.seed = model, epochs, lr, seed
        self.optimizer = make_optimizer("adamw", model, lr, weight_decay)

    def start_epoch(self, epoch: int) -> None:
        set_lr(self.optimizer, self.lr * lr_factor("cosine", epoch, self.epochs))

    def done(self, epoch: int) -> bool:
        return epoch >= self.epochs

    def result(self) -> Classifier:
        return self.model.eval()

    def state(self) -> tuple[dict[str, dict[str, torch.Tensor]], dict[str, Any]]:
        tensors, meta = optimizer_tensors(self.optimizer)
        return {"model": self.model.state_dict(), "optimizer": tensors}, {"optimizer": meta}

    def load_state(self, groups: dict[str, dict[str, torch.Tensor]], meta: dict[str, Any]) -> None:
        self.model.load_state_dict(groups["model"])
        restore_optimizer(self.optimizer, groups.get("optimizer", {}), meta["optimizer"],
                          next(self.model.parameters()).device)


class Finetune(Loop):
    """Cross-entropy on the retain set only: the forget set fades as the model keeps training without it."""

    def __init__(self, model: Classifier, p: FinetuneParams, rows: Rows, weight_decay: float, seed: int):
        super().__init__(model, p.epochs, p.lr, weight_decay, seed)
        self.rows, self.batch_size = rows, batch_size_for(p.batch_size, len(rows.retain_y))

    def run_epoch(self, budget: Budget, epoch: int, step: int) -> tuple[dict[str, float], int]:
        self.start_epoch(epoch)
        r = self.rows
        loss, step = train_one_epoch(budget, self.model, self.optimizer, len(r.retain_y), self.batch_size,
                                     lambda i: F.cross_entropy(self.model(r.retain_x[i]), r.retain_y[i]),
                                     seed=self.seed, epoch=epoch, step=step, lr_hint=self.lr)
        return {"retain_loss": loss}, step


class ForgetBatches:
    """Forget-set batches drawn in seeded shuffles, cycled so every retain batch gets one."""

    def __init__(self, rows: int, seed: int):
        self.rows, self.generator = rows, torch.Generator().manual_seed(seed)
        self.order, self.at = torch.randperm(rows, generator=self.generator), 0

    def take(self, size: int) -> torch.Tensor:
        size = min(size, self.rows)
        if self.at + size > self.rows:
            self.order, self.at = torch.randperm(self.rows, generator=self.generator), 0
        batch = self.order[self.at:self.at + size]
        self.at += size
        return batch


class NegGradPlus(Loop):
    """NegGrad+ (Kurmanji et al., Towards Unbounded Machine Unlearning): descend on the retain loss while ascending
    on the forget loss, alpha·CE(retain) − (1 − alpha)·CE(forget), one forget batch per retain batch."""

    def __init__(self, model: Classifier, p: NegGradPlusParams, rows: Rows, weight_decay: float, seed: int):
        super().__init__(model, p.epochs, p.lr, weight_decay, seed)
        self.rows, self.alpha = rows, p.alpha
        self.batch_size = batch_size_for(p.batch_size, len(rows.retain_y))
        self.forget_batches = ForgetBatches(len(rows.forget_y), seed)

    def run_epoch(self, budget: Budget, epoch: int, step: int) -> tuple[dict[str, float], int]:
        self.start_epoch(epoch)
        r = self.rows

        def loss_of_batch(index: torch.Tensor) -> torch.Tensor:
            forget = self.forget_batches.take(len(index)).to(index.device)
            retain_loss = F.cross_entropy(self.model(r.retain_x[index]), r.retain_y[index])
            forget_loss = F.cross_entropy(self.model(r.forget_x[forget]), r.forget_y[forget])
            return self.alpha * retain_loss - (1 - self.alpha) * forget_loss

        loss, step = train_one_epoch(budget, self.model, self.optimizer, len(r.retain_y), self.batch_size,
                                     loss_of_batch, seed=self.seed, epoch=epoch, step=step, lr_hint=self.lr)
        return {"loss": loss}, step


def distill_kl(student_logits: torch.Tensor, teacher_logits: torch.Tensor, temperature: float) -> torch.Tensor:
    """KL(teacher ‖ student) on temperature-softened outputs, times T² so gradients keep their scale (Hinton et al.,
    Distilling the Knowledge in a Neural Network)."""
    return F.kl_div(F.log_softmax(student_logits / temperature, dim=1), F.softmax(teacher_logits / temperature, dim=1),
                    reduction="batchmean") * temperature ** 2


class Scrub(Loop):
    """SCRUB (Kurmanji et al., Towards Unbounded Machine Unlearning). The student starts as the original and the
    teacher is a frozen copy of it. Max-steps push the student's outputs on the forget set away from the teacher's;
    min-steps keep it close to the teacher (KL) and correct (CE) on the retain set. Only the student's parameters are
    in the optimizer — a public port hands the teacher's to it, which unlearns nothing."""

    def __init__(self, model: Classifier, p: ScrubParams, rows: Rows, weight_decay: float, seed: int):
        super().__init__(model, p.epochs, p.lr, weight_decay, seed)
        self.teacher = copy.deepcopy(model).eval().requires_grad_(False)
        self.p, self.rows = p, rows
        self.retain_batch = batch_size_for(p.batch_size, len(rows.retain_y))
        self.forget_batch = batch_size_for(p.batch_size, len(rows.forget_y))

    def run_epoch(self, budget: Budget, epoch: int, step: int) -> tuple[dict[str, float], int]:
        self.start_epoch(epoch)
        p, r, metrics = self.p, self.rows, {}
        if epoch < p.max_epochs:
            def max_loss(index: torch.Tensor) -> torch.Tensor:
                with torch.no_grad():
                    teacher = self.teacher(r.forget_x[index])
                return -distill_kl(self.model(r.forget_x[index]), teacher, p.temperature)

            # Shuffles seeded apart from the min-steps' so the two passes do not see the same order.
            loss, step = train_one_epoch(budget, self.model, self.optimizer, len(r.forget_y), self.forget_batch,
                                         max_loss, seed=self.seed + 1, epoch=epoch, step=step, lr_hint=p.lr)
            metrics["forget_kl"] = -loss

        def min_loss(index: torch.Tensor) -> torch.Tensor:
            with torch.no_grad():
                teacher = self.teacher(r.retain_x[index])
            student = self.model(r.retain_x[index])
            return p.gamma * F.cross_entropy(student, r.retain_y[index]) + p.alpha * distill_kl(student, teacher,
                                                                                                p.temperature)

        metrics["retain_loss"], step = train_one_epoch(budget, self.model, self.optimizer, len(r.retain_y),
                                                       self.retain_batch, min_loss, seed=self.seed, epoch=epoch,
                                                       step=step, lr_hint=p.lr)
        return metrics, step


def margins(logits: torch.Tensor, labels: torch.Tensor) -> torch.Tensor:
    """z_y − logsumexp of the other logits, per row (klom.margins in torch)."""
    own = F.one_hot(labels, logits.shape[1]).bool()
    return logits[own] - torch.logsumexp(logits.masked_fill(own, -torch.inf), dim=1)


class Matching(Loop):
    """Fine-tune to what a retrained model would output, with MSE, on the forget rows plus a sample of retain rows
    (Georgiev et al., Attribute-to-Delete): the model's own outputs moved by a shift predicted by the datamodel (dmm)
    or measured on real retrains (oracle_matching). The paper matches logits; this matches margins, the quantity KLoM
    compares. On digits, logit MSE toward the same targets left the forget rows' margins where they were (their
    accuracy unchanged at 0.986, KLoM95 5.8) when the shift was on one logit; margin MSE moved them (0.980, 3.6)."""

    def __init__(self, model: Classifier, p: DmmParams | OracleMatchingParams, rows: Rows, weight_decay: float,
                 seed: int):
        super().__init__(model, p.epochs, matching_lr(p.lr, model), weight_decay, seed)
        if rows.match_x is None or rows.match_y is None or rows.match_margins is None:
            raise ValueError("matching needs match_x, match_y and match_margins")
        self.rows = rows
        if p.layers == "head":  # AdamW skips parameters without gradients: only the output layer moves
            for parameter in model.parameters():
                parameter.requires_grad_(False)
            model.head.requires_grad_(True)
        for deleted in deleted_classes(rows.retain_y, rows.forget_y):
            refit_deleted_class(model, rows.match_x, rows.match_y, rows.match_margins, deleted)
        self.batch_size = batch_size_for(p.batch_size, len(rows.match_x))

    def run_epoch(self, budget: Budget, epoch: int, step: int) -> tuple[dict[str, float], int]:
        self.start_epoch(epoch)
        r = self.rows

        def loss_of_batch(index: torch.Tensor) -> torch.Tensor:
            # The targets are outputs of deployed (eval-mode) models, so dropout stays off while matching them.
            self.model.eval()
            return F.mse_loss(margins(self.model(r.match_x[index]), r.match_y[index]), r.match_margins[index])

        loss, step = train_one_epoch(budget, self.model, self.optimizer, len(r.match_x), self.batch_size,
                                     loss_of_batch, seed=self.seed, epoch=epoch, step=step, lr_hint=self.lr)
        return {"match_mse": loss}, step


# dmm's lr "auto". Swept with bench/unlearn_sweep.py on the mnist5k CNN (K = 8, random 10 %; KLoM95 forget / retain /
# test, floor 4.19 / 4.19 / 4.67, do nothing 8.45 / 5.02 / 5.04): 2e-3 (the MLP's) 6.76 / 9.10 / 7.91 and test accuracy
# 0.921 against the retrain's 0.968; 1e-3 5.54 / 6.04 / 5.06, 0.959; 5e-4 6.76 / 4.67 / 4.75, 0.969. On the digits
# MLP 2e-3 meets every target (tests/test_unlearn.py).
MATCHING_LR = {"dense": 2e-3, "convolutional": 5e-4}


def matching_lr(lr: float | str, model: torch.nn.Module) -> float:
    if lr != "auto":
        return float(lr)
    convolutional = any(isinstance(m, torch.nn.modules.conv._ConvNd) for m in model.modules())
    return MATCHING_LR["convolutional" if convolutional else "dense"]


def retrain_params(recipe: Recipe, p: RetrainParams):
    """The original recipe with the user's overrides."""
    overrides = {k: v for k, v in p.model_dump().items() if v is not None}
    return recipe.params.model_copy(update=overrides)


def build_loop(algorithm: str, params: Params, original: Classifier, recipe: Recipe, rows: Rows, seed: int):
    """The loop for `algorithm`; every loop but retrain updates `original` in place."""
    weight_decay = recipe.params.weight_decay
    if algorithm == "retrain":
        model = fresh_model(recipe, rows.retain, seed).to(rows.retain_x.device)
        return Fitting(model, retrain_params(recipe, params), rows.retain_x, rows.retain_y, rows.val_x, rows.val_y,
                       seed)
    loops = {"finetune": Finetune, "neggrad_plus": NegGradPlus, "scrub": Scrub, "dmm": Matching,
             "oracle_matching": Matching}
    return loops[algorithm](original, params, rows, weight_decay, seed)


def match_rows(forget: np.ndarray, retain_multiple: int, seed: int) -> np.ndarray:
    """Training-row indices matched by dmm / oracle_matching: every forget row and `retain_multiple` times as many
    retain rows drawn at random (all of them when there are fewer)."""
    forget_rows, retain_rows = np.flatnonzero(forget), np.flatnonzero(~forget)
    count = min(len(retain_rows), retain_multiple * len(forget_rows))
    sample = np.random.default_rng(seed).choice(retain_rows, count, replace=False)
    return np.sort(np.concatenate([forget_rows, sample]))


def matching_targets(model: torch.nn.Module, train: Dataset, match: np.ndarray, shift: np.ndarray) -> np.ndarray:
    """The matched rows' target logits: `model`'s own plus the shift a retrain would make."""
    return predict_logits(model, torch.from_numpy(train.x[match]).float()).numpy() + shift


def make_rows(train: Dataset, forget: np.ndarray, test: Dataset, device: torch.device,
              match: np.ndarray | None = None, targets: np.ndarray | None = None) -> Rows:
    """Tensors for the loops from the training rows, the forget mask over them and the test rows; `targets` are the
    target logits of the matched rows `match`."""
    def tensors(rows: Dataset) -> tuple[torch.Tensor, torch.Tensor]:
        return torch.from_numpy(rows.x).float().to(device), torch.from_numpy(rows.y).long().to(device)

    retain = train.subset(~forget)
    rows = Rows(retain, *tensors(retain), *tensors(train.subset(forget)), *tensors(test))
    if match is not None and targets is not None:
        rows.match_x = torch.from_numpy(train.x[match]).float().to(device)
        rows.match_y = torch.from_numpy(train.y[match]).long().to(device)
        rows.match_margins = margins(torch.from_numpy(np.asarray(targets, dtype=np.float32)), rows.match_y.cpu()).to(
            device)
    return rows
