"""Distillation losses as small callables chosen by params fields. Each returns one loss per row ([B]), so labeled
and unlabeled (transfer) rows can be weighted differently before averaging."""
from collections.abc import Callable

import torch
import torch.nn.functional as F

SoftLoss = Callable[[torch.Tensor, torch.Tensor, float], torch.Tensor]
HintLoss = Callable[[torch.Tensor, torch.Tensor], torch.Tensor]


def kl_soft_loss(student_logits: torch.Tensor, teacher_logits: torch.Tensor, temperature: float) -> torch.Tensor:
    """KL(teacher ‖ student) of the softmaxes at `temperature`, times T² so the soft gradients keep their size as T
    changes (Hinton, Vinyals & Dean, "Distilling the Knowledge in a Neural Network")."""
    log_student = F.log_softmax(student_logits / temperature, dim=1)
    log_teacher = F.log_softmax(teacher_logits / temperature, dim=1)
    return (log_teacher.exp() * (log_teacher - log_student)).sum(1) * temperature ** 2


def mse_soft_loss(student_logits: torch.Tensor, teacher_logits: torch.Tensor, temperature: float) -> torch.Tensor:
    """Squared error between logits, the large-T limit of the KL loss ("Comparing Kullback-Leibler Divergence and
    Mean Squared Error Loss in Knowledge Distillation", Kim et al.); the temperature does not enter."""
    return (student_logits - teacher_logits).pow(2).mean(1)


def mse_hint_loss(student_features: torch.Tensor, teacher_features: torch.Tensor) -> torch.Tensor:
    """FitNets' hint loss ("FitNets: Hints for Thin Deep Nets"): the student's mapped features regress the
    teacher's."""
    return (student_features - teacher_features).pow(2).mean(1)


def cosine_hint_loss(student_features: torch.Tensor, teacher_features: torch.Tensor) -> torch.Tensor:
    """1 - cosine similarity: matches the direction of the teacher's features and ignores their scale."""
    return 1.0 - F.cosine_similarity(student_features, teacher_features, dim=1)


SOFT_LOSSES: dict[str, SoftLoss] = {"kl": kl_soft_loss, "mse": mse_soft_loss}
HINT_LOSSES: dict[str, HintLoss] = {"mse": mse_hint_loss, "cosine": cosine_hint_loss}
