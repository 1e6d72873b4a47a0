"""The outbox: publish requests written with the job, marked when the broker has taken them; and the dispatcher's
pick of queued jobs due for another publish (jobs.next_dispatch_at, set at each publish)."""
import time

from sqlalchemy import case, func, select, text, update
from sqlalchemy.orm import Session

from core.settings import get_settings
from db.models import Job, OutboxMessage


def pending(session: Session, limit: int = 100) -> list[OutboxMessage]:
    return list(session.scalars(select(OutboxMessage).where(OutboxMessage.published_at.is_(None))
                                .order_by(OutboxMessage.id).limit(limit)))


def pending_jobs(session: Session, limit: int = 100) -> list[tuple[str, str]]:
    """(job id, resource class) of the outbox messages not published yet, oldest first."""
    rows = session.execute(select(OutboxMessage.job_id, Job.resource_class).join(Job, Job.id == OutboxMessage.job_id)
                           .where(OutboxMessage.published_at.is_(None)).order_by(OutboxMessage.id).limit(limit))
    return [(job_id, resource_class) for job_id, resource_class in rows]


def redispatch_wait(every: float, cap: float):
    """Seconds until the next publish, as SQL over the publish count after this one: every, 2·every, 4·every … up to
    cap, so a long queue of jobs waiting for busy workers does not fill the broker with duplicates. A CASE, not
    power(): portable (SQLite has none), a handful of steps."""
    steps, wait = [], every
    while wait < cap:
        steps.append((Job.dispatches + 1 <= len(steps) + 1, wait))
        wait *= 2
    return case(*steps, else_=cap) if steps else cap


def mark_published(session: Session, job_id: str, every: float | None = None, cap: float | None = None) -> None:
    """The broker took the job's message: the outbox row is done, and the job is due again after the backoff
    (REFINERY_REDISPATCH_SECONDS doubling up to REFINERY_REDISPATCH_MAX_SECONDS unless given)."""
    if every is None or cap is None:
        settings = get_settings()
        every, cap = settings.redispatch_seconds, settings.redispatch_max_seconds
    now = time.time()
    _mark_outbox(session, job_id, now)
    session.execute(update(Job).where(Job.id == job_id)
                    .values(last_dispatched_at=now, next_dispatch_at=now + redispatch_wait(every, cap),
                            dispatches=Job.dispatches + 1))


def mark_sent(session: Session, job_id: str) -> None:
    """The API's publish right after a create: only the outbox row, since the job row already counts this publish
    (api/jobs/service.create_job books it at insert). It leaves the job row alone so a worker claiming the job at
    that moment never waits on its lock, and on Postgres it commits without waiting for the WAL flush: a mark lost
    in a crash only means the sweep publishes the job once more, and a duplicate delivery is dropped at claim."""
    if session.get_bind().dialect.name == "postgresql":
        session.execute(text("SET LOCAL synchronous_commit TO OFF"))
    _mark_outbox(session, job_id, time.time())


def _mark_outbox(session: Session, job_id: str, now: float) -> None:
    session.execute(update(OutboxMessage).where(OutboxMessage.job_id == job_id, OutboxMessage.published_at.is_(None))
                    .values(published_at=now))


def stale_queued_jobs(session: Session, now: float, limit: int = 100) -> list[tuple[str, str]]:
    """(job id, resource class) of queued jobs whose message may be lost (broker restarted, publisher crashed): due
    by next_dispatch_at, soonest first. One range of ix_jobs_status_next_dispatch, however long the queue."""
    rows = session.execute(select(Job.id, Job.resource_class)
                           .where(Job.status == "queued", Job.next_dispatch_at <= now)
                           .order_by(Job.next_dispatch_at).limit(limit))
    return [(job_id, resource_class) for job_id, resource_class in rows]


def queue_depth(session: Session) -> int:
    return session.scalar(select(func.count()).select_from(Job).where(Job.status == "queued")) or 0
