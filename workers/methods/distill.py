"""`distill` recipes. `kd`, `multi_teacher` and `ensemble` share one teacher → student loop and differ in how the
teachers' logits become targets; `dataset` learns a small synthetic training set. Helpers: workers/distillation/."""
import json
import math
import time
from collections.abc import Callable
from typing import Any

import numpy as np
import torch
import torch.nn.functional as F
from torch import nn

from core.methods.distill import (
    SMALL_EVAL_MODELS,
    DatasetParams,
    EnsembleParams,
    KDParams,
    MultiTeacherParams,
    StudentTraining,
)
from workers import distributed
from workers.checkpoints import optimizer_tensors, pack, restore_optimizer
from workers.distillation import comparison
from workers.distillation.distribution_matching import DistributionMatching
from workers.distillation.fresh_models import compare_training_sets, fresh_model, summarize, synthetic_dataset
from workers.distillation.losses import HINT_LOSSES, SOFT_LOSSES
from workers.distillation.students import build_student, rebuild
from workers.distillation.synthetic import Standardizer, check_ipc, initial_synthetic, save_synthetic
from workers.distillation.targets import (
    BalancedTeachers,
    EnsembleAverage,
    SingleTeacher,
    TargetStrategy,
    ensemble_logits,
)
from workers.distillation.teachers import Teacher, load_teachers, logits_and_features, teacher_outputs
from workers.distillation.trajectory_matching import TrajectoryMatching
from workers.distillation.transfer import load_transfer_inputs
from workers.errors import JobFailure
from workers.evaluation import predict_logits
from workers.inputs import load_train_and_validation, to_tensors
from workers.methods import Outcome, register
from workers.methods.train import shift_images
from workers.models import default_arch
from workers.outputs import publish_model
from workers.runtime import JobRun, Stop
from workers.training import auto_batch_size, lr_factor, make_optimizer, pick_device, set_lr, train_one_epoch

# Exporting and measuring the published model, on top of the fresh-model comparison.
MEASURE_SECONDS = 5.0


class Curves(dict):
    """name → [[epoch, value], …], as report.json's `curves` and the checkpoint carry them."""

    def add(self, epoch: int, values: dict[str, float]) -> None:
        for name, value in values.items():
            self.setdefault(name, []).append([epoch, value])


class BestModel:
    """The best validation checkpoint of one model: highest accuracy, ties broken by lower loss (as `train` keeps)."""

    def __init__(self):
        self.accuracy, self.loss, self.epoch, self.state = -1.0, math.inf, -1, None

    def offer(self, model: nn.Module, epoch: int, accuracy: float, loss: float) -> None:
        if (accuracy, -loss) > (self.accuracy, -self.loss):
            self.accuracy, self.loss, self.epoch = accuracy, loss, epoch
            self.state = {k: v.detach().clone() for k, v in model.state_dict().items()}

    def meta(self) -> dict[str, Any]:
        return {"accuracy": self.accuracy, "loss": self.loss, "epoch": self.epoch}

    def restore(self, meta: dict[str, Any], state: dict[str, torch.Tensor] | None) -> None:
        self.accuracy, self.loss, self.epoch, self.state = meta["accuracy"], meta["loss"], meta["epoch"], state


def validation_scores(model: nn.Module, x: torch.Tensor, y: torch.Tensor) -> tuple[float, float]:
    logits = predict_logits(model, x)
    return (logits.argmax(1) == y).float().mean().item(), F.cross_entropy(logits, y).item()


class StudentDistillation:
    """The teacher → student loop. Rows are the labeled training rows followed by the transfer rows (label -1);
    labeled rows learn α·soft + (1-α)·hard, transfer rows the soft targets alone. With `baseline`, the student's
    from-scratch twin (same architecture, same initial weights, same shuffles and schedule) trains on the labeled
    rows in the same epochs, so a budget stop cuts both at the same point; its model.onnx is published as
    baseline.onnx."""

    data_parallel = True  # trains through train_one_epoch and ends training with distributed.training_done()

    def __init__(self, params_model: type[StudentTraining],
                 make_strategy: Callable[[StudentTraining, int], TargetStrategy]):
        self.params_model = params_model
        self.make_strategy = make_strategy

    # --- setup ---------------------------------------------------------------------------------------------------
    def setup(self, run: JobRun) -> None:
        self.p = self.params_model.model_validate(run.params)
        # The hint loss is kd's alone: several teachers' features have no common space to regress.
        self.hint_weight = self.p.hint_weight if isinstance(self.p, KDParams) else 0.0
        self.hint_loss = HINT_LOSSES[self.p.hint_loss] if isinstance(self.p, KDParams) else None
        torch.manual_seed(run.spec.seed)
        self.device = pick_device(run.settings.device)
        self._load_data(run)
        self._build_student(run)
        self._cache_teachers(run)
        self._build_optimizers(run)
        self.epoch, self.step, self.baseline_step = 0, 0, 0
        self.best, self.baseline_best = BestModel(), BestModel()
        self.curves = Curves()
        self.seconds = {"student": 0.0, "baseline": 0.0}

    def _load_data(self, run: JobRun) -> None:
        self.train, self.val = load_train_and_validation(run, run.spec.dataset, run.spec.seed)
        refs, field = ([run.spec.model], "model") if run.spec.model is not None else (run.spec.teachers, "teachers")
        self.teachers = load_teachers(run, refs, field, self.train, self.device)
        transfer = (load_transfer_inputs(run, run.spec.transfer, self.train) if run.spec.transfer is not None
                    else np.zeros((0, *self.train.x.shape[1:]), dtype=np.float32))
        run.event("data.loaded", f"Loaded {len(self.train.y)} labeled training rows, {len(transfer)} unlabeled "
                  f"transfer rows and {len(self.val.y)} validation rows; {len(self.teachers)} teacher(s).",
                  train_rows=len(self.train.y), transfer_rows=len(transfer), validation_rows=len(self.val.y),
                  teachers=len(self.teachers))
        self.x = torch.from_numpy(np.concatenate([self.train.x, transfer])).float().to(self.device)
        self.y = torch.cat([torch.from_numpy(self.train.y).long(),
                            torch.full((len(transfer),), -1, dtype=torch.long)]).to(self.device)
        self.labeled_rows, self.transfer_rows = len(self.train.y), len(transfer)
        self.val_x, self.val_y = to_tensors(self.val, self.device)

    def _build_student(self, run: JobRun) -> None:
        self.student, self.student_info, self.built = build_student(run.spec.student, self.teachers, self.train,
                                                                    run.spec.seed)
        self.student.to(self.device)
        run.event("model.built", f"Student {self.built['arch']} {self.built['args']} with {self.built['params']} "
                  f"parameters ({self.built['params_ratio']:.3f}x the teacher's {self.built['teacher_params']}).",
                  **self.built)

    def _cache_teachers(self, run: JobRun) -> None:
        """The teachers' logits on every row, once: targets for un-augmented batches, and what the strategy fits
        (MTARD's temperatures) in any case."""
        started = time.perf_counter()
        self.teacher_logits, self.teacher_features = teacher_outputs(self.teachers, self.x, self.hint_weight > 0)
        self.strategy = self.make_strategy(self.p, len(self.teachers))
        self.strategy.fit(self.teacher_logits)
        seconds = time.perf_counter() - started
        reuse = ("augmented batches are relabelled by the teachers each step" if self.p.augment
                 else "reused every epoch")
        run.event("teachers.cached", f"Teacher logits for {len(self.x)} rows computed once in {seconds:.2f}s; "
                  f"{reuse}.", seconds=round(seconds, 3), cached=not self.p.augment)

    def _build_optimizers(self, run: JobRun) -> None:
        p = self.p
        self.soft_loss = SOFT_LOSSES[p.soft_loss]
        self.regressor = self._hint_regressor()
        trained = nn.ModuleList([self.student] + ([self.regressor] if self.regressor is not None else []))
        self.optimizer = make_optimizer(p.optimizer, trained, p.lr, p.weight_decay, p.momentum)
        self.baseline: nn.Module | None = None
        if p.baseline:
            self.baseline = rebuild(self.student_info, self.train, run.spec.seed).to(self.device)
            self.baseline_optimizer = make_optimizer(p.optimizer, self.baseline, p.lr, p.weight_decay, p.momentum)
        self.epochs = min(p.epochs, run.spec.budget.max_epochs or p.epochs)
        self.batch_size = p.batch_size if p.batch_size != "auto" else auto_batch_size(len(self.y))
        # "auto" sizes the twin's batches by its own (labeled) rows, as a `train` job on them would.
        self.baseline_batch_size = p.batch_size if p.batch_size != "auto" else auto_batch_size(self.labeled_rows)

    def _hint_regressor(self) -> nn.Linear | None:
        """FitNets' regressor from the student's penultimate features to the teacher's (trained with the student,
        not published)."""
        if self.hint_weight == 0:
            return None
        with torch.no_grad():
            self.student.eval()
            _, features = logits_and_features(self.student, self.x[:2])
        return nn.Linear(features.shape[1], self.teacher_features.shape[1]).to(self.device)

    # --- checkpoints ---------------------------------------------------------------------------------------------
    def save_checkpoint(self) -> tuple[dict[str, dict[str, torch.Tensor]], dict[str, Any]]:
        tensors, optimizer_meta = optimizer_tensors(self.optimizer)
        groups = {"model": self.student.state_dict(), "optimizer": tensors}
        meta: dict[str, Any] = {"epoch": self.epoch, "step": self.step, "metric_step": self.epoch,
                                "baseline_step": self.baseline_step, "optimizer": optimizer_meta,
                                "best": self.best.meta(), "curves": self.curves, "seconds": self.seconds,
                                "strategy": self.strategy.state()}
        if self.best.state is not None:
            groups["best"] = self.best.state
        if self.regressor is not None:
            groups["regressor"] = self.regressor.state_dict()
        if self.baseline is not None:
            tensors, meta["baseline_optimizer"] = optimizer_tensors(self.baseline_optimizer)
            groups.update(baseline=self.baseline.state_dict(), baseline_optimizer=tensors)
            meta["baseline_best"] = self.baseline_best.meta()
            if self.baseline_best.state is not None:
                groups["baseline_best"] = self.baseline_best.state
        return groups, meta

    def load_checkpoint(self, groups: dict[str, dict[str, torch.Tensor]], meta: dict[str, Any]) -> None:
        self.student.load_state_dict(groups["model"])
        restore_optimizer(self.optimizer, groups.get("optimizer", {}), meta["optimizer"], self.device)
        self.best.restore(meta["best"], groups.get("best"))
        if self.regressor is not None:
            self.regressor.load_state_dict(groups["regressor"])
        if self.baseline is not None:
            self.baseline.load_state_dict(groups["baseline"])
            restore_optimizer(self.baseline_optimizer, groups.get("baseline_optimizer", {}),
                              meta["baseline_optimizer"], self.device)
            self.baseline_best.restore(meta["baseline_best"], groups.get("baseline_best"))
        self.epoch, self.step, self.baseline_step = meta["epoch"], meta["step"], meta["baseline_step"]
        self.curves, self.seconds = Curves(meta["curves"]), meta["seconds"]
        self.strategy.load_state(meta["strategy"])

    def evaluate(self) -> dict[str, float]:
        accuracy, loss = validation_scores(self.student, self.val_x, self.val_y)
        return {"val_accuracy": accuracy, "val_loss": loss}

    # --- the loop ------------------------------------------------------------------------------------------------
    def run(self, run: JobRun) -> Outcome:
        stopped_by = "completed"
        total_steps = self.epochs * math.ceil(len(self.y) / self.batch_size)
        if self.epoch == 0:
            self.strategy.update(self._initial_soft_losses())
        try:
            while self.epoch < self.epochs:
                self._epoch(run, total_steps)
        except Stop as stop:
            stopped_by = run.budget_reached(stop, f"Budget reached after {self.epoch} full epochs; keeping the best "
                                            "student.")
        distributed.training_done()
        if self.best.state is None:
            raise JobFailure("budget_exhausted", "The budget ran out before the student finished one epoch; raise "
                             "budget.max_seconds or lower params.epochs.")
        self.student.load_state_dict(self.best.state)
        if self.baseline is not None and self.baseline_best.state is not None:
            self.baseline.load_state_dict(self.baseline_best.state)
        run.event("distill.finished", f"Best student validation accuracy {self.best.accuracy:.4f} at epoch "
                  f"{self.best.epoch + 1}.", best_accuracy=self.best.accuracy, best_epoch=self.best.epoch + 1)
        return self._publish(run, stopped_by)

    def _epoch(self, run: JobRun, total_steps: int) -> None:
        p, seed = self.p, run.spec.seed
        lr = p.lr * lr_factor(p.schedule, self.epoch, self.epochs)
        set_lr(self.optimizer, lr)
        # Running sums stay tensors on the training device: no host sync per step.
        zero = torch.zeros((), device=self.device)
        self.sums = {"soft": torch.zeros(len(self.strategy.weights()), device=self.device), "hard": zero,
                     "hint": zero, "labeled": zero, "rows": zero}
        started = time.perf_counter()
        train_loss, self.step = train_one_epoch(run, self.student, self.optimizer, len(self.y), self.batch_size,
                                                self._student_loss, seed=seed, epoch=self.epoch, step=self.step,
                                                lr_hint=p.lr)
        self.seconds["student"] += time.perf_counter() - started
        sums = {name: distributed.sum_over_ranks(total).cpu() for name, total in self.sums.items()}
        soft_means = sums["soft"] / sums["rows"].clamp_min(1)
        self.strategy.update(soft_means)
        scores = self.evaluate()
        self.best.offer(self.student, self.epoch, scores["val_accuracy"], scores["val_loss"])
        values = {"train_loss": train_loss, "soft_loss": float(soft_means @ self.strategy.weights()),
                  "hard_loss": float(sums["hard"] / sums["labeled"].clamp_min(1)), **scores, "lr": lr}
        if self.regressor is not None:
            values["hint_loss"] = float(sums["hint"] / sums["rows"].clamp_min(1))
        if isinstance(self.strategy, BalancedTeachers):
            values.update({f"weight_teacher_{k + 1}": float(w) for k, w in enumerate(self.strategy.weights())})
        if self.baseline is not None:
            values.update(self._baseline_epoch(run, lr))
        self.epoch += 1
        self.curves.add(self.epoch, values)
        run.metrics(self.epoch, values)
        run.progress(self.step, total_steps, epoch=self.epoch)  # the twin trains in lockstep, epoch by epoch
        run.event("distill.epoch", f"Epoch {self.epoch}/{self.epochs}: loss {train_loss:.4f}, student val accuracy "
                  f"{scores['val_accuracy']:.4f}" + (f", baseline {values['baseline_val_accuracy']:.4f}"
                                                     if self.baseline is not None else "") + ".",
                  level="debug", epoch=self.epoch, **{k: round(v, 5) for k, v in values.items()})
        if run.checkpoint_due():
            groups, meta = self.save_checkpoint()
            run.save_checkpoint(pack(groups), meta)

    def _baseline_epoch(self, run: JobRun, lr: float) -> dict[str, float]:
        set_lr(self.baseline_optimizer, lr)
        started = time.perf_counter()

        def loss_of_batch(index: torch.Tensor) -> torch.Tensor:
            x = self.x[index]
            if self.p.augment and x.ndim == 4:
                x = shift_images(x)
            return F.cross_entropy(self.baseline(x), self.y[index])

        # Same seed, so with no transfer rows the twin sees exactly the student's shuffles.
        loss, self.baseline_step = train_one_epoch(run, self.baseline, self.baseline_optimizer, self.labeled_rows,
                                                   self.baseline_batch_size, loss_of_batch, seed=run.spec.seed,
                                                   epoch=self.epoch, step=self.baseline_step, lr_hint=self.p.lr)
        self.seconds["baseline"] += time.perf_counter() - started
        accuracy, val_loss = validation_scores(self.baseline, self.val_x, self.val_y)
        self.baseline_best.offer(self.baseline, self.epoch, accuracy, val_loss)
        return {"baseline_train_loss": loss, "baseline_val_accuracy": accuracy, "baseline_val_loss": val_loss}

    def _teacher_batch(self, index: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor | None]:
        """Inputs, teacher logits [K, B, C] and teacher features for one batch: cached rows, or for augmented
        inputs the teachers' answers on exactly the shifted images the student sees ("Knowledge distillation: A
        good teacher is patient and consistent")."""
        x = self.x[index]
        if not (self.p.augment and x.ndim == 4):
            features = self.teacher_features[index] if self.teacher_features is not None else None
            return x, self.teacher_logits[:, index], features
        x = shift_images(x)
        logits, features = teacher_outputs(self.teachers, x, self.regressor is not None)
        return x, logits, features

    def _student_loss(self, index: torch.Tensor) -> torch.Tensor:
        p = self.p
        x, teacher_logits, teacher_features = self._teacher_batch(index)
        targets, weights = self.strategy.targets(teacher_logits), self.strategy.weights().to(self.device)
        if self.regressor is not None:
            logits, features = logits_and_features(self.student, x)
        else:
            logits = self.student(x)
        soft_each = torch.stack([self.soft_loss(logits, target, p.temperature) for target in targets])  # [K', B]
        soft = (weights[:, None] * soft_each).sum(0)
        labels = self.y[index]
        labeled = labels >= 0
        hard = F.cross_entropy(logits, labels.clamp_min(0), reduction="none")
        per_row = torch.where(labeled, p.alpha * soft + (1 - p.alpha) * hard, soft)
        loss = per_row.mean()
        self.sums["soft"] += soft_each.detach().sum(1)
        self.sums["hard"] += (hard.detach() * labeled).sum()
        self.sums["labeled"] += labeled.sum()
        self.sums["rows"] += len(index)
        if self.regressor is not None:
            hint = self.hint_loss(self.regressor(features), teacher_features)
            loss = loss + self.hint_weight * hint.mean()
            self.sums["hint"] += hint.detach().sum()
        return loss

    @torch.no_grad()
    def _initial_soft_losses(self) -> torch.Tensor:
        """Each target's mean soft loss for the untrained student: the reference of MTARD's relative losses."""
        logits = predict_logits(self.student, self.x)
        targets = self.strategy.targets(self.teacher_logits)
        return torch.stack([self.soft_loss(logits, target, self.p.temperature).mean() for target in targets]).cpu()

    # --- report --------------------------------------------------------------------------------------------------
    def _publish(self, run: JobRun, stopped_by: str) -> Outcome:
        run.event("report.started", "Scoring and measuring the teachers, the student and the baseline.")
        directory = run.workdir / "compare"
        teacher_logits = torch.stack([comparison.logits_on(t.model, self.val_x) for t in self.teachers])
        reference = self._reference_logits(teacher_logits)
        student = self._scored("student (distilled)", self.student, reference, directory / "student")
        teachers = [self._teacher_entry(teacher, logits, student["logits"], directory / f"teacher-{index}")
                    for index, (teacher, logits) in enumerate(zip(self.teachers, teacher_logits, strict=True))]
        summary = {"teacher_accuracy": max(t["accuracy"] for t in teachers), "student_accuracy": student["accuracy"],
                   "agreement": student["agreement_with_teacher"]}
        rows = [comparison.comparison_row(entry) for entry in (*teachers, student)]
        sections: dict[str, Any] = {"teachers": teachers}
        if isinstance(self.strategy, EnsembleAverage):
            summary.update(self._ensemble_summary(teachers, reference, student))
            rows.insert(0, comparison.combined_row(f"ensemble of {len(teachers)}", teachers,
                                                   summary["ensemble_accuracy"]))
        if self.baseline is not None:
            baseline = self._scored("student from scratch (baseline)", self.baseline, reference,
                                    directory / "baseline")
            baseline["best_epoch"] = self.baseline_best.epoch + 1
            sections["baseline"] = {k: v for k, v in baseline.items() if k != "logits"}
            rows.append(comparison.comparison_row(baseline))
            run.add_artifact(directory / "baseline" / "model.onnx", "baseline.onnx")
            summary.update(baseline_accuracy=baseline["accuracy"],
                           distillation_gain=round(student["accuracy"] - baseline["accuracy"], 5))
            if summary["distillation_gain"] <= 0:
                run.event("distill.no_gain", f"Distillation did not help here: the student scores "
                          f"{student['accuracy']:.4f}, its from-scratch twin {baseline['accuracy']:.4f}. A smaller "
                          "student, more epochs or unlabeled transfer data usually change that.", level="warning",
                          distillation_gain=summary["distillation_gain"])
        sections["comparison"] = rows
        sections["distillation"] = self._distillation_section(summary, student)
        self.student_info["source"] = ", ".join(t.uri for t in self.teachers)
        result = publish_model(run, self.student, self.student_info, self.train, self.val, self.val_x, self.val_y,
                               curves=dict(self.curves), stopped_by=stopped_by, sections=sections)
        self._describe_in_card(run)
        return Outcome(stopped_by=stopped_by, metrics={**result, **summary})

    def _scored(self, name: str, model: nn.Module, reference: torch.Tensor, directory) -> dict[str, Any]:
        """A model's accuracy, per-class recall and cost, its validation logits and its top-1 agreement with the
        teacher (or the teachers' combination)."""
        entry = comparison.scored_model(name, model, self.val_x, self.val_y, self.train.classes, directory)
        entry["logits"] = comparison.logits_on(model, self.val_x)
        entry["agreement_with_teacher"] = round(comparison.agreement(entry["logits"], reference), 5)
        return entry

    def _teacher_entry(self, teacher: Teacher, logits: torch.Tensor, student_logits: torch.Tensor,
                       directory) -> dict[str, Any]:
        entry = comparison.scored_model(teacher.name, teacher.model, self.val_x, self.val_y, self.train.classes,
                                        directory)
        teacher.model.to(self.device)
        return {**entry, "uri": teacher.uri, "arch": teacher.info["arch"],
                "agreement_with_student": round(comparison.agreement(student_logits, logits), 5)}

    def _reference_logits(self, teacher_logits: torch.Tensor) -> torch.Tensor:
        """What the student's agreement is measured against: the teacher, the ensemble, or the teachers' average."""
        if isinstance(self.strategy, EnsembleAverage):
            return ensemble_logits(teacher_logits, self.strategy.combine)
        return ensemble_logits(teacher_logits, "probabilities")

    def _ensemble_summary(self, teachers: list[dict], ensemble: torch.Tensor, student: dict) -> dict[str, Any]:
        ensemble_accuracy = float((ensemble.argmax(1) == self.val_y.cpu()).float().mean())
        members = [t["accuracy"] for t in teachers]
        total_params = sum(t["params"] for t in teachers)
        return {"ensemble_accuracy": round(ensemble_accuracy, 5),
                "single_member_accuracy": round(sum(members) / len(members), 5),
                "gain_kept": comparison.gain_kept(student["accuracy"], members, ensemble_accuracy),
                "ensemble_params_over_student": round(total_params / student["params"], 2),
                "paper_reference": "\"Pre-training under infinite compute\" (Kim et al.) reports a student 8x "
                                   "smaller keeping 83% of the ensembling benefit"}

    def _distillation_section(self, summary: dict[str, Any], student: dict[str, Any]) -> dict[str, Any]:
        p = self.p
        per_epoch = {name: seconds / max(1, self.epoch) for name, seconds in self.seconds.items()}
        section = {**summary, "student": self.built, "student_per_class_recall": student["per_class_recall"],
                   "labeled_rows": self.labeled_rows, "transfer_rows": self.transfer_rows,
                   "teacher_logits_cached": not p.augment, "epochs_run": self.epoch, "best_epoch": self.best.epoch + 1,
                   "seconds_per_epoch": {name: round(s, 4) for name, s in per_epoch.items() if s > 0},
                   "params": p.model_dump(mode="json")}
        if self.baseline is not None and per_epoch["baseline"] > 0:
            section["student_epoch_over_baseline_epoch"] = round(per_epoch["student"] / per_epoch["baseline"], 3)
        if isinstance(self.strategy, BalancedTeachers):
            section["teacher_temperatures"] = [round(t, 4) for t in self.strategy.temperatures()]
            section["teacher_loss_weights"] = [round(float(w), 4) for w in self.strategy.weights()]
        return section

    def _describe_in_card(self, run: JobRun) -> None:
        """model.json says what was built and from which teachers (publish_model writes the standard card; this adds
        the `distillation` entry and uploads it again under the same name)."""
        card_path = run.workdir / "out" / "model.json"
        card = json.loads(card_path.read_text())
        card["distillation"] = {"algorithm": run.spec.algorithm, "teachers": [t.uri for t in self.teachers],
                                "student": self.built}
        card_path.write_text(json.dumps(card, indent=2))
        run.add_artifact(card_path)


@register("distill", "kd")
def knowledge_distillation() -> StudentDistillation:
    return StudentDistillation(KDParams, lambda p, teachers: SingleTeacher())


@register("distill", "multi_teacher")
def multi_teacher_distillation() -> StudentDistillation:
    return StudentDistillation(MultiTeacherParams, lambda p, teachers: BalancedTeachers(
        p.entropy_balance, p.loss_balance, p.balance_strength, p.temperature, teachers))


@register("distill", "ensemble")
def ensemble_distillation() -> StudentDistillation:
    return StudentDistillation(EnsembleParams, lambda p, teachers: EnsembleAverage(p.combine, p.temperature))


class DatasetDistillation:
    """`dataset`: learn `ipc` synthetic rows per class, then judge them the way a user would: fresh models trained on
    the synthetic set vs. on random real subsets of the same size vs. on all the data. Publishes synthetic.npz and
    the first synthetic-trained model (with the comparison in its report)."""

    LOG_EVERY = 10  # iterations per metrics point

    def setup(self, run: JobRun) -> None:
        p = self.p = DatasetParams.model_validate(run.params)
        self.seed = run.spec.seed
        torch.manual_seed(self.seed)
        self.device = pick_device(run.settings.device)
        self.train, self.val = load_train_and_validation(run, run.spec.dataset, run.spec.seed)
        check_ipc(self.train, p.ipc)
        self.standardizer = Standardizer.of(self.train)
        x, self.y = to_tensors(self.train, self.device)
        self.x = self.standardizer.forward(x)
        self.val_x, self.val_y = to_tensors(self.val, self.device)
        classes = len(self.train.classes)
        self.initial, self.synthetic_y = initial_synthetic(self.x, self.y, classes, p.ipc, p.init, run.spec.seed)
        self.distiller = make_distiller(p, self.x, self.y, self.initial, self.synthetic_y, classes, run.spec.seed)
        if run.spec.student is not None:
            self.eval_arch, self.eval_args = run.spec.student["arch"], dict(run.spec.student.get("args") or {})
        else:
            self.eval_arch = default_arch(self.train.kind)
            self.eval_args = dict(SMALL_EVAL_MODELS.get(self.eval_arch, {}))
        self.iteration, self.curves = 0, Curves()
        run.event("data.loaded", f"Distilling {len(self.y)} training rows into {classes * p.ipc} synthetic rows "
                  f"({p.ipc} per class) by {p.matching} matching, starting from {p.init} rows.",
                  train_rows=len(self.y), validation_rows=len(self.val_y), synthetic_rows=classes * p.ipc)

    def save_checkpoint(self) -> tuple[dict[str, dict[str, torch.Tensor]], dict[str, Any]]:
        groups, meta = self.distiller.state()
        return groups, {**meta, "iteration": self.iteration, "step": self.iteration, "metric_step": self.iteration,
                        "curves": self.curves}

    def load_checkpoint(self, groups: dict[str, dict[str, torch.Tensor]], meta: dict[str, Any]) -> None:
        self.distiller.load_state(groups, meta)
        self.iteration, self.curves = meta["iteration"], Curves(meta["curves"])

    def evaluate(self) -> dict[str, Any]:
        table, _, _ = self._compare({"distilled": self._synthetic_set(self.distiller.current())})
        return table

    def run(self, run: JobRun) -> Outcome:
        p = self.p
        stopped_by = "completed"
        evaluation_seconds = self._evaluation_seconds()
        losses: list[float] = []
        try:
            self.distiller.prepare(run)
            while self.iteration < p.iterations:
                run.check(self.iteration)
                # Keep enough of the budget to train the fresh models that judge the synthetic set.
                if run.remaining_seconds() - run.finish_reserve() < evaluation_seconds:
                    raise Stop("budget", self.iteration)
                losses.append(self.distiller.step(self.iteration))
                self.iteration += 1
                if self.iteration % self.LOG_EVERY == 0 or self.iteration == p.iterations:
                    self._log(run, losses)
                    losses = []
        except Stop as stop:
            stopped_by = run.budget_reached(stop, f"Budget reached after {self.iteration} of {p.iterations} "
                                            "iterations; keeping the synthetic set as it is.")
        return self._publish(run, stopped_by)

    def _log(self, run: JobRun, losses: list[float]) -> None:
        values = {"matching_loss": sum(losses) / len(losses)}
        self.curves.add(self.iteration, values)
        run.metrics(self.iteration, values)
        run.progress(self.iteration, self.p.iterations)
        run.event("distill.iteration", f"Iteration {self.iteration}/{self.p.iterations}: matching loss "
                  f"{values['matching_loss']:.4f}.", level="debug", iteration=self.iteration, **values)
        if run.checkpoint_due():
            groups, meta = self.save_checkpoint()
            run.save_checkpoint(pack(groups), meta)

    def _synthetic_set(self, standardized: torch.Tensor):
        x = self.standardizer.inverse(standardized).cpu().numpy()
        return synthetic_dataset(self.train, x, self.synthetic_y.cpu().numpy())

    def _compare(self, candidates: dict):
        p = self.p
        return compare_training_sets(self.train, candidates, self.val_x, self.val_y, p.ipc, self.eval_arch,
                                     self.eval_args, p.eval_steps, p.eval_repeats, self.seed, self.device)

    def _evaluation_seconds(self) -> float:
        """Time the fresh-model comparison will take, from a few timed steps on a full batch of real rows."""
        probe_steps = 3
        started = time.perf_counter()
        fresh_model(self.train.subset(np.arange(min(len(self.y), 256))), self.eval_arch, self.eval_args,
                    probe_steps, 0, self.device)
        per_step = (time.perf_counter() - started) / probe_steps
        return per_step * self.p.eval_steps * (3 * self.p.eval_repeats + 1) + MEASURE_SECONDS

    def _publish(self, run: JobRun, stopped_by: str) -> Outcome:
        p = self.p
        # The distilled set is judged against its own starting point too, and the better one is kept: matching can
        # make a set worse for models unlike the matching network (BatchNorm CNNs on mnist5k, bench/distill_dataset.py).
        candidates = {"distilled": self._synthetic_set(self.distiller.current()),
                      "initial": self._synthetic_set(self.initial)}
        run.event("evaluation.started", f"Training fresh {self.eval_arch} models on the synthetic set (and on its "
                  f"{p.init} starting point), on random real subsets of {len(self.synthetic_y)} rows and on the full "
                  "data.")
        table, kept, model = self._compare(candidates)
        synthetic = candidates[kept]
        if kept != "distilled":
            run.event("distill.initial_kept", f"Fresh {self.eval_arch} models learned more from the {p.init} starting "
                      f"rows ({table['candidates']['initial']['accuracy']:.4f}) than from the distilled set "
                      f"({table['candidates']['distilled']['accuracy']:.4f}); synthetic.npz holds the starting rows.",
                      level="warning")
        path = save_synthetic(run.workdir / "synthetic.npz", synthetic.x, synthetic.y)
        run.add_artifact(path)
        summary, rows = summarize(table, self.train, synthetic)
        details = {**summary, "ipc": p.ipc, "iterations_run": self.iteration, "evaluation": table,
                   "synthetic_artifact": f"job://{run.job_id}/synthetic.npz", "params": p.model_dump(mode="json")}
        if isinstance(self.distiller, TrajectoryMatching):
            details["learned_student_lr"] = round(self.distiller.learned_lr(), 6)
        sections = {"comparison": rows, "dataset_distillation": details}
        info = {"arch": self.eval_arch, "args": self.eval_args, "source": f"job://{run.job_id}/synthetic.npz"}
        result = publish_model(run, model, info, synthetic, self.val, self.val_x, self.val_y, curves=dict(self.curves),
                               stopped_by=stopped_by, sections=sections)
        return Outcome(stopped_by=stopped_by, metrics={**result, **summary})


def make_distiller(p: DatasetParams, x: torch.Tensor, y: torch.Tensor, synthetic: torch.Tensor,
                   synthetic_y: torch.Tensor, classes: int, seed: int) -> DistributionMatching | TrajectoryMatching:
    matching = DistributionMatching if p.matching == "distribution" else TrajectoryMatching
    return matching(x, y, synthetic, synthetic_y, classes, p, seed)


@register("distill", "dataset")
def dataset_distillation() -> DatasetDistillation:
    return DatasetDistillation()
