"""Artifact downloads with HTTP byte ranges (RFC 9110 §14; one range per request, which is what download clients and
resumers send) and the sha256 as ETag: a local store's file goes out as a FileResponse (large reads in a thread, or
the server's zero-copy path where it offers one), a remote store's is streamed in constant memory, and S3 objects
can instead be a 307 to a presigned URL (REFINERY_S3_PRESIGNED_DOWNLOADS) so the bytes never pass through the API."""
import re

from fastapi import Response
from fastapi.responses import FileResponse, RedirectResponse, StreamingResponse
from sqlalchemy.orm import Session

from api.errors import APIError, not_found
from core.settings import Settings
from core.storage import CHUNK, get_store
from db.models import Job
from db.repositories.artifacts import get_artifact

_RANGE = re.compile(r"^bytes=(\d*)-(\d*)$")


class _ArtifactFile(FileResponse):
    chunk_size = CHUNK  # Starlette reads 64 KiB at a time by default: a thread hop per 64 KiB caps MB/s


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
    if settings.s3_presigned_downloads and (url := store.presigned_url(artifact.storage_key,
                                                                       settings.presigned_url_seconds)):
        return RedirectResponse(url, status_code=307, headers=headers)
    path = store.local_path(artifact.storage_key)
    if path is not None and (range_ is None or byte_range is not None):
        # FileResponse answers the (already validated) Range itself: 206, Content-Range, Content-Length.
        return _ArtifactFile(path, media_type=artifact.content_type, headers=headers)
    start, end = byte_range or (0, artifact.size - 1)
    headers["Content-Length"] = str(max(0, end - start + 1))
    status = 200
    if byte_range is not None:
        status = 206
        headers["Content-Range"] = f"bytes {start}-{end}/{artifact.size}"
    body = store.iter_range(artifact.storage_key, start, end) if artifact.size else iter([b""])
    return StreamingResponse(body, status_code=status, media_type=artifact.content_type, headers=headers)
