"""The student: the architecture the spec names, or a smaller member of the teacher's family with about
`params_ratio` × its parameters (every width of the teacher scaled by one factor, found by bisection)."""
from typing import Any

import torch

from workers.data import Dataset
from workers.distillation.teachers import Teacher
from workers.inputs import input_stats
from workers.models import Classifier, build_model, count_params, widths_of

DEFAULT_PARAMS_RATIO = 0.1
BISECTION_STEPS = 40


def build_student(student: dict[str, Any] | None, teachers: list[Teacher], train: Dataset,
                  seed: int) -> tuple[Classifier, dict[str, Any], dict[str, Any]]:
    """(model, model_info for the card and report, what was built and why). The same seed gives the same initial
    weights, so a from-scratch baseline built the same way is the student's exact twin."""
    reference = max(teachers, key=lambda teacher: count_params(teacher.model))
    teacher_params = count_params(reference.model)
    if student is not None and "arch" in student:
        arch, args = student["arch"], dict(student.get("args") or {})
        built = {"requested": {"arch": arch, "args": args}}
    else:
        ratio = (student or {}).get("params_ratio", DEFAULT_PARAMS_RATIO)
        arch = reference.info["arch"]
        scale, args = _scaled_args(reference, train, ratio * teacher_params)
        built = {"requested": {"params_ratio": ratio}, "family": arch, "family_of": reference.uri,
                 "width_scale": round(scale, 4)}
    model = _build(arch, args, train, seed)
    params = count_params(model)
    built.update(arch=arch, args=widths_of(model), params=params, teacher_params=teacher_params,
                 params_ratio=round(params / teacher_params, 4))
    return model, {"arch": arch, "args": args, "source": "new"}, built


def rebuild(info: dict[str, Any], train: Dataset, seed: int) -> Classifier:
    """A fresh model like the student, with the same initial weights (the from-scratch baseline)."""
    return _build(info["arch"], info["args"], train, seed)


def _build(arch: str, args: dict, train: Dataset, seed: int) -> Classifier:
    mean, std = input_stats(train)
    torch.manual_seed(seed)
    return build_model(arch, args, tuple(train.x.shape[1:]), len(train.classes), mean, std)


def _scaled_args(teacher: Teacher, train: Dataset, target_params: float) -> tuple[float, dict]:
    """Bisection on the width scale: the parameter count grows with it (about quadratically), and rounding widths
    makes it a staircase, so the scale whose model lands nearest the target wins."""
    widths = widths_of(teacher.model)
    base = {**teacher.info["args"]}

    def args_at(scale: float) -> dict:
        return {**base, **{name: _scale(value, scale) for name, value in widths.items()}}

    def params_at(scale: float) -> int:
        return count_params(_build(teacher.info["arch"], args_at(scale), train, 0))

    low, high = 0.0, 1.0
    best = (abs(params_at(1.0) - target_params), 1.0)
    for _ in range(BISECTION_STEPS):
        middle = (low + high) / 2
        params = params_at(middle)
        best = min(best, (abs(params - target_params), middle))
        if params < target_params:
            low = middle
        else:
            high = middle
        if high - low < 1e-4:
            break
    return best[1], args_at(best[1])


def _scale(value, scale: float):
    if isinstance(value, int):
        return max(1, round(value * scale))
    if isinstance(value, list | tuple):
        return [max(1, round(width * scale)) for width in value]
    return value
