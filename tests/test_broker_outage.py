"""No job is lost when the broker goes away: a private Redis server is stopped and started again around and during
jobs; the ledger's outbox and dispatcher sweep re-publish, and running jobs carry on (their leases live in the db)."""
import os
import time
import uuid

import httpx
import pytest

from bench.services import REDIS_SERVER, PrivateRedis
from tests.conftest import TOKEN, Platform, free_port, fresh_database


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


def test_jobs_submitted_while_the_broker_is_down_run_when_it_returns(outage_platform):
    platform, redis = outage_platform
    redis.kill()
    assert httpx.get(platform.base + "/readyz", timeout=30).status_code == 503
    ids = [platform.submit({"method": "train", "dataset": {"uri": "builtin://iris"}, "params": {"epochs": 2},
                            "budget": {"max_seconds": 60}, "seed": i})["id"] for i in range(3)]
    time.sleep(2)
    assert all(platform.job(i)["status"] == "queued" for i in ids)
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
