"""The small networks dataset distillation matches through: a ConvNet with instance normalisation for images (the
architecture of "Dataset Condensation with Distribution Matching" and MTT, no running statistics, so it behaves the
same on a batch of 10 synthetic images as on 640 real ones) and an MLP for tables."""
import torch
from torch import nn


class ConvNet(nn.Module):
    """[conv3x3 → instance norm → ReLU → 2x2 average pool] while the map is at least 4 pixels wide, then a linear
    classifier on the flattened features. `features(x)` is the embedding distribution matching compares."""

    def __init__(self, input_shape: tuple[int, ...], num_classes: int, width: int):
        super().__init__()
        channels, side = input_shape[0], min(input_shape[1:])
        layers: list[nn.Module] = []
        while True:
            layers += [nn.Conv2d(channels, width, 3, padding=1), nn.GroupNorm(width, width), nn.ReLU()]
            channels = width
            if side < 4:
                break
            layers.append(nn.AvgPool2d(2))
            side //= 2
            if side < 4:
                break
        self.body = nn.Sequential(*layers, nn.Flatten())
        with torch.no_grad():
            features = self.body(torch.zeros(1, *input_shape)).shape[1]
        self.head = nn.Linear(features, num_classes)

    def features(self, x: torch.Tensor) -> torch.Tensor:
        return self.body(x)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.head(self.body(x))


class TableNet(nn.Module):
    """One hidden ReLU layer: the tabular counterpart of ConvNet."""

    def __init__(self, input_shape: tuple[int, ...], num_classes: int, width: int):
        super().__init__()
        self.body = nn.Sequential(nn.Flatten(), nn.Linear(int(torch.tensor(input_shape).prod()), width), nn.ReLU())
        self.head = nn.Linear(width, num_classes)

    def features(self, x: torch.Tensor) -> torch.Tensor:
        return self.body(x)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.head(self.body(x))


def matching_network(input_shape: tuple[int, ...], num_classes: int, width: int, seed: int) -> nn.Module:
    """A freshly initialised network for the inputs' kind; `seed` makes the draw repeatable."""
    torch.manual_seed(seed)
    if len(input_shape) == 3:
        return ConvNet(input_shape, num_classes, width)
    return TableNet(input_shape, num_classes, 4 * width)
