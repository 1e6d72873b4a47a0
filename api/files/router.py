"""Routes under /v1/files."""
from typing import Annotated, Literal

from fastapi import APIRouter, Form, Query, UploadFile

from api.dependencies import CursorQuery, PathId, ProjectId, SessionDep, SettingsDep
from api.errors import V1_ERRORS, not_found
from api.files.schemas import FileList, FileObject
from api.files.service import store_upload
from db.repositories.artifacts import get_project_file, list_files

router = APIRouter(prefix="/v1/files", tags=["files"], responses=V1_ERRORS)


@router.post("", status_code=201, response_model=FileObject)
def upload(file: UploadFile, project_id: ProjectId, session: SessionDep, settings: SettingsDep,
           purpose: Annotated[Literal["dataset", "model"], Form()] = "dataset"):
    row = store_upload(session, settings, project_id, file.file, file.filename, purpose, file.content_type)
    return FileObject.of(row)


@router.get("", response_model=FileList)
def files(project_id: ProjectId, session: SessionDep, limit: Annotated[int, Query(ge=1, le=100)] = 20,
          after: CursorQuery = None):
    rows, has_more = list_files(session, project_id, after=after, limit=limit)
    return FileList(data=[FileObject.of(f) for f in rows], has_more=has_more)


@router.get("/{file_id}", response_model=FileObject)
def get_file(file_id: PathId, project_id: ProjectId, session: SessionDep):
    row = get_project_file(session, project_id, file_id)
    if row is None:
        raise not_found("file", file_id)
    return FileObject.of(row)
