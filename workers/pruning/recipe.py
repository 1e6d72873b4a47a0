"""The loop every pruning algorithm runs: a plan of stages (prune to a target, then fine-tune), the last acceptable
model kept at every step, checkpoints between epochs and stages, and at the end before/after measurements and the
artifacts. Algorithms differ only in their `Strategy`: the plan, how a stage prunes, and what is acceptable."""
import copy
import math
from abc import ABC, abstractmethod
from dataclasses import asdict, dataclass
from typing import Any

import torch
import torch.nn.functional as F

from core.catalog import Params
from workers import distributed
from workers.checkpoints import optimizer_tensors, pack, restore_optimizer
from workers.errors import JobFailure
from workers.evaluation import classification_report, predict_logits
from workers.inputs import load_train_and_validation, resolve_model, to_tensors
from workers.methods import Outcome
from workers.models import Classifier, build_model, count_params, default_arch, widths_of
from workers.outputs import publish_model
from workers.pruning.channels import channel_widths, cost
from workers.pruning.costs import card_of, class_changes, measured_row, ratios, speed_note
from workers.pruning.finetune import Distillation, fine_tuning_loss
from workers.pruning.masks import Masks, dense_masks, keep_masks_applied, sparsity_of
from workers.runtime import JobRun, Stop
from workers.training import auto_batch_size, lr_factor, make_optimizer, pick_device, set_lr, train_one_epoch


@dataclass
class Stage:
    target: float  # sparsity (unstructured) or cost ratio to the original (structured) this stage prunes to
    epochs: int  # fine-tuning epochs after pruning
    point: float | None = None  # the target (or sweep point) this stage completes, if it completes one
    decay: bool = False  # cosine-decay the lr over this stage: the last stage before a point
    rewind: bool = False  # lottery: reset the surviving weights to the rewind point after pruning
    dense: bool = False  # lottery's dense run: trains, prunes nothing, so its model is no result


@dataclass
class Snapshot:
    """A model the job could return: its weights, widths, masks (unstructured) and validation scores."""
    state: dict[str, torch.Tensor]
    masks: Masks | None
    widths: dict
    stage: int
    target: float
    accuracy: float
    loss: float
    sparsity: float
    point: float | None = None

    def meta(self) -> dict:
        return {"widths": self.widths, "stage": self.stage, "target": self.target, "accuracy": self.accuracy,
                "loss": self.loss, "sparsity": self.sparsity, "point": self.point}


class Strategy(ABC):
    """What one pruning algorithm decides; the loop in `PruningJob` does the rest."""
    params_model: type[Params]
    structured = False
    keeps_mid_stage = True  # may a fine-tuning epoch inside a stage become the kept model (lottery: only stage ends)
    nothing_kept = "No pruning step produced a model to keep."  # the failure when every step was stepped back

    @abstractmethod
    def plan(self, job: "PruningJob") -> list[Stage]: ...

    @abstractmethod
    def prune(self, job: "PruningJob", stage: Stage) -> None: ...

    @abstractmethod
    def targets(self, job: "PruningJob") -> list[float]:
        """The targets asked for, in the order the plan reaches them; with `sweep` each becomes a point."""

    def start(self, job: "PruningJob") -> None:
        """Checks and preparation once the data and model are loaded (before any checkpoint is restored)."""
        return None

    def class_weights(self, job: "PruningJob") -> torch.Tensor | None:
        return None

    def distillation(self, job: "PruningJob") -> Distillation | None:
        return None

    def acceptable(self, job: "PruningJob") -> bool:
        """May the model as it is now (job.val_predictions fresh) be kept?"""
        return True

    def stage_failed(self, job: "PruningJob") -> None:
        """A stage ended with no acceptable model at its target (only strategies with an `acceptable` rule)."""
        raise JobFailure("internal_error", "a pruning stage ended with no model to keep", "infra_error")

    def epoch_done(self, job: "PruningJob") -> None:
        """After every fine-tuning epoch (lottery captures its rewind point here)."""
        return None

    def saved(self) -> tuple[dict[str, dict[str, torch.Tensor]], dict[str, Any]]:
        """Strategy state for checkpoints: tensor groups and JSON."""
        return {}, {}

    def restore_state(self, groups: dict[str, dict[str, torch.Tensor]], meta: dict[str, Any]) -> None:
        return None

    def report(self, job: "PruningJob", result: dict) -> tuple[dict[str, Any], dict[str, Any]]:
        """Extra (report sections, result metrics) for this algorithm."""
        return {}, {}

    def describe(self, job: "PruningJob", target: float) -> str:
        return f"{target:.1%} sparsity"


class PruningJob:
    """The prune method's recipe (workers.methods protocol), parameterised by a Strategy."""

    data_parallel = True  # fine-tunes through train_one_epoch and ends training with distributed.training_done()

    def __init__(self, strategy: Strategy):
        self.strategy = strategy

    # --- setup -------------------------------------------------------------------------------------------------
    def setup(self, run: JobRun) -> None:
        self.run_ = run
        self.p = self.strategy.params_model.model_validate(run.params)
        torch.manual_seed(run.spec.seed)
        self.device = pick_device(run.settings.device)
        self.train, self.val = load_train_and_validation(run, run.spec.dataset, run.spec.seed)
        run.event("data.loaded", f"Loaded {len(self.train.y)} training and {len(self.val.y)} validation rows, "
                  f"{len(self.train.classes)} classes, inputs {list(self.train.x.shape[1:])}.",
                  train_rows=len(self.train.y), validation_rows=len(self.val.y), classes=len(self.train.classes))
        self.original, self.model_info = resolve_model(run, run.spec.model, self.train,
                                                       default_arch(self.train.kind))
        self.original.to(self.device).eval()
        self.input_shape = tuple(self.train.x.shape[1:])
        self.x, self.y = to_tensors(self.train, self.device)
        self.val_x, self.val_y = to_tensors(self.val, self.device)
        self.before = classification_report(self.original, self.val_x, self.val_y, self.train.classes)
        self.original_costs = {"params": count_params(self.original),
                               "flops": cost(self.original, "flops", self.input_shape)}
        run.event("model.loaded", f"Model {self.model_info['arch']} with {self.original_costs['params']} parameters; "
                  f"validation accuracy {self.before['accuracy']:.4f} before pruning.",
                  arch=self.model_info["arch"], params=self.original_costs["params"],
                  accuracy=round(self.before["accuracy"], 5))
        self.model = copy.deepcopy(self.original)
        self.masks = None if self.strategy.structured else dense_masks(self.model)
        self.start_sparsity = sparsity_of(self.model)["sparsity"]
        self.batch_size = self.p.batch_size if self.p.batch_size != "auto" else auto_batch_size(len(self.y))
        self.steps_per_epoch = math.ceil(len(self.y) / self.batch_size)
        self.stage_index, self.stage_epoch, self.pruned, self.epoch, self.step = 0, 0, False, 0, 0
        self.points: list[Snapshot] = []
        self.history: list[dict] = []
        self.curves: dict[str, list[list[float]]] = {"train_loss": [], "val_accuracy": [], "lr": [], "shape": []}
        self.val_predictions = predict_logits(self.original, self.val_x).argmax(1)
        self.strategy.start(self)
        self.plan = self.strategy.plan(self)
        self.optimizer = self._new_optimizer()
        self.shape_metrics = self._shape_metrics()
        # The starting model is the first one kept (stage -1): a stage that keeps nothing steps back to it.
        start_target = 1.0 if self.strategy.structured else self.start_sparsity
        self.kept: Snapshot = self.snapshot(self.evaluate(), -1, start_target, None)
        self.kept_is_current = True
        targets = ", ".join(self.strategy.describe(self, target) for target in self.strategy.targets(self))
        run.event("prune.plan", f"{len(self.plan)} stages to {targets}: {sum(s.epochs for s in self.plan)} "
                  "fine-tuning epochs in all.", stages=[asdict(stage) for stage in self.plan])

    def build(self, widths: dict) -> Classifier:
        """The registry architecture at `widths`, on the job's device (its weights are loaded by the caller)."""
        args = {**self.model_info["args"], **widths}
        return build_model(self.model_info["arch"], args, self.input_shape, len(self.train.classes)).to(self.device)

    def _new_optimizer(self) -> torch.optim.Optimizer:
        p = self.p
        optimizer = make_optimizer(p.optimizer, self.model, p.lr, p.weight_decay, p.momentum)
        if self.masks is not None:
            keep_masks_applied(optimizer, self.model, self.masks)
        return optimizer

    # --- checkpoints -------------------------------------------------------------------------------------------
    def save_checkpoint(self) -> tuple[dict[str, dict[str, torch.Tensor]], dict[str, Any]]:
        opt_tensors, opt_meta = optimizer_tensors(self.optimizer)
        groups = {"model": self.model.state_dict(), "optimizer": opt_tensors}
        if self.masks is not None:
            groups["masks"] = self.masks
        snapshots = {f"point{index}": point for index, point in enumerate(self.points)}
        # The kept model is often the last point: store it once and point at it.
        kept_group = next((name for name, point in snapshots.items() if point is self.kept), "kept")
        snapshots.setdefault(kept_group, self.kept)
        for name, snapshot in snapshots.items():
            groups[name] = snapshot.state
            if snapshot.masks is not None:
                groups[f"{name}_masks"] = snapshot.masks
        strategy_groups, strategy_meta = self.strategy.saved()
        groups.update(strategy_groups)
        meta = {"stage": self.stage_index, "stage_epoch": self.stage_epoch, "pruned": self.pruned,
                "epoch": self.epoch, "step": self.step, "metric_step": self.epoch, "widths": widths_of(self.model),
                "plan": [asdict(stage) for stage in self.plan], "history": self.history, "curves": self.curves,
                "optimizer": opt_meta, "kept": {**self.kept.meta(), "group": kept_group},
                "kept_is_current": self.kept_is_current,
                "points": [point.meta() for point in self.points], "strategy": strategy_meta}
        return groups, meta

    def load_checkpoint(self, groups: dict[str, dict[str, torch.Tensor]], meta: dict[str, Any]) -> None:
        self.model = self.build(meta["widths"])
        self.model.load_state_dict(groups["model"])
        if self.masks is not None:
            self.masks = {name: mask.to(self.device) for name, mask in groups["masks"].items()}
        self.optimizer = self._new_optimizer()
        if groups.get("optimizer"):
            restore_optimizer(self.optimizer, groups["optimizer"], meta["optimizer"], self.device)
        self.stage_index, self.stage_epoch, self.pruned = meta["stage"], meta["stage_epoch"], meta["pruned"]
        self.epoch, self.step = meta["epoch"], meta["step"]
        self.plan = [Stage(**stage) for stage in meta["plan"]]
        self.history, self.curves = meta["history"], meta["curves"]
        self.points = [self._snapshot_from(groups, f"point{index}", point) for index, point in enumerate(meta["points"])]
        kept_group = meta["kept"].pop("group")
        self.kept = (self.points[int(kept_group.removeprefix("point"))] if kept_group != "kept"
                     else self._snapshot_from(groups, "kept", meta["kept"]))
        self.kept_is_current = meta["kept_is_current"]
        self.strategy.restore_state(groups, meta["strategy"])
        self.shape_metrics = self._shape_metrics()

    @staticmethod
    def _snapshot_from(groups: dict[str, dict[str, torch.Tensor]], name: str, meta: dict) -> Snapshot:
        return Snapshot(state=groups[name], masks=groups.get(f"{name}_masks"), **meta)

    # --- evaluation and snapshots ------------------------------------------------------------------------------
    def evaluate(self) -> dict[str, float]:
        logits = predict_logits(self.model, self.val_x)
        self.val_predictions = logits.argmax(1)
        return {"val_loss": F.cross_entropy(logits, self.val_y).item(),
                "val_accuracy": (self.val_predictions == self.val_y).float().mean().item()}

    def snapshot(self, scores: dict[str, float], stage: int, target: float, point: float | None) -> Snapshot:
        return Snapshot(state={k: v.detach().clone() for k, v in self.model.state_dict().items()},
                        masks={k: v.clone() for k, v in self.masks.items()} if self.masks is not None else None,
                        widths=widths_of(self.model), stage=stage, target=target, accuracy=scores["val_accuracy"],
                        loss=scores["val_loss"], sparsity=sparsity_of(self.model)["sparsity"], point=point)

    def restore(self, snapshot: Snapshot) -> None:
        """Make `snapshot` the current model again, with fresh optimizer state."""
        self.model = self.build(snapshot.widths)
        self.model.load_state_dict(snapshot.state)
        if snapshot.masks is not None:
            self.masks = {k: v.to(self.device, copy=True) for k, v in snapshot.masks.items()}
        self.optimizer = self._new_optimizer()
        self.shape_metrics = self._shape_metrics()

    def model_of(self, snapshot: Snapshot) -> Classifier:
        model = self.build(snapshot.widths)
        model.load_state_dict(snapshot.state)
        return model.eval()

    def _shape_metrics(self) -> dict[str, float]:
        if self.strategy.structured:
            return {"params_ratio": count_params(self.model) / self.original_costs["params"],
                    "flops_ratio": cost(self.model, "flops", self.input_shape) / self.original_costs["flops"]}
        return {"sparsity": sparsity_of(self.model)["sparsity"]}

    # --- the loop ----------------------------------------------------------------------------------------------
    def run(self, run: JobRun) -> Outcome:
        stopped_by = "completed"
        try:
            while self.stage_index < len(self.plan):
                self._run_stage(run)
        except Stop as stop:
            stopped_by = run.budget_reached(stop, f"Budget reached in stage {self.stage_index + 1}/{len(self.plan)}; "
                                            "keeping the last acceptable model.")
        distributed.training_done()
        return self._finish(run, stopped_by)

    def _run_stage(self, run: JobRun) -> None:
        stage = self.plan[self.stage_index]
        if not self.pruned:
            self._prune(run, stage)
        while self.stage_epoch < stage.epochs:
            self._fine_tune_epoch(run, stage)
        if self.kept.stage != self.stage_index:
            self.strategy.stage_failed(self)
        else:
            self._complete_stage(run, stage)
        self.pruned, self.stage_epoch = False, 0
        self._checkpoint_if_due(run)

    def _prune(self, run: JobRun, stage: Stage) -> None:
        self.strategy.prune(self, stage)
        self.optimizer = self._new_optimizer()
        self.pruned, self.stage_epoch = True, 0
        self.shape_metrics = self._shape_metrics()
        scores = self.evaluate()
        reached = ", ".join(f"{_label(name)} {value:.3g}" for name, value in self.shape_metrics.items())
        what = "dense run" if stage.dense else f"pruned towards {self.strategy.describe(self, stage.target)} ({reached})"
        training = "training" if stage.dense or stage.rewind else "fine-tuning"
        run.event("prune.step", f"Stage {self.stage_index + 1}/{len(self.plan)}: {what}; validation accuracy "
                  f"{scores['val_accuracy']:.4f} before {training}.", stage=self.stage_index + 1,
                  target=round(stage.target, 5), val_accuracy=round(scores["val_accuracy"], 5),
                  **_rounded(self.shape_metrics))
        if stage.epochs == 0:
            self._offer(scores)

    def _fine_tune_epoch(self, run: JobRun, stage: Stage) -> None:
        max_epochs = run.spec.budget.max_epochs
        if max_epochs is not None and self.epoch >= max_epochs:
            raise Stop("budget", self.step)
        lr = self.p.lr * (lr_factor("cosine", self.stage_epoch, stage.epochs) if stage.decay else 1.0)
        set_lr(self.optimizer, lr)
        loss_of_batch = fine_tuning_loss(self.model, self.x, self.y, self.strategy.class_weights(self),
                                         self.strategy.distillation(self))
        train_loss, self.step = train_one_epoch(run, self.model, self.optimizer, len(self.y), self.batch_size,
                                                loss_of_batch, seed=run.spec.seed, epoch=self.epoch, step=self.step,
                                                lr_hint=self.p.lr)
        self.epoch += 1
        self.stage_epoch += 1
        scores = self.evaluate()
        self.strategy.epoch_done(self)
        self.kept_is_current = False
        if self.strategy.keeps_mid_stage or self.stage_epoch == stage.epochs:
            self._offer(scores)
        shape = next(iter(self.shape_metrics.values()))
        for name, value in (("train_loss", train_loss), ("val_accuracy", scores["val_accuracy"]), ("lr", lr),
                            ("shape", shape)):
            self.curves[name].append([self.epoch, value])
        run.metrics(self.epoch, {"train_loss": train_loss, **scores, "lr": lr, **self.shape_metrics})
        run.progress(self.step, sum(s.epochs for s in self.plan) * self.steps_per_epoch, epoch=self.epoch,
                     stage=self.stage_index + 1, stages=len(self.plan))
        run.event("prune.epoch", f"Stage {self.stage_index + 1}/{len(self.plan)}, epoch "
                  f"{self.stage_epoch}/{stage.epochs}: train loss {train_loss:.4f}, validation accuracy "
                  f"{scores['val_accuracy']:.4f}.", level="debug", epoch=self.epoch, train_loss=round(train_loss, 5),
                  **_rounded(scores))
        self._checkpoint_if_due(run)

    def _offer(self, scores: dict[str, float]) -> None:
        self.kept_is_current = self.strategy.acceptable(self)
        if self.kept_is_current:
            stage = self.plan[self.stage_index]
            self.kept = self.snapshot(scores, self.stage_index, stage.target, stage.point)

    def _complete_stage(self, run: JobRun, stage: Stage) -> None:
        # Go on from the kept model: an earlier epoch of this stage, when a later one was not acceptable.
        if not self.kept_is_current:
            self.restore(self.kept)
            self.kept_is_current = True
        self.record(stage, self.kept.accuracy, "kept")
        if stage.point is not None:
            self.points.append(self.kept)
            run.event("prune.point", f"Reached {self.strategy.describe(self, stage.point)} with validation accuracy "
                      f"{self.kept.accuracy:.4f}.", target=stage.point, val_accuracy=round(self.kept.accuracy, 5))
        self.stage_index += 1

    def record(self, stage: Stage, accuracy: float, outcome: str) -> None:
        """One row of the report's steps table."""
        self.history.append({"stage": self.stage_index + 1, "target": round(stage.target, 5),
                             **_rounded(self.shape_metrics), "val_accuracy": round(accuracy, 5),
                             "epochs": stage.epochs, "outcome": outcome})

    def _checkpoint_if_due(self, run: JobRun) -> None:
        if run.checkpoint_due():
            groups, meta = self.save_checkpoint()
            run.save_checkpoint(pack(groups), meta)

    # --- results -----------------------------------------------------------------------------------------------
    def sweeping(self) -> bool:
        return getattr(self.p, "sweep", None) is not None

    def _result(self) -> Snapshot:
        """Sweeps: the most compressed point within max_accuracy_drop of the original, else the most accurate point.
        Otherwise the last point reached, or (stopped early) the last acceptable model."""
        if self.sweeping() and self.points:
            floor = self.before["accuracy"] - self.p.max_accuracy_drop
            good = [point for point in self.points if point.accuracy >= floor]
            if good:
                return good[-1]
            return max(self.points, key=lambda point: point.accuracy)
        return self.kept

    def _finish(self, run: JobRun, stopped_by: str) -> Outcome:
        chosen = self._result()
        if chosen.stage < 0 or self.plan[chosen.stage].dense:
            if stopped_by == "budget":
                raise JobFailure("budget_exhausted", "The budget ran out before the first pruning step was "
                                 "fine-tuned, so there is no pruned model to keep; raise budget.max_seconds or lower "
                                 "the epochs.")
            raise JobFailure("no_pruned_model", self.strategy.nothing_kept)
        model = self.model_of(chosen)
        run.event("prune.finished", f"Keeping the model at {self.strategy.describe(self, chosen.target)} with "
                  f"validation accuracy {chosen.accuracy:.4f} (original {self.before['accuracy']:.4f}).",
                  target=chosen.target, val_accuracy=round(chosen.accuracy, 5))
        rows, result_row = self._comparison(run, chosen, model)
        after = classification_report(model, self.val_x, self.val_y, self.train.classes)
        found_ratios = ratios(rows[0], result_row)
        reached = {point.point for point in self.points}
        summary = {"original_accuracy": round(self.before["accuracy"], 5), "accuracy": round(after["accuracy"], 5),
                   "sparsity": result_row["sparsity"],
                   "overall_sparsity": round(sparsity_of(model)["overall_sparsity"], 5), **found_ratios,
                   "target_reached": all(target in reached for target in self.strategy.targets(self)),
                   "stages_completed": len([row for row in self.history if row["outcome"] == "kept"])}
        sections = self._sections(run, chosen, model, rows, after, summary)
        extra_sections, extra_metrics = self.strategy.report(self, after)
        result = publish_model(run, model, self.model_info, self.train, self.val, self.val_x, self.val_y,
                               curves=self._curves(rows), stopped_by=stopped_by,
                               sections={**sections, **extra_sections})
        return Outcome(stopped_by=stopped_by, metrics={**result, **summary, **extra_metrics})

    def _sections(self, run: JobRun, chosen: Snapshot, model: Classifier, rows: list[dict], after: dict,
                  summary: dict) -> dict[str, Any]:
        """The report's pruning sections: summary and the speed note, the measured comparison, per-class changes,
        the stages run, and per-layer sparsity (unstructured) or channel counts (structured)."""
        structured = self.strategy.structured
        sections: dict[str, Any] = {
            "pruning": {"algorithm": run.spec.algorithm, **summary, "kept": self.strategy.describe(self, chosen.target),
                        "note": speed_note(structured, summary.get("latency_b64_ratio"))},
            "comparison": rows,
            "per_class_change": class_changes(self.before, after, self.train.classes,
                                              list(getattr(self.p, "protected_classes", []))),
            "steps": self.history,
            "training": {**self.p.model_dump(mode="json"), "batch_size_used": self.batch_size, "epochs_run": self.epoch,
                         "steps": self.step},
        }
        if structured:
            before_widths, after_widths = channel_widths(self.original), channel_widths(model)
            sections["per_layer_channels"] = [{"layer": name, "channels_before": width,
                                               "channels_after": after_widths[name]}
                                              for name, width in before_widths.items()]
        else:
            sections["per_layer_sparsity"] = {name: round(value, 5)
                                              for name, value in sparsity_of(model)["per_layer"].items()}
        return sections

    def _comparison(self, run: JobRun, chosen: Snapshot, model: Classifier) -> tuple[list[dict], dict]:
        """Measured rows, original first, measured one after another in this process so ratios are fair. Sweeps
        write every point's model-<target>.{onnx,safetensors,json}."""
        work = run.workdir / "compare"
        classes, kind = self.train.classes, self.train.kind

        def row(name: str, candidate: Classifier, folder: str) -> dict:
            out = work / folder
            out.mkdir(parents=True, exist_ok=True)
            card = card_of(candidate, self.model_info, classes, self.input_shape, kind, run.job_id)
            return measured_row(name, candidate, card, out, self.val_x, self.val_y,
                                sparsity_of(candidate)["sparsity"])

        rows = [row("original", self.original, "original")]
        if not self.sweeping():
            result_row = row(f"pruned ({self.strategy.describe(self, chosen.target)})", model, "pruned")
            return rows + [result_row], result_row
        result_row = rows[0]
        for point in self.points:
            label = f"{point.point:g}"
            point_row = row(f"{self.strategy.describe(self, point.point)}", self.model_of(point), f"point-{label}")
            point_row["chosen"] = point is chosen
            rows.append(point_row)
            for suffix in ("onnx", "safetensors", "json"):
                run.add_artifact(work / f"point-{label}" / f"model.{suffix}", f"model-{label}.{suffix}")
            if point is chosen:
                result_row = point_row
        return rows, result_row

    def _curves(self, rows: list[dict]) -> dict[str, list | dict]:
        shape_name = next(iter(self.shape_metrics))
        curves = {name: points for name, points in self.curves.items() if name != "shape"}
        curves[shape_name] = self.curves["shape"]
        if self.sweeping():
            # The frontier: x is each point's FLOPs (structured) or sparsity, y its validation accuracy.
            x_key = "flops" if self.strategy.structured else "sparsity"
            curves[f"frontier_accuracy_by_{x_key}"] = {
                "x_label": x_key, "points": [[row[x_key], row["accuracy"]] for row in rows[1:]]}
        return curves


def _label(metric: str) -> str:
    return metric.replace("_", " ")


def _rounded(values: dict[str, float]) -> dict[str, float]:
    return {name: round(value, 5) for name, value in values.items()}
