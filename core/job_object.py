"""The public job object, as GET /v1/jobs/{id} returns it: shared by the API's responses and the ledger's webhook
payloads (db/lifecycle.py snapshots it at each status change), so it lives here, free of the API and of torch."""
from typing import TYPE_CHECKING, Any, Literal

from pydantic import BaseModel, Field

if TYPE_CHECKING:
    from db.models import Job


class Progress(BaseModel):
    fraction: float = 0.0
    step: int = 0
    total_steps: int | None = None
    eta_seconds: float | None = None
    epoch: int | None = None
    samples_per_second: float | None = None  # training throughput over the last heartbeat interval, while running


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


class WaitingFor(BaseModel):
    """Why a queued job has not started (core/resources.waiting_for): `no_worker_for_class` when no live worker
    serves its resource class, `worker_busy` when every one that does is running another job."""
    reason: Literal["no_worker_for_class", "worker_busy"]
    resource_class: str
    message: str


def public_progress(job: "Job") -> dict[str, Any]:
    return {"fraction": 0.0, "step": 0, "total_steps": None, "eta_seconds": None, **(job.progress or {})}


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
    resource_class: str  # the worker pool it runs on (core/resources.py): cpu, cpu-x2, gpu, gpu-x4 …
    waiting_for: WaitingFor | None = None  # queued jobs only, where the API knows (db/worker_registry.py)

    @classmethod
    def of(cls, job: "Job", waiting_for: dict[str, str] | None = None) -> "JobObject":
        budget = job.spec.get("budget") or {}
        return cls(id=job.id, status=job.status, method=job.method, algorithm=job.algorithm, spec=job.spec,
                   resource_class=job.resource_class, waiting_for=waiting_for,
                   created_at=job.created_at, started_at=job.started_at, finished_at=job.finished_at,
                   attempt=job.attempt, max_attempts=job.max_attempts, cancel_requested=job.cancel_requested,
                   progress=Progress(**public_progress(job)),
                   budget=BudgetUse(max_seconds=job.max_seconds, used_seconds=round(job.used_seconds, 3),
                                    max_epochs=budget.get("max_epochs"), max_steps=budget.get("max_steps")),
                   result=job.result, error=JobError(**job.error) if job.error else None,
                   metadata=job.metadata_ or {})

    def as_json(self) -> dict[str, Any]:
        """What the API's response serialisation makes of it (by alias: the error's `class`)."""
        return self.model_dump(mode="json", by_alias=True)
