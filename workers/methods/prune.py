"""`prune/*`: the pruning algorithms as strategies for the shared stage loop (workers.pruning.recipe) — magnitude,
lottery, structured and class_aware. Each decides its plan, how a stage prunes and what may be kept."""
from typing import Any

import torch
import torch.nn.functional as F

from core.methods.prune import ClassAwareParams, LotteryParams, MagnitudeParams, StructuredParams
from workers.errors import JobFailure
from workers.methods import register
from workers.models import widths_of
from workers.pruning.channels import group_sizes, rebuild, remove_channels, smallest_ratio, widths_for
from workers.pruning.finetune import Distillation, teacher_answers
from workers.pruning.masks import apply_masks, dense_masks, magnitude_masks, sparsity_schedule
from workers.pruning.recipe import PruningJob, Stage, Strategy

# Rows whose loss gradients score channels for Taylor importance: enough for stable scores, a fraction of an epoch.
TAYLOR_ROWS = 512
# Class-aware pruning stops stepping back when the retry would add less sparsity than this.
MIN_SPARSITY_STEP = 0.005


def gradual_plan(start: float, targets: list[float], fractions: list[float], epochs_per_step: int,
                 final_epochs: int) -> list[Stage]:
    """Stages from `start` through each target in turn: one pruning step per fraction of the way (the last is 1),
    fine-tuning after each; the last step of every target is a point, with a cosine-decayed fine-tune."""
    stages, previous = [], start
    for target in targets:
        for fraction in fractions[:-1]:
            stages.append(Stage(previous + (target - previous) * fraction, epochs_per_step))
        stages.append(Stage(target, final_epochs, point=target, decay=True))
        previous = target
    return stages


class Magnitude(Strategy):
    """Global (or per-layer) magnitude pruning on a gradual schedule, fine-tuning between steps."""
    params_model = MagnitudeParams

    def targets(self, job: PruningJob) -> list[float]:
        return sorted(job.p.sweep) if job.p.sweep else [job.p.target_sparsity]

    def start(self, job: PruningJob) -> None:
        lowest = self.targets(job)[0]
        if lowest <= job.start_sparsity:
            raise JobFailure("already_sparse", f"{job.start_sparsity:.1%} of the model's prunable weights are zero "
                             f"already, at or above the target {lowest:.1%}; choose a higher target.")

    def plan(self, job: PruningJob) -> list[Stage]:
        p = job.p
        fractions = sparsity_schedule(0.0, 1.0, p.steps, p.schedule)  # the schedule's shape, 0 → 1
        return gradual_plan(job.start_sparsity, self.targets(job), fractions, p.epochs_per_step, p.final_epochs)

    def prune(self, job: PruningJob, stage: Stage) -> None:
        job.masks = magnitude_masks(job.model, stage.target, job.p.scope, job.p.score, job.masks)
        apply_masks(job.model, job.masks)


class ClassAware(Magnitude):
    """After "Class-dependent Compression of Deep Neural Networks" (Entezari & Saukh): gradual magnitude pruning
    whose fine-tuning weights the protected classes up, and which keeps a model only while every protected class's
    false negatives stay within `max_fn_increase` of the original's (the weight trades false positives for their
    recall). A stage that breaks the bound steps back to the last good model and retries a smaller step first. The
    weight stays as given: raising it on every step back buys the bound by predicting protected classes for
    everything."""
    params_model = ClassAwareParams
    nothing_kept = ("Every pruning step broke the protected classes' false-negative bound, even after stepping back; "
                    "raise max_fn_increase or protected_weight, or give more epochs_per_step.")

    def __init__(self):
        self.step_backs = 0

    def start(self, job: PruningJob) -> None:
        super().start(job)
        classes = job.train.classes
        for label in job.p.protected_classes:
            if label >= len(classes):
                raise JobFailure("unknown_class", f"protected class {label} does not exist: this dataset has "
                                 f"{len(classes)} classes, label ids 0..{len(classes) - 1}.")
            if job.before["per_class"]["support"][classes[label]] == 0:
                raise JobFailure("protected_class_not_in_validation", f"protected class {label} has no validation "
                                 "rows, so its false negatives cannot be checked; use a larger validation fraction.")
        self.allowed = {label: self._false_negatives(job, label, job.val_predictions) + job.p.max_fn_increase
                        for label in job.p.protected_classes}

    @staticmethod
    def _false_negatives(job: PruningJob, label: int, predictions: torch.Tensor) -> int:
        return int(((job.val_y == label) & (predictions != label)).sum())

    def class_weights(self, job: PruningJob) -> torch.Tensor:
        weights = torch.ones(len(job.train.classes), device=job.device)
        weights[job.p.protected_classes] = job.p.protected_weight
        return weights

    def acceptable(self, job: PruningJob) -> bool:
        return all(self._false_negatives(job, label, job.val_predictions) <= allowed
                   for label, allowed in self.allowed.items())

    def stage_failed(self, job: PruningJob) -> None:
        failed, good = job.plan[job.stage_index], job.kept
        job.record(failed, job.evaluate()["val_accuracy"], "stepped back")
        job.restore(good)
        job.kept_is_current = True
        gap = failed.target - good.sparsity
        if self.step_backs >= job.p.max_step_backs or gap < MIN_SPARSITY_STEP:
            job.run_.event("class_aware.stopped_short", f"{failed.target:.1%} sparsity broke the protected classes' "
                           f"false-negative bound and no smaller step is left to try; keeping {good.sparsity:.1%}.",
                           level="warning", failed=round(failed.target, 5), kept=round(good.sparsity, 5))
            del job.plan[job.stage_index:]
            return
        self.step_backs += 1
        retry = Stage(good.sparsity + gap / 2, max(2, 2 * job.p.epochs_per_step))
        job.plan.insert(job.stage_index, retry)
        job.run_.event("class_aware.step_back", f"{failed.target:.1%} sparsity broke the protected classes' "
                       f"false-negative bound; back to {good.sparsity:.1%} and trying {retry.target:.1%} first "
                       f"(step back {self.step_backs}/{job.p.max_step_backs}).", level="warning",
                       failed=round(failed.target, 5), back_to=round(good.sparsity, 5), retry=round(retry.target, 5))

    def saved(self) -> tuple[dict, dict]:
        return {}, {"step_backs": self.step_backs}

    def restore_state(self, groups: dict, meta: dict) -> None:
        self.step_backs = meta["step_backs"]

    def report(self, job: PruningJob, result: dict) -> tuple[dict[str, Any], dict[str, Any]]:
        classes = job.train.classes
        rows = [{"class": classes[label],
                 "false_negatives_before": job.before["per_class"]["false_negatives"][classes[label]],
                 "false_negatives_after": result["per_class"]["false_negatives"][classes[label]],
                 "allowed": allowed} for label, allowed in self.allowed.items()]
        for row in rows:
            row["within_bound"] = row["false_negatives_after"] <= row["allowed"]
        metrics = {"protected_false_negatives": {row["class"]: {key: row[key] for key in
                                                                ("false_negatives_before", "false_negatives_after",
                                                                 "allowed")} for row in rows},
                   "step_backs": self.step_backs}
        return {"protected_classes": rows}, metrics


class Lottery(Strategy):
    """Iterative magnitude pruning with rewinding: "The Lottery Ticket Hypothesis" (Frankle & Carbin), rewinding to
    an early epoch rather than the initialisation as "Linear Mode Connectivity and the Lottery Ticket Hypothesis"
    (Frankle et al.) found necessary beyond small networks. A fresh dense run from the model's architecture gives
    the rewind point; each round prunes the same share of the remaining weights, resets the survivors to the rewind
    point and retrains. The given model is the baseline the ticket is compared with."""
    params_model = LotteryParams
    keeps_mid_stage = False  # a ticket part-way through retraining is worse than the previous round's

    def __init__(self):
        self.rewind_state: dict[str, torch.Tensor] | None = None

    def targets(self, job: PruningJob) -> list[float]:
        return [job.p.target_sparsity]

    def start(self, job: PruningJob) -> None:
        torch.manual_seed(job.run_.spec.seed)
        fresh = job.build(widths_of(job.original))
        fresh.mean.copy_(job.original.mean)
        fresh.std.copy_(job.original.std)
        job.model = fresh
        job.masks = dense_masks(fresh)
        if job.p.rewind_epoch == 0:
            self._capture(job)

    def plan(self, job: PruningJob) -> list[Stage]:
        p = job.p
        stages = [Stage(0.0, p.epochs_per_round, decay=True, dense=True)]
        for round_ in range(1, p.rounds + 1):
            # The same share of the remaining weights each round: 1 - (1 - target)^(round / rounds).
            sparsity = p.target_sparsity if round_ == p.rounds else 1 - (1 - p.target_sparsity) ** (round_ / p.rounds)
            stages.append(Stage(sparsity, p.epochs_per_round, point=sparsity, decay=True, rewind=True))
        return stages

    def epoch_done(self, job: PruningJob) -> None:
        if job.plan[job.stage_index].dense and job.stage_epoch == job.p.rewind_epoch:
            self._capture(job)

    def _capture(self, job: PruningJob) -> None:
        self.rewind_state = {k: v.detach().clone() for k, v in job.model.state_dict().items()}
        job.run_.event("lottery.rewind_point", f"Rewind point captured at epoch {job.p.rewind_epoch} of the dense "
                       "run.", epoch=job.p.rewind_epoch)

    def prune(self, job: PruningJob, stage: Stage) -> None:
        if stage.dense:
            return
        job.masks = magnitude_masks(job.model, stage.target, job.p.scope, job.p.score, job.masks)
        job.model.load_state_dict(self.rewind_state)
        apply_masks(job.model, job.masks)
        job.run_.event("lottery.rewound", f"Pruned to {stage.target:.1%} sparsity and reset the surviving weights "
                       f"to epoch {job.p.rewind_epoch} of the dense run.", sparsity=round(stage.target, 5))

    def saved(self) -> tuple[dict, dict]:
        return ({"rewind": self.rewind_state} if self.rewind_state is not None else {}), {}

    def restore_state(self, groups: dict, meta: dict) -> None:
        self.rewind_state = groups.get("rewind", self.rewind_state)

    def report(self, job: PruningJob, result: dict) -> tuple[dict[str, Any], dict[str, Any]]:
        rounds = [{"round": index, **{k: v for k, v in row.items() if k not in ("stage", "outcome")}}
                  for index, row in enumerate(job.history)]
        return {"rounds": rounds}, {"rounds_completed": max(0, len(job.history) - 1)}


class Structured(Strategy):
    """Channel pruning with Torch-Pruning to a FLOPs or parameter ratio, in `steps` geometric steps (each removes
    the same share of the remaining cost), fine-tuning after each, optionally distilling from the unpruned model."""
    params_model = StructuredParams
    structured = True
    nothing_kept = "Structured pruning kept no model."

    def __init__(self):
        self.teacher: Distillation | None = None

    def measure(self, job: PruningJob) -> str:
        p = job.p
        if p.target_params_ratio is not None:
            return "params"
        return "flops" if p.target_flops_ratio is not None else p.sweep_measure

    def targets(self, job: PruningJob) -> list[float]:
        p = job.p
        if p.sweep:
            return sorted(p.sweep, reverse=True)
        return [p.target_params_ratio if p.target_params_ratio is not None else p.target_flops_ratio]

    def describe(self, job: PruningJob, target: float) -> str:
        return f"{target:.3g}× {'FLOPs' if self.measure(job) == 'flops' else 'params'}"

    def start(self, job: PruningJob) -> None:
        if not group_sizes(job.model, job.input_shape):
            raise JobFailure("nothing_to_prune", f"this {job.model_info['arch']} has no channels or hidden units to "
                             "remove besides the output layer; structured pruning needs hidden layers.")
        measure = self.measure(job)
        lowest = smallest_ratio(job.model, job.input_shape, measure, job.p.round_to)
        if min(self.targets(job)) < lowest:
            floor = job.p.round_to or 1
            hint = " or lower round_to" if job.p.round_to and job.p.round_to > 1 else ""
            raise JobFailure("target_unreachable", f"structured pruning can take this model down to {lowest:.3f}× "
                             f"its {'FLOPs' if measure == 'flops' else 'parameters'} at most (every layer down to "
                             f"{floor} channel{'s' if floor > 1 else ''}); choose a target at or above that{hint}.")
        if job.p.distill:
            self.teacher = teacher_answers(job.original, job.x, job.p.distill_weight, job.p.temperature)

    def plan(self, job: PruningJob) -> list[Stage]:
        p = job.p
        shape = [k / p.steps for k in range(1, p.steps + 1)]
        stages, previous = [], 1.0
        for target in self.targets(job):
            for fraction in shape[:-1]:
                stages.append(Stage(previous * (target / previous) ** fraction, p.epochs_per_step))
            stages.append(Stage(target, p.final_epochs, point=target, decay=True))
            previous = target
        return stages

    def prune(self, job: PruningJob, stage: Stage) -> None:
        measure = self.measure(job)
        goal = stage.target * job.original_costs[measure]
        widths, _ = widths_for(job.model, job.input_shape, goal, measure, job.p.round_to)
        if widths == group_sizes(job.model, job.input_shape):
            return
        remove_channels(job.model, job.input_shape, widths, job.p.importance, lambda: self._gradients(job))
        job.model = rebuild(job.model_info["arch"], job.model_info["args"], job.model, job.input_shape,
                            len(job.train.classes))

    @staticmethod
    def _gradients(job: PruningJob) -> None:
        """Accumulate the loss gradients Taylor importance reads, on a seeded sample of training rows (eval mode, so
        BatchNorm statistics stay as they are)."""
        job.model.eval()
        rows = torch.randperm(len(job.y), generator=torch.Generator().manual_seed(job.run_.spec.seed))[:TAYLOR_ROWS]
        for index in rows.to(job.device).split(job.batch_size):
            F.cross_entropy(job.model(job.x[index]), job.y[index]).backward()

    def distillation(self, job: PruningJob) -> Distillation | None:
        return self.teacher

    def report(self, job: PruningJob, result: dict) -> tuple[dict[str, Any], dict[str, Any]]:
        return {}, {"target_measure": self.measure(job)}


@register("prune", "magnitude")
def magnitude() -> PruningJob:
    return PruningJob(Magnitude())


@register("prune", "class_aware")
def class_aware() -> PruningJob:
    return PruningJob(ClassAware())


@register("prune", "lottery")
def lottery() -> PruningJob:
    return PruningJob(Lottery())


@register("prune", "structured")
def structured() -> PruningJob:
    return PruningJob(Structured())
