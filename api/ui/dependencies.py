"""The dashboard's caller: the API key kept in an HttpOnly session cookie, checked like a Bearer key on every request;
`UiOwnedJob` is the job in the path if it belongs to that key's project (one "not found" page otherwise)."""
import re
from typing import Annotated

from fastapi import Cookie, Depends

from api.dependencies import ID_PATTERN, CallerKey, SessionDep, SettingsDep, authenticate, retry_after
from db.models import Job
from db.repositories.jobs import get_project_job

COOKIE = "refinery_session"
ID = re.compile(ID_PATTERN)


class LoginRequired(Exception):
    """No key, or a revoked one: pages redirect to the login form, htmx and script requests get a 401."""


class PageNotFound(Exception):
    def __init__(self, what: str):
        super().__init__(what)
        self.what = what


class RateLimited(Exception):
    def __init__(self, retry_after: float):
        super().__init__(retry_after)
        self.retry_after = retry_after


async def get_ui_key(settings: SettingsDep, key: Annotated[str | None, Cookie(alias=COOKIE)] = None) -> CallerKey:
    """The same check, cache and (shared) rate limit as a Bearer key."""
    caller = await authenticate(settings, key) if key else None
    if caller is None:
        raise LoginRequired()
    wait = await retry_after(settings, caller.id)
    if wait > 0:
        raise RateLimited(wait)
    return caller


UiKey = Annotated[CallerKey, Depends(get_ui_key)]


def get_ui_project_id(key: UiKey) -> str:
    return key.project_id


UiProjectId = Annotated[str, Depends(get_ui_project_id)]


def get_ui_owned_job(job_id: str, project_id: UiProjectId, session: SessionDep) -> Job:
    # An id that cannot exist gets the same page as a missing one, not a validation error.
    job = get_project_job(session, project_id, job_id) if ID.match(job_id) else None
    if job is None:
        raise PageNotFound(f"job {job_id}")
    return job


UiOwnedJob = Annotated[Job, Depends(get_ui_owned_job)]
