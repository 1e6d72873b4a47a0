"""The embedded default as a new user meets it: `refinery serve` (what `make serve` runs) with SQLite, the
filesystem broker and a local store, no external service; a supervised worker that is replaced when it dies."""
import contextlib
import os
import re
import signal
import subprocess
import sys
import time
from pathlib import Path

import httpx
import numpy as np
import pytest

from bench.common import worker_pids
from tests.conftest import ROOT, free_port, onnx_accuracy

REFINERY = str(Path(sys.executable).parent / "refinery")


@pytest.fixture(scope="module")
def embedded(tmp_path_factory, data_root):
    home = tmp_path_factory.mktemp("embedded-home")
    env = {k: v for k, v in os.environ.items() if not k.startswith("REFINERY_")}
    env.update(REFINERY_HOME=str(home), REFINERY_PORT=str(free_port()), REFINERY_DATA_ROOTS=str(data_root),
               REFINERY_LEASE_SECONDS="5", REFINERY_HEARTBEAT_SECONDS="1", REFINERY_CHECKPOINT_SECONDS="1",
               OMP_NUM_THREADS="1")
    log = open(home / "serve.log", "w")
    proc = subprocess.Popen([REFINERY, "serve"], env=env, cwd=ROOT, stdout=log, stderr=subprocess.STDOUT,
                            start_new_session=True)
    base = f"http://127.0.0.1:{env['REFINERY_PORT']}"
    try:
        deadline = time.time() + 120
        while time.time() < deadline:
            with contextlib.suppress(httpx.HTTPError):
                if httpx.get(base + "/healthz", timeout=2).status_code == 200:
                    break
            time.sleep(0.5)
        text = (home / "serve.log").read_text()
        key = re.search(r"API key: (\S+)", text).group(1)
        yield {"base": base, "headers": {"Authorization": f"Bearer {key}"}, "env": env, "proc": proc, "home": home}
    finally:
        os.killpg(proc.pid, signal.SIGTERM)
        proc.wait(30)


def _wait(e, job_id, timeout=180):
    deadline = time.time() + timeout
    while time.time() < deadline:
        job = httpx.get(f"{e['base']}/v1/jobs/{job_id}", headers=e["headers"]).json()
        if job["status"] in ("succeeded", "failed", "cancelled"):
            return job
        time.sleep(0.5)
    raise AssertionError(f"{job_id} did not finish")


def test_serve_prints_a_working_key_and_needs_no_services(embedded):
    text = (embedded["home"] / "serve.log").read_text()
    assert "sqlite:///" in text and "filesystem://" in text and "listening on" in text
    ready = httpx.get(embedded["base"] + "/readyz").json()
    assert ready["checks"] == {"database": True, "broker": True}
    assert httpx.get(embedded["base"] + "/v1/methods", headers=embedded["headers"]).status_code == 200
    assert (embedded["home"] / "api_key").stat().st_mode & 0o077 == 0


def test_embedded_train_job_and_project_isolation(embedded, data_root):
    r = httpx.post(embedded["base"] + "/v1/jobs", headers=embedded["headers"], json={
        "method": "train", "dataset": {"uri": f"file://{data_root}/digits_train.npz"},
        "params": {"epochs": 15}, "budget": {"max_seconds": 120}})
    assert r.status_code == 201, r.text
    job = _wait(embedded, r.json()["id"])
    assert job["status"] == "succeeded", job["error"]
    onnx = httpx.get(f"{embedded['base']}/v1/jobs/{job['id']}/artifacts/model.onnx", headers=embedded["headers"])
    test = np.load(data_root / "digits_test.npz")
    assert onnx_accuracy(onnx.content, test["x"], test["y"]) >= 0.95
    out = subprocess.run([REFINERY, "keys", "create", "--project", "someone-else"], env=embedded["env"], cwd=ROOT,
                         capture_output=True, text=True, timeout=60, check=True)
    other = {"Authorization": f"Bearer {out.stdout.strip().splitlines()[-1]}"}
    assert httpx.get(f"{embedded['base']}/v1/jobs/{job['id']}", headers=other).status_code == 404


def test_a_killed_worker_is_replaced_and_its_job_finishes(embedded):
    r = httpx.post(embedded["base"] + "/v1/jobs", headers=embedded["headers"], json={
        "method": "train", "dataset": {"uri": "builtin://digits"}, "model": {"arch": "mlp"}, "params": {"epochs": 150},
        "budget": {"max_seconds": 200}, "seed": 5})
    job_id = r.json()["id"]
    deadline = time.time() + 60
    while time.time() < deadline:
        events = httpx.get(f"{embedded['base']}/v1/jobs/{job_id}/events", headers=embedded["headers"],
                           params={"limit": 100}).json()["data"]
        if any(e["type"] == "checkpoint.saved" for e in events):
            break
        time.sleep(0.3)
    else:
        raise AssertionError("no checkpoint within 60 s")
    before = worker_pids(embedded["proc"].pid)
    assert len(before) == 1
    os.kill(before[0], signal.SIGKILL)
    job = _wait(embedded, job_id, timeout=240)
    assert job["status"] == "succeeded" and job["attempt"] == 2, job
    after = worker_pids(embedded["proc"].pid)
    assert after and after != before
