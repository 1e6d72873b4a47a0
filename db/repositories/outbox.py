"""The outbox: publish requests written with the job, marked when the broker has taken them."""
import time

from sqlalchemy import case, func, select, update
from sqlalchemy.orm import Session

from db.models import Job, OutboxMessage


def pending(session: Session, limit: int = 100) -> list[OutboxMessage]:
    return list(session.scalars(select(OutboxMessage).where(OutboxMessage.published_at.is_(None))
                                .order_by(OutboxMessage.id).limit(limit)))


def mark_published(session: Session, job_id: str) -> None:
    now = time.time()
    session.execute(update(OutboxMessage).where(OutboxMessage.job_id == job_id, OutboxMessage.published_at.is_(None))
                    .values(published_at=now))
    session.execute(update(Job).where(Job.id == job_id).values(last_dispatched_at=now, dispatches=Job.dispatches + 1))


def stale_queued_jobs(session: Session, now: float, every: float, cap: float, limit: int = 100) -> list[str]:
    """Queued jobs whose message may be lost (broker restarted, publisher crashed): never published, or published
    long enough ago. The wait doubles with each publish (every, 2·every, 4·every … up to cap), so a long queue of
    jobs waiting for busy workers does not fill the broker with duplicates."""
    # The doubling as a CASE over the publish count: portable SQL (SQLite has no power()), a handful of steps.
    steps, wait = [], every
    while wait < cap:
        steps.append((Job.dispatches <= len(steps) + 1, wait))
        wait *= 2
    due_after = case(*steps, else_=cap) if steps else every
    return list(session.scalars(
        select(Job.id)
        .where(Job.status == "queued", Job.last_dispatched_at.is_(None) | (Job.last_dispatched_at <= now - due_after))
        .order_by(Job.last_dispatched_at.is_not(None), Job.last_dispatched_at).limit(limit)))


def queue_depth(session: Session) -> int:
    return session.scalar(select(func.count()).select_from(Job).where(Job.status == "queued")) or 0
