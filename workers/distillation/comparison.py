"""Teacher vs student in the report: accuracy, per-class recall, top-1 agreement and cost (params, FLOPs, ONNX size,
latency) of every model, and the rows the report page draws as one table with ratios to its first row."""
from pathlib import Path
from typing import Any

import torch

from workers.evaluation import classification_report, predict_logits
from workers.models import Classifier, export_onnx, measure


def agreement(a: torch.Tensor, b: torch.Tensor) -> float:
    """Share of rows where two models' top-1 predictions agree (logits [N, C] each)."""
    return float((a.argmax(1) == b.argmax(1)).float().mean())


def scored_model(name: str, model: Classifier, val_x: torch.Tensor, val_y: torch.Tensor, classes: list[str],
                 directory: Path) -> dict[str, Any]:
    """Accuracy, per-class recall and measured cost of one model; its ONNX file is written to `directory` for the
    size and ONNX Runtime latency, not published."""
    model = model.to("cpu").eval()
    val_x, val_y = val_x.cpu(), val_y.cpu()
    evaluation = classification_report(model, val_x, val_y, classes)
    directory.mkdir(parents=True, exist_ok=True)
    onnx_path = directory / "model.onnx"
    input_shape = tuple(val_x.shape[1:])
    export_onnx(model, input_shape, onnx_path)
    measured = measure(model, input_shape, onnx_path, None)
    return {"name": name, "accuracy": round(evaluation["accuracy"], 5),
            "per_class_recall": evaluation["per_class"]["recall"], "params": measured["params"],
            "flops": measured["flops"], "onnx_bytes": measured["size_bytes"]["onnx"],
            "latency_ms": round(measured["latency_ms"]["onnxruntime_b1"], 4)}


def comparison_row(scored: dict[str, Any]) -> dict[str, Any]:
    return {key: scored[key] for key in ("name", "accuracy", "params", "flops", "onnx_bytes", "latency_ms")}


def combined_row(name: str, members: list[dict[str, Any]], accuracy: float) -> dict[str, Any]:
    """An ensemble's cost: its members run one after another, so every cost adds up."""
    return {"name": name, "accuracy": round(accuracy, 5),
            **{key: sum(member[key] for member in members) for key in ("params", "flops", "onnx_bytes")},
            "latency_ms": round(sum(member["latency_ms"] for member in members), 4)}


def logits_on(model: Classifier, x: torch.Tensor) -> torch.Tensor:
    return predict_logits(model.to("cpu"), x.cpu())


def gain_kept(student: float, members: list[float], ensemble: float) -> float | None:
    """Share of the ensemble's gain over a single member (their mean accuracy) that the student keeps; None when the
    ensemble gains nothing, where the share is undefined."""
    single = sum(members) / len(members)
    gain = ensemble - single
    return None if gain <= 0 else round((student - single) / gain, 4)
