"""The outbox: publish requests written with the job, marked when the broker has taken them."""
import time

from sqlalchemy import func, select, update
from sqlalchemy.orm import Session

from db.models import Job, OutboxMessage


def pending(session: Session, limit: int = 100) -> list[OutboxMessage]:
    return list(session.scalars(select(OutboxMessage).where(OutboxMessage.published_at.is_(None))
                                .order_by(OutboxMessage.id).limit(limit)))


def mark_published(session: Session, job_id: str) -> None:
    now = time.time()
    session.execute(update(OutboxMessage).where(OutboxMessage.job_id == job_id, OutboxMessage.published_at.is_(None))
                    .values(published_at=now))
    session.execute(update(Job).where(Job.id == job_id).values(last_dispatched_at=now))


def stale_queued_jobs(session: Session, older_than: float, limit: int = 100) -> list[str]:
    """Queued jobs not published for a while: their message may be lost (broker restart, crashed publisher)."""
    return list(session.scalars(select(Job.id).where(Job.status == "queued",
                                                     (Job.last_dispatched_at.is_(None)) | (Job.last_dispatched_at < older_than))
                                .order_by(Job.id).limit(limit)))


def queue_depth(session: Session) -> int:
    return session.scalar(select(func.count()).select_from(Job).where(Job.status == "queued")) or 0
