"""Request body size limit as pure ASGI middleware: refuses with 413 before reading a body it knows is too big, and
stops reading one that grows past the limit (chunked uploads), so memory stays bounded."""
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
