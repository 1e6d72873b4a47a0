"""The one writer of job status. Every transition is a conditional UPDATE, so two processes can never both win one;
every write a worker makes after its claim is fenced by its lease token. Each status change also writes the webhook
deliveries that report it (db/repositories/webhooks.enqueue_job_event), in the same transaction.

    queued ──claim──▶ running ──finish──▶ succeeded | failed | cancelled
      ▲                  │
      └──lease expired───┘ (attempt + 1; failed past max_attempts)
    queued ──cancel──▶ cancelled
"""
import secrets
import time
from typing import Any

from sqlalchemy import update
from sqlalchemy.orm import Session

from db.models import Job
from db.repositories.events import add_event
from db.repositories.webhooks import enqueue_job_event

TERMINAL = ("succeeded", "failed", "cancelled")
ALLOWED = {
    "queued": {"running", "cancelled", "failed"},
    "running": {"succeeded", "failed", "cancelled", "queued"},
    "succeeded": set(),
    "failed": set(),
    "cancelled": set(),
}


class LeaseLost(Exception):
    """This worker no longer holds the job (the reaper gave it to another attempt, or it was cancelled)."""


def claim(session: Session, job_id: str, worker: str, lease_seconds: float) -> str | None:
    """queued → running with a fresh lease token, or None if the job is not claimable (a duplicate delivery)."""
    token = secrets.token_hex(16)
    now = time.time()
    project_id = session.scalar(
        update(Job).where(Job.id == job_id, Job.status == "queued", Job.cancel_requested.is_(False))
        .values(status="running", lease_token=token, lease_expires_at=now + lease_seconds, worker=worker,
                started_at=now)
        .returning(Job.project_id)
    )
    if project_id is None:
        return None
    enqueue_job_event(session, job_id, project_id, "job.running")
    return token


def renew(session: Session, job_id: str, token: str, lease_seconds: float, **values: Any) -> bool:
    """Extend the lease (and write progress/used time); False when the lease is no longer ours. Holding the row
    lock until commit also fences the other writes of the same transaction against the reaper."""
    result = session.execute(
        update(Job).where(Job.id == job_id, Job.lease_token == token, Job.status == "running")
        .values(lease_expires_at=time.time() + lease_seconds, **values)
    )
    return result.rowcount == 1


def fence(session: Session, job_id: str, token: str, lease_seconds: float) -> None:
    if not renew(session, job_id, token, lease_seconds):
        raise LeaseLost(job_id)


def finish(session: Session, job_id: str, token: str, status: str, *, result: dict | None = None,
           error: dict | None = None, used_seconds: float | None = None, progress: dict | None = None) -> bool:
    assert status in ALLOWED["running"] - {"queued"}
    values: dict[str, Any] = {"status": status, "finished_at": time.time(), "lease_token": None,
                              "lease_expires_at": None, "result": result, "error": error}
    if used_seconds is not None:
        values["used_seconds"] = used_seconds
    if progress is not None:
        values["progress"] = {**progress, "fraction": 1.0} if status == "succeeded" else progress
    project_id = session.scalar(update(Job).where(Job.id == job_id, Job.lease_token == token, Job.status == "running")
                                .values(**values).returning(Job.project_id))
    if project_id is None:
        return False
    enqueue_job_event(session, job_id, project_id, f"job.{status}")
    return True


def fail_unclaimed(session: Session, job_id: str, error: dict) -> bool:
    """A queued job that can never run (e.g. its spec no longer validates on this worker)."""
    project_id = session.scalar(update(Job).where(Job.id == job_id, Job.status == "queued")
                                .values(status="failed", finished_at=time.time(), error=error)
                                .returning(Job.project_id))
    if project_id is None:
        return False
    enqueue_job_event(session, job_id, project_id, "job.failed")
    return True


def request_cancel(session: Session, job: Job) -> str:
    """Queued jobs are cancelled at once; running ones get a flag their worker checks every step."""
    now = time.time()
    res = session.execute(update(Job).where(Job.id == job.id, Job.status == "queued")
                          .values(status="cancelled", finished_at=now, cancel_requested=True))
    if res.rowcount == 1:
        add_event(session, job.id, job.attempt, "job.cancelled", "Cancelled before it started.")
        enqueue_job_event(session, job.id, job.project_id, "job.cancelled")
        return "cancelled"
    res = session.execute(update(Job).where(Job.id == job.id, Job.status == "running").values(cancel_requested=True))
    if res.rowcount == 1:
        add_event(session, job.id, job.attempt, "job.cancel_requested", "Cancel requested; the worker stops at its next step.")
        return "cancelling"
    return "finished"


def reap_expired(session: Session, now: float | None = None) -> list[tuple[str, str]]:
    """Return jobs whose lease expired (their worker died) to the queue with attempt + 1, or fail them past
    max_attempts, or cancel them if a cancel was pending. Returns (job_id, new_status) pairs."""
    now = now or time.time()
    expired = list(session.execute(
        update(Job).where(Job.status == "running", Job.lease_expires_at < now, Job.cancel_requested.is_(True))
        .values(status="cancelled", finished_at=now, lease_token=None, lease_expires_at=None)
        .returning(Job.id, Job.project_id)))
    changes = [(job_id, "cancelled") for job_id, _ in expired]
    failed = list(session.execute(
        update(Job).where(Job.status == "running", Job.lease_expires_at < now, Job.attempt >= Job.max_attempts)
        .values(status="failed", finished_at=now, lease_token=None, lease_expires_at=None,
                error={"code": "worker_lost", "class": "infra_error",
                       "message": "The worker running this job stopped responding on its last allowed attempt."})
        .returning(Job.id, Job.project_id)))
    changes += [(job_id, "failed") for job_id, _ in failed]
    requeued = list(session.execute(
        update(Job).where(Job.status == "running", Job.lease_expires_at < now)
        .values(status="queued", attempt=Job.attempt + 1, lease_token=None, lease_expires_at=None, worker=None,
                last_dispatched_at=None, dispatches=0, next_dispatch_at=now)  # the next sweep publishes it
        .returning(Job.id, Job.attempt, Job.project_id)))
    changes += [(job_id, "queued") for job_id, _, _ in requeued]
    for job_id, attempt, project_id in requeued:
        add_event(session, job_id, attempt, "job.requeued",
                  f"The previous worker stopped responding; attempt {attempt} will resume from the last checkpoint.",
                  level="warning")
        enqueue_job_event(session, job_id, project_id, "job.requeued")
    for job_id, project_id in failed:
        add_event(session, job_id, 0, "job.failed", "Worker lost on the last allowed attempt.", level="error")
        enqueue_job_event(session, job_id, project_id, "job.failed")
    for job_id, project_id in expired:
        enqueue_job_event(session, job_id, project_id, "job.cancelled")
    return changes
