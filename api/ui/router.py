"""The web dashboard under /ui: server-rendered pages (Jinja2) with htmx partial updates and Chart.js plots, signed in
with an API key kept in an HttpOnly session cookie. Every route reuses the REST API's services and repositories, and
none is in the OpenAPI schema."""
import json
from collections.abc import AsyncIterator
from datetime import UTC, datetime
from pathlib import Path
from typing import Annotated, Any

from fastapi import APIRouter, FastAPI, Form, Header, Query, Request
from fastapi.responses import HTMLResponse, JSONResponse, RedirectResponse, Response, StreamingResponse
from fastapi.staticfiles import StaticFiles
from fastapi.templating import Jinja2Templates

from api.artifacts.schemas import ArtifactObject
from api.artifacts.service import download_response
from api.dependencies import PathName, SessionDep, SettingsDep
from api.errors import APIError
from api.jobs.router import _stream_events, publish_after_commit
from api.ui import service
from api.ui.dependencies import COOKIE, ID, LoginRequired, PageNotFound, RateLimited, UiOwnedJob, UiProjectId
from db.lifecycle import TERMINAL, request_cancel
from db.repositories.artifacts import list_artifacts
from db.repositories.jobs import get_project_job
from db.repositories.projects import find_active_key

HERE = Path(__file__).parent
router = APIRouter(prefix="/ui", include_in_schema=False)
templates = Jinja2Templates(directory=HERE / "templates")
# Scripts only from this server (the vendored htmx and Chart.js, and ui.js); inline style attributes shade the
# confusion matrix and size progress bars.
CSP = ("default-src 'self'; script-src 'self'; style-src 'self' 'unsafe-inline'; img-src 'self' data:; "
       "connect-src 'self'; frame-ancestors 'none'; base-uri 'none'; form-action 'self'")
# report.html is self-contained (inline CSS and SVG, no scripts): shown inline with nothing else allowed.
REPORT_CSP = "default-src 'none'; style-src 'unsafe-inline'; img-src data:; sandbox"
SECURITY_HEADERS = {"Content-Security-Policy": CSP, "X-Content-Type-Options": "nosniff", "Referrer-Policy": "same-origin",
                    "Cache-Control": "no-store"}


def mount(app: FastAPI) -> None:
    """Add the dashboard to the API: its routes, its static files and its error pages."""
    app.include_router(router)
    app.mount("/ui/static", StaticFiles(directory=HERE / "static"), name="ui-static")
    app.add_exception_handler(LoginRequired, _login_required)
    app.add_exception_handler(PageNotFound, _page_not_found)
    app.add_exception_handler(RateLimited, _rate_limited)


def page(request: Request, name: str, context: dict[str, Any] | None = None, status: int = 200) -> HTMLResponse:
    return templates.TemplateResponse(request, name, context or {}, status_code=status, headers=SECURITY_HEADERS)


def is_htmx(request: Request) -> bool:
    return request.headers.get("hx-request") == "true"


async def _login_required(request: Request, _: LoginRequired) -> Response:
    if is_htmx(request):
        return Response(status_code=401, headers={"HX-Redirect": "/ui/login"})
    if "text/html" in request.headers.get("accept", ""):
        return RedirectResponse("/ui/login", status_code=303)
    return JSONResponse({"error": "sign in at /ui/login"}, status_code=401)


async def _page_not_found(request: Request, exc: PageNotFound) -> Response:
    return page(request, "not_found.html", {"what": exc.what, "signed_in": True}, status=404)


async def _rate_limited(request: Request, exc: RateLimited) -> Response:
    seconds = max(1, int(exc.retry_after + 0.999))
    return Response(f"Too many requests for this key; retry in {seconds} s.", status_code=429,
                    headers={"Retry-After": str(seconds)}, media_type="text/plain")


# ---- signing in -------------------------------------------------------------------------------------------------


@router.get("")
def home():
    return RedirectResponse("/ui/jobs", status_code=303)


@router.get("/login")
def login_form(request: Request):
    return page(request, "login.html")


@router.post("/login")
def login(request: Request, session: SessionDep, key: Annotated[str, Form(max_length=512)] = ""):
    key = key.strip()
    if not key or find_active_key(session, key) is None:
        return page(request, "login.html", {"error": "This API key is not valid or has been revoked."}, status=401)
    response = RedirectResponse("/ui/jobs", status_code=303)
    # A session cookie (no Max-Age): the key leaves with the browser session; scripts never see it.
    response.set_cookie(COOKIE, key, httponly=True, samesite="strict", secure=request.url.scheme == "https",
                        path="/ui")
    return response


@router.post("/logout")
def logout():
    response = RedirectResponse("/ui/login", status_code=303)
    response.delete_cookie(COOKIE, path="/ui")
    return response


# ---- jobs list --------------------------------------------------------------------------------------------------


@router.get("/jobs")
def jobs(request: Request, project_id: UiProjectId, session: SessionDep, status: str = "", method: str = "",
         metadata: Annotated[str, Query(max_length=2000)] = "", after: str = ""):
    filters = {"status": status, "method": method, "metadata": metadata}
    rows, has_more = service.list_page(session, project_id, status=status or None, method=method or None,
                                       metadata=service.parse_metadata(metadata), after=after or None)
    context = {"rows": rows, "has_more": has_more, "filters": filters, "after": after,
               "statuses": service.STATUSES, "methods": [m["name"] for m in service.catalog()],
               "first_query": {k: v for k, v in filters.items() if v},
               "next_query": {**{k: v for k, v in filters.items() if v}, "after": rows[-1]["id"] if rows else ""}}
    return page(request, "_jobs_table.html" if is_htmx(request) else "jobs.html", context)


@router.get("/jobs/new")
def new_job(request: Request, project_id: UiProjectId, session: SessionDep, method: str = "", algorithm: str = ""):
    method, algorithm = service.pick_algorithm(method or None, algorithm or None)
    spec = service.default_spec(session, project_id, method, algorithm)
    return _new_job_page(request, method, algorithm, json.dumps(spec, indent=2))


def _new_job_page(request: Request, method: str, algorithm: str, text: str, problem: service.FormProblem | None = None):
    context = {"catalog": service.catalog(), "method": method, "algorithm": algorithm, "spec_text": text,
               "params": service.param_rows(service.params_schema(method, algorithm)), "problem": problem}
    name = "_new_job_form.html" if is_htmx(request) else "new_job.html"
    return page(request, name, context, status=422 if problem else 200)


@router.post("/jobs/new")
def submit_job(request: Request, project_id: UiProjectId, session: SessionDep, settings: SettingsDep,
               spec: Annotated[str, Form(max_length=1_000_000)] = "", method: Annotated[str, Form()] = "",
               algorithm: Annotated[str, Form()] = ""):
    try:
        job = service.submit(session, settings, project_id, spec)
    except service.FormProblem as problem:
        session.rollback()
        method, algorithm = service.pick_algorithm(method or None, algorithm or None)
        return _new_job_page(request, method, algorithm, spec, problem)
    session.commit()
    publish_after_commit(session, job)
    target = f"/ui/jobs/{job.id}"
    if is_htmx(request):
        return Response(status_code=204, headers={"HX-Redirect": target})
    return RedirectResponse(target, status_code=303)


# ---- one job ----------------------------------------------------------------------------------------------------


@router.get("/jobs/{job_id}")
def job_page(request: Request, job: UiOwnedJob, session: SessionDep, settings: SettingsDep):
    report = service.read_report(session, settings, job) if job.status in TERMINAL else None
    context = {"job": job, "row": service.job_row(job), "state": service.live_state(job),
               "spec_text": json.dumps(job.spec, indent=2), "charts": service.metric_charts(session, job.id),
               **_report_context(session, job, report)}
    return page(request, "job.html", context)


def _report_context(session, job, report) -> dict[str, Any]:
    artifacts = [ArtifactObject.of(a) for a in list_artifacts(session, job.id)]
    return {"job": job, "view": service.report_view(job, report), "artifacts": artifacts,
            "has_report_html": any(a.name == "report.html" for a in artifacts)}


@router.get("/jobs/{job_id}/row")
def job_row(request: Request, job: UiOwnedJob):
    return page(request, "_job_row.html", {"row": service.job_row(job)})


@router.get("/jobs/{job_id}/state")
def job_state(job: UiOwnedJob):
    return JSONResponse(service.live_state(job), headers={"Cache-Control": "no-store"})


@router.get("/jobs/{job_id}/metrics")
def job_metrics(job: UiOwnedJob, session: SessionDep):
    return JSONResponse(service.metric_charts(session, job.id), headers={"Cache-Control": "no-store"})


@router.get("/jobs/{job_id}/results")
def job_results(request: Request, job: UiOwnedJob, session: SessionDep, settings: SettingsDep):
    """The report sections and artifact list, swapped into the job page when the job finishes."""
    report = service.read_report(session, settings, job) if job.status in TERMINAL else None
    return page(request, "_job_results.html", _report_context(session, job, report))


@router.get("/jobs/{job_id}/events")
def job_events(job: UiOwnedJob, request: Request, settings: SettingsDep,
               last_event_id: Annotated[str | None, Header(pattern=r"^evt_[0-9]{1,18}$")] = None):
    """The live event stream, cookie-authenticated (EventSource cannot send an Authorization header); the same
    generator as GET /v1/jobs/{id}/events with Accept: text/event-stream."""
    cursor = int(last_event_id.removeprefix("evt_")) if last_event_id else 0
    return StreamingResponse(_unnamed(_stream_events(settings.database_url, job.id, cursor, request)),
                             media_type="text/event-stream", headers={"Cache-Control": "no-cache"})


async def _unnamed(frames: AsyncIterator[str]) -> AsyncIterator[str]:
    """EventSource listens for event types by name only, and a job's types are open-ended (train.epoch,
    prune.step, …): job events go as plain messages (each payload carries its type); `end` stays named."""
    async for frame in frames:
        if frame.startswith("event: end"):
            yield frame
        else:
            yield "".join(line for line in frame.splitlines(keepends=True) if not line.startswith("event: "))


@router.get("/jobs/{job_id}/artifacts/{name}")
def download(job: UiOwnedJob, name: PathName, session: SessionDep, settings: SettingsDep,
             range_: Annotated[str | None, Header(alias="Range")] = None,
             if_none_match: Annotated[str | None, Header()] = None):
    inline = name == "report.html"
    try:
        response = download_response(session, settings, job, name, range_, if_none_match, inline=inline)
    except APIError as exc:
        if exc.status == 404:
            raise PageNotFound(f"artifact {name}") from None
        raise
    if inline:
        response.headers["Content-Security-Policy"] = REPORT_CSP
    return response


@router.post("/jobs/{job_id}/cancel")
def cancel(job: UiOwnedJob, session: SessionDep):
    request_cancel(session, job)
    session.commit()
    return RedirectResponse(f"/ui/jobs/{job.id}", status_code=303)


# ---- compare ----------------------------------------------------------------------------------------------------


@router.get("/compare")
def compare(request: Request, project_id: UiProjectId, session: SessionDep,
            ids: Annotated[list[str] | None, Query(max_length=20)] = None):
    ids = list(dict.fromkeys(ids or []))
    if not 2 <= len(ids) <= 6:
        return page(request, "compare.html", {"error": f"Pick 2 to 6 jobs to compare (got {len(ids)}).",
                                              "view": None}, status=400)
    found = []
    for job_id in ids:
        job = get_project_job(session, project_id, job_id) if ID.match(job_id) else None
        if job is None:
            raise PageNotFound(f"job {job_id}")
        found.append(job)
    return page(request, "compare.html", {"view": service.compare(session, found), "error": None})


# ---- template helpers -------------------------------------------------------------------------------------------


def _when(timestamp: float | None) -> str:
    if timestamp is None:
        return "—"
    return datetime.fromtimestamp(timestamp, UTC).strftime("%Y-%m-%d %H:%M:%S UTC")


def _seconds(seconds: float | None) -> str:
    if seconds is None:
        return "—"
    if seconds < 120:
        return f"{seconds:.1f} s"
    minutes, rest = divmod(round(seconds), 60)
    return f"{minutes} min {rest} s" if minutes < 60 else f"{minutes // 60} h {minutes % 60} min"


def _number(value: Any) -> str:
    if isinstance(value, bool) or not isinstance(value, int | float):
        return "—" if value is None else str(value)
    if isinstance(value, int):
        return f"{value:,}"
    return f"{value:.4g}"


def _size(count: int) -> str:
    for factor, suffix in ((2**30, "GiB"), (2**20, "MiB"), (2**10, "KiB")):
        if count >= factor:
            return f"{count / factor:.1f} {suffix}"
    return f"{count} B"


templates.env.filters.update(when=_when, seconds=_seconds, number=_number, size=_size)
