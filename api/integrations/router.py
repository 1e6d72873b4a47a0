"""Routes under /v1/jobs/{job_id}/export."""
from typing import Annotated

from fastapi import APIRouter, Depends, Response

from api.dependencies import ProjectId, SessionDep, SettingsDep, idempotency_key
from api.errors import V1_ERRORS, documented
from api.integrations import service
from api.integrations.schemas import MlflowExportObject, MlflowExportRequest
from api.jobs.dependencies import OwnedJob

router = APIRouter(prefix="/v1/jobs/{job_id}/export", tags=["integrations"], responses=V1_ERRORS)


@router.post("/mlflow", status_code=201, response_model=MlflowExportObject, responses=documented(409, 502))
def export_mlflow(body: MlflowExportRequest, job: OwnedJob, project_id: ProjectId, session: SessionDep,
                  settings: SettingsDep, response: Response,
                  key: Annotated[str | None, Depends(idempotency_key)]):
    """Log a finished job to an MLflow tracking server as a new run: params, metric series, tags, artifacts."""
    digest = service.body_hash(body)
    if key is not None and (earlier := service.replay(session, project_id, key, digest)) is not None:
        response.headers["Idempotent-Replayed"] = "true"
        return earlier
    plan = service.plan_export(session, settings, job, body)
    # End the read transaction before calling out: the tracking server may take seconds, and a POST's transaction
    # holds a pooled connection (and, on SQLite, the write lock) until it ends.
    session.commit()
    exported = service.export_to_mlflow(plan, settings)
    export, created = service.record_export(session, plan, exported, key, digest)
    session.commit()
    if not created:
        response.headers["Idempotent-Replayed"] = "true"
    return export
