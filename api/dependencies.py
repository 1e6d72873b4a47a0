"""Request dependencies: settings, the request's db session (commit at the boundary), the caller's project."""
import threading
import time
from collections.abc import Iterator
from typing import Annotated

from fastapi import Depends, Header, Path, Query, Request
from fastapi.security import HTTPAuthorizationCredentials, HTTPBearer
from sqlalchemy.orm import Session

from api.errors import APIError
from core.settings import Settings, get_settings
from db.models import ApiKey
from db.repositories.projects import find_active_key
from db.session import transaction

SettingsDep = Annotated[Settings, Depends(get_settings)]

# Ids, cursors and names from paths and queries: checked before they reach SQL (Postgres refuses NUL bytes, and an
# id that cannot exist should be a clean 404/422, not a database error).
ID_PATTERN = r"^[A-Za-z0-9_-]{1,64}$"
NAME_PATTERN = r"^[A-Za-z0-9._-]{1,200}$"
PathId = Annotated[str, Path(pattern=ID_PATTERN)]
PathName = Annotated[str, Path(pattern=NAME_PATTERN)]
CursorQuery = Annotated[str | None, Query(pattern=ID_PATTERN)]
NameQuery = Annotated[str | None, Query(pattern=NAME_PATTERN)]


def get_session(request: Request, settings: SettingsDep) -> Iterator[Session]:
    with transaction(settings.database_url, readonly=request.method in ("GET", "HEAD")) as session:
        yield session


# scope="function": commit before the response is sent, so a client that got 201 can read the object at once.
SessionDep = Annotated[Session, Depends(get_session, scope="function")]
_bearer = HTTPBearer(auto_error=False)


class RateLimiter:
    """A token bucket per API key, per API process: `per_minute` requests, bursts up to the same number."""

    def __init__(self) -> None:
        self._buckets: dict[str, tuple[float, float]] = {}
        self._lock = threading.Lock()

    def retry_after(self, key_id: str, per_minute: int) -> float:
        rate = per_minute / 60.0
        now = time.monotonic()
        with self._lock:
            tokens, last = self._buckets.get(key_id, (float(per_minute), now))
            tokens = min(float(per_minute), tokens + (now - last) * rate)
            if tokens >= 1.0:
                self._buckets[key_id] = (tokens - 1.0, now)
                return 0.0
            self._buckets[key_id] = (tokens, now)
            return (1.0 - tokens) / rate


rate_limiter = RateLimiter()


def get_api_key(session: SessionDep, settings: SettingsDep,
                credentials: Annotated[HTTPAuthorizationCredentials | None, Depends(_bearer)]) -> ApiKey:
    if credentials is None or credentials.scheme.lower() != "bearer":
        raise APIError(401, "missing_api_key", "Send your API key as 'Authorization: Bearer <key>'.",
                       headers={"WWW-Authenticate": "Bearer"})
    key = find_active_key(session, credentials.credentials)
    if key is None:
        raise APIError(401, "invalid_api_key", "This API key is not valid or has been revoked.",
                       headers={"WWW-Authenticate": "Bearer"})
    wait = rate_limiter.retry_after(key.id, settings.rate_limit_per_minute)
    if wait > 0:
        raise APIError(429, "rate_limited", f"Too many requests for this key; retry in {wait:.1f} s.",
                       headers={"Retry-After": str(max(1, int(wait + 0.999)))})
    return key


def get_project_id(key: Annotated[ApiKey, Depends(get_api_key)]) -> str:
    return key.project_id


ProjectId = Annotated[str, Depends(get_project_id)]


def idempotency_key(key: Annotated[str | None, Header(alias="Idempotency-Key", pattern=r"^[\x21-\x7e]{1,255}$",
                                                     description="same key + same body returns the same object")]
                    = None) -> str | None:
    return key
