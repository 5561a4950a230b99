"""Typed errors inside, one JSON shape outside: ``{"error": {"code", "message", "detail"}}``.

::

    ServiceError (500 internal)
    ├── InvalidRequestError (400 invalid_request)
    │   ├── InvalidCursorError (400 invalid_cursor)
    │   ├── UnknownModelError (400 unknown_model)
    │   └── ToolSelectionError (400 unknown_tool | mcp_server_not_allowed)
    ├── UnauthorizedError (401 unauthorized)
    ├── NotFoundError (404 not_found)
    ├── ChatBusyError (409 chat_busy)
    ├── RunExpiredError (410 run_expired)
    ├── LimitExceededError (422 history_too_long | too_many_parts)
    ├── TooManyRequestsError (429 too_many_runs | budget_exhausted; ``Retry-After``)
    └── UnavailableError (503 store_unavailable | mcp_unavailable | runs_unavailable | shutting_down)

Litestar's own validation errors become 400 ``invalid_request`` naming the
field; other ``HTTPException``s keep their status; anything else is logged
and answered 500 ``internal`` without its text.
"""

from __future__ import annotations

import logging
from collections.abc import Mapping
from typing import Any, ClassVar

import msgspec
from litestar import Request, Response
from litestar.exceptions import HTTPException, ValidationException

log = logging.getLogger("service")


class ErrorBody(msgspec.Struct, frozen=True):
    """What went wrong: a stable ``code``, a sentence for people, and structured ``detail``."""

    code: str
    message: str
    detail: dict[str, Any] = msgspec.field(default_factory=dict[str, Any])


class ErrorEnvelope(msgspec.Struct, frozen=True):
    """The one error shape of every HTTP error response."""

    error: ErrorBody


class ServiceError(Exception):
    """Base of the errors the API renders; the class carries the code and status."""

    code: ClassVar[str] = "internal"
    status: ClassVar[int] = 500

    def __init__(self, message: str, *, detail: Mapping[str, Any] | None = None, code: str | None = None) -> None:
        super().__init__(message)
        self.message = message
        self.detail = dict(detail or {})
        if code is not None:
            self.code = code  # type: ignore[misc] - a subclass may name a finer code per instance


class InvalidRequestError(ServiceError):
    """The request is malformed; ``detail.field`` names the field when there is one."""

    code = "invalid_request"
    status = 400


class InvalidCursorError(InvalidRequestError):
    """A resume cursor (``Last-Event-ID`` / ``after``) that names no position in the run."""

    code = "invalid_cursor"


class UnknownModelError(InvalidRequestError):
    """A model id no provider serves."""

    code = "unknown_model"


class ToolSelectionError(InvalidRequestError):
    """A tool or MCP server the chat may not use."""

    code = "unknown_tool"


class UnauthorizedError(ServiceError):
    """No credentials, or credentials that prove nothing; answered with ``WWW-Authenticate: Bearer``."""

    code = "unauthorized"
    status = 401


class NotFoundError(ServiceError):
    """No such resource (or not yours)."""

    code = "not_found"
    status = 404


class ChatBusyError(ServiceError):
    """The chat already has an active run; ``detail.active_run_id`` names it."""

    code = "chat_busy"
    status = 409


class RunExpiredError(ServiceError):
    """The run's events are past retention; its answer is still in the chat."""

    code = "run_expired"
    status = 410


class LimitExceededError(ServiceError):
    """A well-formed request over one of the service's size limits; ``detail.field`` names the field."""

    code = "limit_exceeded"
    status = 422


class TooManyRequestsError(ServiceError):
    """The caller is over one of its limits; ``retry_after`` (seconds) becomes ``Retry-After``."""

    code = "rate_limited"
    status = 429

    def __init__(self, message: str, *, retry_after: int, code: str, detail: Mapping[str, Any] | None = None) -> None:
        super().__init__(message, code=code, detail=detail)
        self.retry_after = max(1, retry_after)


class UnavailableError(ServiceError):
    """A dependency (database, Redis, MCP server) is down."""

    code = "unavailable"
    status = 503


def error_response(status: int, code: str, message: str, detail: Mapping[str, Any] | None = None) -> Response[Any]:
    """Render the one error shape."""
    body = ErrorEnvelope(ErrorBody(code=code, message=message, detail=dict(detail or {})))
    return Response(body, status_code=status, media_type="application/json")


def render_service_error(_: Request[Any, Any, Any], exc: ServiceError) -> Response[Any]:
    """Render a ``ServiceError``."""
    response = error_response(exc.status, exc.code, exc.message, exc.detail)
    if isinstance(exc, TooManyRequestsError):
        response.headers["Retry-After"] = str(exc.retry_after)
    elif isinstance(exc, UnauthorizedError):
        response.headers["WWW-Authenticate"] = "Bearer"
    return response


def render_validation_error(_: Request[Any, Any, Any], exc: ValidationException) -> Response[Any]:
    """Render Litestar's request validation failure as 400, naming the field(s)."""
    problems: list[dict[str, Any]] = []
    if isinstance(exc.extra, list):
        problems = [p for p in exc.extra if isinstance(p, dict)]  # type: ignore[misc]
    fields = [str(p.get("key") or p.get("source") or "") for p in problems]
    message = exc.detail
    if problems:
        message = "; ".join(f"{p.get('key') or 'body'}: {p.get('message')}" for p in problems)
    detail: dict[str, Any] = {"field": fields[0] if fields else None, "errors": problems}
    return error_response(400, "invalid_request", message, detail)


_HTTP_CODES = {
    400: "invalid_request",
    401: "unauthorized",
    403: "forbidden",
    404: "not_found",
    405: "method_not_allowed",
    406: "not_acceptable",
    413: "payload_too_large",
    415: "unsupported_media_type",
    429: "rate_limited",
}


def render_http_error(_: Request[Any, Any, Any], exc: HTTPException) -> Response[Any]:
    """Render any other Litestar HTTP error with its status."""
    code = _HTTP_CODES.get(exc.status_code, "internal" if exc.status_code >= 500 else "http_error")
    response = error_response(exc.status_code, code, exc.detail)
    if exc.headers:
        response.headers.update(exc.headers)
    if exc.status_code == 429 and "Retry-After" not in response.headers:  # Litestar's rate limit says RateLimit-Reset
        response.headers["Retry-After"] = response.headers.get("RateLimit-Reset", "1")
    return response


def render_unexpected(request: Request[Any, Any, Any], exc: Exception) -> Response[Any]:
    """Last resort: log the failure, answer 500 without its text."""
    log.exception("unhandled error on %s %s", request.method, request.url.path, exc_info=exc)
    return error_response(500, "internal", "an internal error occurred")


EXCEPTION_HANDLERS: dict[int | type[Exception], Any] = {
    ServiceError: render_service_error,
    ValidationException: render_validation_error,
    HTTPException: render_http_error,
    Exception: render_unexpected,
}
