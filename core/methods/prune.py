"""The `prune` method's catalog entry: unstructured magnitude, lottery-ticket, structured (channel) and class-aware
pruning, each algorithm's parameters, and the spec rules they share. Torch-free: the API imports it."""
from typing import Annotated, Literal

from pydantic import Field, field_validator, model_validator

from core.catalog import Algorithm, Method, Params, SpecProblem
from core.spec import JobSpec

Fraction = Annotated[float, Field(gt=0.0, lt=1.0)]
Epochs = Annotated[int, Field(ge=0, le=1000)]
DEFAULT_SPARSITY = 0.8
DEFAULT_FLOPS_RATIO = 0.5


class FineTuning(Params):
    """How the pruned model is fine-tuned between and after pruning steps (shared by every algorithm)."""
    lr: float = Field(default=1e-3, gt=0, le=10, description="fine-tuning learning rate")
    batch_size: Annotated[int, Field(ge=1, le=65536)] | Literal["auto"] = Field(
        default="auto", description='rows per step; "auto" = min(64, max(8, rows // 16)), as in train')
    optimizer: Literal["adam", "adamw", "sgd"] = "adamw"
    momentum: float = Field(default=0.9, ge=0, lt=1, description="for sgd")
    weight_decay: float = Field(default=1e-4, ge=0, le=1)


class Sweep(Params):
    """One job over several targets: one model per point, the frontier in the report, the best point as model.*."""
    sweep: Annotated[list[Fraction], Field(min_length=2, max_length=12)] | None = Field(
        default=None, description="targets to sweep instead of a single target; each point writes "
                                  "model-<target>.onnx/.safetensors/.json")
    max_accuracy_drop: float = Field(
        default=0.01, ge=0, le=1, description="sweeps: the best point is the most compressed one whose validation "
                                              "accuracy is within this of the original model's (else the most accurate)")

    @field_validator("sweep")
    @classmethod
    def _distinct_points(cls, value):
        if value is not None and len(set(value)) != len(value):
            raise ValueError("sweep points must be distinct")
        return value


class Ranking(Params):
    """Which weights unstructured pruning removes first."""
    scope: Literal["global", "layer"] = Field(
        default="global", description="global: one threshold over all layers, so layers end at different "
                                      "sparsities; layer: every layer to the same sparsity")
    score: Literal["lamp", "magnitude"] = Field(
        default="lamp", description="how weights are ranked: LAMP (\"Layer-adaptive Sparsity for the Magnitude-based "
                                    "Pruning\"), |w| rescaled within its layer so a global threshold does not empty "
                                    "layers whose weights are small (convolutions behind BatchNorm); or raw |w|")


class Gradual(Params):
    """A sparsity schedule: `steps` pruning steps, fine-tuning after each, then a final fine-tune."""
    schedule: Literal["cubic", "linear"] = Field(
        default="cubic", description='cubic: "To prune, or not to prune" (Zhu & Gupta) — big steps first, small '
                                     'ones near the target')
    steps: int = Field(default=5, ge=1, le=100, description="pruning steps from the model's sparsity to the target")
    epochs_per_step: Epochs = Field(default=2, description="fine-tuning epochs after each step but the last")
    final_epochs: Epochs = Field(default=5, description="fine-tuning epochs after the last step (cosine-decayed lr)")


def _fill_default(data, field: str, default: float, others: tuple[str, ...]):
    """Fill `field` when the user named no target at all, so the stored spec says what ran."""
    if isinstance(data, dict) and all(data.get(name) is None for name in (field, *others)):
        return {**data, field: default}
    return data


def _one_target(params: Params, names: tuple[str, ...]) -> None:
    given = [name for name in names if getattr(params, name) is not None]
    if len(given) > 1:
        raise ValueError(f"give only one of {', '.join(names)}; got {', '.join(given)}")


class MagnitudeParams(FineTuning, Sweep, Gradual, Ranking):
    target_sparsity: Fraction | None = Field(
        default=None, description=f"fraction of conv/linear weights set to zero; {DEFAULT_SPARSITY} when neither it "
                                  "nor sweep is given")

    @model_validator(mode="before")
    @classmethod
    def _default_target(cls, data):
        return _fill_default(data, "target_sparsity", DEFAULT_SPARSITY, ("sweep",))

    @model_validator(mode="after")
    def _single_target(self):
        _one_target(self, ("target_sparsity", "sweep"))
        return self


class LotteryParams(FineTuning, Ranking):
    target_sparsity: Fraction = Field(default=DEFAULT_SPARSITY, description="sparsity of the final ticket")
    rounds: int = Field(default=3, ge=1, le=30, description="prune-rewind-retrain rounds; each removes the same "
                                                            "share of the remaining weights")
    epochs_per_round: int = Field(default=10, ge=1, le=1000, description="training epochs of the dense run and of "
                                                                         "every round")
    rewind_epoch: int = Field(default=1, ge=0, le=999, description="epoch of the dense run whose weights the "
                                                                   "survivors are reset to (0 = initialisation)")

    @model_validator(mode="after")
    def _rewind_inside_the_run(self):
        if self.rewind_epoch >= self.epochs_per_round:
            raise ValueError(f"rewind_epoch ({self.rewind_epoch}) must be below epochs_per_round "
                             f"({self.epochs_per_round})")
        return self


class StructuredParams(FineTuning, Sweep):
    target_flops_ratio: Fraction | None = Field(
        default=None, description=f"FLOPs of the pruned model / the original's; {DEFAULT_FLOPS_RATIO} when no "
                                  "target is given")
    target_params_ratio: Fraction | None = Field(default=None, description="parameters of the pruned model / "
                                                                           "the original's")
    sweep_measure: Literal["flops", "params"] = Field(default="flops", description="what sweep ratios are of")
    importance: Literal["l1", "l2", "bn_scale", "taylor"] = Field(
        default="l2", description="channel importance: group L1/L2 weight magnitude, BatchNorm scale "
                                  "(\"Learning Efficient Convolutional Networks through Network Slimming\") or "
                                  "first-order Taylor (\"Importance Estimation for Neural Network Pruning\")")
    steps: int = Field(default=4, ge=1, le=50, description="pruning steps, each followed by fine-tuning")
    epochs_per_step: Epochs = Field(default=2, description="fine-tuning epochs after each step but the last")
    final_epochs: Epochs = Field(default=8, description="fine-tuning epochs after the last step (cosine-decayed lr)")
    round_to: int | None = Field(
        default=16, ge=1, le=256, description="keep channel counts multiples of this (never below it): ONNX "
                                              "Runtime's blocked convolutions want multiples of 8 (AVX2) or 16 "
                                              "(AVX-512), and odd widths can make a smaller model slower; null "
                                              "removes channels one by one")
    distill: bool = Field(default=False, description="fine-tune towards the unpruned model's soft labels too "
                                                     "(\"Distilling the Knowledge in a Neural Network\")")
    distill_weight: float = Field(default=0.5, ge=0, le=1, description="share of the distillation term in the loss")
    temperature: float = Field(default=4.0, ge=1, le=20, description="softmax temperature of the distillation term")

    @model_validator(mode="before")
    @classmethod
    def _default_target(cls, data):
        return _fill_default(data, "target_flops_ratio", DEFAULT_FLOPS_RATIO, ("target_params_ratio", "sweep"))

    @model_validator(mode="after")
    def _single_target(self):
        _one_target(self, ("target_flops_ratio", "target_params_ratio", "sweep"))
        return self


class ClassAwareParams(FineTuning, Sweep, Gradual, Ranking):
    protected_classes: Annotated[list[Annotated[int, Field(ge=0)]], Field(min_length=1, max_length=1000)] = Field(
        description="label ids whose false negatives must not grow")
    max_fn_increase: int = Field(default=1, ge=0, description="extra false negatives allowed per protected class on "
                                                              "the validation data, against the original model")
    protected_weight: float = Field(default=3.0, ge=1, le=100, description="loss weight of the protected classes "
                                                                           "while fine-tuning")
    max_step_backs: int = Field(default=4, ge=0, le=20, description="times to step back to the last good model "
                                                                    "and retry a smaller step before stopping short")
    target_sparsity: Fraction | None = Field(
        default=None, description=f"fraction of conv/linear weights set to zero; {DEFAULT_SPARSITY} when neither it "
                                  "nor sweep is given")

    @model_validator(mode="before")
    @classmethod
    def _default_target(cls, data):
        return _fill_default(data, "target_sparsity", DEFAULT_SPARSITY, ("sweep",))

    @model_validator(mode="after")
    def _single_target(self):
        _one_target(self, ("target_sparsity", "sweep"))
        if len(set(self.protected_classes)) != len(self.protected_classes):
            raise ValueError("protected_classes must be distinct")
        return self


def check_spec(spec: JobSpec) -> None:
    """Pruning needs a trained model to start from, and takes none of the other methods' inputs."""
    model = spec.model
    if model is None or model.uri is None:
        raise SpecProblem("model.uri", "prune needs the trained model to prune: model.uri = \"job://<id>\" for a "
                                       "Refinery model, or safetensors weights with model.arch")
    is_refinery_model = model.uri.startswith("job://") and "/" not in model.uri.removeprefix("job://")
    if not is_refinery_model and model.arch is None:
        raise SpecProblem("model.arch", "model.uri points at bare weights; also give model.arch (and model.args) so "
                                        "the architecture can be rebuilt, or use job://<id> for a Refinery model")
    for field in ("forget", "student", "teachers", "transfer", "evaluate"):
        if getattr(spec, field) is not None:
            raise SpecProblem(field, f"prune takes no {field}; remove it")


METHOD = Method(
    name="prune",
    default_algorithm="magnitude",
    summary="Make a trained model smaller: zero its weights (unstructured) or remove whole channels (structured), "
            "fine-tuning as it goes.",
    algorithms={
        "magnitude": Algorithm("magnitude", MagnitudeParams, "Global magnitude pruning on a gradual (cubic) "
                               "schedule with fine-tuning; zeros stay in a dense model of the same shape."),
        "lottery": Algorithm("lottery", LotteryParams, "Iterative magnitude pruning with weight rewinding to an "
                             "early checkpoint of a fresh dense run (\"The Lottery Ticket Hypothesis\")."),
        "structured": Algorithm("structured", StructuredParams, "Dependency-aware channel pruning (Torch-Pruning) "
                                "to a FLOPs or parameter target: a physically smaller, faster dense model."),
        "class_aware": Algorithm("class_aware", ClassAwareParams, "Gradual magnitude pruning that keeps protected "
                                 "classes' false negatives within a bound (\"Class-dependent Compression of Deep "
                                 "Neural Networks\")."),
    },
    check_spec=check_spec,
)
