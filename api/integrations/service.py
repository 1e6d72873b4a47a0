"""MLflow export: a finished job logged to a user's MLflow tracking server as one run — the spec as params, every
metric series with its steps plus the result's final values, tags, and the model.onnx, report.json and model.json
artifacts (uploaded through the tracking server, which proxies them with `mlflow server`'s --serve-artifacts).

The export runs in three steps so that no database transaction is open while a remote server is being called
(with SQLite a POST holds the write lock): `plan_export` reads the ledger into an `ExportPlan`, the router commits,
`export_to_mlflow` talks to MLflow, then `record_export` writes an `export.mlflow` event (and the Idempotency-Key
record pointing at it) in a new transaction."""
import json
import os
import re
import tempfile
import threading
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any
from urllib.parse import urlsplit

from sqlalchemy.exc import IntegrityError
from sqlalchemy.orm import Session

from api.errors import APIError
from api.idempotency import replayed_id, request_hash
from api.integrations.schemas import MlflowExportObject, MlflowExportRequest
from core.netguard import AddressRefused, address_policy, check_http_url
from core.settings import Settings
from core.storage import get_store
from db.lifecycle import TERMINAL
from db.models import Job
from db.repositories import idempotency
from db.repositories.artifacts import list_artifacts
from db.repositories.events import add_event, get_event, metric_series

ENDPOINT = "POST /v1/jobs/{id}/export/mlflow"
EVENT_TYPE = "export.mlflow"
ARTIFACTS = ("model.onnx", "report.json", "model.json")
MLFLOW_STATUS = {"succeeded": "FINISHED", "failed": "FAILED", "cancelled": "KILLED"}

# MLflow's limits (mlflow.utils.validation): a param value holds 6000 characters, a key 250; one log_batch call
# takes 100 params or tags and 1000 metrics, 1000 entities in all.
MAX_PARAM_VALUE = 6000
MAX_KEY = 250
PARAMS_PER_BATCH = 100
METRICS_PER_BATCH = 1000
_KEY_UNSAFE = re.compile(r"[^A-Za-z0-9_.\- ]")  # what MLflow accepts in a key on every OS, minus "/" (a path)

# The MLflow client reads these from the environment at every request. They are process-wide, so they are set once
# for the whole API process (the only MLflow user in it) instead of around each call, where two concurrent exports
# would race on them; an operator's own values win. Redirects are refused outright: the tracking host was checked
# against the outbound policy, the host a redirect names would not be.
CLIENT_ENVIRONMENT = {"MLFLOW_HTTP_REQUEST_TIMEOUT": "10", "MLFLOW_HTTP_REQUEST_MAX_RETRIES": "1",
                      "MLFLOW_HTTP_REQUEST_BACKOFF_FACTOR": "1"}
_configured = threading.Lock()


@dataclass(frozen=True)
class ExportPlan:
    """What the export sends, read from the ledger before any remote call."""
    job_id: str
    project_id: str
    attempt: int
    method: str
    algorithm: str
    status: str
    spec: dict[str, Any]
    stopped_by: str | None
    result_metrics: dict[str, Any]
    started_at: float | None
    finished_at: float | None
    series: dict[str, list[tuple[int, float, float]]]
    artifacts: list[tuple[str, str]]  # (name, storage key)
    storage_url: str
    dashboard_url: str
    request: MlflowExportRequest


@dataclass(frozen=True)
class Exported:
    experiment_id: str
    run_id: str
    run_url: str
    artifacts: list[str]


# --- checks and replay --------------------------------------------------------------------------------------------

def check_tracking_uri(uri: str, settings: Settings) -> None:
    """http(s) only, no credentials, and a host that resolves to addresses the outbound policy allows. This checks
    the name now; the MLflow client then resolves it again and connects by itself (check-then-connect, not a
    connection pinned to the checked address)."""
    try:
        check_http_url(uri, address_policy(settings.outbound_networks))
    except AddressRefused as exc:
        raise _bad_uri(f"tracking_uri refused: {exc}.") from None


def _bad_uri(message: str) -> APIError:
    return APIError(422, "invalid_tracking_uri", message, param="tracking_uri")


def body_hash(request: MlflowExportRequest) -> str:
    return request_hash(request.model_dump(mode="json"))


def replay(session: Session, project_id: str, key: str, digest: str) -> MlflowExportObject | None:
    """The export an earlier request with this Idempotency-Key made, or None; a different body is a 409."""
    event_id = replayed_id(session, project_id, ENDPOINT, key, digest, "export")
    if event_id is None:
        return None
    event = get_event(session, int(event_id.removeprefix("evt_")))
    return MlflowExportObject(**event.data, created_at=event.created_at)


def plan_export(session: Session, settings: Settings, job: Job, request: MlflowExportRequest) -> ExportPlan:
    if job.status not in TERMINAL:
        raise APIError(409, "job_not_finished", f"The job is {job.status}; only a finished job can be exported.",
                       param="id")
    check_tracking_uri(request.tracking_uri, settings)
    rows = {a.name: a.storage_key for a in list_artifacts(session, job.id)}
    public = settings.public_url.rstrip("/") or f"http://127.0.0.1:{settings.port}"
    return ExportPlan(job_id=job.id, project_id=job.project_id, attempt=job.attempt, method=job.method,
                      algorithm=job.algorithm, status=job.status, spec=dict(job.spec),
                      stopped_by=(job.result or {}).get("stopped_by"),
                      result_metrics=dict((job.result or {}).get("metrics") or {}), started_at=job.started_at,
                      finished_at=job.finished_at, series=metric_series(session, job.id, None),
                      artifacts=[(name, rows[name]) for name in ARTIFACTS if name in rows],
                      storage_url=settings.storage_url, dashboard_url=f"{public}/ui/jobs/{job.id}", request=request)


def record_export(session: Session, plan: ExportPlan, exported: Exported, key: str | None,
                  digest: str) -> tuple[MlflowExportObject, bool]:
    """The `export.mlflow` event (the export's record, shown in the job's events) and the Idempotency-Key record
    pointing at it. Returns (export, created). Two requests with the same key racing: the unique constraint picks
    one; the loser's run is deleted from MLflow (best effort) and the winner's export returned."""
    out = MlflowExportObject(job_id=plan.job_id, tracking_uri=plan.request.tracking_uri,
                             experiment_id=exported.experiment_id, run_id=exported.run_id, run_url=exported.run_url,
                             artifacts=exported.artifacts, created_at=time.time())
    data = out.model_dump(mode="json", exclude={"object", "created_at"})
    try:
        with session.begin_nested():
            event = add_event(session, plan.job_id, plan.attempt, EVENT_TYPE,
                              f"Exported to MLflow run {exported.run_id} (experiment {exported.experiment_id}).",
                              data=data)
            session.flush()
            out.created_at = event.created_at
            if key is not None:
                idempotency.add_record(session, plan.project_id, ENDPOINT, key, digest, f"evt_{event.seq}")
    except IntegrityError:
        earlier = replay(session, plan.project_id, key, digest) if key is not None else None
        if earlier is None:
            raise
        _delete_run_quietly(plan.request.tracking_uri, exported.run_id)
        return earlier, False
    return out, True


# --- talking to MLflow --------------------------------------------------------------------------------------------

def _client(tracking_uri: str):
    """An MlflowClient for this tracking server alone (no global tracking URI is set). Imported here: the MLflow
    client costs seconds to import and only this route needs it."""
    with _configured:
        for name, value in CLIENT_ENVIRONMENT.items():
            os.environ.setdefault(name, value)
        os.environ["MLFLOW_ALLOW_HTTP_REDIRECTS"] = "false"
    from mlflow.tracking import MlflowClient
    return MlflowClient(tracking_uri=tracking_uri)


def _failure(message: str, param: str | None) -> APIError:
    return APIError(502, "mlflow_export_failed", message[:2000], param=param)


def export_to_mlflow(plan: ExportPlan, settings: Settings) -> Exported:
    """Log the plan as a new run. A tracking server that refuses or cannot be reached is a 502 with its message; a
    run left half-written is marked FAILED in MLflow (best effort) and named in the message."""
    from mlflow.exceptions import MlflowException
    from requests import RequestException

    request = plan.request
    client = _client(request.tracking_uri)
    run_id = None
    with tempfile.TemporaryDirectory(prefix="refinery-mlflow-") as scratch:
        files = _copy_artifacts(plan, Path(scratch))
        try:
            experiment_id = _experiment_id(client, request.experiment_name)
            run_name = request.run_name or plan.job_id
            run = client.create_run(experiment_id, start_time=_ms(plan.started_at or plan.finished_at),
                                    run_name=run_name, tags=_tags(plan, run_name))
            run_id = run.info.run_id
            _check_artifact_location(run.info.artifact_uri, request.tracking_uri, settings)
            _log_params_and_metrics(client, run_id, plan)
            for path in files:
                client.log_artifact(run_id, str(path))
            client.set_terminated(run_id, MLFLOW_STATUS[plan.status], end_time=_ms(plan.finished_at))
        except (MlflowException, RequestException, APIError) as exc:
            message = exc.message if isinstance(exc, APIError) else str(exc)
            if run_id is not None:
                _fail_run_quietly(client, run_id)
                message = f"{message} (run {run_id} is marked FAILED in MLflow)"
            raise _failure(f"The MLflow tracking server at {request.tracking_uri} failed the export: {message}",
                           exc.param if isinstance(exc, APIError) else "tracking_uri") from None
    base = request.tracking_uri.rstrip("/")
    return Exported(experiment_id=experiment_id, run_id=run_id,
                    run_url=f"{base}/#/experiments/{experiment_id}/runs/{run_id}", artifacts=[p.name for p in files])


def _copy_artifacts(plan: ExportPlan, scratch: Path) -> list[Path]:
    """The artifacts, streamed from the store into a scratch folder under their own names (MLflow names an
    artifact after its file), before any remote call: a store problem is ours, not the tracking server's."""
    store = get_store(plan.storage_url)
    paths = []
    for name, key in plan.artifacts:
        store.copy_to(key, str(scratch / name))
        paths.append(scratch / name)
    return paths


def _experiment_id(client, name: str) -> str:
    from mlflow.exceptions import MlflowException

    experiment = client.get_experiment_by_name(name)
    if experiment is not None:
        if experiment.lifecycle_stage != "active":
            raise APIError(502, "mlflow_export_failed", f"The MLflow experiment {name!r} is deleted; restore it or "
                           "choose another experiment_name.", param="experiment_name")
        return experiment.experiment_id
    try:
        return client.create_experiment(name)
    except MlflowException:
        # Another export created it in the meantime.
        experiment = client.get_experiment_by_name(name)
        if experiment is None:
            raise
        return experiment.experiment_id


def _check_artifact_location(artifact_uri: str, tracking_uri: str, settings: Settings) -> None:
    """The tracking server chooses where a run's artifacts go. Only locations it serves over HTTP are written to: a
    file:// or s3:// location would make the API write to its own disk or to buckets its credentials reach."""
    parts = urlsplit(artifact_uri)
    tracking = urlsplit(tracking_uri)
    if parts.scheme == "mlflow-artifacts" and parts.netloc in ("", tracking.netloc):
        return
    if parts.scheme.lower() in ("http", "https"):
        check_tracking_uri(artifact_uri, settings)
        return
    raise APIError(502, "mlflow_export_failed", f"The run's artifact location {artifact_uri!r} is not served by the "
                   "tracking server; start it with --serve-artifacts (the default) so artifacts go over HTTP.",
                   param="tracking_uri")


def _tags(plan: ExportPlan, run_name: str) -> dict[str, str]:
    return {"mlflow.runName": run_name, "refinery.job_id": plan.job_id, "refinery.method": plan.method,
            "refinery.algorithm": plan.algorithm, "refinery.status": plan.status,
            "refinery.attempt": str(plan.attempt), "refinery.dashboard_url": plan.dashboard_url,
            **({"refinery.stopped_by": plan.stopped_by} if plan.stopped_by else {})}


def _log_params_and_metrics(client, run_id: str, plan: ExportPlan) -> None:
    from mlflow.entities import Metric, Param

    params = [Param(key, value) for key, value in flatten_params(plan.spec).items()]
    for start in range(0, len(params), PARAMS_PER_BATCH):
        client.log_batch(run_id, params=params[start:start + PARAMS_PER_BATCH])
    metrics = [Metric(_key(name), value, _ms(created_at), step)
               for name, points in plan.series.items() for step, value, created_at in points]
    last_step = max((step for points in plan.series.values() for step, _, _ in points), default=0)
    for name, value in final_metrics(plan.result_metrics, taken=set(plan.series)).items():
        metrics.append(Metric(name, value, _ms(plan.finished_at), last_step))
    for start in range(0, len(metrics), METRICS_PER_BATCH):
        client.log_batch(run_id, metrics=metrics[start:start + METRICS_PER_BATCH])


def _fail_run_quietly(client, run_id: str) -> None:
    try:
        client.set_terminated(run_id, "FAILED")
    except Exception:  # noqa: S110  the export already failed; this is only tidying up after it
        pass


def _delete_run_quietly(tracking_uri: str, run_id: str) -> None:
    try:
        _client(tracking_uri).delete_run(run_id)
    except Exception:  # noqa: S110  a duplicate run left behind is harmless; the winner's export is returned
        pass


# --- shaping the data ---------------------------------------------------------------------------------------------

def _ms(seconds: float | None) -> int:
    return int((seconds if seconds is not None else time.time()) * 1000)


def _key(name: str) -> str:
    return _KEY_UNSAFE.sub("_", name)[:MAX_KEY] or "_"


def _param_value(value: Any) -> str:
    text = value if isinstance(value, str) else json.dumps(value, separators=(",", ":"), sort_keys=True)
    if len(text) > MAX_PARAM_VALUE:
        # Long lists (e.g. forget.indices) do not fit; the ending says it was cut, the full spec is in report.json.
        marker = f"…[truncated, {len(text)} characters]"
        text = text[:MAX_PARAM_VALUE - len(marker)] + marker
    return text


def flatten_params(spec: dict[str, Any], prefix: str = "") -> dict[str, str]:
    """{"params": {"lr": 0.1}, "dataset": {"uri": …}} → {"params.lr": "0.1", "dataset.uri": …}: nested objects
    become dotted keys, lists and scalars JSON text; empty objects are left out."""
    out: dict[str, str] = {}
    for name, value in spec.items():
        key = _key(f"{prefix}{name}")
        if isinstance(value, dict):
            out.update(flatten_params(value, f"{key}."))
        else:
            out[key] = _param_value(value)
    return out


def final_metrics(result: dict[str, Any], taken: set[str], prefix: str = "") -> dict[str, float]:
    """The result's numbers as final metric values: nested objects and lists become dotted keys
    (per_class_recall.3); a name that is also a per-step series gets a "final." prefix so that series' history
    stays one point per step. Booleans and text are left out."""
    out: dict[str, float] = {}
    items = result.items() if isinstance(result, dict) else enumerate(result)
    for name, value in items:
        key = _key(f"{prefix}{name}")
        if isinstance(value, dict | list):
            out.update(final_metrics(value, taken, f"{key}."))
        elif isinstance(value, int | float) and not isinstance(value, bool):
            out[f"final.{key}" if key in taken else key] = float(value)
    return out
