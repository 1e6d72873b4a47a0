"""Where the model being unlearned came from: the Refinery `train` job that made it (following earlier unlearn jobs
back to it), read from the ledger, so a retrain and every oracle repeat that job's recipe, data split and seed."""
import json
from dataclasses import dataclass
from typing import Any

from pydantic import ValidationError

from core.methods.train import TrainParams
from core.spec import Validation
from db.models import Job
from db.repositories.artifacts import get_artifact
from db.session import transaction
from workers.runtime import JobRun
from workers.unlearning.fitting import Recipe

# A chain of unlearn jobs longer than this is followed no further (and a cycle cannot be made, but is cut anyway).
MAX_CHAIN = 32


@dataclass(frozen=True)
class Origin:
    train_job: str | None  # the `train` job the model comes from, if any
    params: TrainParams
    dataset_uri: str | None
    validation: Validation | None
    seed: int
    note: str
    epochs_run: int | None = None  # what the original job ran, from its report (for epochs "auto")

    def recipe(self, model_info: dict[str, Any]) -> Recipe:
        return Recipe(model_info["arch"], dict(model_info.get("args") or {}), self.params)


def find_origin(run: JobRun) -> Origin:
    """Follow model.uri (job://…) through unlearn jobs to a train job in this project."""
    uri = run.spec.model.uri if run.spec.model else None
    with transaction(run.settings.database_url, readonly=True) as session:
        for _ in range(MAX_CHAIN):
            if uri is None or not uri.startswith("job://") or "/" in uri.removeprefix("job://"):
                break
            job = session.get(Job, uri.removeprefix("job://"))
            if job is None or job.project_id != run.project_id:
                break
            if job.method == "train":
                return _from_train_job(job, _epochs_run(run, session, job.id))
            if job.method != "unlearn":
                break
            uri = (job.spec.get("model") or {}).get("uri")
    return Origin(None, TrainParams(), None, None, run.spec.seed,
                  "The model does not come from a Refinery train job, so retrains use train's default parameters.")


def _epochs_run(run: JobRun, session, job_id: str) -> int | None:
    artifact = get_artifact(session, job_id, "report.json")
    raw = run.store.read_bytes(artifact.storage_key) if artifact else None
    try:
        return int(json.loads(raw)["training"]["epochs_run"]) if raw else None
    except (ValueError, KeyError, TypeError):
        return None


def _from_train_job(job: Job, epochs_run: int | None) -> Origin:
    spec = job.spec
    try:
        params = TrainParams.model_validate(spec.get("params") or {})
    except ValidationError:
        params = TrainParams()
    dataset = spec.get("dataset") or {}
    validation = Validation.model_validate(dataset["validation"]) if dataset.get("validation") else None
    return Origin(job.id, params, dataset.get("uri"), validation, int(spec.get("seed", 0)),
                  f"Retrains repeat train job {job.id}'s recipe.", epochs_run)
