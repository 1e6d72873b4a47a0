"""Job rules: validate a spec against the catalog and the server's limits, create it idempotently, cancel it."""
import contextlib
import time

from pydantic import ValidationError
from sqlalchemy.exc import IntegrityError
from sqlalchemy.orm import Session

from api.errors import APIError, loc_to_param
from api.idempotency import replayed_id, request_hash
from core.catalog import METHODS, SpecProblem, find_algorithm
from core.ids import new_id
from core.resources import resource_class
from core.settings import Settings
from core.spec import JobSpec
from db.models import Job
from db.repositories import idempotency
from db.repositories.events import add_event
from db.repositories.jobs import get_job, insert_job
from db.repositories.webhooks import enqueue_job_event

ENDPOINT = "POST /v1/jobs"


def normalise(spec: JobSpec, settings: Settings) -> dict:
    """Apply the method's default algorithm, the algorithm's parameter defaults and the server's budget rules."""
    method = METHODS.get(spec.method)
    if method is None:
        available = ", ".join(sorted(METHODS))
        raise APIError(422, "method_unavailable", f"Method {spec.method!r} is not available on this server yet; "
                       f"available: {available}.", param="method")
    algorithm = find_algorithm(spec.method, spec.algorithm)
    if algorithm is None:
        raise APIError(422, "unknown_algorithm", f"Method {spec.method!r} has no algorithm {spec.algorithm!r}; "
                       f"choose one of {', '.join(method.algorithms)}.", param="algorithm")
    try:
        params = algorithm.params.model_validate(spec.params)
    except ValidationError as exc:
        first = exc.errors()[0]
        param = loc_to_param(("params", *first["loc"]))
        raise APIError(422, "invalid_params", f"{param}: {first['msg']}", param=param) from None
    if method.check_spec is not None:
        try:
            method.check_spec(spec)
        except SpecProblem as problem:
            raise APIError(422, "invalid_spec", problem.message, param=problem.param) from None
    max_seconds = spec.budget.max_seconds or settings.default_max_seconds
    if max_seconds > settings.max_seconds_cap:
        raise APIError(422, "budget_too_large", f"budget.max_seconds may be at most {settings.max_seconds_cap} on "
                       "this server.", param="budget.max_seconds")
    data = spec.model_dump(mode="json", by_alias=True, exclude_none=True)
    data.update(algorithm=algorithm.name, params=params.model_dump(mode="json"),
                budget={**data.get("budget", {}), "max_seconds": max_seconds})
    return data


def create_job(session: Session, settings: Settings, project_id: str, spec: JobSpec, key: str | None) -> tuple[Job, bool]:
    """Returns (job, created). With an Idempotency-Key, the same key and body return the first job; the same key
    with another body is a 409. The unique constraint on the key decides between concurrent requests."""
    data = normalise(spec, settings)
    digest = request_hash(spec.model_dump(mode="json", by_alias=True))
    if key is not None:
        replay = _replay(session, project_id, key, digest)
        if replay is not None:
            return replay, False
    now = time.time()
    # The publish that follows the commit (api/jobs/router.publish_after_commit) is booked here as the first
    # dispatch, so it need not touch this row again while a worker may be claiming it; if that publish fails, the
    # outbox row stays pending and the sweep publishes the job within a second.
    job = Job(id=new_id("job"), project_id=project_id, status="queued", method=data["method"],
              algorithm=data["algorithm"], spec=data, metadata_=data.get("metadata", {}), created_at=now,
              attempt=1, max_attempts=settings.max_attempts, max_seconds=data["budget"]["max_seconds"],
              used_seconds=0.0, cancel_requested=False, progress={}, resource_class=resource_class(spec.resources),
              last_dispatched_at=now, dispatches=1, next_dispatch_at=now + settings.redispatch_seconds)
    try:
        # A savepoint only where a concurrent request with the same Idempotency-Key can collide with this insert.
        with session.begin_nested() if key is not None else contextlib.nullcontext():
            insert_job(session, job)
            add_event(session, job.id, 1, "job.created", f"Job created: {job.method}/{job.algorithm}.")
            enqueue_job_event(session, job.id, project_id, "job.queued")
            if key is not None:
                idempotency.add_record(session, project_id, ENDPOINT, key, digest, job.id)
    except IntegrityError:
        replay = _replay(session, project_id, key, digest) if key is not None else None
        if replay is None:
            raise
        return replay, False
    return job, True


def _replay(session: Session, project_id: str, key: str, digest: str) -> Job | None:
    job_id = replayed_id(session, project_id, ENDPOINT, key, digest, "job")
    return None if job_id is None else get_job(session, job_id)
