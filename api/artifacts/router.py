"""Routes under /v1/jobs/{job_id}/artifacts."""
from typing import Annotated

from fastapi import APIRouter, Header
from fastapi.responses import StreamingResponse

from api.artifacts.schemas import ArtifactList, ArtifactObject
from api.artifacts.service import download_response
from api.dependencies import PathName, SessionDep, SettingsDep
from api.errors import V1_ERRORS, documented
from api.jobs.dependencies import OwnedJob
from db.repositories.artifacts import list_artifacts

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
    return download_response(session, settings, job, name, range_, if_none_match)
