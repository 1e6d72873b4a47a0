"""Typed API errors and the one handler that renders every error as {"error": {type, code, message, param}}."""
import logging

from fastapi import FastAPI, Request
from fastapi.exceptions import RequestValidationError
from fastapi.responses import JSONResponse
from pydantic import BaseModel
from sqlalchemy.exc import OperationalError
from starlette.exceptions import HTTPException as StarletteHTTPException
from starlette.routing import Match

log = logging.getLogger("refinery.api")

ERROR_TYPES = {400: "invalid_request_error", 401: "authentication_error", 404: "not_found_error",
               409: "conflict_error", 413: "request_too_large", 416: "invalid_request_error",
               422: "invalid_request_error", 429: "rate_limit_error", 503: "service_unavailable"}


class ErrorDetail(BaseModel):
    type: str
    code: str
    message: str
    param: str | None


class ErrorEnvelope(BaseModel):
    error: ErrorDetail


def documented(*statuses: int) -> dict[int | str, dict]:
    """OpenAPI `responses` for the error statuses a route can answer with, all in the error envelope."""
    return {status: {"model": ErrorEnvelope, "description": ERROR_TYPES.get(status, "error")} for status in statuses}


# What every authenticated /v1 route may answer besides its success.
V1_ERRORS = documented(400, 401, 404, 413, 422, 429, 503)


class APIError(Exception):
    def __init__(self, status: int, code: str, message: str, param: str | None = None,
                 headers: dict[str, str] | None = None):
        super().__init__(message)
        self.status, self.code, self.message, self.param, self.headers = status, code, message, param, headers


def not_found(kind: str, object_id: str) -> APIError:
    """The same answer for a missing object and another project's object, so ids leak nothing."""
    return APIError(404, "not_found", f"No {kind} with id {object_id!r}.", param="id")


def error_body(status: int, code: str, message: str, param: str | None) -> dict:
    return {"error": {"type": ERROR_TYPES.get(status, "api_error"), "code": code, "message": message, "param": param}}


_UNION_BRANCHES = {"int", "float", "str", "bool", "list", "dict", "none", "constrained-int", "constrained-float"}


def loc_to_param(loc: tuple) -> str | None:
    """A pydantic error location as the dotted field path a user wrote, e.g. ("body", "params", "epochs", "int")
    → "params.epochs": union branch and validator names mean nothing to a user."""
    parts = [str(p) for p in loc if p not in ("body", "query", "path", "header")]
    parts = [p for p in parts if p not in _UNION_BRANCHES and not p.startswith(("function-", "tagged-union", "literal["))]
    return ".".join(parts) or None


def allowed_methods(request: Request) -> list[str]:
    """The methods some route serves this path with, asked of the router itself (routers nest, so the route table
    is not flat)."""
    allowed = []
    for method in ("GET", "HEAD", "POST", "PUT", "PATCH", "DELETE", "OPTIONS"):
        scope = {**request.scope, "method": method}
        if any(route.matches(scope)[0] == Match.FULL for route in request.app.router.routes):
            allowed.append(method)
    return allowed


def install_handlers(app: FastAPI) -> None:
    @app.exception_handler(APIError)
    async def _api_error(_: Request, exc: APIError):
        return JSONResponse(error_body(exc.status, exc.code, exc.message, exc.param), exc.status, headers=exc.headers)

    @app.exception_handler(RequestValidationError)
    async def _validation(_: Request, exc: RequestValidationError):
        errors = exc.errors()
        first = errors[0] if errors else {"loc": (), "msg": "invalid request"}
        param = loc_to_param(tuple(first.get("loc", ())))
        message = "; ".join(f"{loc_to_param(tuple(e.get('loc', ()))) or 'body'}: {e.get('msg')}" for e in errors[:5])
        return JSONResponse(error_body(422, "invalid_spec", message, param), 422)

    @app.exception_handler(StarletteHTTPException)
    async def _http(request: Request, exc: StarletteHTTPException):
        code = {404: "not_found", 405: "method_not_allowed", 413: "request_too_large"}.get(exc.status_code, "http_error")
        headers = dict(getattr(exc, "headers", None) or {})
        if exc.status_code == 405:
            # Starlette names only the first matching route's methods; a path served by several routes (GET and
            # POST /v1/jobs) must list them all (RFC 9110 §15.5.6).
            headers["Allow"] = ", ".join(allowed_methods(request))
        return JSONResponse(error_body(exc.status_code, code, str(exc.detail), None), exc.status_code,
                            headers=headers or None)

    @app.exception_handler(OperationalError)
    async def _database_down(_: Request, exc: OperationalError):
        # The database is unreachable or restarting: a retryable 503, not a 500 (the pool reconnects by itself).
        log.warning("database unavailable: %s", exc.orig)
        return JSONResponse(error_body(503, "database_unavailable", "The database is unavailable; retry shortly.",
                                       None), 503, headers={"Retry-After": "5"})

    @app.exception_handler(Exception)
    async def _unexpected(_: Request, exc: Exception):
        log.exception("unhandled error", exc_info=exc)
        return JSONResponse(error_body(500, "internal_error", "An internal error occurred; it has been logged.", None), 500)
