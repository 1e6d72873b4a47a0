"""A small convnet for small images: conv3x3-BN-ReLU blocks, pooling chosen from the input size, a linear head."""
from typing import Annotated

import torch
from pydantic import BaseModel, ConfigDict, Field, StrictFloat, StrictInt
from torch import nn

Channels = Annotated[StrictInt, Field(ge=1, le=4096)]


class CNNArgs(BaseModel):
    """`channels` gives every conv block's width and `hidden` the head's hidden width, so a pruned CNN is exact."""

    model_config = ConfigDict(frozen=True, extra="forbid")
    channels: Annotated[tuple[Channels, ...], Field(min_length=1, max_length=8)] = (32, 64, 64)
    hidden: Annotated[StrictInt, Field(ge=1, le=65536)] = 128
    dropout: Annotated[StrictFloat, Field(ge=0.0, le=0.9)] = 0.1


class CNN(nn.Module):
    def __init__(self, args: CNNArgs, input_shape: tuple[int, ...], num_classes: int):
        super().__init__()
        in_channels, height, width = input_shape
        side = min(height, width)
        layers: list[nn.Module] = []
        for index, out_channels in enumerate(args.channels):
            layers += [nn.Conv2d(in_channels, out_channels, 3, padding=1, bias=False), nn.BatchNorm2d(out_channels),
                       nn.ReLU()]
            # Halve the feature map between blocks while it is at least 4 pixels wide, so 8x8 digits keep a 2x2 map
            # for the last block and 28x28 or 32x32 images still shrink to 7x7 or 8x8 before global pooling.
            if index < len(args.channels) - 1 and side >= 4:
                layers.append(nn.MaxPool2d(2))
                side //= 2
            in_channels = out_channels
        self.features = nn.Sequential(*layers)
        self.pool = nn.AdaptiveAvgPool2d(1)
        self.flatten = nn.Flatten()
        self.hidden = nn.Sequential(nn.Linear(in_channels, args.hidden), nn.ReLU(), nn.Dropout(args.dropout))
        self.head = nn.Linear(args.hidden, num_classes)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.head(self.hidden(self.flatten(self.pool(self.features(x)))))

    def widths(self) -> dict:
        """The width arguments that rebuild this module as it is now (after pruning, too)."""
        return {"channels": [m.out_channels for m in self.features if isinstance(m, nn.Conv2d)],
                "hidden": self.hidden[0].out_features}
