"""Artifact downloads: streamed from the store in constant memory, with HTTP byte ranges (RFC 9110 §14; one range
per request, which is what download clients and resumers send) and the sha256 as ETag."""
import re

from fastapi import Response
from fastapi.responses import StreamingResponse
from sqlalchemy.orm import Session

from api.errors import APIError, not_found
from core.settings import Settings
from core.storage import get_store
from db.models import Job
from db.repositories.artifacts import get_artifact

_RANGE = re.compile(r"^bytes=(\d*)-(\d*)$")


def parse_range(header: str | None, size: int) -> tuple[int, int] | None:
    """(start, end) inclusive, or None for the whole body. Unsatisfiable ranges are a 416."""
    if not header:
        return None
    match = _RANGE.match(header.strip())
    if not match or match.groups() == ("", ""):
        return None  # malformed or multi-range: ignoring Range and sending 200 is allowed
    first, last = match.groups()
    if first == "":
        length = int(last)
        if length == 0:
            raise _unsatisfiable(size)
        return max(0, size - length), size - 1
    start = int(first)
    end = min(int(last), size - 1) if last else size - 1
    if start >= size or (last and int(last) < start):
        raise _unsatisfiable(size)
    return start, end


def _unsatisfiable(size: int) -> APIError:
    return APIError(416, "range_not_satisfiable", f"The artifact has {size} bytes.", param="Range",
                    headers={"Content-Range": f"bytes */{size}"})


def download_response(session: Session, settings: Settings, job: Job, name: str, range_: str | None,
                      if_none_match: str | None, *, inline: bool = False) -> Response:
    """The artifact `name` of an owned `job`: 200, 206 for a Range, 304 when the ETag matches; 404 when missing."""
    artifact = get_artifact(session, job.id, name)
    if artifact is None:
        raise not_found("artifact", name)
    etag = f'"{artifact.sha256}"'
    disposition = "inline" if inline else "attachment"
    headers = {"ETag": etag, "Accept-Ranges": "bytes", "X-Checksum-SHA256": artifact.sha256,
               "Content-Disposition": f'{disposition}; filename="{artifact.name}"'}
    if if_none_match and etag in if_none_match:
        return Response(status_code=304, headers=headers)
    store = get_store(settings.storage_url)
    byte_range = parse_range(range_, artifact.size)
    start, end = byte_range or (0, artifact.size - 1)
    headers["Content-Length"] = str(max(0, end - start + 1))
    status = 200
    if byte_range is not None:
        status = 206
        headers["Content-Range"] = f"bytes {start}-{end}/{artifact.size}"
    body = store.iter_range(artifact.storage_key, start, end) if artifact.size else iter([b""])
    return StreamingResponse(body, status_code=status, media_type=artifact.content_type, headers=headers)
