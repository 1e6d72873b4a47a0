"""Structured pruning with Torch-Pruning: remove whole channels (and hidden units) across dependent layers —
residual additions, BatchNorm, the flatten before a linear layer — so the model is physically smaller and still a
registry architecture whose new widths rebuild it from model.json."""
import copy
from collections.abc import Callable

import torch
import torch_pruning as tp
from torch import nn

from workers.errors import JobFailure
from workers.models import Classifier, build_model, count_flops, count_params, widths_of

# Bisection rounds when searching the channel ratio for a cost target: 2^-12 is finer than one channel of any layer.
BISECTION_ROUNDS = 12
ALMOST_ALL = 1.0 - 1e-6


def importance(name: str) -> tp.importance.Importance:
    """Channel importance by name; a group's score sums over every layer its channels touch."""
    if name == "l1":
        return tp.importance.GroupMagnitudeImportance(p=1)
    if name == "l2":
        return tp.importance.GroupMagnitudeImportance(p=2)
    if name == "bn_scale":
        # "Learning Efficient Convolutional Networks through Network Slimming": |gamma| of the BatchNorm after a conv.
        return tp.importance.BNScaleImportance()
    # "Importance Estimation for Neural Network Pruning" (Molchanov et al.): |weight * gradient|; needs gradients.
    return tp.importance.GroupTaylorImportance()


def cost(model: nn.Module, measure: str, input_shape: tuple[int, ...]) -> int:
    """Parameters, or forward FLOPs per sample (torch.utils.flop_counter, as the report counts them)."""
    if measure == "params":
        return count_params(model)
    return count_flops(copy.deepcopy(model).cpu().eval(), input_shape)


def kept_channels(channels: int, ratio: float, round_to: int | None) -> int:
    """How many of a group's `channels` survive removing `ratio` of them: at least one, and with `round_to` a
    multiple of it (never below it), so the count only falls as the ratio grows."""
    keep = max(1, int(channels * (1.0 - ratio)))
    if round_to:
        keep = max(min(channels, round_to), keep - keep % round_to)
    return keep


def _graph(model: Classifier, input_shape: tuple[int, ...]) -> tp.DependencyGraph:
    """The model's channel dependencies, traced in eval mode: tracing runs a forward pass that must not move
    BatchNorm's running statistics."""
    model.eval()
    example = torch.randn((1, *input_shape), device=next(model.parameters()).device)
    try:
        return tp.DependencyGraph().build_dependency(model, example_inputs=example, verbose=False)
    except Exception as error:  # the tracer raises many types on graphs it cannot follow
        raise JobFailure("structured_pruning_unsupported", f"Torch-Pruning cannot trace this model's dependencies "
                         f"({type(error).__name__}: {error}); use algorithm magnitude for it.") from error


def _groups(graph: tp.DependencyGraph, model: Classifier) -> list:
    """Every group of coupled channels that may shrink; the head's outputs stay (one per class)."""
    return list(graph.get_all_groups(ignored_layers=[model.head], root_module_types=[nn.Conv2d, nn.Linear]))


def group_sizes(model: Classifier, input_shape: tuple[int, ...]) -> list[int]:
    """Channel count of every group structured pruning may shrink, in the tracer's (stable) order; none: only the
    head, e.g. an MLP without hidden layers."""
    trial = copy.deepcopy(model)
    return [len(group[0].idxs) for group in _groups(_graph(trial, input_shape), trial)]


def uniform_widths(sizes: list[int], ratio: float, round_to: int | None) -> list[int]:
    return [kept_channels(channels, ratio, round_to) for channels in sizes]


def remove_channels(model: Classifier, input_shape: tuple[int, ...], widths: list[int], importance_name: str,
                    accumulate_gradients: Callable[[], None] | None = None) -> None:
    """Shrink every group to its entry in `widths` (group_sizes order), removing the least important channels
    first, in place."""
    graph = _graph(model, input_shape)
    scorer, fallback = importance(importance_name), importance("l2")
    if importance_name == "taylor" and accumulate_gradients is not None:
        model.zero_grad(set_to_none=True)
        accumulate_gradients()
    removals = []
    for group, keep in zip(_groups(graph, model), widths, strict=True):
        drop = len(group[0].idxs) - keep
        if drop <= 0:
            continue
        with torch.no_grad():
            # BatchNorm scale has nothing to read in a group without BatchNorm (an MLP's hidden layer).
            scores = scorer(group)
            scores = fallback(group) if scores is None else scores
        root = group[0].dep
        removals.append((root.target.module, root.handler, torch.argsort(scores)[:drop].tolist()))
    # Groups cover disjoint channels, so each removal leaves the others' indices valid.
    for module, handler, indices in removals:
        pruning = graph.get_pruning_group(module, handler, indices)
        if graph.check_pruning_group(pruning):
            pruning.prune()
    model.zero_grad(set_to_none=True)


def cost_after(model: Classifier, input_shape: tuple[int, ...], widths: list[int], measure: str) -> int:
    """What `model` would cost shrunk to `widths`, measured on a copy (which channels go does not change the cost,
    so a cheap importance stands in for the real one)."""
    trial = copy.deepcopy(model)
    remove_channels(trial, input_shape, widths, "l2")
    return cost(trial, measure, input_shape)


def widths_for(model: Classifier, input_shape: tuple[int, ...], goal: float, measure: str,
               round_to: int | None) -> tuple[list[int], int]:
    """Group widths whose model costs at most `goal`, and that cost. Bisects one channel ratio for every group
    (cost falls monotonically with it), then gives channels back, most-cut group first, where rounding overshot
    the goal; falls back to the narrowest model when nothing reaches `goal`."""
    sizes = group_sizes(model, input_shape)
    now = cost(model, measure, input_shape)
    if now <= goal:
        return sizes, now
    low, high = sizes, uniform_widths(sizes, ALMOST_ALL, round_to)
    high_cost = cost_after(model, input_shape, high, measure)
    if high_cost > goal:
        return high, high_cost
    low_ratio, high_ratio = 0.0, ALMOST_ALL
    for _ in range(BISECTION_ROUNDS):
        middle_ratio = (low_ratio + high_ratio) / 2
        middle = uniform_widths(sizes, middle_ratio, round_to)
        middle_cost = cost_after(model, input_shape, middle, measure)
        if middle_cost <= goal:
            high_ratio, high, high_cost = middle_ratio, middle, middle_cost
        else:
            low_ratio, low = middle_ratio, middle
    for index in sorted(range(len(sizes)), key=lambda i: high[i] / sizes[i]):
        if low[index] > high[index]:
            trial = [*high[:index], low[index], *high[index + 1:]]
            trial_cost = cost_after(model, input_shape, trial, measure)
            if trial_cost <= goal:
                high, high_cost = trial, trial_cost
    return high, high_cost


def smallest_ratio(model: Classifier, input_shape: tuple[int, ...], measure: str, round_to: int | None) -> float:
    """The least cost ratio structured pruning can reach on this model (every group down to its minimum)."""
    narrowest = uniform_widths(group_sizes(model, input_shape), ALMOST_ALL, round_to)
    return cost_after(model, input_shape, narrowest, measure) / cost(model, measure, input_shape)


def rebuild(arch: str, args: dict, model: Classifier, input_shape: tuple[int, ...], num_classes: int) -> Classifier:
    """The registry architecture at `model`'s current widths, holding its weights: proves that model.json plus
    model.safetensors will reload it, and gives a clean module (no tracer state) to train on."""
    widths = widths_of(model)
    try:
        rebuilt = build_model(arch, {**args, **widths}, input_shape, num_classes)
        rebuilt.load_state_dict(model.state_dict(), strict=True)
    except (JobFailure, RuntimeError) as error:
        message = error.message if isinstance(error, JobFailure) else str(error)
        raise JobFailure("structured_pruning_unsupported", f"the pruned {arch} cannot be described by its "
                         f"architecture's width arguments ({message}); use algorithm magnitude for it.") from error
    return rebuilt.to(next(model.parameters()).device)


def channel_widths(model: nn.Module) -> dict[str, int]:
    """Output channels (convolutions) or units (linear layers) per layer name."""
    return {name: module.out_channels if isinstance(module, nn.Conv2d) else module.out_features
            for name, module in model.named_modules() if isinstance(module, nn.Conv2d | nn.Linear)}
