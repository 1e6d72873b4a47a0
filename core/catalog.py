"""Methods, their algorithms and each algorithm's parameter model: what `GET /v1/methods` publishes and specs obey.

A method's training code lives in `workers/methods/`; only the torch-free parameter models live here, so the API can
validate specs without importing torch."""
from dataclasses import dataclass
from typing import Literal

from pydantic import BaseModel, ConfigDict, Field, field_validator


class Params(BaseModel):
    model_config = ConfigDict(extra="forbid", frozen=True)


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


@dataclass(frozen=True)
class Algorithm:
    name: str
    params: type[Params]
    summary: str


@dataclass(frozen=True)
class Method:
    name: str
    default_algorithm: str
    algorithms: dict[str, Algorithm]
    summary: str


METHODS: dict[str, Method] = {
    "train": Method(
        name="train",
        default_algorithm="supervised",
        summary="Plain supervised training: baselines, teachers, oracle retrains.",
        algorithms={"supervised": Algorithm("supervised", TrainParams,
                                            "Cross-entropy training, keeping the best validation checkpoint.")},
    ),
}


def find_algorithm(method: str, algorithm: str | None) -> Algorithm | None:
    entry = METHODS.get(method)
    if entry is None:
        return None
    return entry.algorithms.get(algorithm or entry.default_algorithm)
