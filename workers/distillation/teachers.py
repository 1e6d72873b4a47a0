"""Teachers: loaded and checked against the job's data, frozen, and asked for their logits once over every training
row (or per batch when the inputs are augmented); plus the penultimate features a hint loss regresses."""
from dataclasses import dataclass

import torch

from core.spec import ModelRef
from workers.data import Dataset
from workers.errors import JobFailure
from workers.inputs import resolve_model
from workers.models import Classifier, default_arch
from workers.runtime import JobRun

PREDICT_BATCH = 1024


@dataclass
class Teacher:
    name: str  # how the report names it: "teacher", or "teacher 1", "teacher 2", …
    field: str  # the spec field it came from, for error messages: "model" or "teachers[1]"
    uri: str
    model: Classifier
    info: dict


def load_teachers(run: JobRun, refs: list[ModelRef], field: str, train: Dataset,
                  device: torch.device) -> list[Teacher]:
    """Every teacher must take the dataset's inputs and predict its classes; a mismatch fails the job naming the
    teacher, before any training."""
    teachers = []
    for index, ref in enumerate(refs):
        where = field if len(refs) == 1 else f"{field}[{index}]"
        try:
            model, info = resolve_model(run, ref, train, default_arch(train.kind))
        except JobFailure as failure:
            raise JobFailure(failure.code, f"{where}: {failure.message}", failure.error_class) from None
        model.to(device).eval()
        for parameter in model.parameters():
            parameter.requires_grad_(False)
        name = "teacher" if len(refs) == 1 else f"teacher {index + 1}"
        teachers.append(Teacher(name=name, field=where, uri=ref.uri or "", model=model, info=info))
    return teachers


def logits_and_features(model: Classifier, x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """Logits and the features entering the output layer ([B, D]), in one forward pass."""
    captured: list[torch.Tensor] = []
    handle = model.head.register_forward_hook(lambda _module, inputs, _output: captured.append(inputs[0]))
    try:
        logits = model(x)
    finally:
        handle.remove()
    return logits, captured[0].flatten(1)


@torch.no_grad()
def teacher_outputs(teachers: list[Teacher], x: torch.Tensor,
                    with_features: bool = False) -> tuple[torch.Tensor, torch.Tensor | None]:
    """Logits of every teacher on every row, [K, N, C], and the first teacher's features [N, D] when asked. Computed
    once per job when the inputs are not augmented: the teachers are frozen, so per-batch recomputation would only
    repeat this work every epoch (about 5x a student epoch on digits)."""
    logits, features = [], []
    for index, teacher in enumerate(teachers):
        teacher.model.eval()
        chunks = [logits_and_features(teacher.model, x[start:start + PREDICT_BATCH])
                  for start in range(0, len(x), PREDICT_BATCH)]
        logits.append(torch.cat([chunk[0] for chunk in chunks]))
        if with_features and index == 0:
            features.append(torch.cat([chunk[1] for chunk in chunks]))
    return torch.stack(logits), (features[0] if features else None)
