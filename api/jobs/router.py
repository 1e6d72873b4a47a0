"""Routes under /v1/jobs."""
import asyncio
import json
import time
from typing import Annotated, Literal

from fastapi import APIRouter, Depends, Header, Query, Request, Response
from fastapi.responses import StreamingResponse
from sqlalchemy.orm import Session

from api.dependencies import CursorQuery, NameQuery, PathId, ProjectId, SessionDep, SettingsDep, idempotency_key
from api.errors import V1_ERRORS, APIError, documented, not_found
from api.jobs import polling, service
from api.jobs.dependencies import OwnedJob
from api.jobs.schemas import EventList, EventObject, JobList, JobObject, MetricList, MetricPointObject, MetricSeries
from core.broker import publish_job
from core.spec import JobSpec
from db import worker_registry
from db.lifecycle import TERMINAL, request_cancel
from db.models import Job
from db.repositories import events as event_repo
from db.repositories import jobs as job_repo
from db.repositories.outbox import mark_sent
from db.session import get_sessionmaker

router = APIRouter(prefix="/v1/jobs", tags=["jobs"], responses=V1_ERRORS)
Limit = Annotated[int, Query(ge=1, le=100)]
JobStatus = Literal["queued", "running", "succeeded", "failed", "cancelled"]


@router.post("", status_code=201, response_model=JobObject, responses=documented(409, 503))
def create_job(spec: JobSpec, project_id: ProjectId, session: SessionDep, settings: SettingsDep, response: Response,
               key: Annotated[str | None, Depends(idempotency_key)]):
    job, created = service.create_job(session, settings, project_id, spec, key)
    session.commit()
    if created:
        publish_after_commit(session, job)
    else:
        response.headers["Idempotent-Replayed"] = "true"
    return JobObject.of(job, worker_registry.waiting_for(settings.database_url, job))


def publish_after_commit(session: Session, job: Job) -> None:
    """Wake a worker for a committed job (its attributes outlive the commit: expire_on_commit is off, so no second
    read). If the broker is down the outbox row stays and the dispatcher sweep retries, so a failure here loses
    nothing. Shared with the dashboard's new-job form."""
    try:
        publish_job(job.id, job.resource_class)
        mark_sent(session, job.id)
        session.commit()
    except Exception:
        session.rollback()


def _metadata_filters(request: Request) -> dict[str, str]:
    filters = {k[len("metadata["):-1]: v for k, v in request.query_params.items()
               if k.startswith("metadata[") and k.endswith("]")}
    for key, value in filters.items():
        # Compared in SQL: a NUL byte cannot reach Postgres, a double quote cannot sit in a SQLite JSON path.
        if not key or '"' in key or "\x00" in key or "\x00" in value:
            raise APIError(400, "invalid_metadata_filter", "A metadata filter key must be non-empty without '\"' or "
                           "NUL characters, and its value without NUL characters.", param=f"metadata[{key}]")
    return filters


@router.get("", response_model=JobList)
def list_jobs(request: Request, project_id: ProjectId, session: SessionDep, settings: SettingsDep, limit: Limit = 20,
              after: CursorQuery = None, status: JobStatus | None = None, method: NameQuery = None):
    jobs, has_more = job_repo.list_jobs(session, project_id, after=after, limit=limit, status=status, method=method,
                                        metadata=_metadata_filters(request))
    return JobList(data=[JobObject.of(j, worker_registry.waiting_for(settings.database_url, j)) for j in jobs],
                   has_more=has_more)


_ETAG_HEADER = {"ETag": {"schema": {"type": "string"}, "description": "a strong validator of this job object"}}
WaitQuery = Annotated[float | None, Query(
    gt=0, le=60, description="long-poll: answer as soon as the job differs from the version in If-None-Match (or "
                             "from the job when the request arrived), or after this many seconds (the server may "
                             "wait less: REFINERY_LONG_POLL_MAX_SECONDS)")]
IfNoneMatch = Annotated[str | None, Header(alias="If-None-Match",
                                           description="ETags the client holds: 304 while the job still matches")]


@router.get("/{job_id}", response_model=JobObject,
            responses={200: {"headers": _ETAG_HEADER},
                       304: {"description": "Not Modified: the job still matches If-None-Match", "headers": _ETAG_HEADER}})
async def get_job(job_id: PathId, project_id: ProjectId, settings: SettingsDep, request: Request,
                  wait: WaitQuery = None, if_none_match: IfNoneMatch = None):
    held = polling.parse_if_none_match(if_none_match)
    wait = min(wait, settings.long_poll_max_seconds) if wait else None
    job = await polling.read_or_wait(request, settings.database_url, project_id, job_id, wait, held)
    if job is None:
        raise not_found("job", job_id)
    headers = {"ETag": job.etag, "Cache-Control": "private, no-cache"}
    if polling.matches(job.etag, held):
        return Response(status_code=304, headers=headers)
    return Response(job.body, media_type="application/json", headers=headers)


@router.post("/{job_id}/cancel", response_model=JobObject)
def cancel_job(job: OwnedJob, session: SessionDep):
    request_cancel(session, job)
    session.commit()
    session.refresh(job)
    return JobObject.of(job)


# Event ids are evt_<sequence>: the published pattern says so, so a client (or a fuzzer) knows what a cursor is.
EventCursorQuery = Annotated[str | None, Query(pattern=r"^evt_[0-9]{1,18}$", description="an event id, e.g. evt_12")]


def _event_cursor(after: str | None) -> int:
    if not after:
        return 0
    try:
        return int(after.removeprefix("evt_"))
    except ValueError:
        raise APIError(400, "invalid_cursor", "after must be an event id such as evt_12.", param="after") from None


@router.get("/{job_id}/events", response_model=EventList,
            responses={200: {"content": {"text/event-stream": {}}, "description": "JSON page, or a live SSE stream"}})
def list_events(job: OwnedJob, request: Request, session: SessionDep, settings: SettingsDep, limit: Limit = 100,
                after: EventCursorQuery = None):
    cursor = _event_cursor(request.headers.get("last-event-id") or after)
    if "text/event-stream" in request.headers.get("accept", ""):
        return StreamingResponse(_stream_events(settings.database_url, job.id, cursor, request),
                                 media_type="text/event-stream", headers={"Cache-Control": "no-cache"})
    rows, has_more = event_repo.list_events(session, job.id, after_seq=cursor, limit=limit)
    return EventList(data=[EventObject.of(e) for e in rows], has_more=has_more)


async def _stream_events(url: str, job_id: str, cursor: int, request: Request):
    """Server-sent events: each event once, in order; ends after the job finishes and its last event is sent. While
    the job is queued, a `job.waiting` event (no id: it is not in the ledger) carries its waiting_for in `data` each
    time that changes, e.g. when no worker serves its resource class."""
    last_beat = time.monotonic()
    waiting = None
    while not await request.is_disconnected():
        rows, status, now_waiting = await asyncio.to_thread(_poll_events, url, job_id, cursor)
        for event in rows:
            cursor = event.seq
            payload = EventObject.of(event).model_dump_json()
            yield f"id: evt_{event.seq}\nevent: {event.type}\ndata: {payload}\n\n"
        if now_waiting != waiting:
            waiting = now_waiting
            if waiting:
                # Shaped like a job event (the dashboard's timeline shows it), without an id: no cursor moves.
                payload = {"object": "event", "job_id": job_id, "created_at": time.time(), "level": "warning",
                           "type": "job.waiting", "message": waiting["message"], "data": waiting}
                yield f"event: job.waiting\ndata: {json.dumps(payload)}\n\n"
        if not rows and status in TERMINAL:
            yield f"event: end\ndata: {json.dumps({'status': status})}\n\n"
            return
        if time.monotonic() - last_beat > 15:
            last_beat = time.monotonic()
            yield ": keep-alive\n\n"
        if not rows:
            await asyncio.sleep(0.5)


def _poll_events(url: str, job_id: str, cursor: int):
    session = get_sessionmaker(url)()
    try:
        rows, _ = event_repo.list_events(session, job_id, after_seq=cursor, limit=500)
        job = job_repo.get_job(session, job_id)
        return rows, job.status if job else "failed", worker_registry.waiting_for(url, job) if job else None
    finally:
        session.close()


@router.get("/{job_id}/metrics", response_model=MetricList)
def get_metrics(job: OwnedJob, session: SessionDep, name: NameQuery = None):
    series = event_repo.metric_series(session, job.id, name)
    return MetricList(data=[MetricSeries(name=n, points=[MetricPointObject(step=s, value=v, created_at=t)
                                                         for s, v, t in points])
                            for n, points in series.items()])
