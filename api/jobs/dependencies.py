"""`OwnedJob`: the job in the path, if it belongs to the caller's project; a 404 otherwise (same as missing)."""
from typing import Annotated

from fastapi import Depends

from api.dependencies import PathId, ProjectId, SessionDep
from api.errors import not_found
from db.models import Job
from db.repositories.jobs import get_project_job


def get_owned_job(job_id: PathId, project_id: ProjectId, session: SessionDep) -> Job:
    job = get_project_job(session, project_id, job_id)
    if job is None:
        raise not_found("job", job_id)
    return job


OwnedJob = Annotated[Job, Depends(get_owned_job)]
