"""No job is lost when the broker goes away: a private Redis server is stopped and started again around and during
jobs; the ledger's outbox and dispatcher sweep re-publish, and running jobs carry on (their leases live in the db)."""
import os
import subprocess
import sys
import time
import uuid

import httpx
import pytest
from sqlalchemy import select

from bench.services import REDIS_SERVER, PrivateRedis
from db.models import Job, OutboxMessage
from db.repositories import outbox
from db.session import transaction
from tests.conftest import REDIS_URL, ROOT, TOKEN, Platform, free_port, fresh_database
from workers.watchdog import EXIT_STALLED, Watchdog, redis_queue_depth


@pytest.fixture(scope="module")
def outage_platform(tmp_path_factory):
    if REDIS_SERVER is None:
        pytest.skip("redis-server is not installed")
    home = tmp_path_factory.mktemp("outage-home")
    redis = PrivateRedis(free_port(), home)
    redis.start()
    with fresh_database() as url:
        env = dict(os.environ, REFINERY_HOME=str(home), REFINERY_DATABASE_URL=url,
                   REFINERY_BROKER_URL=f"redis://127.0.0.1:{redis.port}/0",
                   REFINERY_QUEUE=f"refinery.outage.{uuid.uuid4().hex[:6]}", REFINERY_STORAGE_URL=f"file://{home}/s",
                   REFINERY_BOOTSTRAP_TOKEN=TOKEN, REFINERY_PORT=str(free_port()), REFINERY_LEASE_SECONDS="6",
                   REFINERY_HEARTBEAT_SECONDS="1", REFINERY_REDISPATCH_SECONDS="3", REFINERY_SWEEP_SECONDS="0.5")
        platform = Platform(env, home)
        platform.start_api()
        platform.start_worker()
        try:
            yield platform, redis
        finally:
            platform.stop()
            redis.kill()


def test_a_created_job_is_booked_as_dispatched_once_and_its_outbox_row_marked(outage_platform):
    """The create path publishes after its commit and marks only the outbox row (the job row counts that publish
    from its insert), so a worker claiming the job never waits on the API; the sweep's backoff starts from it."""
    platform, _redis = outage_platform
    job = platform.submit({"method": "train", "dataset": {"uri": "builtin://iris"}, "params": {"epochs": 1},
                           "budget": {"max_seconds": 60}})
    # Read at once: a job still queued 3 s later (a worker slow to boot) is published again by the sweep, which
    # rightly moves these columns on.
    with transaction(platform.env["REFINERY_DATABASE_URL"]) as session:
        row = session.get(Job, job["id"])
        message = session.scalar(select(OutboxMessage).where(OutboxMessage.job_id == job["id"]))
        assert message.published_at is not None and message.published_at >= job["created_at"]
        if row.dispatches == 1:  # not yet re-published: the create's own booking
            assert row.last_dispatched_at == pytest.approx(job["created_at"])
            assert row.next_dispatch_at == pytest.approx(job["created_at"] + 3)  # REFINERY_REDISPATCH_SECONDS
        else:
            assert time.time() - job["created_at"] >= 3, "re-published before its redispatch wait was over"
    assert platform.wait(job["id"])["status"] == "succeeded"


def test_jobs_submitted_while_the_broker_is_down_run_when_it_returns(outage_platform):
    platform, redis = outage_platform
    redis.kill()
    assert httpx.get(platform.base + "/readyz", timeout=30).status_code == 503
    ids = [platform.submit({"method": "train", "dataset": {"uri": "builtin://iris"}, "params": {"epochs": 2},
                            "budget": {"max_seconds": 60}, "seed": i})["id"] for i in range(3)]
    time.sleep(2)
    assert all(platform.job(i)["status"] == "queued" for i in ids)
    with transaction(platform.env["REFINERY_DATABASE_URL"]) as session:  # the failed publishes left them pending
        assert {job_id for job_id, _ in outbox.pending_jobs(session)} >= set(ids)
    redis.start()  # a new, empty Redis: every message published before is gone
    for job_id in ids:
        done = platform.wait(job_id, timeout=180)
        assert done["status"] == "succeeded" and done["attempt"] == 1, done
    assert httpx.get(platform.base + "/readyz", timeout=30).status_code == 200


def test_a_running_job_survives_a_broker_restart(outage_platform):
    platform, redis = outage_platform
    job = platform.submit({"method": "train", "dataset": {"uri": "builtin://digits"}, "params": {"epochs": 40},
                           "budget": {"max_seconds": 200}})
    platform.wait(job["id"], until=("running", "succeeded"))
    redis.kill()
    time.sleep(3)
    redis.start()
    done = platform.wait(job["id"], timeout=240)
    assert done["status"] == "succeeded", done
    after = platform.submit({"method": "train", "dataset": {"uri": "builtin://iris"}, "params": {"epochs": 1},
                             "budget": {"max_seconds": 60}})
    assert platform.wait(after["id"], timeout=180)["status"] == "succeeded"  # the worker reconnected


def test_the_watchdog_sees_a_stall_only_when_idle_beside_a_waiting_queue(redis_client):
    queue = f"refinery.watchdog.{uuid.uuid4().hex[:6]}"
    exits: list[int] = []
    dog = Watchdog(redis_queue_depth(REDIS_URL, queue), stall_seconds=1.0, exit=exits.append, interval=0.1)
    try:
        assert not dog.check()  # an empty queue is no stall
        redis_client.rpush(queue, b"message")
        dog.busy.set()
        assert not dog.check() and (time.sleep(1.2) or not dog.check())  # busy with a job: not a stall either
        dog.busy.clear()
        assert not dog.check()  # idle beside a message: the clock starts
        time.sleep(1.2)
        assert dog.check()
        dog.start()
        deadline = time.time() + 5
        while not exits and time.time() < deadline:
            time.sleep(0.05)
        assert exits == [EXIT_STALLED]
    finally:
        dog.stopping.set()
        redis_client.delete(queue)

    def broker_down() -> int:
        raise ConnectionError("redis is restarting")
    assert not Watchdog(broker_down, stall_seconds=0).check()  # an unreachable broker is not a stall


def test_a_deaf_worker_exits_and_is_replaced(tmp_path, redis_client):
    """A real worker that cannot hear its queue — it consumes another one, as a stalled consumer hears nothing —
    while a message waits there exits with EX_TEMPFAIL for its supervisor to replace it."""
    from core.embedded import worker_args

    queue = f"refinery.deaf.{uuid.uuid4().hex[:6]}"
    env = dict(os.environ, REFINERY_BROKER_URL=REDIS_URL, REFINERY_QUEUE=queue, REFINERY_HOME=str(tmp_path),
               REFINERY_WORKER_STALL_SECONDS="2")
    args = worker_args(queue)
    args[args.index("-Q") + 1] = queue + ".elsewhere"
    redis_client.rpush(queue, b"a message nobody consumes")
    try:
        worker = subprocess.run([sys.executable, *args], env=env, cwd=ROOT, capture_output=True, text=True,
                                timeout=120)
    finally:
        redis_client.delete(queue)
    assert worker.returncode == EXIT_STALLED, worker.stderr[-2000:]
    assert "the broker consumer has stalled" in worker.stdout + worker.stderr
