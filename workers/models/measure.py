"""What a model costs: parameters, FLOPs, bytes on disk and measured CPU latency (torch and ONNX Runtime)."""
import statistics
import time
from collections.abc import Callable
from pathlib import Path

import numpy as np
import torch
from torch import nn
from torch.utils.flop_counter import FlopCounterMode

from workers.models.classifier import cpu_eval_copy
from workers.models.onnx_export import onnx_session

WARMUP_RUNS = 3
MIN_RUNS = 5
# 30, not 100: a median of 30 timed runs is steady to a few percent, and a small model's 3 settings × 100 runs were
# ~60 ms of a short job's ~140 ms after training (bench P1).
MAX_RUNS = 30
SECONDS_PER_SETTING = 0.25
LARGE_BATCH = 64


def count_params(model: nn.Module) -> int:
    return sum(parameter.numel() for parameter in model.parameters())


def count_flops(model: nn.Module, input_shape: tuple[int, ...]) -> int:
    """Forward FLOPs for one sample as torch.utils.flop_counter counts them: 2 per multiply-accumulate of
    convolutions and matrix products (normalisation, activations and pooling are not counted)."""
    counter = FlopCounterMode(display=False)
    with counter, torch.no_grad():
        model(torch.zeros((1, *input_shape)))
    return int(counter.get_total_flops())


def measure(model: nn.Module, input_shape: tuple[int, ...], onnx_path: Path | None, weights_path: Path | None) -> dict:
    """Params, per-sample FLOPs, file sizes (None where no file was given) and median latencies in milliseconds,
    one thread, after warm-up; each setting stops after MAX_RUNS runs or SECONDS_PER_SETTING seconds."""
    model = cpu_eval_copy(model)
    input_shape = tuple(input_shape)
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    try:
        flops = count_flops(model, input_shape)
        timings = {"torch_cpu_b1": _torch_latency(model, input_shape)}
    finally:
        torch.set_num_threads(threads)
    if onnx_path is not None:
        session = onnx_session(onnx_path)
        for batch in (1, LARGE_BATCH):
            inputs = np.random.default_rng(0).standard_normal((batch, *input_shape), dtype=np.float32)
            timings[f"onnxruntime_b{batch}"] = _median_ms(lambda x=inputs: session.run(["logits"], {"input": x}))
    latency_ms = {name: median for name, (median, _) in timings.items()}
    latency_ms["runs"] = min(runs for _, runs in timings.values())
    return {
        "params": count_params(model),
        "flops": flops,
        "size_bytes": {"safetensors": _size(weights_path), "onnx": _size(onnx_path)},
        "latency_ms": latency_ms,
    }


def _torch_latency(model: nn.Module, input_shape: tuple[int, ...]) -> tuple[float, int]:
    inputs = torch.randn((1, *input_shape), generator=torch.Generator().manual_seed(0))
    with torch.inference_mode():
        return _median_ms(lambda: model(inputs))


def _median_ms(run: Callable[[], object]) -> tuple[float, int]:
    """Median wall time of `run` in milliseconds, and how many timed runs it took."""
    for _ in range(WARMUP_RUNS):
        run()
    times = []
    deadline = time.perf_counter() + SECONDS_PER_SETTING
    while len(times) < MIN_RUNS or (len(times) < MAX_RUNS and time.perf_counter() < deadline):
        start = time.perf_counter()
        run()
        times.append((time.perf_counter() - start) * 1000.0)
    return statistics.median(times), len(times)


def _size(path: Path | None) -> int | None:
    return Path(path).stat().st_size if path is not None else None
