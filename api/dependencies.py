"""Request dependencies: settings, the request's db session (commit at the boundary), the caller's key and project
(a short auth cache), and the per-key rate limit (in Redis when configured, shared by every API process)."""
import asyncio
import logging
import threading
import time
from collections import OrderedDict
from collections.abc import Iterator
from dataclasses import dataclass
from functools import lru_cache
from typing import Annotated, Any

from fastapi import Depends, Header, Path, Query, Request
from fastapi.security import HTTPAuthorizationCredentials, HTTPBearer
from redis import asyncio as aioredis
from redis.exceptions import RedisError
from sqlalchemy.orm import Session
from starlette.concurrency import run_in_threadpool

from api.errors import APIError
from core.settings import Settings, get_settings
from db.repositories.projects import active_key_owner, hash_key
from db.session import transaction


async def _settings() -> Settings:
    """get_settings as an async dependency: FastAPI would run the plain function in a worker thread per request."""
    return get_settings()


SettingsDep = Annotated[Settings, Depends(_settings)]

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

# The same token bucket, kept in Redis so every API process and replica draws on one budget per key. One EVALSHA
# per request: read, refill and take happen atomically in Redis, on Redis' clock (the processes' clocks may differ).
# Returns the seconds to wait as a string (a Lua number would come back truncated to an integer).
_BUCKET_LUA = """
local capacity = tonumber(ARGV[1])
local rate = tonumber(ARGV[2])
local clock = redis.call('TIME')
local now = tonumber(clock[1]) + tonumber(clock[2]) / 1000000
local state = redis.call('HMGET', KEYS[1], 'tokens', 'at')
local tokens = tonumber(state[1]) or capacity
local at = tonumber(state[2]) or now
tokens = math.min(capacity, tokens + math.max(0, now - at) * rate)
local wait = 0
if tokens >= 1 then tokens = tokens - 1 else wait = (1 - tokens) / rate end
redis.call('HSET', KEYS[1], 'tokens', tostring(tokens), 'at', tostring(now))
redis.call('EXPIRE', KEYS[1], math.ceil(capacity / rate) + 1)
return tostring(wait)
"""
_log = logging.getLogger("refinery.api")


class SharedRateLimiter:
    """The per-key budget in Redis (REFINERY_RATE_LIMIT_URL, or a redis:// broker). If Redis does not answer, each
    process falls back to its own bucket for 5 s rather than refusing or stalling every request."""

    FALLBACK_SECONDS = 5.0

    def __init__(self, url: str) -> None:
        self.url = url
        self._client: tuple[asyncio.AbstractEventLoop, Any] | None = None
        self._down_until = 0.0

    def _script(self):
        loop = asyncio.get_running_loop()
        if self._client is None or self._client[0] is not loop:  # a client belongs to the loop that made it
            client = aioredis.Redis.from_url(self.url, socket_timeout=0.5, socket_connect_timeout=0.5)
            self._client = (loop, client.register_script(_BUCKET_LUA))
        return self._client[1]

    async def retry_after(self, key_id: str, per_minute: int) -> float:
        if time.monotonic() >= self._down_until:
            try:
                return float(await self._script()(keys=[f"refinery:rate:{key_id}"],
                                                  args=[per_minute, per_minute / 60.0]))
            except (RedisError, OSError) as exc:
                self._down_until = time.monotonic() + self.FALLBACK_SECONDS
                _log.warning("rate limit store %s unavailable, limiting per process for %.0f s: %s",
                             self.url, self.FALLBACK_SECONDS, exc)
        return rate_limiter.retry_after(key_id, per_minute)


@lru_cache
def _shared_limiter(url: str) -> SharedRateLimiter:
    return SharedRateLimiter(url)


async def retry_after(settings: Settings, key_id: str) -> float:
    url = settings.rate_limit_url or (settings.broker_url if settings.broker_url.startswith(("redis://", "rediss://"))
                                      else "")
    if not url:
        return rate_limiter.retry_after(key_id, settings.rate_limit_per_minute)
    return await _shared_limiter(url).retry_after(key_id, settings.rate_limit_per_minute)


@dataclass(frozen=True)
class CallerKey:
    """Who is calling: the API key's id and its project. Never the key itself."""
    id: str
    project_id: str


class KeyCache:
    """Keys found active, by their sha256 digest, for `auth_cache_seconds`: most requests of a poller then cost no
    auth query. Bounded (oldest entry out first); a revoked key stays accepted here for at most the TTL."""

    def __init__(self, max_entries: int = 10_000) -> None:
        self._entries: OrderedDict[str, tuple[float, CallerKey]] = OrderedDict()
        self._lock = threading.Lock()
        self.max_entries = max_entries

    def get(self, digest: str) -> CallerKey | None:
        with self._lock:
            entry = self._entries.get(digest)
            if entry is None:
                return None
            if entry[0] <= time.monotonic():
                del self._entries[digest]
                return None
            return entry[1]

    def put(self, digest: str, caller: CallerKey, ttl: float) -> None:
        with self._lock:
            self._entries[digest] = (time.monotonic() + ttl, caller)
            self._entries.move_to_end(digest)
            while len(self._entries) > self.max_entries:
                self._entries.popitem(last=False)


key_cache = KeyCache()


def _lookup_key(url: str, digest: str) -> CallerKey | None:
    with transaction(url, readonly=True) as session:
        owner = active_key_owner(session, digest)
    return CallerKey(*owner) if owner else None


async def authenticate(settings: Settings, api_key: str) -> CallerKey | None:
    """The active key's caller, from the cache or the ledger; None for an unknown or revoked key. The REST API's
    Bearer keys and the dashboard's cookie both come through here."""
    digest = hash_key(api_key)
    key = key_cache.get(digest) if settings.auth_cache_seconds > 0 else None
    if key is None:
        key = await run_in_threadpool(_lookup_key, settings.database_url, digest)
        if key is not None and settings.auth_cache_seconds > 0:
            key_cache.put(digest, key, settings.auth_cache_seconds)
    return key


async def get_api_key(settings: SettingsDep,
                      credentials: Annotated[HTTPAuthorizationCredentials | None, Depends(_bearer)]) -> CallerKey:
    """Async, so a cached key costs no trip to a worker thread; a lookup uses its own short session, so a request
    (a long-poll above all) never holds a database connection for its authentication."""
    if credentials is None or credentials.scheme.lower() != "bearer":
        raise APIError(401, "missing_api_key", "Send your API key as 'Authorization: Bearer <key>'.",
                       headers={"WWW-Authenticate": "Bearer"})
    key = await authenticate(settings, credentials.credentials)
    if key is None:
        raise APIError(401, "invalid_api_key", "This API key is not valid or has been revoked.",
                       headers={"WWW-Authenticate": "Bearer"})
    wait = await retry_after(settings, key.id)
    if wait > 0:
        raise APIError(429, "rate_limited", f"Too many requests for this key; retry in {wait:.1f} s.",
                       headers={"Retry-After": str(max(1, int(wait + 0.999)))})
    return key


async def get_project_id(key: Annotated[CallerKey, Depends(get_api_key)]) -> str:
    return key.project_id


ProjectId = Annotated[str, Depends(get_project_id)]


def idempotency_key(key: Annotated[str | None, Header(alias="Idempotency-Key", pattern=r"^[\x21-\x7e]{1,255}$",
                                                     description="same key + same body returns the same object")]
                    = None) -> str | None:
    return key
