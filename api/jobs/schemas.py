"""Response shapes for jobs, events and metrics (the request shape is core.spec.JobSpec)."""
from typing import Any, Literal

from pydantic import BaseModel

# The job object lives in core (webhook payloads from the ledger are the same object); importable from here too.
from core.job_object import BudgetUse, JobError, JobObject, Progress  # noqa: F401
from db.models import JobEvent


class JobList(BaseModel):
    object: Literal["list"] = "list"
    data: list[JobObject]
    has_more: bool


class EventObject(BaseModel):
    id: str
    object: Literal["event"] = "event"
    job_id: str
    created_at: float
    level: str
    type: str
    message: str
    data: dict[str, Any]
    attempt: int

    @classmethod
    def of(cls, event: JobEvent) -> "EventObject":
        return cls(id=f"evt_{event.seq}", job_id=event.job_id, created_at=event.created_at, level=event.level,
                   type=event.type, message=event.message, data=event.data or {}, attempt=event.attempt)


class EventList(BaseModel):
    object: Literal["list"] = "list"
    data: list[EventObject]
    has_more: bool


class MetricPointObject(BaseModel):
    step: int
    value: float
    created_at: float


class MetricSeries(BaseModel):
    object: Literal["metric"] = "metric"
    name: str
    points: list[MetricPointObject]


class MetricList(BaseModel):
    object: Literal["list"] = "list"
    data: list[MetricSeries]
    has_more: bool = False
