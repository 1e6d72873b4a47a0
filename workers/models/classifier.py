"""The module every Refinery model is: standardisation held in buffers, then an architecture body."""
import copy

import torch
from torch import nn


class Classifier(nn.Module):
    """Raw inputs in, logits out.

    `mean` and `std` are buffers shaped to broadcast over the input ([1, C, 1, 1] for images, [1, F] for tabular),
    so they travel in model.safetensors and the exported ONNX takes inputs exactly as stored in the dataset file.
    """

    def __init__(self, body: nn.Module, mean: torch.Tensor, std: torch.Tensor):
        super().__init__()
        self.register_buffer("mean", mean)
        self.register_buffer("std", std)
        self.body = body

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.body((x - self.mean) / self.std)

    @property
    def head(self) -> nn.Linear:
        """The output layer (one unit per class): pruning must leave its outputs alone."""
        return self.body.head


def cpu_eval_copy(model: nn.Module) -> nn.Module:
    """A CPU copy in eval mode, so exporting or measuring never moves or switches the caller's model."""
    return copy.deepcopy(model).cpu().eval()
