"""Resource-routed queues (issue 13): a job is published to its resource class's Celery queue, only a worker serving
that class takes it, and a queued job whose class no live worker serves says so in `waiting_for`. Also the
dispatcher's next_dispatch_at backoff and the worker registry on Postgres and on the embedded SQLite."""
import base64
import json
import os
import time
import uuid

import pytest

from core.ids import new_id
from core.resources import class_queues, parse_classes, queue_for, resource_class, waiting_for
from core.settings import Settings
from db import lifecycle, sweeper, worker_registry
from db.migrate import upgrade
from db.models import Job, Worker
from db.repositories import outbox, workers
from db.repositories.jobs import insert_job
from db.repositories.projects import get_or_create_project
from db.session import transaction
from tests.conftest import REDIS_URL, TOKEN, Platform, free_port, fresh_database

IRIS = {"method": "train", "dataset": {"uri": "builtin://iris"}, "params": {"epochs": 1},
        "budget": {"max_seconds": 60}}


def queued_job_ids(redis_client, queue: str) -> list[str]:
    """The job ids of the Celery messages waiting in a Redis queue (kombu: a list of JSON envelopes whose body is
    base64 JSON [args, kwargs, embed])."""
    ids = []
    for raw in redis_client.lrange(queue, 0, -1):
        envelope = json.loads(raw)
        args, _kwargs, _embed = json.loads(base64.b64decode(envelope["body"]))
        ids.append(args[0])
    return ids


def sse_waiting(platform: Platform, job_id: str) -> dict:
    """The first `job.waiting` event of the job's event stream."""
    with platform.http.stream("GET", f"/v1/jobs/{job_id}/events", headers={"Accept": "text/event-stream"}) as stream:
        named = None
        for line in stream.iter_lines():
            if line.startswith("event: "):
                named = line.removeprefix("event: ")
            elif line.startswith("data: ") and named == "job.waiting":
                return json.loads(line.removeprefix("data: "))
    raise AssertionError("the stream ended without a job.waiting event")


def test_resource_classes_and_their_queues():
    assert resource_class({}) == "cpu"
    assert resource_class({"accelerator": "cpu", "devices": 2}) == "cpu-x2"
    assert resource_class({"accelerator": "gpu", "devices": 4}) == "gpu-x4"
    assert resource_class({"accelerator": "gpu", "devices": 8, "nodes": 2}) == "gpu-x8-n2"
    assert queue_for("cpu", "refinery.jobs") == "refinery.jobs"  # existing deployments keep their queue
    assert queue_for("gpu-x4", "refinery.jobs") == "refinery.jobs.gpu-x4"
    assert class_queues("q", "cpu, cpu-x2,cpu") == ["q", "q.cpu-x2"]
    for bad in ("", "gpux4", "tpu", "gpu-x1", "cpu-n1"):
        with pytest.raises(ValueError, match="worker_classes"):
            parse_classes(bad)
    with pytest.raises(ValueError, match="'gpux4' is not a resource class"):
        Settings(worker_classes="cpu,gpux4")


@pytest.fixture(scope="module")
def gpu_platform(redis_client, tmp_path_factory):
    """An API on its own database and queue prefix with no worker at first; start_worker() starts one serving only
    the `gpu` class (on this machine's CPU: what is tested is routing)."""
    home = tmp_path_factory.mktemp("queues-home")
    queue = f"refinery.queues.{uuid.uuid4().hex[:8]}"
    with fresh_database() as url:
        env = dict(os.environ, REFINERY_HOME=str(home), REFINERY_DATABASE_URL=url, REFINERY_BROKER_URL=REDIS_URL,
                   REFINERY_QUEUE=queue, REFINERY_STORAGE_URL=f"file://{home}/store", REFINERY_BOOTSTRAP_TOKEN=TOKEN,
                   REFINERY_PORT=str(free_port()), REFINERY_SWEEP_SECONDS="0.5", REFINERY_REDISPATCH_SECONDS="60",
                   REFINERY_WORKER_CLASSES="gpu", REFINERY_WORKER_REPORT_SECONDS="1", REFINERY_DEVICE="cpu",
                   OMP_NUM_THREADS="1", PYTHONUNBUFFERED="1")
        platform = Platform(env, home)
        platform.start_api()
        try:
            yield platform, url, queue
        finally:
            platform.stop()
            redis_client.delete(queue, f"{queue}.gpu")


def test_a_job_waits_for_a_worker_of_its_class_and_only_that_worker_runs_it(gpu_platform, redis_client):
    platform, url, queue = gpu_platform
    gpu_job = platform.submit({**IRIS, "resources": {"accelerator": "gpu"}})
    cpu_job = platform.submit(IRIS)
    assert gpu_job["resource_class"] == "gpu" and cpu_job["resource_class"] == "cpu"
    # Nothing serves either class yet: both say so, naming the class and the setting that would serve it.
    for job, name in ((gpu_job, "gpu"), (cpu_job, "cpu")):
        seen = platform.job(job["id"])
        assert seen["status"] == "queued", seen
        assert seen["waiting_for"]["reason"] == "no_worker_for_class", seen
        assert seen["waiting_for"]["resource_class"] == name
        assert f"REFINERY_WORKER_CLASSES={name}" in seen["waiting_for"]["message"]
    listed = {j["id"]: j for j in platform.http.get("/v1/jobs", params={"status": "queued"}).json()["data"]}
    assert listed[gpu_job["id"]]["waiting_for"]["reason"] == "no_worker_for_class"
    assert sse_waiting(platform, gpu_job["id"])["data"] == platform.job(gpu_job["id"])["waiting_for"]
    # Each message went to its class's queue.
    assert gpu_job["id"] in queued_job_ids(redis_client, f"{queue}.gpu")
    assert gpu_job["id"] not in queued_job_ids(redis_client, queue)
    assert cpu_job["id"] in queued_job_ids(redis_client, queue)

    platform.start_worker()  # serves gpu only
    done = platform.wait(gpu_job["id"], timeout=120)
    assert done["status"] == "succeeded" and done["waiting_for"] is None, done
    with transaction(url) as session:
        ran_on = session.get(Job, gpu_job["id"]).worker
    assert ran_on.endswith(f":{platform.worker_proc.pid}"), ran_on
    # The gpu-only worker has been consuming all along, yet the cpu job's message is still in the cpu queue, and the
    # job still waits for a cpu worker.
    assert cpu_job["id"] in queued_job_ids(redis_client, queue)
    seen = platform.job(cpu_job["id"])
    assert seen["status"] == "queued" and seen["waiting_for"]["reason"] == "no_worker_for_class", seen
    assert seen["waiting_for"]["resource_class"] == "cpu"
    with transaction(url) as session:
        registered = {row.id: row.classes for row in session.query(Worker)}
    assert registered == {ran_on: ["gpu"]}


@pytest.fixture(scope="module")
def ledger():
    with fresh_database() as url:
        with transaction(url) as session:
            project_id = get_or_create_project(session, "queues-ledger").id
        yield url, project_id


def make_job(url: str, project_id: str, resource_class: str) -> str:
    with transaction(url) as session:
        job = Job(id=new_id("job"), project_id=project_id, status="queued", method="train", algorithm="supervised",
                  spec={"method": "train"}, metadata_={}, created_at=time.time(), attempt=1, max_attempts=2,
                  max_seconds=60, used_seconds=0.0, cancel_requested=False, progress={}, resource_class=resource_class)
        insert_job(session, job)
        return job.id


def test_redispatch_backs_off_by_next_dispatch_at_and_a_requeue_is_due_at_once(ledger, redis_client):
    url, project_id = ledger
    job_id = make_job(url, project_id, "gpu")
    with transaction(url) as session:
        assert (job_id, "gpu") in outbox.pending_jobs(session)
        waits = []
        for _ in range(5):
            outbox.mark_published(session, job_id, every=10.0, cap=40.0)
            session.flush()
            job = session.get(Job, job_id)
            session.refresh(job)
            waits.append(round(job.next_dispatch_at - job.last_dispatched_at, 3))
            # Not due before its wait is over, due after.
            assert (job_id, "gpu") not in outbox.stale_queued_jobs(session, job.last_dispatched_at + waits[-1] - 0.5)
            assert (job_id, "gpu") in outbox.stale_queued_jobs(session, job.next_dispatch_at)
        assert outbox.pending_jobs(session) == []
    assert waits == [10.0, 20.0, 40.0, 40.0, 40.0]
    # Claimed, then its worker vanishes: the reaper requeues it, due at once, and the sweep publishes it to the
    # queue of its class.
    with transaction(url) as session:
        assert lifecycle.claim(session, job_id, "w", lease_seconds=30)
    with transaction(url) as session:
        assert (job_id, "gpu") not in outbox.stale_queued_jobs(session, time.time() + 3600)  # running: never stale
    queue = f"refinery.queues-ledger.{uuid.uuid4().hex[:8]}"
    settings = Settings(database_url=url, queue=queue, redispatch_seconds=10, redispatch_max_seconds=40)
    with transaction(url) as session:
        session.query(Job).filter(Job.id == job_id).update({"lease_expires_at": time.time() - 1})
        session.query(Job).filter(Job.id != job_id, Job.status == "queued").update({"status": "cancelled"})
    try:
        assert sweeper.sweep_once(settings) == {"reaped": 1, "published": 1}
        assert queued_job_ids(redis_client, f"{queue}.gpu") == [job_id]
        assert redis_client.llen(queue) == 0
        assert sweeper.sweep_once(settings)["published"] == 0  # backing off again
    finally:
        redis_client.delete(queue, f"{queue}.gpu")


def until(check, timeout: float = 30) -> None:
    deadline = time.time() + timeout
    while not check():
        assert time.time() < deadline, "condition not reached"
        time.sleep(0.05)


@pytest.mark.parametrize("database", ["postgres", "sqlite"])
def test_the_worker_registry_tells_absent_busy_and_idle_pools_apart(database, ledger, tmp_path, monkeypatch):
    if database == "sqlite":
        url = f"sqlite:///{tmp_path / 'embedded.db'}"
        upgrade(url)
    else:
        url = ledger[0]
        with transaction(url) as session:
            session.query(Worker).delete()
    monkeypatch.setattr(worker_registry, "CACHE_SECONDS", 0.0)
    # Reports only when woken (a minute between periodic ones): what busy() and idle() do.
    settings = Settings(database_url=url, worker_seen_seconds=30, worker_report_seconds=60)
    gpu = worker_registry.Reporter(settings, "host-a:1", ["gpu", "gpu-x4"])
    gpu.start()  # reports once at start, then from its thread
    old = worker_registry.Reporter(settings, "host-b:2", ["cpu"])
    with transaction(url) as session:  # a cpu worker last seen a minute ago is gone
        workers.report(session, old.worker_id, old.classes, time.time() - 120, time.time() - 60, None)
    assert worker_registry.idle_by_class(url, 30) == {"gpu": 1, "gpu-x4": 1}
    gpu.busy("job_1")
    until(lambda: worker_registry.idle_by_class(url, 30) == {"gpu": 0, "gpu-x4": 0})
    assert waiting_for("gpu-x4", worker_registry.idle_by_class(url, 30), 30)["reason"] == "worker_busy"
    assert waiting_for("cpu", worker_registry.idle_by_class(url, 30), 30)["reason"] == "no_worker_for_class"
    gpu.idle()
    until(lambda: waiting_for("gpu", worker_registry.idle_by_class(url, 30), 30) is None)  # an idle one takes it
    gpu.stop()  # a clean shutdown leaves at once
    assert worker_registry.idle_by_class(url, 30) == {}
    with transaction(url) as session:
        workers.forget(session, time.time() - 30)
        assert session.query(Worker).count() == 0
