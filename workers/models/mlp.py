"""A multilayer perceptron: flattens any input, so it serves tabular data and small images alike."""
from typing import Annotated

import torch
from pydantic import BaseModel, ConfigDict, Field, StrictFloat, StrictInt
from torch import nn

Width = Annotated[StrictInt, Field(ge=1, le=65536)]
Dropout = Annotated[StrictFloat, Field(ge=0.0, le=0.9)]


class MLPArgs(BaseModel):
    """`hidden` gives every hidden layer's width, so a pruned MLP is described exactly; [] is logistic regression."""

    model_config = ConfigDict(frozen=True, extra="forbid")
    hidden: Annotated[tuple[Width, ...], Field(max_length=16)] = (256, 128)
    dropout: Dropout = 0.1


class MLP(nn.Module):
    def __init__(self, args: MLPArgs, input_shape: tuple[int, ...], num_classes: int):
        super().__init__()
        self.flatten = nn.Flatten()
        layers: list[nn.Module] = []
        width = _numel(input_shape)
        for hidden in args.hidden:
            layers += [nn.Linear(width, hidden), nn.ReLU(), nn.Dropout(args.dropout)]
            width = hidden
        self.layers = nn.Sequential(*layers)
        self.head = nn.Linear(width, num_classes)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.head(self.layers(self.flatten(x)))

    def widths(self) -> dict:
        """The width arguments that rebuild this module as it is now (after pruning, too)."""
        return {"hidden": [m.out_features for m in self.layers if isinstance(m, nn.Linear)]}


def _numel(shape: tuple[int, ...]) -> int:
    count = 1
    for size in shape:
        count *= size
    return count
