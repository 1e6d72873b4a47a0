"""What every model-producing job leaves behind (DESIGN §5): model.safetensors, model.json, model.onnx, report.json
and report.html, uploaded as artifacts."""
import time
from typing import Any

import torch

from workers.data import Dataset
from workers.evaluation import classification_report
from workers.models import Classifier, export_onnx, measure, model_card, save_model
from workers.report import write_report
from workers.runtime import JobRun


def publish_model(run: JobRun, model: Classifier, model_info: dict[str, Any], train: Dataset, val: Dataset,
                  val_x: torch.Tensor, val_y: torch.Tensor, *, curves: dict[str, list], stopped_by: str,
                  sections: dict[str, Any] | None = None, headline: dict[str, Any] | None = None) -> dict[str, Any]:
    """Evaluate, export, measure and report; returns the job's result metrics. `headline` adds a method's own
    numbers (e.g. forget/retain/test accuracy) to the summary cards at the top of the report."""
    out = run.workdir / "out"
    out.mkdir(parents=True, exist_ok=True)
    model = model.to("cpu").eval()
    run.event("export.started", "Saving weights, exporting ONNX and measuring the model.")
    evaluation = classification_report(model, val_x.cpu(), val_y.cpu(), train.classes)
    input_shape = tuple(train.x.shape[1:])
    card = model_card(model, model_info["arch"], model_info["args"], input_shape, len(train.classes), train.classes,
                      train.kind, extra={"trained_by": run.job_id, "feature_names": train.feature_names})
    weights_path, card_path = save_model(model, card, out)
    onnx_path = out / "model.onnx"
    export_onnx(model, input_shape, onnx_path)
    measured = measure(model, input_shape, onnx_path, weights_path)
    summary = {"accuracy": round(evaluation["accuracy"], 5), "loss": round(evaluation["loss"], 5),
               "params": measured["params"], "flops": measured["flops"],
               **{k: v for k, v in (headline or {}).items() if isinstance(v, int | float)}}
    report = {
        "job": {"id": run.job_id, "method": run.spec.method, "algorithm": run.spec.algorithm or "",
                "attempt": run.attempt, "created_at": run.created_at},
        "summary": summary,
        "dataset": {"uri": run.spec.dataset.uri, "kind": train.kind, "train_rows": len(train.y),
                    "validation_rows": len(val.y), "input_shape": list(input_shape), "classes": train.classes},
        "model": {"arch": model_info["arch"], "args": model_info["args"], "source": model_info.get("source"),
                  **measured},
        "per_class": evaluation["per_class"],
        "confusion_matrix": evaluation["confusion_matrix"],
        "curves": curves,
        "budget": {"max_seconds": run.max_seconds, "used_seconds": round(run.used_seconds(), 2),
                   "stopped_by": stopped_by},
        "wall_seconds": round(time.time() - run.created_at, 2),
        **(sections or {}),
    }
    json_path, html_path = write_report(out, report)
    for path in (weights_path, card_path, onnx_path, json_path, html_path):
        run.add_artifact(path)
    run.event("artifacts.written", "Artifacts written: model.safetensors, model.json, model.onnx, report.json, "
              "report.html.", accuracy=summary["accuracy"])
    return {**summary, "per_class_recall": evaluation["per_class"]["recall"],
            "size_bytes": measured.get("size_bytes"), "latency_ms": measured.get("latency_ms")}
