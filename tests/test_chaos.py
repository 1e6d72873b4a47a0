"""Faults against the production shape on one machine: `refinery serve` (what `make serve` runs) with
REFINERY_DATABASE_URL=postgresql://…, REFINERY_BROKER_URL=redis://… and REFINERY_WORKERS=2, on a private Postgres
cluster and a private Redis server, so the database can be restarted and workers killed without touching the
machine's shared services. The soak versions (dozens of kills, restarts) are bench/chaos.py."""
import os
import re
import signal
import subprocess
import sys
import threading
import time
from pathlib import Path

import httpx
import pytest

from bench.common import Served, celery_log_time, served
from bench.services import PG_BIN, REDIS_SERVER, PrivateRedis, private_postgres
from tests.conftest import Platform, free_port

LEASE = 4
pytestmark = pytest.mark.skipif(PG_BIN is None or REDIS_SERVER is None,
                                reason="needs the postgresql and redis-server packages (installed by .ci/run)")


class Prod(Platform):
    """The conftest Platform's user-side helpers (submit, wait, events) on a served platform."""

    def __init__(self, platform: Served, postgres, database: str, redis: PrivateRedis):
        self.platform, self.postgres, self.database, self.redis = platform, postgres, database, redis
        self.base, self.headers, self.home = platform.base, platform.headers, platform.home
        self.http = httpx.Client(base_url=platform.base, headers=platform.headers, timeout=30)

    def worker_log(self) -> str:
        return self.platform.worker_logs()

    def wait_for_event(self, job_id: str, type_: str, timeout: float = 120) -> None:
        deadline = time.time() + timeout
        while time.time() < deadline and type_ not in [e["type"] for e in self.events(job_id)]:
            time.sleep(0.2)


@pytest.fixture(scope="module")
def prod(tmp_path_factory):
    home = tmp_path_factory.mktemp("prod-home")
    redis = PrivateRedis(free_port(), home)
    redis.start()
    with private_postgres(free_port()) as postgres:
        database = "refinery"
        url = postgres.create_database(database)
        env = {"REFINERY_DATABASE_URL": url, "REFINERY_BROKER_URL": redis.url, "REFINERY_WORKERS": "2",
               "REFINERY_STORAGE_URL": f"file://{home / 'store'}", "REFINERY_LEASE_SECONDS": str(LEASE),
               "REFINERY_HEARTBEAT_SECONDS": "1", "REFINERY_CHECKPOINT_SECONDS": "1",
               "REFINERY_REDISPATCH_SECONDS": "3", "REFINERY_SWEEP_SECONDS": "0.5"}
        try:
            with served(env, home) as platform:
                yield Prod(platform, postgres, database, redis)
        finally:
            redis.kill()


def _train(seed: int, epochs: int = 60, model: dict | None = None) -> dict:
    """A digits job; an MLP unless told otherwise (a few times faster per epoch than the default CNN)."""
    return {"method": "train", "dataset": {"uri": "builtin://digits"}, "params": {"epochs": epochs},
            "budget": {"max_seconds": 600}, "seed": seed, "model": model or {"arch": "mlp"}}


def _started_on(events: list[dict]) -> list[str]:
    return [re.search(r"started on (\S+?)\.", e["message"]).group(1) for e in events if e["type"] == "job.started"]


def test_serve_runs_the_production_shape_with_several_workers(prod):
    ready = httpx.get(prod.platform.base + "/readyz").json()
    assert ready == {"status": "ready", "checks": {"database": True, "broker": True}}
    assert len(prod.platform.worker_pids()) == 2
    jobs = [prod.submit(_train(seed, epochs=40)) for seed in range(2)]
    done = [prod.wait(job["id"]) for job in jobs]
    assert [job["status"] for job in done] == ["succeeded", "succeeded"]
    workers = {_started_on(prod.events(job["id"]))[0] for job in jobs}
    assert len(workers) == 2, workers  # submitted together, they ran side by side on both workers


def test_postgres_restart_mid_run_is_a_503_then_the_job_resumes_once(prod):
    job = prod.submit(_train(7, epochs=150))
    prod.wait_for_event(job["id"], "checkpoint.saved")
    prod.postgres.stop()
    stopped_at = time.time()
    try:
        statuses = {prod.http.get(f"/v1/jobs/{job['id']}").status_code for _ in range(5)}
        listing = prod.http.get("/v1/jobs")
        time.sleep(LEASE + 2)  # down for longer than a lease: the worker has to let go of the job
    finally:
        prod.postgres.start()
    assert statuses == {503}, statuses
    assert listing.status_code == 503 and listing.json()["error"]["code"] == "database_unavailable", listing.text
    done = prod.wait(job["id"], timeout=300)
    assert done["status"] == "succeeded" and done["attempt"] == 2, done
    events = prod.events(job["id"])
    resumed = [e for e in events if e["type"] == "job.resumed"]
    assert len(resumed) == 1 and resumed[0]["attempt"] == 2 and resumed[0]["data"]["step"] > 0
    # Never two active attempts: the first worker let go before the second attempt started.
    abandoned = [celery_log_time(line) for line in prod.platform.worker_logs().splitlines()
                 if job["id"] in line and ("abandoning attempt 1" in line or "stopping this attempt" in line)]
    second_start = next(e["created_at"] for e in events if e["type"] == "job.started" and e["attempt"] == 2)
    assert abandoned and abandoned[0] < second_start, (abandoned, second_start)
    assert abandoned[0] - stopped_at < LEASE + 1  # it let go within its lease
    epochs = [p["step"] for p in next(m for m in prod.http.get(f"/v1/jobs/{job['id']}/metrics").json()["data"]
                                      if m["name"] == "val_accuracy")["points"]]
    assert epochs == list(range(1, 151))


def _rss_bytes(pid: int) -> int:
    try:
        with open(f"/proc/{pid}/status") as status:
            return next(int(line.split()[1]) * 1024 for line in status if line.startswith("VmRSS:"))
    except (FileNotFoundError, StopIteration, ProcessLookupError):
        return 0


class OomKiller(threading.Thread):
    """What the kernel does to a container over its memory limit: SIGKILL any worker whose resident memory passes
    `limit` bytes. (No cgroup can be made here, so the limit is enforced from outside, the same way.)"""

    def __init__(self, platform: Served, limit: int):
        super().__init__(daemon=True)
        self.platform, self.limit, self.kills = platform, limit, 0
        self.stopping = threading.Event()

    def run(self) -> None:
        while not self.stopping.is_set():
            for pid in self.platform.worker_pids():
                if _rss_bytes(pid) > self.limit:
                    os.kill(pid, signal.SIGKILL)
                    self.kills += 1
            time.sleep(0.02)


def test_a_job_that_always_kills_its_worker_fails_after_max_attempts(prod):
    baseline = max(_rss_bytes(pid) for pid in prod.platform.worker_pids())
    killer = OomKiller(prod.platform, limit=baseline + 600 * 2**20)
    killer.start()
    try:
        # ~100M parameters: weights, gradients and Adam's moments need over a gigabyte.
        job = prod.submit(_train(11, epochs=5, model={"arch": "mlp", "args": {"hidden": [10000, 10000]}}))
        done = prod.wait(job["id"], timeout=180)
    finally:
        killer.stopping.set()
        killer.join()
    assert done["status"] == "failed" and done["attempt"] == done["max_attempts"] == 3, done
    assert done["error"]["code"] == "worker_lost", done["error"]
    assert killer.kills == 3  # once per attempt: no redelivery loop
    events_then = len(prod.events(job["id"]))
    time.sleep(LEASE + 2)
    assert prod.job(job["id"])["status"] == "failed" and len(prod.events(job["id"])) == events_then
    assert prod.wait(prod.submit(_train(12, epochs=5))["id"])["status"] == "succeeded"  # the workers carry on


def test_a_worker_that_dies_after_its_claim_before_any_heartbeat_is_reaped(prod):
    from db import lifecycle
    from db.session import transaction

    # With the broker down no live worker can take the job first (and the POST still answers 201: the job waits in
    # the outbox). Claim it as a worker would, then "die": no heartbeat, no events, nothing.
    prod.redis.kill()
    try:
        job = prod.submit(_train(13, epochs=20))
        claimed_at = time.time()  # the lease is stamped inside the claim, so after this
        with transaction(prod.postgres.url(prod.database)) as session:
            token = lifecycle.claim(session, job["id"], "doomed-worker:1", LEASE)
    finally:
        prod.redis.start()
    assert token is not None
    done = prod.wait(job["id"], timeout=120)
    assert done["status"] == "succeeded" and done["attempt"] == 2, done
    requeued = next(e for e in prod.events(job["id"]) if e["type"] == "job.requeued")
    assert LEASE <= requeued["created_at"] - claimed_at < LEASE + 3  # reaped once its lease ran out


def test_api_keys_never_appear_in_a_database_dump_and_a_revoked_key_is_refused(prod):
    env = {"REFINERY_DATABASE_URL": prod.postgres.url(prod.database), "REFINERY_HOME": str(prod.platform.home)}
    created = _cli(env, "keys", "create", "--project", "dump-check", "--name", "ci")
    key = created.stdout.strip().splitlines()[-1]
    bootstrap = prod.platform.headers["Authorization"].removeprefix("Bearer ")
    assert httpx.get(prod.platform.base + "/v1/jobs", headers={"Authorization": f"Bearer {key}"}).status_code == 200
    dump = prod.postgres.dump(prod.database)
    assert "CREATE TABLE public.api_keys" in dump
    for secret in (key, bootstrap):
        assert secret not in dump and secret[-16:] not in dump  # at most a short display prefix is stored
    _cli(env, "keys", "revoke", key)
    # The API trusts a key it checked for REFINERY_AUTH_CACHE_SECONDS (5 s by default): refused once that is over.
    time.sleep(5.2)
    refused = httpx.get(prod.platform.base + "/v1/jobs", headers={"Authorization": f"Bearer {key}"})
    assert refused.status_code == 401 and refused.json()["error"]["code"] == "invalid_api_key", refused.text


def _cli(env: dict[str, str], *args: str) -> subprocess.CompletedProcess:
    clean = {k: v for k, v in os.environ.items() if not k.startswith("REFINERY_")}
    out = subprocess.run([str(Path(sys.executable).parent / "refinery"), *args], env={**clean, **env},
                         capture_output=True, text=True, timeout=120)
    assert out.returncode == 0, out.stderr
    return out
