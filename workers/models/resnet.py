"""CIFAR-style ResNets from "Deep Residual Learning for Image Recognition" (He et al., 2015): 3 stages of
n = (depth - 2) / 6 basic blocks, with projection shortcuts (option B) where the shape changes."""
from typing import Annotated, ClassVar

import torch
from pydantic import BaseModel, ConfigDict, Field, StrictInt, model_validator
from torch import nn

Width = Annotated[StrictInt, Field(ge=1, le=2048)]


class ResNetArgs(BaseModel):
    """`widths` are the three stages' residual widths (the stem has the first stage's width); `inner_widths`, one per
    block, are the widths of each block's middle conv, which structured pruning changes independently of the
    residual stream. Omitted, a block's inner width is its stage's width."""

    model_config = ConfigDict(frozen=True, extra="forbid")
    depth: ClassVar[int]
    widths: tuple[Width, Width, Width] = (16, 32, 64)
    inner_widths: tuple[Width, ...] | None = None

    @classmethod
    def blocks_per_stage(cls) -> int:
        return (cls.depth - 2) // 6

    @model_validator(mode="after")
    def _one_inner_width_per_block(self):
        blocks = 3 * self.blocks_per_stage()
        if self.inner_widths is not None and len(self.inner_widths) != blocks:
            raise ValueError(f"inner_widths needs one width per block: {blocks} for resnet{self.depth}, "
                             f"got {len(self.inner_widths)}")
        return self

    def block_inner_widths(self) -> list[int]:
        if self.inner_widths is not None:
            return list(self.inner_widths)
        return [width for width in self.widths for _ in range(self.blocks_per_stage())]


class ResNet20Args(ResNetArgs):
    depth: ClassVar[int] = 20


class ResNet56Args(ResNetArgs):
    depth: ClassVar[int] = 56


class BasicBlock(nn.Module):
    """Two 3x3 convs and a shortcut; separate ReLU modules keep the graph plain for Torch-Pruning's tracer."""

    def __init__(self, in_channels: int, inner: int, out_channels: int, stride: int):
        super().__init__()
        self.conv1 = nn.Conv2d(in_channels, inner, 3, stride=stride, padding=1, bias=False)
        self.bn1 = nn.BatchNorm2d(inner)
        self.relu1 = nn.ReLU()
        self.conv2 = nn.Conv2d(inner, out_channels, 3, padding=1, bias=False)
        self.bn2 = nn.BatchNorm2d(out_channels)
        self.shortcut: nn.Module = nn.Identity()
        if stride != 1 or in_channels != out_channels:
            self.shortcut = nn.Sequential(nn.Conv2d(in_channels, out_channels, 1, stride=stride, bias=False),
                                          nn.BatchNorm2d(out_channels))
        self.relu2 = nn.ReLU()

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        out = self.relu1(self.bn1(self.conv1(x)))
        out = self.bn2(self.conv2(out))
        return self.relu2(out + self.shortcut(x))


class ResNet(nn.Module):
    def __init__(self, args: ResNetArgs, input_shape: tuple[int, ...], num_classes: int):
        super().__init__()
        self.depth = args.depth
        in_channels = input_shape[0]
        width = args.widths[0]
        self.stem = nn.Sequential(nn.Conv2d(in_channels, width, 3, padding=1, bias=False), nn.BatchNorm2d(width),
                                  nn.ReLU())
        inner_widths = iter(args.block_inner_widths())
        stages = []
        for stage, stage_width in enumerate(args.widths):
            blocks = []
            for block in range(args.blocks_per_stage()):
                stride = 2 if stage > 0 and block == 0 else 1
                blocks.append(BasicBlock(width, next(inner_widths), stage_width, stride))
                width = stage_width
            stages.append(nn.Sequential(*blocks))
        self.stages = nn.Sequential(*stages)
        # Global average pooling makes the head independent of the input size (8x8 digits end at 2x2, CIFAR at 8x8).
        self.pool = nn.AdaptiveAvgPool2d(1)
        self.flatten = nn.Flatten()
        self.head = nn.Linear(width, num_classes)
        for module in self.modules():
            if isinstance(module, nn.Conv2d):
                # "Delving Deep into Rectifiers" (He et al., 2015) initialisation, as the CIFAR ResNets use.
                nn.init.kaiming_normal_(module.weight, mode="fan_out", nonlinearity="relu")

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.head(self.flatten(self.pool(self.stages(self.stem(x)))))

    def widths(self) -> dict:
        """The width arguments that rebuild this module as it is now (after pruning, too)."""
        return {"widths": [stage[-1].conv2.out_channels for stage in self.stages],
                "inner_widths": [block.conv1.out_channels for stage in self.stages for block in stage]}
