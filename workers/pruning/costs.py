"""Before/after numbers for the report: a measured row per model (accuracy, params, FLOPs, file sizes, ONNX Runtime
latency), per-class recall and false-negative changes, and the note on what unstructured sparsity does not buy."""
import gzip
from pathlib import Path
from typing import Any

import torch

from workers.evaluation import classification_report
from workers.models import Classifier, export_onnx, measure, model_card, save_model


def measured_row(name: str, model: Classifier, card: dict, out_dir: Path, val_x: torch.Tensor,
                 val_y: torch.Tensor, sparsity: float) -> dict[str, Any]:
    """Save and export `model` into `out_dir` (model.safetensors, model.json, model.onnx) and measure it: one
    comparison row. `gzip_bytes` shows what zeros save in storage, which dense sizes cannot."""
    model = model.cpu().eval()
    weights_path, _ = save_model(model, card, out_dir)
    onnx_path = out_dir / "model.onnx"
    export_onnx(model, tuple(card["input_shape"]), onnx_path)
    costs = measure(model, tuple(card["input_shape"]), onnx_path, weights_path)
    evaluation = classification_report(model, val_x.cpu(), val_y.cpu(), card["classes"])
    latency = costs["latency_ms"]
    return {"name": name, "accuracy": round(evaluation["accuracy"], 5), "sparsity": round(sparsity, 5),
            "params": costs["params"], "flops": costs["flops"], "onnx_bytes": costs["size_bytes"]["onnx"],
            "gzip_bytes": len(gzip.compress(weights_path.read_bytes(), compresslevel=6)),
            "latency_ms": round(latency["onnxruntime_b1"], 4), "latency_b64_ms": round(latency["onnxruntime_b64"], 4)}


def card_of(model: Classifier, model_info: dict, classes: list[str], input_shape: tuple[int, ...], kind: str,
            job_id: str) -> dict:
    return model_card(model, model_info["arch"], model_info["args"], input_shape, len(classes), classes, kind,
                      extra={"trained_by": job_id})


RATIO_NAMES = {"params": "params_ratio", "flops": "flops_ratio", "onnx_bytes": "onnx_size_ratio",
               "gzip_bytes": "gzip_size_ratio", "latency_ms": "latency_b1_ratio", "latency_b64_ms": "latency_b64_ratio"}


def ratios(before: dict[str, Any], after: dict[str, Any]) -> dict[str, float]:
    """after / before for every cost, the way results are quoted: 0.25 = four times smaller or faster."""
    return {name: round(after[key] / before[key], 4) for key, name in RATIO_NAMES.items() if before.get(key)}


def class_changes(before: dict, after: dict, classes: list[str], protected: list[int]) -> list[dict[str, Any]]:
    """One row per class: validation recall and false negatives before and after (classification_report's
    per_class), flagging protected classes."""
    rows = []
    for index, name in enumerate(classes):
        row = {"class": name,
               "recall_before": before["per_class"]["recall"][name], "recall_after": after["per_class"]["recall"][name],
               "false_negatives_before": before["per_class"]["false_negatives"][name],
               "false_negatives_after": after["per_class"]["false_negatives"][name],
               "support": before["per_class"]["support"][name]}
        if protected:
            row["protected"] = index in protected
        rows.append(row)
    return rows


def speed_note(structured: bool, latency_ratio: float | None) -> str:
    measured = f" (measured here: batch-64 latency ×{latency_ratio:.2f})" if latency_ratio is not None else ""
    if structured:
        return ("Structured pruning removed whole channels, so the exported graph itself is smaller: ONNX Runtime "
                f"does less arithmetic on every run{measured}.")
    return ("Unstructured sparsity does not speed up dense ONNX Runtime: the zeros are stored and multiplied like "
            f"any other weight, so latency stays where it was{measured}. What the zeros buy is compressibility "
            "(gzip size) and a model ready for sparse kernels or structured pruning; for a faster dense model use "
            "algorithm structured.")
