"""Routes under /v1/jobs/{job_id}/artifacts."""
from typing import Annotated

from fastapi import APIRouter, Header, Response
from fastapi.responses import StreamingResponse

from api.artifacts.schemas import ArtifactList, ArtifactObject
from api.artifacts.service import parse_range
from api.dependencies import PathName, SessionDep, SettingsDep
from api.errors import V1_ERRORS, documented, not_found
from api.jobs.dependencies import OwnedJob
from core.storage import get_store
from db.repositories.artifacts import get_artifact, list_artifacts

router = APIRouter(prefix="/v1/jobs/{job_id}/artifacts", tags=["artifacts"], responses=V1_ERRORS)


@router.get("", response_model=ArtifactList)
def artifacts(job: OwnedJob, session: SessionDep):
    return ArtifactList(data=[ArtifactObject.of(a) for a in list_artifacts(session, job.id)])


@router.get("/{name}", response_class=StreamingResponse,
            responses={200: {"content": {"application/octet-stream": {}}}, 206: {"description": "partial content"},
                       304: {"description": "not modified"}, **documented(416)})
def download(job: OwnedJob, name: PathName, session: SessionDep, settings: SettingsDep,
             range_: Annotated[str | None, Header(alias="Range")] = None,
             if_none_match: Annotated[str | None, Header()] = None):
    artifact = get_artifact(session, job.id, name)
    if artifact is None:
        raise not_found("artifact", name)
    etag = f'"{artifact.sha256}"'
    headers = {"ETag": etag, "Accept-Ranges": "bytes", "X-Checksum-SHA256": artifact.sha256,
               "Content-Disposition": f'attachment; filename="{artifact.name}"'}
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
