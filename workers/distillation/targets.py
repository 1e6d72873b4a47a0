"""How the teachers' logits become what the student learns from. A strategy turns the teachers' logits [K, B, C]
into target logits [K', B, C] with one loss weight per target: one teacher as it is (kd), an ensemble's average
(ensemble), or several teachers balanced as in MTARD (multi_teacher). Its state travels in checkpoints."""
import math
from typing import Any, Protocol

import torch
import torch.nn.functional as F

TEMPERATURE_RANGE = (1e-2, 1e3)
BISECTION_STEPS = 60


class TargetStrategy(Protocol):
    def fit(self, logits: torch.Tensor) -> None: ...
    def targets(self, logits: torch.Tensor) -> torch.Tensor: ...
    def weights(self) -> torch.Tensor: ...
    def update(self, losses: torch.Tensor) -> None: ...
    def state(self) -> dict[str, Any]: ...
    def load_state(self, state: dict[str, Any]) -> None: ...


class SingleTeacher:
    """kd: the teacher's logits are the targets."""

    def fit(self, logits: torch.Tensor) -> None:
        pass

    def targets(self, logits: torch.Tensor) -> torch.Tensor:
        return logits

    def weights(self) -> torch.Tensor:
        return torch.ones(1)

    def update(self, losses: torch.Tensor) -> None:
        pass

    def state(self) -> dict[str, Any]:
        return {}

    def load_state(self, state: dict[str, Any]) -> None:
        pass


class EnsembleAverage(SingleTeacher):
    """ensemble: one target, the members' average. Averaging probabilities at the distillation temperature T is
    written as logits T·log(mean softmax(z/T)), whose softmax at T is exactly that average."""

    def __init__(self, combine: str, temperature: float):
        self.combine = combine
        self.temperature = temperature

    def targets(self, logits: torch.Tensor) -> torch.Tensor:
        return ensemble_logits(logits, self.combine, self.temperature)[None]


def ensemble_logits(logits: torch.Tensor, combine: str, temperature: float = 1.0) -> torch.Tensor:
    """The ensemble's logits [B, C] from its members' [K, B, C]."""
    if combine == "logits":
        return logits.mean(0)
    members = logits.shape[0]
    log_probabilities = F.log_softmax(logits / temperature, dim=2)
    return temperature * (torch.logsumexp(log_probabilities, dim=0) - math.log(members))


class BalancedTeachers:
    """multi_teacher, after "Mitigating the Accuracy-Robustness Trade-off via Multi-Teacher Adversarial
    Distillation" (MTARD). Entropy-Based Balance: each teacher gets its own temperature τ_k so that its soft targets'
    mean entropy equals the teachers' average at T; written as logits scaled by T/τ_k. Normalization Loss Balance:
    each epoch, teacher k's loss weight is proportional to (L_k / L_k,initial)^β, so the teacher the student has
    learned least from (relatively) pulls hardest. With both off this is plain averaging of the soft targets."""

    def __init__(self, entropy_balance: bool, loss_balance: bool, strength: float, temperature: float, teachers: int):
        self.entropy_balance, self.loss_balance = entropy_balance, loss_balance
        self.strength, self.temperature = strength, temperature
        self.scales = torch.ones(teachers)
        self.initial_losses: torch.Tensor | None = None
        self.current_weights = torch.full((teachers,), 1.0 / teachers)

    def fit(self, logits: torch.Tensor) -> None:
        if self.entropy_balance:
            self.scales = entropy_matching_scales(logits, self.temperature)

    def targets(self, logits: torch.Tensor) -> torch.Tensor:
        return logits * self.scales.to(logits.device)[:, None, None]

    def weights(self) -> torch.Tensor:
        return self.current_weights

    def update(self, losses: torch.Tensor) -> None:
        """`losses`: each teacher's mean soft loss, first for the untrained student, then after every epoch."""
        losses = losses.detach().cpu().clamp_min(1e-12)
        if self.initial_losses is None:
            self.initial_losses = losses
            return
        if self.loss_balance:
            relative = (losses / self.initial_losses).pow(self.strength)
            self.current_weights = relative / relative.sum()

    def state(self) -> dict[str, Any]:
        return {"scales": self.scales.tolist(), "weights": self.current_weights.tolist(),
                "initial_losses": None if self.initial_losses is None else self.initial_losses.tolist()}

    def load_state(self, state: dict[str, Any]) -> None:
        self.scales = torch.tensor(state["scales"])
        self.current_weights = torch.tensor(state["weights"])
        self.initial_losses = None if state["initial_losses"] is None else torch.tensor(state["initial_losses"])

    def temperatures(self) -> list[float]:
        return [self.temperature / float(scale) for scale in self.scales]


def mean_entropy(logits: torch.Tensor, temperature: float) -> float:
    """Mean entropy (nats) of softmax(logits / temperature) over the rows of [N, C] logits."""
    log_p = F.log_softmax(logits / temperature, dim=1)
    return float(-(log_p.exp() * log_p).sum(1).mean())


def entropy_matching_scales(logits: torch.Tensor, temperature: float) -> torch.Tensor:
    """Per teacher, T/τ_k with τ_k the temperature at which its mean entropy equals the teachers' mean entropy at T.
    Entropy grows with the temperature, so bisection (on log τ) finds it."""
    target = sum(mean_entropy(teacher, temperature) for teacher in logits) / len(logits)
    scales = []
    for teacher in logits:
        low, high = (math.log(t) for t in TEMPERATURE_RANGE)
        for _ in range(BISECTION_STEPS):
            middle = (low + high) / 2
            if mean_entropy(teacher, math.exp(middle)) < target:
                low = middle
            else:
                high = middle
        scales.append(temperature / math.exp((low + high) / 2))
    return torch.tensor(scales)
