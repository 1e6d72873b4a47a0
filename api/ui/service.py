"""What the dashboard's pages show, computed from the ledger's rows and a job's report.json: table rows, the new-job
form's prefilled spec and parameter table, chart series, and each method's own view. Queries stay in db/."""
import json
import time
from typing import Any

from pydantic import ValidationError
from sqlalchemy.orm import Session

from api.errors import APIError, loc_to_param
from api.jobs import service as job_service
from api.jobs.schemas import JobObject
from api.ui.dependencies import ID
from core.catalog import METHODS, find_algorithm
from core.settings import Settings
from core.spec import JobSpec
from core.storage import get_store
from db.lifecycle import TERMINAL
from db.models import Job
from db.repositories import jobs as job_repo
from db.repositories.artifacts import get_artifact
from db.repositories.events import metric_series

STATUSES = ("queued", "running", "succeeded", "failed", "cancelled")
PAGE_SIZE = 20
MAX_REPORT_BYTES = 8 * 1024 * 1024
# The number a person wants first for each kind of job, in order of preference.
HEADLINE_METRICS = ("accuracy", "student_accuracy", "test_accuracy")
# Metric series named <split>_<what> share one chart per <what> (train vs validation loss on one plot).
SPLITS = ("train", "val", "test", "forget", "retain", "student", "teacher")


# ---- jobs list --------------------------------------------------------------------------------------------------


def parse_metadata(text: str) -> dict[str, str]:
    """`team=search, run=3` → {"team": "search", "run": "3"}; pieces without '=' are ignored."""
    pairs = (piece.split("=", 1) for piece in text.split(",") if "=" in piece)
    return {key.strip(): value.strip() for key, value in pairs if key.strip()}


def list_page(session: Session, project_id: str, *, status: str | None, method: str | None, metadata: dict[str, str],
              after: str | None) -> tuple[list[dict[str, Any]], bool]:
    status = status if status in STATUSES else None
    method = method if method in METHODS else None
    after = after if after and ID.match(after) else None
    jobs, has_more = job_repo.list_jobs(session, project_id, after=after, limit=PAGE_SIZE, status=status,
                                        method=method, metadata=metadata)
    return [job_row(job) for job in jobs], has_more


def job_row(job: Job) -> dict[str, Any]:
    view = JobObject.of(job)
    metrics = (job.result or {}).get("metrics") or {}
    headline = next(((name, metrics[name]) for name in HEADLINE_METRICS if _is_number(metrics.get(name))), None)
    return {"id": job.id, "status": job.status, "method": job.method, "algorithm": job.algorithm,
            "dataset": (job.spec.get("dataset") or {}).get("uri", ""), "created_at": job.created_at,
            "dataset_short": _tail((job.spec.get("dataset") or {}).get("uri", ""), 36),
            "duration": duration(job), "progress": view.progress.fraction if job.status != "succeeded" else 1.0,
            "headline": headline, "live": job.status not in TERMINAL, "metadata": job.metadata_ or {}}


def duration(job: Job) -> float | None:
    if job.started_at is None:
        return None
    return (job.finished_at or time.time()) - job.started_at


def live_state(job: Job) -> dict[str, Any]:
    """What the job page refreshes while the job runs."""
    view = JobObject.of(job)
    return {"status": job.status, "attempt": job.attempt, "max_attempts": job.max_attempts,
            "progress": view.progress.model_dump(), "budget": view.budget.model_dump(),
            "cancel_requested": job.cancel_requested, "duration": duration(job),
            "error": view.error.model_dump(by_alias=True) if view.error else None,
            "stopped_by": (job.result or {}).get("stopped_by"), "terminal": job.status in TERMINAL}


# ---- new job ----------------------------------------------------------------------------------------------------


def catalog() -> list[dict[str, Any]]:
    return [{"name": m.name, "summary": m.summary, "default_algorithm": m.default_algorithm,
             "algorithms": [{"name": a.name, "summary": a.summary} for a in m.algorithms.values()]}
            for m in METHODS.values()]


def pick_algorithm(method: str | None, algorithm: str | None) -> tuple[str, str]:
    """A known (method, algorithm): the requested pair, else the method's default, else train's."""
    method = method if method in METHODS else "train"
    found = find_algorithm(method, algorithm) if algorithm else None
    return method, found.name if found else METHODS[method].default_algorithm


def params_schema(method: str, algorithm: str) -> dict[str, Any]:
    return find_algorithm(method, algorithm).params.model_json_schema()


def param_rows(schema: dict[str, Any]) -> list[dict[str, Any]]:
    """One row per parameter of a JSON Schema: name, type, default, bounds and description."""
    required = set(schema.get("required") or [])
    defs = schema.get("$defs") or {}
    return [{"name": name, "type": _type_of(prop, defs), "default": prop.get("default"),
             "has_default": "default" in prop, "required": name in required, "bounds": _bounds(prop),
             "description": prop.get("description") or ""}
            for name, prop in (schema.get("properties") or {}).items()]


def default_spec(session: Session, project_id: str, method: str, algorithm: str) -> dict[str, Any]:
    """A spec that runs as it stands where it can: the algorithm's parameter defaults, a built-in dataset, and for
    methods that start from a model the project's newest successful train job."""
    schema = params_schema(method, algorithm)
    params = {name: prop["default"] for name, prop in (schema.get("properties") or {}).items() if "default" in prop}
    spec: dict[str, Any] = {"method": method, "algorithm": algorithm,
                            "dataset": {"uri": "builtin://digits", "validation": {"fraction": 0.1}},
                            "params": params, "budget": {"max_seconds": 600}, "seed": 0, "metadata": {}}
    if method == "train":
        return spec
    trained, _ = job_repo.list_jobs(session, project_id, after=None, limit=2, status="succeeded", method="train",
                                    metadata={})
    uris = [f"job://{job.id}" for job in trained] or ["job://<id of a succeeded train job>"]
    if method == "distill" and algorithm == "dataset":
        return spec
    if method == "distill" and algorithm != "kd":
        spec["teachers"] = [{"uri": uri} for uri in (uris * 2)[:2]]
    else:
        spec["model"] = {"uri": uris[0]}
    if method == "distill":
        spec["student"] = {"params_ratio": 0.25}
    if method == "unlearn":
        spec["forget"] = {"class": 3}
    return spec


class FormProblem(Exception):
    """A spec the form cannot submit: `param` names the field (e.g. "params.lr"), as the REST API's 422 does."""

    def __init__(self, message: str, param: str | None):
        super().__init__(message)
        # The page names the field beside the message already.
        self.message, self.param = message.removeprefix(f"{param}: ") if param else message, param


def submit(session: Session, settings: Settings, project_id: str, text: str) -> Job:
    """Parse the editor's JSON and create the job through the same rules as POST /v1/jobs."""
    try:
        body = json.loads(text)
    except json.JSONDecodeError as exc:
        raise FormProblem(f"The spec is not valid JSON: {exc.msg} (line {exc.lineno}, column {exc.colno}).",
                          "spec") from None
    try:
        spec = JobSpec.model_validate(body)
    except ValidationError as exc:
        first = exc.errors()[0]
        param = loc_to_param(tuple(first.get("loc", ())))
        raise FormProblem(f"{param or 'spec'}: {first['msg']}", param) from None
    try:
        job, _ = job_service.create_job(session, settings, project_id, spec, None)
    except APIError as exc:
        raise FormProblem(exc.message, exc.param) from None
    return job


# ---- job page ---------------------------------------------------------------------------------------------------


def read_report(session: Session, settings: Settings, job: Job) -> dict[str, Any] | None:
    """The job's report.json, read whole from the store (it is small: metrics, not weights)."""
    artifact = get_artifact(session, job.id, "report.json")
    if artifact is None or artifact.size > MAX_REPORT_BYTES:
        return None
    body = b"".join(get_store(settings.storage_url).iter_range(artifact.storage_key, 0, artifact.size - 1))
    try:
        report = json.loads(body)
    except ValueError:
        return None
    return report if isinstance(report, dict) else None


def metric_charts(session: Session, job_id: str) -> list[dict[str, Any]]:
    """Chart.js-ready: one chart per quantity, one dataset per split, points as {x: step, y: value}."""
    charts: dict[str, dict[str, Any]] = {}
    for name, points in metric_series(session, job_id, None).items():
        split, _, what = name.partition("_")
        if split not in SPLITS or not what:
            split, what = "", name
        chart = charts.setdefault(what, {"title": what.replace("_", " "), "x_label": "epoch", "datasets": []})
        chart["datasets"].append({"label": split or name, "data": [{"x": s, "y": v} for s, v, _ in points]})
    return sorted(charts.values(), key=lambda c: (c["title"] not in ("loss", "accuracy"), c["title"]))


def report_view(job: Job, report: dict[str, Any] | None) -> dict[str, Any]:
    """The sections the job page draws from report.json: headline numbers, the confusion matrix, and the method's own
    view (pruning frontier and per-layer shape, distillation teacher vs student, unlearning scores and KLoM)."""
    if not report:
        return {}
    view: dict[str, Any] = {"summary": {k: v for k, v in (report.get("summary") or {}).items() if _is_number(v)},
                            "confusion": confusion(report)}
    if job.method == "prune":
        view["prune"] = prune_view(report)
    elif job.method == "distill":
        view["distill"] = distill_view(report)
    elif job.method == "unlearn":
        view["unlearn"] = unlearn_view(report)
    return view


def confusion(report: dict[str, Any]) -> dict[str, Any] | None:
    matrix = report.get("confusion_matrix")
    if not isinstance(matrix, list) or not matrix or len(matrix) > 60:
        return None
    names = (report.get("dataset") or {}).get("classes") or []
    names = [str(n) for n in names] if len(names) == len(matrix) else [str(i) for i in range(len(matrix))]
    rows = []
    for true, counts in enumerate(matrix):
        total = sum(c for c in counts if _is_number(c)) or 1
        rows.append({"name": names[true], "cells": [{"count": c, "share": round(c / total, 3) if _is_number(c) else 0,
                                                     "diagonal": true == predicted}
                                                    for predicted, c in enumerate(counts)]})
    return {"classes": names, "rows": rows}


def prune_view(report: dict[str, Any]) -> dict[str, Any]:
    rows = [row for row in report.get("comparison") or [] if isinstance(row, dict)]
    frontier = {}
    if len(rows) > 2 or any("chosen" in row for row in rows):
        # A sweep: every point beside the original, accuracy against what each costs.
        for x_key, label in (("flops", "FLOPs"), ("latency_ms", "latency (ms, ONNX Runtime, batch 1)"),
                             ("sparsity", "sparsity")):
            points = [{"x": row[x_key], "y": row["accuracy"], "label": row.get("name", "")}
                      for row in rows if _is_number(row.get(x_key)) and _is_number(row.get("accuracy"))]
            if len({p["x"] for p in points}) >= 2:
                # The first row is the model before pruning: drawn apart, as the point the sweep trades from.
                frontier[x_key] = {"x_label": label, "points": points[1:], "original": points[:1]}
    layers = report.get("per_layer_sparsity") or {}
    channels = report.get("per_layer_channels") or []
    return {"comparison": rows, "frontier": frontier,
            "per_layer_sparsity": [{"layer": k, "value": v} for k, v in layers.items() if _is_number(v)],
            "per_layer_channels": [c for c in channels if isinstance(c, dict)]}


def distill_view(report: dict[str, Any]) -> dict[str, Any]:
    rows = [row for row in report.get("comparison") or [] if isinstance(row, dict)]
    return {"comparison": rows, "baseline": report.get("baseline"), "summary": report.get("distillation") or {}}


def unlearn_view(report: dict[str, Any]) -> dict[str, Any]:
    rows = [row for row in report.get("comparison") or [] if isinstance(row, dict)]
    klom = [row for row in report.get("klom") or [] if isinstance(row, dict)]
    return {"comparison": rows, "klom": klom, "estimator": report.get("klom_estimator") or {},
            "forget_set": report.get("forget_set") or {}}


# ---- compare ----------------------------------------------------------------------------------------------------


def compare(session: Session, jobs: list[Job]) -> dict[str, Any]:
    """Side by side: every numeric result metric as a row, and one chart per metric series with a line per job."""
    metrics = [((job.result or {}).get("metrics") or {}) for job in jobs]
    names = sorted({name for m in metrics for name, value in m.items() if _is_number(value)})
    table = [{"name": name, "values": [m.get(name) if _is_number(m.get(name)) else None for m in metrics]}
             for name in names]
    charts: dict[str, dict[str, Any]] = {}
    for job in jobs:
        for name, points in metric_series(session, job.id, None).items():
            chart = charts.setdefault(name, {"title": name.replace("_", " "), "x_label": "epoch", "datasets": []})
            chart["datasets"].append({"label": f"{job.id} ({job.method}/{job.algorithm})",
                                      "data": [{"x": s, "y": v} for s, v, _ in points]})
    return {"jobs": [job_row(job) for job in jobs], "table": table,
            "charts": sorted(charts.values(), key=lambda c: (-len(c["datasets"]), c["title"]))}


# ---- helpers ----------------------------------------------------------------------------------------------------


def _type_of(prop: dict[str, Any], defs: dict[str, Any]) -> str:
    if "$ref" in prop:
        prop = defs.get(prop["$ref"].rsplit("/", 1)[-1], {})
    if "enum" in prop:
        return " | ".join(json.dumps(v) for v in prop["enum"])
    if "const" in prop:
        return json.dumps(prop["const"])
    if "anyOf" in prop:
        return " | ".join(_type_of(branch, defs) for branch in prop["anyOf"])
    if prop.get("type") == "array":
        return f"array of {_type_of(prop.get('items') or {}, defs)}"
    return str(prop.get("type", "any"))


def _bounds(prop: dict[str, Any]) -> str:
    parts = []
    for branch in [prop, *(prop.get("anyOf") or [])]:
        for key, sign in (("minimum", "≥"), ("exclusiveMinimum", ">"), ("maximum", "≤"), ("exclusiveMaximum", "<"),
                          ("minItems", "items ≥"), ("maxItems", "items ≤")):
            if key in branch:
                parts.append(f"{sign} {branch[key]}")
    return ", ".join(parts)


def _tail(text: str, limit: int) -> str:
    """The end of a long URI (the file name is what tells datasets apart)."""
    return text if len(text) <= limit else "…" + text[-(limit - 1):]


def _is_number(value: Any) -> bool:
    return isinstance(value, int | float) and not isinstance(value, bool)
