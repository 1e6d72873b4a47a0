"""The loss a pruned model is fine-tuned with: cross-entropy, optionally class-weighted (class-aware pruning) and
optionally mixed with distillation from the unpruned model."""
from collections.abc import Callable
from dataclasses import dataclass

import torch
import torch.nn.functional as F
from torch import nn

from workers.evaluation import predict_logits


@dataclass(frozen=True)
class Distillation:
    """Soft labels of the unpruned model on the training rows ([N, classes] logits), computed once: the inputs are
    never augmented while pruning, so the teacher's answers do not change between epochs."""
    teacher_logits: torch.Tensor
    weight: float
    temperature: float


def teacher_answers(teacher: nn.Module, x: torch.Tensor, weight: float, temperature: float) -> Distillation:
    return Distillation(predict_logits(teacher, x).detach(), weight, temperature)


def fine_tuning_loss(model: nn.Module, x: torch.Tensor, y: torch.Tensor, class_weights: torch.Tensor | None,
                     distillation: Distillation | None) -> Callable[[torch.Tensor], torch.Tensor]:
    """`loss_of_batch(indices)` for train_one_epoch."""

    def loss_of_batch(index: torch.Tensor) -> torch.Tensor:
        logits = model(x[index])
        loss = F.cross_entropy(logits, y[index], weight=class_weights)
        if distillation is None:
            return loss
        # "Distilling the Knowledge in a Neural Network" (Hinton et al.): KL between temperature-softened outputs,
        # scaled by T^2 so its gradients keep their size as T changes.
        t = distillation.temperature
        soft = F.kl_div(F.log_softmax(logits / t, dim=1), F.softmax(distillation.teacher_logits[index] / t, dim=1),
                        reduction="batchmean") * t * t
        return (1 - distillation.weight) * loss + distillation.weight * soft

    return loss_of_batch
