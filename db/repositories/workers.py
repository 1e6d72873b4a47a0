"""Worker rows: each worker process reports the resource classes it serves and the job it runs; the API reads which
classes have a live worker, and how many of those are idle."""
from sqlalchemy import delete, select, update
from sqlalchemy.orm import Session

from db.models import Worker


def report(session: Session, worker_id: str, classes: list[str], started_at: float, now: float,
           job_id: str | None) -> None:
    """Write this worker's row (insert on its first report). Only this worker writes its row, so update-then-insert
    cannot race with another writer."""
    updated = session.execute(update(Worker).where(Worker.id == worker_id)
                              .values(classes=classes, seen_at=now, job_id=job_id)).rowcount
    if not updated:
        session.add(Worker(id=worker_id, classes=classes, started_at=started_at, seen_at=now, job_id=job_id))


def leave(session: Session, worker_id: str) -> None:
    session.execute(delete(Worker).where(Worker.id == worker_id))


def forget(session: Session, seen_before: float) -> None:
    session.execute(delete(Worker).where(Worker.seen_at < seen_before))


def idle_by_class(session: Session, seen_since: float) -> dict[str, int]:
    """For every class some worker seen since `seen_since` serves: how many of those workers are idle."""
    idle: dict[str, int] = {}
    for classes, job_id in session.execute(select(Worker.classes, Worker.job_id).where(Worker.seen_at >= seen_since)):
        for name in classes:
            idle[name] = idle.get(name, 0) + (job_id is None)
    return idle
