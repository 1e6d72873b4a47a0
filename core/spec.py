"""The job spec a user submits (DESIGN §4): plain pydantic, shared by the API (validation) and the workers (execution)."""
from typing import Annotated, Any, Literal

from pydantic import BaseModel, ConfigDict, Field, field_validator, model_validator

Method = Literal["train", "distill", "prune", "unlearn"]
URI_SCHEMES = ("builtin://", "file://", "https://", "s3://", "job://", "file_")
URI_PATTERN = r"^(builtin://|file://|https://|s3://|job://|file_)"
Uri = Annotated[str, Field(pattern=URI_PATTERN, min_length=5, max_length=2048,
                           description="builtin://, file://, https://, s3://, job://<id>[/<artifact>] or file_…")]


def check_uri(uri: str) -> str:
    if not uri.startswith(URI_SCHEMES):
        raise ValueError(f"unsupported URI {uri!r}: use one of {', '.join(URI_SCHEMES)}")
    return uri


class Strict(BaseModel):
    model_config = ConfigDict(extra="forbid", frozen=True)


class Validation(Strict):
    """Either a seeded stratified `fraction` of the dataset, or a separate `uri` in the same format."""
    fraction: float | None = Field(default=None, gt=0.0, lt=0.9)
    uri: Uri | None = None

    @model_validator(mode="after")
    def _one_of(self) -> "Validation":
        if (self.fraction is None) == (self.uri is None):
            raise ValueError("give exactly one of validation.fraction or validation.uri")
        if self.uri is not None:
            check_uri(self.uri)
        return self


class DatasetRef(Strict):
    uri: Uri
    label_column: str | None = Field(default=None, description="label column for .csv / .parquet datasets")
    validation: Validation | None = None

    _check_uri = field_validator("uri")(lambda cls, v: check_uri(v))


class ModelRef(Strict):
    """A model: `uri` of safetensors weights (or `job://<id>` for a Refinery model), `arch` from the registry, `args`."""
    uri: Uri | None = None
    arch: str | None = None
    args: dict[str, Any] = Field(default_factory=dict)

    @model_validator(mode="after")
    def _something(self) -> "ModelRef":
        if self.uri is None and self.arch is None:
            raise ValueError("give model.uri, model.arch, or both")
        if self.uri is not None:
            check_uri(self.uri)
        return self


class Budget(Strict):
    max_seconds: int | None = Field(default=None, ge=1, description="wall-clock compute seconds; server default and cap apply")
    max_epochs: int | None = Field(default=None, ge=1)
    max_steps: int | None = Field(default=None, ge=1)


class Resources(Strict):
    """What a job runs on. `accelerator` and `devices` pick the worker pool (resource class `cpu`, `gpu`, `gpu-x4` …);
    `devices` > 1 runs the training loop data-parallel over that many processes (DDP; gloo on CPU, NCCL on GPU)."""
    accelerator: Literal["cpu", "gpu"] = "cpu"
    devices: int = Field(default=1, ge=1, le=64, description="processes (CPU) or GPUs the training loop runs on")
    nodes: int = Field(default=1, ge=1, le=64, description="machines; more than 1 needs a multi-node worker pool")


class Forget(Strict):
    class_: int | None = Field(default=None, alias="class", ge=0)
    indices: list[int] | None = None
    uri: Uri | None = None

    model_config = ConfigDict(extra="forbid", frozen=True, populate_by_name=True)


class JobSpec(Strict):
    method: Method
    algorithm: str | None = None
    model: ModelRef | None = None
    dataset: DatasetRef
    params: dict[str, Any] = Field(default_factory=dict)
    budget: Budget = Field(default_factory=Budget)
    resources: Resources = Field(default_factory=Resources)
    seed: int = Field(default=0, ge=0, le=2**31 - 1)
    metadata: dict[str, Annotated[str, Field(max_length=512)]] = Field(default_factory=dict, max_length=32)
    # Method-specific inputs (distill / unlearn); validated by the method's own rules.
    forget: Forget | None = None
    student: dict[str, Any] | None = None
    teachers: list[ModelRef] | None = None
    transfer: DatasetRef | None = None
    evaluate: dict[str, Any] | None = Field(default=None, description="method-specific evaluation options, e.g. "
                                            "unlearn's {\"oracles\": K}; checked by the method")
