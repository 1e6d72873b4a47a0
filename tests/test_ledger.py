"""The ledger on real Postgres (and SQLite for the embedded mode): migrations, exclusive claims, lease fencing, the
reaper, the outbox dispatcher publishing to real Redis, and idempotency under concurrency. These tests use their own
database and queue, away from the running platform's sweeper and worker."""
import concurrent.futures
import time
import uuid

import pytest
from sqlalchemy import inspect, text
from sqlalchemy.exc import IntegrityError

from core.ids import new_id
from core.settings import Settings
from db import lifecycle, sweeper
from db.migrate import upgrade
from db.models import Job, OutboxMessage
from db.repositories import idempotency, outbox
from db.repositories.jobs import insert_job
from db.repositories.projects import create_key, find_active_key, get_or_create_project, revoke_key
from db.session import get_engine, get_sessionmaker, transaction
from tests.conftest import fresh_database

TABLES = {"projects", "api_keys", "jobs", "job_events", "metric_points", "artifacts", "files", "idempotency_records",
          "outbox", "alembic_version"}


def make_job(url: str, project_id: str, **values) -> str:
    with transaction(url) as session:
        job = Job(id=new_id("job"), project_id=project_id, status="queued", method="train", algorithm="supervised",
                  spec={"method": "train"}, metadata_={}, created_at=time.time(), attempt=1, max_attempts=2,
                  max_seconds=60, used_seconds=0.0, cancel_requested=False, progress={})
        for key, value in values.items():
            setattr(job, key, value)
        insert_job(session, job)
        return job.id


LEDGER_QUEUE = f"refinery.ledger-test.{uuid.uuid4().hex[:8]}"


@pytest.fixture(scope="module")
def pg_url():
    with fresh_database() as url:
        yield url


@pytest.fixture(scope="module")
def project_id(pg_url) -> str:
    with transaction(pg_url) as session:
        return get_or_create_project(session, "ledger-tests").id


def test_migrations_run_on_postgres_and_sqlite(pg_url, tmp_path):
    sqlite_url = f"sqlite:///{tmp_path / 'embedded.db'}"
    upgrade(sqlite_url)
    upgrade(sqlite_url)  # idempotent
    for url in (pg_url, sqlite_url):
        assert set(inspect(get_engine(url)).get_table_names()) >= TABLES, url


def test_only_one_of_many_concurrent_claims_wins(pg_url, project_id):
    job_id = make_job(pg_url, project_id)

    def claim(i):
        with transaction(pg_url) as session:
            return lifecycle.claim(session, job_id, f"worker-{i}", lease_seconds=30)

    with concurrent.futures.ThreadPoolExecutor(8) as pool:
        tokens = list(pool.map(claim, range(16)))
    assert sum(t is not None for t in tokens) == 1
    with transaction(pg_url) as session:
        job = session.get(Job, job_id)
        assert job.status == "running" and job.lease_token in tokens


def test_writes_are_fenced_by_the_lease_token(pg_url, project_id):
    job_id = make_job(pg_url, project_id)
    with transaction(pg_url) as session:
        token = lifecycle.claim(session, job_id, "w", lease_seconds=30)
    with transaction(pg_url) as session:
        assert lifecycle.renew(session, job_id, token, 30)
        assert not lifecycle.renew(session, job_id, "stolen-token", 30)
        with pytest.raises(lifecycle.LeaseLost):
            lifecycle.fence(session, job_id, "stolen-token", 30)
    with transaction(pg_url) as session:
        assert not lifecycle.finish(session, job_id, "stolen-token", "succeeded")
        assert lifecycle.finish(session, job_id, token, "succeeded", result={"ok": True})
    with transaction(pg_url) as session:
        assert not lifecycle.finish(session, job_id, token, "failed")  # terminal: nothing moves it again
        assert session.get(Job, job_id).status == "succeeded"


def test_reaper_requeues_then_fails_past_max_attempts(pg_url, project_id):
    job_id = make_job(pg_url, project_id)
    with transaction(pg_url) as session:
        old_token = lifecycle.claim(session, job_id, "w1", lease_seconds=0.01)
    time.sleep(0.05)
    # An API started by another test may run its own sweep on this database too; either reaper may win.
    with transaction(pg_url) as session:
        lifecycle.reap_expired(session)
    with transaction(pg_url) as session:
        job = session.get(Job, job_id)
        assert job.status == "queued" and job.attempt == 2 and job.lease_token is None
        assert not lifecycle.renew(session, job_id, old_token, 30)  # the old worker is fenced out
        lifecycle.claim(session, job_id, "w2", lease_seconds=0.01)
    time.sleep(0.05)
    with transaction(pg_url) as session:
        lifecycle.reap_expired(session)
    with transaction(pg_url) as session:
        job = session.get(Job, job_id)
        assert job.status == "failed" and job.error["code"] == "worker_lost"


def test_reaper_cancels_a_dead_job_whose_cancel_was_requested(pg_url, project_id):
    job_id = make_job(pg_url, project_id)
    with transaction(pg_url) as session:
        lifecycle.claim(session, job_id, "w", lease_seconds=0.01)
        session.get(Job, job_id).cancel_requested = True
    time.sleep(0.05)
    with transaction(pg_url) as session:
        lifecycle.reap_expired(session)
    with transaction(pg_url) as session:
        assert session.get(Job, job_id).status == "cancelled"


def test_a_cancelled_queued_job_cannot_be_claimed(pg_url, project_id):
    job_id = make_job(pg_url, project_id)
    with transaction(pg_url) as session:
        assert lifecycle.request_cancel(session, session.get(Job, job_id)) == "cancelled"
    with transaction(pg_url) as session:
        assert lifecycle.claim(session, job_id, "w", 30) is None


def test_dispatcher_publishes_the_outbox_and_stale_queued_jobs_to_redis(pg_url, project_id, redis_client):
    settings = Settings(database_url=pg_url, redispatch_seconds=0.2, redispatch_max_seconds=0.5, queue=LEDGER_QUEUE)
    job_id = make_job(pg_url, project_id)
    with transaction(pg_url) as session:  # other queued jobs in this database were published already
        for message in outbox.pending(session):
            if message.job_id != job_id:
                outbox.mark_published(session, message.job_id)
        session.query(Job).filter(Job.status == "queued", Job.id != job_id).update({"status": "cancelled"})
    assert sweeper.sweep_once(settings)["published"] == 1
    assert redis_client.llen(LEDGER_QUEUE) == 1
    with transaction(pg_url) as session:
        row = session.query(OutboxMessage).filter_by(job_id=job_id).one()
        assert row.published_at is not None
    assert sweeper.sweep_once(settings)["published"] == 0  # published recently: not again yet
    time.sleep(0.3)
    assert sweeper.sweep_once(settings)["published"] == 1  # still unclaimed: the message may be lost, publish again
    assert redis_client.llen(LEDGER_QUEUE) == 2
    time.sleep(0.3)
    assert sweeper.sweep_once(settings)["published"] == 0  # backing off: 0.4 s after the second publish
    time.sleep(0.15)
    assert sweeper.sweep_once(settings)["published"] == 1
    time.sleep(0.55)
    assert sweeper.sweep_once(settings)["published"] == 1  # 0.8 s is over the 0.5 s cap
    assert redis_client.llen(LEDGER_QUEUE) == 4
    redis_client.delete(LEDGER_QUEUE)


def test_idempotency_key_is_unique_per_project_and_endpoint(pg_url, project_id):
    job_id = make_job(pg_url, project_id)
    session_a = get_sessionmaker(pg_url)()
    session_b = get_sessionmaker(pg_url)()
    try:
        idempotency.add_record(session_a, project_id, "POST /v1/jobs", "k1", "h", job_id)
        session_a.commit()
        with pytest.raises(IntegrityError):
            idempotency.add_record(session_b, project_id, "POST /v1/jobs", "k1", "h2", job_id)
    finally:
        session_b.rollback()
        session_a.close()
        session_b.close()


def test_api_keys_are_stored_hashed_and_revocable(pg_url):
    with transaction(pg_url) as session:
        project = get_or_create_project(session, "keys-test")
        row, key = create_key(session, project, name="ci")
    with transaction(pg_url) as session:
        assert find_active_key(session, key).id == row.id
        dump = str([tuple(r) for r in session.execute(text("SELECT * FROM api_keys")).all()])
        assert key not in dump and key[4:20] not in dump
        assert revoke_key(session, row.id)
    with transaction(pg_url) as session:
        assert find_active_key(session, key) is None
