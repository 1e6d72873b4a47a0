"""Unstructured pruning: which weights are prunable, magnitude masks (one global threshold or one per layer),
sparsity schedules and sparsity statistics. A mask is a bool tensor per weight name; a pruned weight is exactly 0."""
import torch
from torch import nn

Masks = dict[str, torch.Tensor]


def prunable_weights(model: nn.Module) -> dict[str, nn.Parameter]:
    """Every convolution's and linear layer's weight, the head's included: what `target_sparsity` counts. Biases and
    normalisation parameters are a rounding error in size and shift whole activations, so they stay."""
    return {f"{name}.weight": module.weight for name, module in model.named_modules()
            if isinstance(module, nn.Conv2d | nn.Linear)}


def dense_masks(model: nn.Module) -> Masks:
    return {name: torch.ones_like(weight, dtype=torch.bool) for name, weight in prunable_weights(model).items()}


@torch.no_grad()
def magnitude_masks(model: nn.Module, sparsity: float, scope: str, score: str, masks: Masks) -> Masks:
    """Masks keeping the highest-scoring weights so that `sparsity` of them are pruned. Weights already pruned by
    `masks` stay pruned (they rank below every live weight), so sparsity only grows."""
    weights = prunable_weights(model)
    rank = lamp_scores if score == "lamp" else torch.abs
    scores = {name: torch.where(masks[name], rank(weight), torch.full_like(weight, -1.0))
              for name, weight in weights.items()}
    if scope == "layer":
        return {name: _keep_largest(score, sparsity) for name, score in scores.items()}
    flat = _keep_largest(torch.cat([score.flatten() for score in scores.values()]), sparsity)
    out, start = {}, 0
    for name, score in scores.items():
        out[name] = flat[start:start + score.numel()].view_as(score)
        start += score.numel()
    return out


def lamp_scores(weight: torch.Tensor) -> torch.Tensor:
    """"Layer-adaptive Sparsity for the Magnitude-based Pruning" (Lee et al., 2021): with a layer's weights sorted by
    magnitude, w_u^2 / sum of w_v^2 over v >= u. Comparable across layers, and each layer's largest weight scores 1,
    so a global threshold never empties a layer."""
    squares = weight.flatten() ** 2
    order = torch.argsort(squares)
    ascending = squares[order]
    remaining = torch.flip(torch.cumsum(torch.flip(ascending, [0]), 0), [0])
    scores = torch.empty_like(squares)
    scores[order] = ascending / remaining.clamp_min(torch.finfo(squares.dtype).tiny)
    return scores.view_as(weight)


def _keep_largest(scores: torch.Tensor, sparsity: float) -> torch.Tensor:
    pruned = round(sparsity * scores.numel())
    keep = torch.ones_like(scores, dtype=torch.bool)
    if pruned > 0:
        keep.view(-1)[torch.topk(scores.flatten(), pruned, largest=False).indices] = False
    return keep


@torch.no_grad()
def apply_masks(model: nn.Module, masks: Masks) -> None:
    for name, weight in prunable_weights(model).items():
        weight.mul_(masks[name])


def keep_masks_applied(optimizer: torch.optim.Optimizer, model: nn.Module, masks: Masks) -> None:
    """Re-zero pruned weights after every optimizer step: momentum and weight decay would otherwise revive them."""
    optimizer.register_step_post_hook(lambda *_: apply_masks(model, masks))


def sparsity_schedule(start: float, target: float, steps: int, shape: str) -> list[float]:
    """Sparsity after each of `steps` pruning steps. Cubic is "To prune, or not to prune" (Zhu & Gupta, 2017):
    s_k = target + (start - target)(1 - k/steps)^3, pruning fast while many redundant weights remain."""
    if shape == "cubic":
        return [target + (start - target) * (1 - k / steps) ** 3 for k in range(1, steps + 1)]
    return [start + (target - start) * k / steps for k in range(1, steps + 1)]


@torch.no_grad()
def sparsity_of(model: nn.Module) -> dict:
    """`sparsity`: zero share of the prunable weights (what targets mean); `overall_sparsity`: of every parameter;
    `per_layer`: each prunable weight's zero share."""
    weights = prunable_weights(model)
    zeros = {name: int((weight == 0).sum()) for name, weight in weights.items()}
    prunable = sum(weight.numel() for weight in weights.values())
    every = sum(parameter.numel() for parameter in model.parameters())
    every_zero = sum(int((parameter == 0).sum()) for parameter in model.parameters())
    return {"sparsity": sum(zeros.values()) / max(1, prunable), "overall_sparsity": every_zero / max(1, every),
            "prunable_weights": prunable, "per_layer": {name: zeros[name] / weights[name].numel() for name in weights}}
