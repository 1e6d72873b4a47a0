"""The `train` method's catalog entry: plain supervised training and its parameters."""
from typing import Literal

from pydantic import Field, field_validator

from core.catalog import Algorithm, Method, Params


class TrainParams(Params):
    epochs: int | Literal["auto"] = Field(default=30, description='epochs, or "auto" to train until the budget or a plateau')
    lr: float = Field(default=1e-3, gt=0, le=10)
    batch_size: int | Literal["auto"] = Field(
        default="auto", description='rows per step; "auto" = min(64, max(8, rows // 16)), so small tables still get '
                                    'enough optimizer steps per epoch')
    optimizer: Literal["adam", "adamw", "sgd"] = "adamw"
    momentum: float = Field(default=0.9, ge=0, lt=1, description="for sgd")
    weight_decay: float = Field(default=1e-4, ge=0, le=1)
    label_smoothing: float = Field(default=0.0, ge=0, lt=1)
    schedule: Literal["cosine", "constant", "step"] = "cosine"
    patience: int = Field(default=10, ge=1, le=1000, description='epochs without validation gain before "auto" stops')
    augment: bool = Field(default=False, description="random ±1 pixel shifts for images")

    @field_validator("batch_size")
    @classmethod
    def _batch_bounds(cls, value):
        if value != "auto" and not 1 <= value <= 65536:
            raise ValueError("batch_size must be between 1 and 65536, or \"auto\"")
        return value


METHOD = Method(
    name="train",
    default_algorithm="supervised",
    summary="Plain supervised training: baselines, teachers, oracle retrains.",
    algorithms={"supervised": Algorithm("supervised", TrainParams,
                                        "Cross-entropy training, keeping the best validation checkpoint.")},
)
