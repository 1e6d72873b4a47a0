"""Limits as pure ASGI middleware: the request body size (refused with 413 before reading a body known to be too
big, and reading stops when a chunked one grows past the limit, so memory stays bounded), and how many requests are
inside the application at once."""
import asyncio
import contextlib
import json

from starlette.exceptions import HTTPException

from api.errors import error_body


class BodySizeLimit:
    def __init__(self, app, max_bytes_for):
        self.app = app
        self.max_bytes_for = max_bytes_for  # called per request so settings changes in tests take effect

    async def __call__(self, scope, receive, send):
        if scope["type"] != "http":
            return await self.app(scope, receive, send)
        limit = self.max_bytes_for()
        headers = dict(scope.get("headers") or [])
        length = headers.get(b"content-length")
        if length is not None and length.isdigit() and int(length) > limit:
            return await _too_large(send, limit)
        received = 0
        started = False

        async def limited_receive():
            nonlocal received
            message = await receive()
            if message["type"] == "http.request":
                received += len(message.get("body", b""))
                if received > limit:
                    raise _TooLarge
            return message

        async def tracking_send(message):
            nonlocal started
            if message["type"] == "http.response.start":
                started = True
            await send(message)

        try:
            await self.app(scope, limited_receive, tracking_send)
        except _TooLarge:
            if not started:
                await _too_large(send, limit)


class _TooLarge(HTTPException):
    """An HTTPException, so FastAPI's body parsing re-raises it (rather than turning it into a 400)."""

    def __init__(self) -> None:
        super().__init__(413, "The request body is larger than this server accepts.")


async def _too_large(send, limit: int) -> None:
    body = json.dumps(error_body(413, "request_too_large", f"Request bodies are limited to {limit} bytes.", None)).encode()
    await send({"type": "http.response.start", "status": 413,
                "headers": [(b"content-type", b"application/json"), (b"content-length", str(len(body)).encode()),
                            (b"connection", b"close")]})
    await send({"type": "http.response.body", "body": body})


class AdmissionGate:
    """At most `limit` requests at a time inside the application; the rest wait their turn here, asynchronously,
    holding no worker thread and no database connection. Without it a few hundred concurrent clients starve the
    pool: requests holding a pooled connection wait for a thread while the threads wait for a connection, until
    the pool's 30 s timeout turns them into errors (measured with bench/load_polling.py: 200 clients → 88 % errors).
    A request leaves the gate when its response starts (its session has committed by then), so a long download or
    a live event stream does not keep a place. Keep `limit` below the pool's connections and the thread pool's
    size (40).

    A request that waits on purpose (a long-poll) steps outside while it waits: `async with outside_gate(scope)`
    gives its place back and queues for one again before its next read, so a thousand long-polls hold no places
    and each of their reads is admitted like any other request."""

    def __init__(self, app, limit: int):
        self.app = app
        self.limit = limit
        self._semaphore: asyncio.Semaphore | None = None

    async def __call__(self, scope, receive, send):
        if scope["type"] != "http":
            return await self.app(scope, receive, send)
        self._semaphore = self._semaphore or asyncio.Semaphore(self.limit)
        place = _Place(self._semaphore)
        await place.enter()
        scope[_PLACE] = place

        async def send_and_leave(message):
            if message["type"] == "http.response.start":
                place.leave()
            await send(message)

        try:
            await self.app(scope, receive, send_and_leave)
        finally:
            place.leave()


_PLACE = "refinery.admission_place"


class _Place:
    """One request's place inside the gate: held at most once, given back at most once per time it was taken."""

    def __init__(self, semaphore: asyncio.Semaphore):
        self.semaphore = semaphore
        self.inside = False

    async def enter(self) -> None:
        await self.semaphore.acquire()
        self.inside = True

    def leave(self) -> None:
        if self.inside:
            self.inside = False
            self.semaphore.release()


@contextlib.asynccontextmanager
async def outside_gate(scope):
    """Wait outside the admission gate (a no-op when the app runs without one)."""
    place: _Place | None = scope.get(_PLACE)
    held = place is not None and place.inside
    if held:
        place.leave()
    try:
        yield
    finally:
        if held:
            await place.enter()
