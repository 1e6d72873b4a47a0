"""Reading a job for a poller: one primary-key read serialised once, a strong ETag over those bytes, conditional
GET (`If-None-Match` → 304) and the long-poll (`?wait=N`), which re-reads the job every POLL_SECONDS in a worker
thread, outside the admission gate and holding no database connection between reads."""
import asyncio
import hashlib
import time
from dataclasses import dataclass

from fastapi import Request
from starlette.concurrency import run_in_threadpool

from api.limits import outside_gate
from core.job_object import JobObject
from db import worker_registry
from db.repositories import jobs as job_repo
from db.session import transaction

# Between two reads of a waiting long-poll: a change reaches the client 0.25 s after it commits on average (half
# what a client polling every second sees), and each waiting client costs two primary-key reads a second on one
# pooled connection — no request, no auth, no HTTP round trip.
POLL_SECONDS = 0.5


@dataclass(frozen=True)
class JobBody:
    body: bytes  # the job object's JSON, exactly as sent
    etag: str  # a strong validator: it changes whenever any byte of the body does


def etag_of(body: bytes) -> str:
    return '"' + hashlib.sha256(body).hexdigest()[:32] + '"'


def read_job_body(url: str, project_id: str, job_id: str) -> JobBody | None:
    """The job as the API returns it, or None when it is missing or another project's. Runs in a worker thread."""
    with transaction(url, readonly=True) as session:
        row = job_repo.get_project_job_view(session, project_id, job_id)
    if row is None:
        return None
    body = JobObject.of(row, worker_registry.waiting_for(url, row)).model_dump_json(by_alias=True).encode()
    return JobBody(body, etag_of(body))


def parse_if_none_match(header: str | None) -> set[str] | None:
    """The entity tags a client holds (`*` for any). If-None-Match compares weakly (RFC 9110 §13.1.2), so a W/
    prefix a proxy may have added is ignored."""
    if not header:
        return None
    tags = {tag.strip().removeprefix("W/") for tag in header.split(",") if tag.strip()}
    return tags or None


def matches(etag: str, tags: set[str] | None) -> bool:
    return bool(tags) and ("*" in tags or etag in tags)


async def read_or_wait(request: Request, url: str, project_id: str, job_id: str, wait: float | None,
                       held: set[str] | None) -> JobBody | None:
    """The job now, or — given `wait` seconds — as soon as it differs from the version the client holds (its
    If-None-Match tags, else the version read first), or at the end of the wait, whichever comes first."""
    current = await run_in_threadpool(read_job_body, url, project_id, job_id)
    if current is None or not wait:
        return current
    unchanged = held or {current.etag}
    deadline = time.monotonic() + wait
    while matches(current.etag, unchanged) and (remaining := deadline - time.monotonic()) > 0:
        async with outside_gate(request.scope):
            await asyncio.sleep(min(POLL_SECONDS, remaining))
            if await request.is_disconnected():
                return current  # nobody will read the answer
        current = await run_in_threadpool(read_job_body, url, project_id, job_id)
        if current is None:
            return None
    return current
