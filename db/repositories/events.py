"""Job events (an append-only log per job) and metric points (per-step series)."""
import time
from typing import Any

from sqlalchemy import delete, select
from sqlalchemy.orm import Session

from db.models import JobEvent, MetricPoint


def add_event(session: Session, job_id: str, attempt: int, type_: str, message: str, *, level: str = "info",
              data: dict[str, Any] | None = None, created_at: float | None = None) -> JobEvent:
    event = JobEvent(job_id=job_id, attempt=attempt, type=type_, message=message, level=level, data=data or {},
                     created_at=created_at or time.time())
    session.add(event)
    return event


def list_events(session: Session, job_id: str, *, after_seq: int, limit: int) -> tuple[list[JobEvent], bool]:
    rows = list(session.scalars(select(JobEvent).where(JobEvent.job_id == job_id, JobEvent.seq > after_seq)
                                .order_by(JobEvent.seq).limit(limit + 1)))
    return rows[:limit], len(rows) > limit


def get_event(session: Session, seq: int) -> JobEvent | None:
    return session.get(JobEvent, seq)


def add_metrics(session: Session, job_id: str, step: int, values: dict[str, float],
                created_at: float | None = None) -> None:
    now = created_at or time.time()
    session.add_all(MetricPoint(job_id=job_id, name=name, step=step, value=float(value), created_at=now)
                    for name, value in values.items())


def drop_metrics_after(session: Session, job_id: str, step: int) -> None:
    """A resumed attempt replays steps after its checkpoint; drop the old attempt's points for them first."""
    session.execute(delete(MetricPoint).where(MetricPoint.job_id == job_id, MetricPoint.step > step))


def metric_series(session: Session, job_id: str, name: str | None) -> dict[str, list[tuple[int, float, float]]]:
    query = select(MetricPoint).where(MetricPoint.job_id == job_id).order_by(MetricPoint.name, MetricPoint.step)
    if name:
        query = query.where(MetricPoint.name == name)
    series: dict[str, list[tuple[int, float, float]]] = {}
    for point in session.scalars(query):
        series.setdefault(point.name, []).append((point.step, point.value, point.created_at))
    return series
