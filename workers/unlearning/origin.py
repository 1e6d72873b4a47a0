"""Where the model being unlearned came from: the Refinery `train` job that made it, read from the ledger, so a
retrain and every oracle repeat that job's recipe, data split and seed; and the chain of earlier unlearn jobs in
between (a stream of deletion requests, each starting from the model the previous one produced)."""
import json
from dataclasses import dataclass
from typing import Any

from pydantic import ValidationError

from core.methods.train import TrainParams
from core.spec import Forget, ModelRef, Validation
from db.models import Job
from db.repositories.artifacts import get_artifact
from db.session import transaction
from workers.runtime import JobRun
from workers.unlearning.fitting import Recipe

# A chain of unlearn jobs longer than this is followed no further (and a cycle cannot be made, but is cut anyway).
MAX_CHAIN = 32


@dataclass(frozen=True)
class Link:
    """An earlier deletion request of the chain: an unlearn job whose model this job (directly or further down the
    chain) starts from. `request_sha256` and `training_set_sha256` are what its report recorded (None for a job
    that did not record them), so a changed file behind a request is caught rather than silently re-read."""
    job_id: str
    algorithm: str
    params: dict[str, Any]
    seed: int
    forget: Forget
    dataset_uri: str
    model: dict[str, Any]  # the model reference this request started from (uri, and arch/args for bare weights)
    request_sha256: str | None
    training_set_sha256: str | None


@dataclass(frozen=True)
class Origin:
    train_job: str | None  # the `train` job the model comes from, if any
    params: TrainParams
    dataset_uri: str | None
    validation: Validation | None
    seed: int
    note: str
    epochs_run: int | None = None  # what the original job ran, from its report (for epochs "auto")
    chain: tuple[Link, ...] = ()  # earlier requests, oldest first; empty for a first deletion

    def recipe(self, model_info: dict[str, Any]) -> Recipe:
        return Recipe(model_info["arch"], dict(model_info.get("args") or {}), self.params)

    def root_model(self, own_model: ModelRef) -> ModelRef:
        """The model before any deletion: what the first request of the chain started from."""
        return ModelRef.model_validate(self.chain[0].model) if self.chain else own_model


def find_origin(run: JobRun) -> Origin:
    """Follow model.uri (job://…) through unlearn jobs to a train job in this project, keeping the unlearn jobs."""
    uri = run.spec.model.uri if run.spec.model else None
    links: list[Link] = []
    with transaction(run.settings.database_url, readonly=True) as session:
        for _ in range(MAX_CHAIN):
            if uri is None or not uri.startswith("job://") or "/" in uri.removeprefix("job://"):
                break
            job = session.get(Job, uri.removeprefix("job://"))
            if job is None or job.project_id != run.project_id:
                break
            if job.method == "train":
                return _from_train_job(job, _report(run, session, job.id), tuple(reversed(links)))
            if job.method != "unlearn":
                break
            links.append(_link(job, _report(run, session, job.id)))
            uri = (job.spec.get("model") or {}).get("uri")
    return Origin(None, TrainParams(), None, None, run.spec.seed,
                  "The model does not come from a Refinery train job, so retrains use train's default parameters.",
                  chain=tuple(reversed(links)))


def _report(run: JobRun, session, job_id: str) -> dict:
    artifact = get_artifact(session, job_id, "report.json")
    try:
        return json.loads(run.store.read_bytes(artifact.storage_key)) if artifact else {}
    except ValueError:
        return {}


def _link(job: Job, report: dict) -> Link:
    spec = job.spec
    chain = report.get("chain") or {}
    requests = chain.get("requests") or []
    # A job from before chains were recorded forgot only its own request: its forget_set is that request's.
    request_sha = requests[-1]["sha256"] if requests else (report.get("forget_set") or {}).get("sha256")
    return Link(job.id, job.algorithm, dict(spec.get("params") or {}), int(spec.get("seed", 0)),
                Forget.model_validate(spec["forget"]), (spec.get("dataset") or {}).get("uri", ""),
                dict(spec.get("model") or {}), request_sha,
                (chain.get("training_set") or {}).get("sha256"))


def _from_train_job(job: Job, report: dict, chain: tuple[Link, ...]) -> Origin:
    spec = job.spec
    try:
        params = TrainParams.model_validate(spec.get("params") or {})
    except ValidationError:
        params = TrainParams()
    dataset = spec.get("dataset") or {}
    validation = Validation.model_validate(dataset["validation"]) if dataset.get("validation") else None
    try:
        epochs_run = int(report["training"]["epochs_run"])
    except (ValueError, KeyError, TypeError):
        epochs_run = None
    return Origin(job.id, params, dataset.get("uri"), validation, int(spec.get("seed", 0)),
                  f"Retrains repeat train job {job.id}'s recipe.", epochs_run, chain)
