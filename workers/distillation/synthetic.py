"""The synthetic set: checks, initialisation (random real rows, noise, or AST's representative rows), the siamese
augmentation shared by real and synthetic batches, and synthetic.npz. Synthetic inputs are learned in standardised
units (the real training data's mean and std) and written back in the data's own units."""
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch
from sklearn.cluster import KMeans

from workers.data import Dataset
from workers.errors import JobFailure
from workers.inputs import input_stats

MAX_SHIFT_FRACTION = 0.125  # shifts up to 1/8 of the image side: ±1 pixel on 8x8 digits, ±3 on 28x28
SCALE_RANGE = 0.2  # intensity scale in [0.9, 1.1]


@dataclass
class Standardizer:
    mean: torch.Tensor  # broadcasts over a batch: [1, C, 1, 1] for images, [1, F] for tables
    std: torch.Tensor

    @classmethod
    def of(cls, data: Dataset) -> "Standardizer":
        mean, std = input_stats(data)
        return cls(torch.from_numpy(mean)[None], torch.from_numpy(std)[None])

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return (x - self.mean.to(x.device)) / self.std.to(x.device)

    def inverse(self, x: torch.Tensor) -> torch.Tensor:
        return x * self.std.to(x.device) + self.mean.to(x.device)


def check_ipc(train: Dataset, ipc: int) -> None:
    counts = np.bincount(train.y, minlength=len(train.classes))
    smallest = int(counts.argmin())
    if counts[smallest] < ipc:
        raise JobFailure("ipc_too_large", f"params.ipc is {ipc} but class {train.classes[smallest]!r} has only "
                         f"{int(counts[smallest])} training rows (after the validation split); lower ipc to at most "
                         f"{int(counts[smallest])}.")


def class_rows(y: torch.Tensor, classes: int) -> list[torch.Tensor]:
    return [torch.nonzero(y == label).flatten() for label in range(classes)]


def initial_synthetic(x: torch.Tensor, y: torch.Tensor, classes: int, ipc: int, init: str,
                      seed: int) -> tuple[torch.Tensor, torch.Tensor]:
    """(synthetic inputs [classes·ipc, …] in standardised units, labels), class by class."""
    generator = torch.Generator().manual_seed(seed)
    rows = []
    for members in class_rows(y.cpu(), classes):
        if init == "representative":
            rows.append(members[_representatives(x[members.to(x.device)].cpu(), ipc, seed)])
        else:
            rows.append(members[torch.randperm(len(members), generator=generator)[:ipc]])
    chosen = torch.cat(rows).to(x.device)
    synthetic = x[chosen].clone()
    if init == "noise":
        synthetic = torch.randn(synthetic.shape, generator=generator).to(x.device)
    return synthetic, torch.arange(classes, device=x.device).repeat_interleave(ipc)


def _representatives(x: torch.Tensor, ipc: int, seed: int) -> torch.Tensor:
    """AST's representative initialisation: the real row nearest each of `ipc` k-means centres of the class, so the
    synthetic set starts covering the class's modes instead of `ipc` random (possibly atypical) rows."""
    flat = x.flatten(1).numpy()
    centres = KMeans(n_clusters=ipc, n_init=3, random_state=seed).fit(flat).cluster_centers_
    distances = ((flat[None] - centres[:, None]) ** 2).sum(-1)  # [ipc, rows]
    chosen: list[int] = []
    for row in distances:  # nearest unused row per centre, so no row is picked twice
        order = np.argsort(row)
        chosen.append(int(next(i for i in order if i not in chosen)))
    return torch.tensor(chosen)


def siamese_augment(batches: list[torch.Tensor], generator: torch.Generator) -> list[torch.Tensor]:
    """The same random shift and intensity scale on every batch (real and synthetic alike), as in "Dataset
    Condensation with Differentiable Siamese Augmentation": both sides see the same view, and the synthetic images
    receive gradients through it. Tables pass through unchanged."""
    if batches[0].ndim != 4:
        return batches
    side = min(batches[0].shape[2:])
    limit = max(1, int(side * MAX_SHIFT_FRACTION))
    dy, dx = torch.randint(-limit, limit + 1, (2,), generator=generator).tolist()
    scale = 1.0 + (torch.rand(1, generator=generator).item() - 0.5) * SCALE_RANGE
    return [torch.roll(batch, shifts=(dy, dx), dims=(2, 3)) * scale for batch in batches]


def save_synthetic(path: Path, x: np.ndarray, y: np.ndarray) -> Path:
    """synthetic.npz with `x` (float32, the data's units and shape) and `y` (int64): a dataset any job can use."""
    np.savez(path, x=x.astype(np.float32), y=y.astype(np.int64))
    return path
