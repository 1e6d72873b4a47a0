"""Fixtures on real components: a fresh Postgres database migrated by Alembic, a Redis database, a running API
(uvicorn) and a real Celery worker as subprocesses, and a scratch data root with real data files."""
import contextlib
import os
import signal
import socket
import subprocess
import sys
import time
import uuid
from pathlib import Path

import httpx
import numpy as np
import psycopg
import pytest
import redis

os.environ.setdefault("OMP_NUM_THREADS", "1")
PG_HOST = os.environ.get("REFINERY_TEST_PG_HOST", "127.0.0.1")
REDIS_URL = os.environ.get("REFINERY_TEST_REDIS", "redis://127.0.0.1:6379/11")
QUEUE = f"refinery.test.{uuid.uuid4().hex[:8]}"  # per test session, so parallel sessions never share messages
TOKEN = "rfy_test_bootstrap_" + uuid.uuid4().hex
ROOT = Path(__file__).resolve().parent.parent
# The test process itself publishes (ledger tests): point its settings at the test Redis queue and a scratch home
# before anything reads them.
os.environ.update(REFINERY_BROKER_URL=REDIS_URL, REFINERY_QUEUE=QUEUE,
                  REFINERY_HOME=os.environ.get("REFINERY_TEST_HOME", f"/tmp/refinery-test-{uuid.uuid4().hex[:8]}"))
TERMINAL = ("succeeded", "failed", "cancelled")


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


@contextlib.contextmanager
def fresh_database():
    """A new database on the real Postgres, migrated with the real Alembic migrations, dropped afterwards."""
    from db.migrate import upgrade
    from db.session import get_engine

    name = f"refinery_test_{uuid.uuid4().hex[:10]}"
    with psycopg.connect(f"host={PG_HOST} user=postgres dbname=postgres", autocommit=True) as conn:
        conn.execute(f'CREATE DATABASE "{name}"')
    url = f"postgresql://postgres@{PG_HOST}:5432/{name}"
    try:
        upgrade(url)
        yield url
    finally:
        get_engine(url).dispose()
        with psycopg.connect(f"host={PG_HOST} user=postgres dbname=postgres", autocommit=True) as conn:
            conn.execute(f'DROP DATABASE IF EXISTS "{name}" WITH (FORCE)')


@pytest.fixture(scope="session")
def pg_url():
    """The database the running platform (API + worker) uses."""
    with fresh_database() as url:
        yield url


@pytest.fixture(scope="session")
def redis_client():
    client = redis.Redis.from_url(REDIS_URL)
    yield client
    client.delete(QUEUE)


@pytest.fixture(scope="session")
def data_root(tmp_path_factory) -> Path:
    """Real data files a user would bring: digits as .npz (train/test split), wine as CSV with a label column."""
    from sklearn.datasets import load_digits, load_wine

    root = tmp_path_factory.mktemp("data")
    digits = load_digits()
    x = (digits.images[:, None] / 16.0).astype(np.float32)
    y = digits.target.astype(np.int64)
    order = np.random.default_rng(0).permutation(len(y))
    test, train = order[:400], order[400:]
    np.savez(root / "digits_train.npz", x=x[train], y=y[train])
    np.savez(root / "digits_test.npz", x=x[test], y=y[test])
    wine = load_wine()
    order = np.random.default_rng(0).permutation(len(wine.target))
    with open(root / "wine_train.csv", "w") as f:
        f.write(",".join([f"f{i}" for i in range(wine.data.shape[1])] + ["cultivar"]) + "\n")
        for i in order[50:]:
            f.write(",".join(f"{v:.6g}" for v in wine.data[i]) + f",{wine.target[i]}\n")
    np.savez(root / "wine_test.npz", x=wine.data[order[:50]].astype(np.float32), y=wine.target[order[:50]])
    return root


class Platform:
    """The production shape on one machine: API + worker processes against Postgres, Redis and a store dir."""

    def __init__(self, env: dict[str, str], home: Path):
        self.env, self.home = env, home
        self.port = int(env["REFINERY_PORT"])
        self.base = f"http://127.0.0.1:{self.port}"
        self.headers = {"Authorization": f"Bearer {TOKEN}"}
        self.api_proc: subprocess.Popen | None = None
        self.worker_proc: subprocess.Popen | None = None
        self.http = httpx.Client(base_url=self.base, headers=self.headers, timeout=60)

    def _spawn(self, args: list[str], log_name: str) -> subprocess.Popen:
        log = open(self.home / log_name, "ab")
        return subprocess.Popen([sys.executable, *args], env=self.env, cwd=ROOT, stdout=log, stderr=subprocess.STDOUT,
                                start_new_session=True)

    def start_api(self) -> None:
        self.api_proc = self._spawn(["-m", "uvicorn", "api.main:app", "--host", "127.0.0.1", "--port", str(self.port),
                                     "--log-level", "warning"], "api.log")
        deadline = time.time() + 60
        while time.time() < deadline:
            with contextlib.suppress(httpx.HTTPError):
                # Up, and the bootstrap key (written by a start-up thread) already works.
                if httpx.get(self.base + "/healthz", timeout=2).status_code == 200 and \
                        httpx.get(self.base + "/v1/methods", headers=self.headers, timeout=2).status_code != 401:
                    return
            time.sleep(0.3)
        raise RuntimeError("API did not start: " + (self.home / "api.log").read_text()[-2000:])

    def start_worker(self) -> None:
        from core.embedded import worker_args
        from core.resources import class_queues
        queues = class_queues(self.env["REFINERY_QUEUE"], self.env.get("REFINERY_WORKER_CLASSES", "cpu"))
        self.worker_proc = self._spawn(worker_args(",".join(queues)), "worker.log")

    def kill_worker(self, sig=signal.SIGKILL) -> None:
        if self.worker_proc and self.worker_proc.poll() is None:
            os.kill(self.worker_proc.pid, sig)
            self.worker_proc.wait(30)

    def stop(self) -> None:
        for proc in (self.worker_proc, self.api_proc):
            if proc and proc.poll() is None:
                proc.terminate()
                try:
                    proc.wait(15)
                except subprocess.TimeoutExpired:
                    proc.kill()

    # --- as a user ---
    def submit(self, spec: dict, **kw) -> dict:
        r = self.http.post("/v1/jobs", json=spec, **kw)
        assert r.status_code == 201, r.text
        return r.json()

    def job(self, job_id: str) -> dict:
        return self.http.get(f"/v1/jobs/{job_id}").json()

    def wait(self, job_id: str, timeout: float = 240, until=TERMINAL) -> dict:
        deadline = time.time() + timeout
        while time.time() < deadline:
            job = self.job(job_id)
            if job["status"] in until:
                return job
            time.sleep(0.3)
        raise AssertionError(f"job {job_id} still {job['status']} after {timeout}s; worker log:\n"
                             + self.worker_log()[-3000:])

    def worker_log(self) -> str:
        return (self.home / "worker.log").read_text(errors="replace")

    def events(self, job_id: str) -> list[dict]:
        from bench.common import job_events
        return job_events(self.http, job_id)

    def cli(self, *args: str) -> subprocess.CompletedProcess:
        return subprocess.run([str(Path(sys.executable).parent / "refinery"), *args], env=self.env, cwd=ROOT,
                              capture_output=True, text=True, timeout=120)


@pytest.fixture(scope="session")
def platform(pg_url, redis_client, data_root, tmp_path_factory):
    home = tmp_path_factory.mktemp("home")
    env = dict(os.environ, REFINERY_HOME=str(home), REFINERY_DATABASE_URL=pg_url, REFINERY_BROKER_URL=REDIS_URL, REFINERY_QUEUE=QUEUE,
               REFINERY_STORAGE_URL=f"file://{home / 'store'}", REFINERY_BOOTSTRAP_TOKEN=TOKEN,
               REFINERY_DATA_ROOTS=str(data_root), REFINERY_PORT=str(free_port()), REFINERY_LEASE_SECONDS="6",
               REFINERY_HEARTBEAT_SECONDS="1", REFINERY_CHECKPOINT_SECONDS="1", REFINERY_REDISPATCH_SECONDS="3",
               REFINERY_SWEEP_SECONDS="0.5", REFINERY_MAX_UPLOAD_BYTES=str(2_000_000),
               REFINERY_RATE_LIMIT_PER_MINUTE="100000", OMP_NUM_THREADS="1", PYTHONUNBUFFERED="1",
               # The worker serves 1- and 2-process CPU jobs (resource classes cpu and cpu-x2, core/resources.py).
               REFINERY_WORKER_CLASSES="cpu,cpu-x2",
               # Webhook receivers in the tests listen on loopback; short retries and timeouts keep the tests quick.
               REFINERY_OUTBOUND_ALLOWED_NETWORKS="127.0.0.0/8", REFINERY_WEBHOOK_RETRY_SECONDS="0,1,1,1,1",
               REFINERY_WEBHOOK_CONNECT_TIMEOUT_SECONDS="1", REFINERY_WEBHOOK_TIMEOUT_SECONDS="10",
               REFINERY_WEBHOOK_LEASE_SECONDS="12", REFINERY_WEBHOOK_POLL_SECONDS="0.1")
    p = Platform(env, home)
    p.start_api()
    p.start_worker()
    yield p
    p.stop()


@pytest.fixture(scope="session")
def other_project_headers(platform) -> dict[str, str]:
    """A key for a second project, made the way an operator makes one: `refinery keys create`."""
    out = platform.cli("keys", "create", "--project", "other-team")
    assert out.returncode == 0, out.stderr
    key = out.stdout.strip().splitlines()[-1]
    assert key.startswith("rfy_") and " " not in key
    return {"Authorization": f"Bearer {key}"}


def onnx_accuracy(onnx_bytes: bytes, x: np.ndarray, y: np.ndarray) -> float:
    import onnxruntime as ort
    session = ort.InferenceSession(onnx_bytes, providers=["CPUExecutionProvider"])
    logits = session.run(None, {session.get_inputs()[0].name: x.astype(np.float32)})[0]
    return float((logits.argmax(1) == y).mean())
