"""Distribution matching (DM) from "Dataset Condensation with Distribution Matching" (Zhao & Bilen): every step a
freshly initialised network embeds a real batch and the synthetic set, and the synthetic inputs move so that each
class's mean embedding matches the real one. No network is trained, which makes it the fast default."""
from typing import Any

import torch

from core.methods.distill import DatasetParams
from workers.checkpoints import optimizer_tensors, restore_optimizer
from workers.distillation.networks import matching_network
from workers.distillation.synthetic import class_rows, siamese_augment
from workers.runtime import JobRun


def class_means(features: torch.Tensor, labels: torch.Tensor, classes: int) -> torch.Tensor:
    """[classes, D] mean feature of each class's rows."""
    sums = torch.zeros(classes, features.shape[1], device=features.device).index_add(0, labels, features)
    counts = torch.bincount(labels, minlength=classes).clamp_min(1).to(features.device)
    return sums / counts[:, None]


class DistributionMatching:
    def __init__(self, x: torch.Tensor, y: torch.Tensor, synthetic: torch.Tensor, synthetic_y: torch.Tensor,
                 classes: int, p: DatasetParams, seed: int):
        self.x, self.y, self.classes, self.p, self.seed = x, y, classes, p, seed
        self.rows = class_rows(y.cpu(), classes)
        self.synthetic = synthetic.detach().clone().requires_grad_(True)
        self.synthetic_y = synthetic_y
        self.optimizer = torch.optim.Adam([self.synthetic], lr=p.lr_images)

    def prepare(self, run: JobRun) -> None:
        """Nothing to precompute: DM needs no expert networks."""

    def step(self, iteration: int) -> float:
        # Seeded by iteration, so a resumed attempt draws the same networks, batches and augmentations.
        generator = torch.Generator().manual_seed(self.seed * 100003 + iteration)
        network = matching_network(tuple(self.x.shape[1:]), self.classes, self.p.network_width,
                                   self.seed * 100003 + iteration)
        network.to(self.x.device).requires_grad_(False)
        chosen = torch.cat([members[torch.randperm(len(members), generator=generator)[:self.p.real_batch]]
                            for members in self.rows]).to(self.x.device)
        real, synthetic = self.x[chosen], self.synthetic
        if self.p.augment:
            real, synthetic = siamese_augment([real, synthetic], generator)
        with torch.no_grad():
            real_means = class_means(network.features(real), self.y[chosen], self.classes)
        synthetic_means = class_means(network.features(synthetic), self.synthetic_y, self.classes)
        loss = (real_means - synthetic_means).pow(2).sum()
        self.optimizer.zero_grad(set_to_none=True)
        loss.backward()
        self.optimizer.step()
        return loss.item()

    def current(self) -> torch.Tensor:
        return self.synthetic.detach()

    def state(self) -> tuple[dict[str, dict[str, torch.Tensor]], dict[str, Any]]:
        tensors, meta = optimizer_tensors(self.optimizer)
        return {"synthetic": {"x": self.synthetic.detach()}, "synthetic_optimizer": tensors}, {"optimizer": meta}

    def load_state(self, groups: dict[str, dict[str, torch.Tensor]], meta: dict[str, Any]) -> None:
        with torch.no_grad():
            self.synthetic.copy_(groups["synthetic"]["x"].to(self.synthetic.device))
        restore_optimizer(self.optimizer, groups.get("synthetic_optimizer", {}), meta["optimizer"],
                          self.synthetic.device)
