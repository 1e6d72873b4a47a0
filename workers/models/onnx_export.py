"""model.onnx: export with a dynamic batch dimension, checked against torch in ONNX Runtime before it is kept."""
import warnings
from pathlib import Path

import numpy as np
import onnxruntime as ort
import torch

from workers.errors import JobFailure
from workers.models.classifier import Classifier, cpu_eval_copy

OPSET = 17
CHECK_BATCH = 7
# Logits can reach tens after training; allow float32 reordering error relative to their size as well.
ABSOLUTE_TOLERANCE = 1e-4
RELATIVE_TOLERANCE = 1e-5


def export_onnx(model: Classifier, input_shape: tuple[int, ...], path: Path) -> None:
    """Write `path` (input "input" [batch, *input_shape] float32 as stored in the dataset, output "logits")."""
    model = cpu_eval_copy(model)
    example = _raw_inputs(model, input_shape, 2)
    try:
        # The TorchScript exporter (dynamo=False) still ships in torch 2.13, is several times faster than the
        # torch.export-based one and writes a single file; it is deprecated, hence the silenced warning.
        with warnings.catch_warnings():
            warnings.simplefilter("ignore", DeprecationWarning)
            torch.onnx.export(model, (example,), str(path), dynamo=False, opset_version=OPSET,
                              input_names=["input"], output_names=["logits"],
                              dynamic_axes={"input": {0: "batch"}, "logits": {0: "batch"}})
    except Exception as error:  # the exporter raises many types; each is ours to fix
        raise JobFailure("export_failed", f"ONNX export failed: {type(error).__name__}: {error}", "infra_error") from error
    _check_against_torch(model, input_shape, Path(path))


def onnx_session(path: Path) -> ort.InferenceSession:
    """An ONNX Runtime CPU session on one thread (what latency numbers are measured with)."""
    options = ort.SessionOptions()
    options.intra_op_num_threads = 1
    options.inter_op_num_threads = 1
    return ort.InferenceSession(str(path), options, providers=["CPUExecutionProvider"])


def _raw_inputs(model: Classifier, input_shape: tuple[int, ...], batch: int) -> torch.Tensor:
    """Random inputs in the data's own units: mean + std * noise, per channel or feature."""
    generator = torch.Generator().manual_seed(0)
    noise = torch.randn((batch, *input_shape), generator=generator)
    return model.mean + model.std * noise


def _check_against_torch(model: Classifier, input_shape: tuple[int, ...], path: Path) -> None:
    inputs = _raw_inputs(model, input_shape, CHECK_BATCH)
    with torch.inference_mode():
        expected = model(inputs).numpy()
    try:
        (got,) = onnx_session(path).run(["logits"], {"input": inputs.numpy()})
    except Exception as error:  # onnxruntime errors share no base but Exception
        raise JobFailure("export_failed", f"ONNX Runtime cannot run the export: {error}", "infra_error") from error
    difference = float(np.abs(got - expected).max())
    if not np.allclose(got, expected, rtol=RELATIVE_TOLERANCE, atol=ABSOLUTE_TOLERANCE):
        raise JobFailure("export_failed", f"ONNX Runtime logits differ from torch by up to {difference:.2e}",
                         "infra_error")
