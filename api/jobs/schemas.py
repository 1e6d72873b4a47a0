"""Response shapes for jobs, events and metrics (the request shape is core.spec.JobSpec)."""
from typing import Any, Literal

from pydantic import BaseModel, Field

from db.models import Job, JobEvent
from db.repositories.jobs import public_progress


class Progress(BaseModel):
    fraction: float = 0.0
    step: int = 0
    total_steps: int | None = None
    eta_seconds: float | None = None
    epoch: int | None = None


class BudgetUse(BaseModel):
    max_seconds: int
    used_seconds: float
    max_epochs: int | None = None
    max_steps: int | None = None


class JobError(BaseModel):
    code: str
    message: str
    class_: str = Field(alias="class", serialization_alias="class")

    model_config = {"populate_by_name": True}


class JobObject(BaseModel):
    id: str
    object: Literal["job"] = "job"
    status: Literal["queued", "running", "succeeded", "failed", "cancelled"]
    method: str
    algorithm: str
    spec: dict[str, Any]
    created_at: float
    started_at: float | None
    finished_at: float | None
    attempt: int
    max_attempts: int
    cancel_requested: bool
    progress: Progress
    budget: BudgetUse
    result: dict[str, Any] | None
    error: JobError | None
    metadata: dict[str, str]

    @classmethod
    def of(cls, job: Job) -> "JobObject":
        budget = job.spec.get("budget") or {}
        return cls(id=job.id, status=job.status, method=job.method, algorithm=job.algorithm, spec=job.spec,
                   created_at=job.created_at, started_at=job.started_at, finished_at=job.finished_at,
                   attempt=job.attempt, max_attempts=job.max_attempts, cancel_requested=job.cancel_requested,
                   progress=Progress(**public_progress(job)),
                   budget=BudgetUse(max_seconds=job.max_seconds, used_seconds=round(job.used_seconds, 3),
                                    max_epochs=budget.get("max_epochs"), max_steps=budget.get("max_steps")),
                   result=job.result, error=JobError(**job.error) if job.error else None,
                   metadata=job.metadata_ or {})


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
