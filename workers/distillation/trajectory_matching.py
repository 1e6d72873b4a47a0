"""Trajectory matching (MTT, "Dataset Distillation by Matching Training Trajectories", Cazenavette et al.) with the
improvements of "Efficient Dataset Distillation through Alignment with Smooth and High-Quality Expert Trajectories"
(AST, Shen et al.), each switchable:

- experts trained with a clipped loss and a gradient penalty, so their trajectories change smoothly;
- representative initialisation of the synthetic set (synthetic.py);
- a balanced inner-loop loss: the student's loss is divided by its value at the segment's start, so segments that
  start late in training (small losses) move the student as much as early ones;
- an intermediate matching loss: the student also matches the expert's intermediate epochs, not only the end;
- weight perturbation: the student starts from slightly perturbed expert weights, so the synthetic set does not
  depend on one exact starting point (and accumulated error matters less).

The clipped loss, the penalty weight and the perturbation size are our reading of AST, stated as constants below."""
from typing import Any

import torch
import torch.nn.functional as F
from torch import nn
from torch.func import functional_call

from core.methods.distill import DatasetParams
from workers.checkpoints import optimizer_tensors, restore_optimizer
from workers.distillation.networks import matching_network
from workers.distillation.synthetic import siamese_augment
from workers.runtime import JobRun

EXPERT_LR = 0.01  # plain SGD, as MTT's experts
EXPERT_BATCH = 64
LOSS_CLIP = 1.0  # nats: a row's loss above this is scaled down to it (gradient direction kept, size bounded)
GRADIENT_PENALTY = 0.1  # weight of ‖∇θ loss‖² in the experts' objective
PERTURBATION = 0.01  # student start = expert weights + N(0, (0.01·std of each tensor)²)
SYNTHETIC_BATCH = 256  # synthetic rows per inner step (all of them when fewer)


class Trajectories:
    """Each expert's flattened weights after every epoch: [experts][epochs + 1, P]."""

    def __init__(self, network: nn.Module):
        self.names = [name for name, _ in network.named_parameters()]
        self.shapes = [parameter.shape for _, parameter in network.named_parameters()]
        self.runs: list[torch.Tensor] = []

    def unflatten(self, flat: torch.Tensor) -> dict[str, torch.Tensor]:
        sizes = [shape.numel() for shape in self.shapes]
        return {name: chunk.view(shape)
                for name, chunk, shape in zip(self.names, flat.split(sizes), self.shapes, strict=True)}


def flat_parameters(network: nn.Module) -> torch.Tensor:
    return torch.cat([parameter.detach().flatten() for parameter in network.parameters()])


def expert_loss(network: nn.Module, x: torch.Tensor, y: torch.Tensor, clip: bool, penalty: bool) -> torch.Tensor:
    """Cross-entropy, optionally clipped per row and with a gradient-norm penalty (AST's smooth experts)."""
    rows = F.cross_entropy(network(x), y, reduction="none")
    if clip:
        rows = rows * (LOSS_CLIP / rows.detach()).clamp(max=1.0)
    loss = rows.mean()
    if penalty:
        grads = torch.autograd.grad(loss, list(network.parameters()), create_graph=True)
        loss = loss + GRADIENT_PENALTY * sum(grad.pow(2).sum() for grad in grads)
    return loss


class TrajectoryMatching:
    def __init__(self, x: torch.Tensor, y: torch.Tensor, synthetic: torch.Tensor, synthetic_y: torch.Tensor,
                 classes: int, p: DatasetParams, seed: int):
        self.x, self.y, self.classes, self.p, self.seed = x, y, classes, p, seed
        self.input_shape = tuple(x.shape[1:])
        self.network = matching_network(self.input_shape, classes, p.network_width, seed).to(x.device)
        self.trajectories = Trajectories(self.network)
        self.synthetic = synthetic.detach().clone().requires_grad_(True)
        self.synthetic_y = synthetic_y
        self.optimizer = torch.optim.Adam([self.synthetic], lr=p.lr_images)
        # MTT learns the student's step size along with the images; it starts at the experts' own.
        self.student_lr = torch.tensor(EXPERT_LR, device=x.device, requires_grad=True)
        self.lr_optimizer = torch.optim.SGD([self.student_lr], lr=p.lr_lr, momentum=0.5)

    # --- experts -------------------------------------------------------------------------------------------------
    def prepare(self, run: JobRun) -> None:
        """Train the experts on the real data (skipped when a checkpoint brought their trajectories)."""
        while len(self.trajectories.runs) < self.p.experts:
            index = len(self.trajectories.runs)
            self.trajectories.runs.append(self._train_expert(run, index))
            run.event("experts.trained", f"Expert {index + 1}/{self.p.experts} trained for {self.p.expert_epochs} "
                      "epochs.", level="debug", expert=index + 1)

    def _train_expert(self, run: JobRun, index: int) -> torch.Tensor:
        p = self.p
        network = matching_network(self.input_shape, self.classes, p.network_width,
                                   self.seed * 7919 + index).to(self.x.device)
        optimizer = torch.optim.SGD(network.parameters(), lr=EXPERT_LR)
        generator = torch.Generator().manual_seed(self.seed * 7919 + index)
        snapshots = [flat_parameters(network)]
        for _ in range(p.expert_epochs):
            order = torch.randperm(len(self.y), generator=generator).to(self.x.device)
            for start in range(0, len(order), EXPERT_BATCH):
                run.check()
                batch = order[start:start + EXPERT_BATCH]
                x = self.x[batch]
                if p.augment:
                    (x,) = siamese_augment([x], generator)
                loss = expert_loss(network, x, self.y[batch], p.clip_loss, p.gradient_penalty)
                optimizer.zero_grad(set_to_none=True)
                loss.backward()
                optimizer.step()
            snapshots.append(flat_parameters(network))
        return torch.stack(snapshots)

    # --- one update of the synthetic set -------------------------------------------------------------------------
    def step(self, iteration: int) -> float:
        p = self.p
        generator = torch.Generator().manual_seed(self.seed * 100003 + iteration)
        expert = self.trajectories.runs[int(torch.randint(len(self.trajectories.runs), (1,), generator=generator))]
        start_epoch = int(torch.randint(p.max_start_epoch + 1, (1,), generator=generator))
        start = expert[start_epoch]
        targets = expert[start_epoch + 1:start_epoch + p.match_epochs + 1]  # [M, P]
        weights = start.clone()
        if p.weight_perturbation:
            weights = self._perturbed(weights, generator)
        weights.requires_grad_(True)
        checkpoints = self._checkpoint_steps()
        losses, first_loss, reached = [], None, {}
        for inner in range(p.synthetic_steps):
            rows = torch.randperm(len(self.synthetic_y), generator=generator)[:SYNTHETIC_BATCH].to(self.x.device)
            x = self.synthetic[rows]
            if p.augment:
                (x,) = siamese_augment([x], generator)
            logits = functional_call(self.network, self.trajectories.unflatten(weights), (x,))
            loss = F.cross_entropy(logits, self.synthetic_y[rows])
            if p.balanced_inner_loss:
                first_loss = loss.detach() if first_loss is None else first_loss
                loss = loss / first_loss.clamp_min(1e-8)
            (grad,) = torch.autograd.grad(loss, weights, create_graph=True)
            weights = weights - self.student_lr * grad
            if inner + 1 in checkpoints:
                reached[checkpoints[inner + 1]] = weights
        for epoch_offset, reached_weights in reached.items():
            target = targets[epoch_offset]
            losses.append((reached_weights - target).pow(2).sum() / (start - target).pow(2).sum().clamp_min(1e-12))
        matching = torch.stack(losses).mean()
        self.optimizer.zero_grad(set_to_none=True)
        self.lr_optimizer.zero_grad(set_to_none=True)
        matching.backward()
        self.optimizer.step()
        self.lr_optimizer.step()
        with torch.no_grad():
            self.student_lr.clamp_(min=1e-6)
        return matching.item()

    def _checkpoint_steps(self) -> dict[int, int]:
        """Inner step → index of the expert epoch it is matched to. The final step always matches the segment's end;
        with intermediate matching, the steps in between match the epochs in between, evenly spaced."""
        p = self.p
        final = {p.synthetic_steps: p.match_epochs - 1}
        if not p.intermediate_matching:
            return final
        steps = {max(1, round(p.synthetic_steps * (k + 1) / p.match_epochs)): k for k in range(p.match_epochs - 1)}
        return {**steps, **final}

    def _perturbed(self, weights: torch.Tensor, generator: torch.Generator) -> torch.Tensor:
        chunks = []
        sizes = [shape.numel() for shape in self.trajectories.shapes]
        for chunk in weights.split(sizes):
            noise = torch.randn(chunk.shape, generator=generator).to(chunk.device)
            chunks.append(chunk + PERTURBATION * chunk.std().nan_to_num(0.0) * noise)
        return torch.cat(chunks)

    # --- state ---------------------------------------------------------------------------------------------------
    def current(self) -> torch.Tensor:
        return self.synthetic.detach()

    def learned_lr(self) -> float:
        return self.student_lr.item()

    def state(self) -> tuple[dict[str, dict[str, torch.Tensor]], dict[str, Any]]:
        tensors, meta = optimizer_tensors(self.optimizer)
        lr_tensors, lr_meta = optimizer_tensors(self.lr_optimizer)
        groups = {"synthetic": {"x": self.synthetic.detach(), "student_lr": self.student_lr.detach().reshape(1)},
                  "synthetic_optimizer": tensors, "lr_optimizer": lr_tensors,
                  "trajectories": {f"expert_{i}": run for i, run in enumerate(self.trajectories.runs)}}
        return groups, {"optimizer": meta, "lr_optimizer": lr_meta}

    def load_state(self, groups: dict[str, dict[str, torch.Tensor]], meta: dict[str, Any]) -> None:
        device = self.synthetic.device
        with torch.no_grad():
            self.synthetic.copy_(groups["synthetic"]["x"].to(device))
            self.student_lr.copy_(groups["synthetic"]["student_lr"][0].to(device))
        restore_optimizer(self.optimizer, groups.get("synthetic_optimizer", {}), meta["optimizer"], device)
        restore_optimizer(self.lr_optimizer, groups.get("lr_optimizer", {}), meta["lr_optimizer"], device)
        runs = groups.get("trajectories", {})
        self.trajectories.runs = [runs[f"expert_{i}"].to(device) for i in range(len(runs))]
