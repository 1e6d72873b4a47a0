"""Request and response shapes for exports to other systems."""
from typing import Literal

from pydantic import BaseModel, ConfigDict, Field


class MlflowExportRequest(BaseModel):
    model_config = ConfigDict(extra="forbid")
    tracking_uri: str = Field(min_length=1, max_length=2048,
                              description="http:// or https:// URL of the MLflow tracking server, e.g. "
                                          "http://mlflow.internal:5000")
    # MLflow's own limits: 500 characters for an experiment name, 250 for a run name (a tag value would allow more,
    # but the UI shows the name in one line).
    experiment_name: str = Field("refinery", min_length=1, max_length=500,
                                 description="created when it does not exist")
    run_name: str | None = Field(None, min_length=1, max_length=250, description="default: the job id")


class MlflowExportObject(BaseModel):
    object: Literal["mlflow_export"] = "mlflow_export"
    job_id: str
    tracking_uri: str
    experiment_id: str
    run_id: str
    run_url: str | None = Field(None, description="the run's page in the MLflow UI")
    artifacts: list[str] = Field(description="the job's artifacts uploaded to the run")
    created_at: float
