"""The architecture registry: names users put in a job spec, their validated arguments, and `build_model`."""
from collections.abc import Callable
from dataclasses import dataclass

import numpy as np
import torch
from pydantic import BaseModel, ValidationError
from torch import nn

from workers.errors import JobFailure
from workers.models.classifier import Classifier
from workers.models.cnn import CNN, CNNArgs
from workers.models.mlp import MLP, MLPArgs
from workers.models.resnet import ResNet, ResNet20Args, ResNet56Args


@dataclass(frozen=True)
class Architecture:
    name: str
    args_model: type[BaseModel]
    build: Callable[[BaseModel, tuple[int, ...], int], nn.Module]
    images_only: bool
    description: str


ARCHITECTURES: dict[str, Architecture] = {
    arch.name: arch
    for arch in [
        Architecture("mlp", MLPArgs, MLP, False, "multilayer perceptron on flattened inputs (tabular or images)"),
        Architecture("cnn", CNNArgs, CNN, True, "small convnet for small images (8x8 digits to 32x32)"),
        Architecture("resnet20", ResNet20Args, ResNet, True, "CIFAR ResNet-20 (He et al., 2015)"),
        Architecture("resnet56", ResNet56Args, ResNet, True, "CIFAR ResNet-56 (He et al., 2015)"),
    ]
}

DEFAULT_ARCH = {"image": "cnn", "tabular": "mlp"}


def default_arch(kind: str) -> str:
    """The architecture a `train` job gets when its spec names none."""
    if kind not in DEFAULT_ARCH:
        raise ValueError(f"no default architecture for dataset kind {kind!r}")
    return DEFAULT_ARCH[kind]


def architecture(arch: str) -> Architecture:
    if arch not in ARCHITECTURES:
        raise JobFailure("unknown_arch", f"unknown architecture {arch!r}; choose one of: {', '.join(ARCHITECTURES)}")
    return ARCHITECTURES[arch]


def parse_args(arch: str, args: dict | None) -> BaseModel:
    """Validate a model's arguments against its architecture (defaults filled in, bounds checked)."""
    spec = architecture(arch)
    try:
        return spec.args_model.model_validate(args or {})
    except ValidationError as error:
        problems = "; ".join(f"{'.'.join(str(part) for part in e['loc']) or 'args'}: {e['msg']}"
                             for e in error.errors())
        raise JobFailure("invalid_model_args", f"model args for {arch!r}: {problems}") from None


def build_model(arch: str, args: dict | None, input_shape: tuple[int, ...], num_classes: int,
                mean: np.ndarray | None = None, std: np.ndarray | None = None) -> Classifier:
    """A fresh model for inputs shaped `input_shape` (no batch: (C, H, W) or (F,)); `mean`/`std` are per channel
    (or per feature), computed on the training data as stored, and are applied inside the model."""
    spec = architecture(arch)
    parsed = parse_args(arch, args)
    input_shape = _checked_input_shape(input_shape)
    if spec.images_only and len(input_shape) != 3:
        raise JobFailure("invalid_model_args", f"architecture {arch!r} needs image inputs shaped (C, H, W); this "
                                               f"dataset's inputs are shaped {input_shape}; use 'mlp'")
    if isinstance(num_classes, bool) or not isinstance(num_classes, int) or num_classes < 2:
        raise JobFailure("invalid_model_args", f"a classifier needs at least 2 classes, got {num_classes!r}")
    body = spec.build(parsed, input_shape, num_classes)
    std_per_channel = _per_channel(std, input_shape, 1.0, "std")
    # A constant channel or feature carries no information; dividing by 1 keeps it finite instead of inf.
    std_per_channel = torch.where(std_per_channel > 1e-12, std_per_channel, torch.ones(()))
    return Classifier(body, _per_channel(mean, input_shape, 0.0, "mean"), std_per_channel)


def widths_of(model: Classifier) -> dict:
    """The width arguments read off the module's layers, so a pruned model's card rebuilds it exactly."""
    return model.body.widths()


def _checked_input_shape(input_shape) -> tuple[int, ...]:
    shape = tuple(input_shape)
    if not shape or any(isinstance(s, bool) or not isinstance(s, int) or s < 1 for s in shape):
        raise JobFailure("invalid_model_args", f"input shape must be positive sizes without the batch, got {shape}")
    return shape


def _per_channel(values: np.ndarray | None, input_shape: tuple[int, ...], fill: float, name: str) -> torch.Tensor:
    """A [1, C, 1, ...] tensor broadcasting over a batch: one value per channel (images) or per feature (tabular)."""
    channels = input_shape[0]
    shape = (1, channels) + (1,) * (len(input_shape) - 1)
    if values is None:
        return torch.full(shape, fill)
    flat = np.asarray(values, dtype=np.float32).reshape(-1)
    if flat.size not in (1, channels) or not np.isfinite(flat).all():
        raise JobFailure("invalid_model_args", f"{name} needs 1 or {channels} finite values (one per channel or "
                                               f"feature), got {flat.size}")
    return torch.from_numpy(np.broadcast_to(flat, (channels,)).copy()).reshape(shape)
