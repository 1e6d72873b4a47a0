"""Job rows: create (with its outbox message), fetch within a project, list with cursor and filters."""
import time

from sqlalchemy import Row, Select, bindparam, case, func, select
from sqlalchemy.orm import Session

from db.models import Job, JobEvent, OutboxMessage


def insert_job(session: Session, job: Job) -> Job:
    """The job row and its outbox message go in the same transaction: a committed job is always published."""
    session.add(job)
    session.add(OutboxMessage(job_id=job.id, created_at=time.time()))
    session.flush()
    return job


def get_job(session: Session, job_id: str) -> Job | None:
    return session.get(Job, job_id)


def cancel_requested(session: Session, job_id: str) -> bool:
    return bool(session.scalar(select(Job.cancel_requested).where(Job.id == job_id)))


def ping(session: Session) -> None:
    """Readiness: the database answers a trivial query."""
    session.execute(select(1))


def get_project_job(session: Session, project_id: str, job_id: str) -> Job | None:
    return session.scalar(select(Job).where(Job.id == job_id, Job.project_id == project_id))


# What the public job object is made of (core.job_object.JobObject.of reads these by name), as one Core statement
# built once: a status poll runs it on the session's connection with two bound ids — no ORM entity, identity map or
# change tracking, and no statement to build and coerce per request (that alone was a third of a read's time).
_jobs = Job.__table__
_JOB_VIEW = (select(*(_jobs.c[name] for name in (
    "id", "status", "method", "algorithm", "spec", "created_at", "started_at", "finished_at", "attempt",
    "max_attempts", "cancel_requested", "progress", "max_seconds", "used_seconds", "result", "error",
    "resource_class")),
    _jobs.c.metadata.label("metadata_"))
    .where(_jobs.c.id == bindparam("job_id"), _jobs.c.project_id == bindparam("project_id")))


def get_project_job_view(session: Session, project_id: str, job_id: str) -> Row | None:
    """The job's public columns, if it belongs to the project: one primary-key read."""
    return session.connection().execute(_JOB_VIEW, {"job_id": job_id, "project_id": project_id}).first()


def list_query(project_id: str, *, after: str | None, limit: int, status: str | None, method: str | None,
               metadata: dict[str, str]) -> Select:
    """Newest first; `after` is the last id of the previous page (keyset pagination). Every filter is SQL: status
    and method walk ix_jobs_project_status_id / ix_jobs_project_method_id in id order; metadata compares the JSON
    field as text (`metadata->>'k'` on Postgres, JSON_EXTRACT on SQLite), on the rows those indexes yield."""
    query = select(Job).where(Job.project_id == project_id).order_by(Job.id.desc())
    if status:
        query = query.where(Job.status == status)
    if method:
        query = query.where(Job.method == method)
    for key, value in metadata.items():
        query = query.where(Job.metadata_[key].as_string() == value)
    if after:
        query = query.where(Job.id < after)
    return query.limit(limit + 1)


def list_jobs(session: Session, project_id: str, *, after: str | None, limit: int, status: str | None,
              method: str | None, metadata: dict[str, str]) -> tuple[list[Job], bool]:
    rows = list(session.scalars(list_query(project_id, after=after, limit=limit, status=status, method=method,
                                           metadata=metadata)))
    return rows[:limit], len(rows) > limit


def count_by_status(session: Session) -> dict[str, int]:
    return {status: count for status, count in session.execute(select(Job.status, func.count()).group_by(Job.status))}


def finished_durations(session: Session, since: float) -> list[tuple[str, float]]:
    rows = session.execute(select(Job.method, Job.finished_at - Job.started_at)
                           .where(Job.finished_at >= since, Job.started_at.is_not(None)))
    return [(m, float(d)) for m, d in rows]


def count_by_method_and_status(session: Session) -> dict[tuple[str, str], int]:
    rows = session.execute(select(Job.method, Job.status, func.count()).group_by(Job.method, Job.status))
    return {(method, status): count for method, status, count in rows}


def dispatch_waits(session: Session, since: float) -> list[tuple[str, float]]:
    """(method, seconds an attempt waited from queued to claimed), for the attempts of jobs claimed since `since`.
    An attempt is queued at its job's `job.created` event (attempt 1) or its `job.requeued` event (later attempts:
    the reaper writes it with the new attempt number) and claimed at its `job.started` event, which the worker
    writes right after its claim commits. `jobs.started_at` alone would hold only the newest attempt's claim."""
    claimed = func.min(case((JobEvent.type == "job.started", JobEvent.created_at)))
    queued = func.min(case((JobEvent.type != "job.started", JobEvent.created_at)))
    rows = session.execute(
        select(Job.method, claimed - queued)
        .join(Job, Job.id == JobEvent.job_id)
        .where(Job.started_at >= since, JobEvent.type.in_(("job.created", "job.requeued", "job.started")))
        .group_by(Job.method, JobEvent.job_id, JobEvent.attempt))
    return [(method, max(0.0, float(wait))) for method, wait in rows if wait is not None]


def running_progress(session: Session) -> list[tuple[str, str, dict]]:
    """(job id, method, progress) of the running jobs, as their workers' heartbeats last wrote it."""
    return [(job_id, method, progress or {}) for job_id, method, progress in
            session.execute(select(Job.id, Job.method, Job.progress).where(Job.status == "running"))]
