"""Errors mapped once: every failure a handler meets becomes one ``ServiceError``, rendered per transport.

:func:`service_error` is the table: a domain or library exception in, the API's typed error out.
HTTP handlers answer it through Litestar's exception handlers (:data:`EXCEPTION_HANDLERS`, one JSON
shape ``{"error": {"code", "message", "detail"}}``); WebSocket handlers through :func:`error_frame`
(an ``error`` frame, the socket stays open). Anything the table does not know is ``internal``: logged
with its traceback, answered without its text.

``detail.field`` names the offending field of a bad request wherever the failure says which one: a
body field by its path (``response_format.json_schema.name``, ``message[0].text``; an unknown or
missing field by its own name, ``modle``), a query parameter by its name, a header by its header name
(``Idempotency-Key``).
"""

from __future__ import annotations

import logging
import re
from collections.abc import Callable, Mapping
from typing import Any, cast

import msgspec
from litestar import Request, Response
from litestar.exceptions import HTTPException, ValidationException

from service import errors
from service.api.schemas import InvalidBodyError
from service.engine.providers import UnknownModelError
from service.engine.tools import McpUnavailableError, ServerNotAllowedError, ToolError
from service.errors import ErrorBody, ErrorEnvelope
from service.store.base import StoreUnavailableError

log = logging.getLogger("service")


class ErrorFrame(msgspec.Struct, frozen=True, tag_field="type", tag="error"):
    """A WebSocket frame could not be acted on; ``ref`` is its ``client_ref`` or ``run_id`` when known."""

    code: str
    message: str
    ref: str | None = None
    detail: dict[str, Any] = msgspec.field(default_factory=dict[str, Any])


def tool_selection_error(exc: ToolError) -> errors.ServiceError:
    """A tool selection that cannot be served: 400 naming the field, 503 when an MCP server is down."""
    if isinstance(exc, McpUnavailableError):
        return errors.UnavailableError(exc.message, code=exc.code)
    field = "mcp_servers" if isinstance(exc, ServerNotAllowedError) else "tools"
    return errors.ToolSelectionError(exc.message, code=exc.code, detail={"field": field})


def _invalid_body(exc: InvalidBodyError) -> errors.ServiceError:
    return errors.InvalidRequestError(str(exc), detail={"field": exc.field})


def _unknown_model(exc: UnknownModelError) -> errors.ServiceError:
    return errors.UnknownModelError(str(exc), detail={"field": "model"})


def _store_down(_: StoreUnavailableError) -> errors.ServiceError:
    return errors.UnavailableError("the chat store is unavailable", code="store_unavailable")


_TABLE: Mapping[type[Exception], Callable[[Any], errors.ServiceError]] = {
    errors.ServiceError: lambda exc: cast("errors.ServiceError", exc),
    InvalidBodyError: _invalid_body,
    UnknownModelError: _unknown_model,
    ToolError: tool_selection_error,
    StoreUnavailableError: _store_down,
}
"""Domain exceptions and their API errors, looked up along the exception's MRO (most specific first)."""


def service_error(exc: Exception, *, where: str) -> errors.ServiceError:
    """The API error for ``exc``; an exception the table does not know is logged (``where``) as ``internal``."""
    for cls in type(exc).__mro__:
        mapper = _TABLE.get(cls)
        if mapper is not None:
            return mapper(exc)
    log.error("unhandled error in %s", where, exc_info=exc)
    return errors.ServiceError("an internal error occurred")


def error_frame(exc: Exception, *, ref: str | None, where: str) -> ErrorFrame:
    """The WebSocket ``error`` frame for ``exc``."""
    error = service_error(exc, where=where)
    return ErrorFrame(error.code, error.message, ref=ref, detail=error.detail)


# -- which field ------------------------------------------------------------------------------------

_NAMED_FIELD = re.compile(r"(?:unknown|missing required) field `([^`]*)`")
_AT_PATH = re.compile(r" - at `\$([^`]*)`$")


def field_of(message: str, path: str = "") -> str | None:
    """The field a msgspec validation message is about.

    That is ``path`` (or the message's own ``- at `$…```), plus the field the message names when it is an
    unknown or a missing one; None when the message is about the body or frame as a whole.
    """
    if (at := _AT_PATH.search(message)) is not None:
        path = at.group(1).removeprefix(".")
    if (named := _NAMED_FIELD.search(message)) is not None:
        return f"{path}.{named.group(1)}" if path else named.group(1)
    return path or None


def _problem_field(request: Request[Any, Any, Any], problem: Mapping[str, Any]) -> str | None:
    key, source = str(problem.get("key") or ""), problem.get("source")
    if source == "body" and key == "data":
        key = ""  # Litestar's name for the whole body
    elif source == "header":
        parameter = request.route_handler.parsed_fn_signature.parameters.get(key)
        definition = getattr(parameter, "kwarg_definition", None)
        key = getattr(definition, "header", None) or getattr(definition, "name", None) or key
    return field_of(str(problem.get("message") or ""), key)


# -- HTTP ------------------------------------------------------------------------------------------


def error_response(error: errors.ServiceError) -> Response[Any]:
    """Render the one error shape (with ``Retry-After`` / ``WWW-Authenticate`` where the error needs it)."""
    body = ErrorEnvelope(ErrorBody(code=error.code, message=error.message, detail=error.detail))
    response: Response[Any] = Response(body, status_code=error.status, media_type="application/json")
    if isinstance(error, errors.TooManyRequestsError):
        response.headers["Retry-After"] = str(error.retry_after)
    elif isinstance(error, errors.UnauthorizedError):
        response.headers["WWW-Authenticate"] = "Bearer"
    return response


def render_validation_error(request: Request[Any, Any, Any], exc: ValidationException) -> Response[Any]:
    """Litestar's request validation failure: 400 ``invalid_request`` naming the field(s)."""
    problems: list[dict[str, Any]] = []
    if isinstance(exc.extra, list):
        problems = [p for p in exc.extra if isinstance(p, dict)]  # type: ignore[misc]
    fields = [_problem_field(request, p) for p in problems]
    message = exc.detail
    if problems:
        message = "; ".join(f"{field or 'body'}: {p.get('message')}" for field, p in zip(fields, problems, strict=True))
    detail: dict[str, Any] = {"field": fields[0] if fields else None, "errors": problems}
    return error_response(errors.InvalidRequestError(message, detail=detail))


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


class _HttpError(errors.ServiceError):
    """Another Litestar HTTP error, with its own status."""

    def __init__(self, exc: HTTPException) -> None:
        code = _HTTP_CODES.get(exc.status_code, "internal" if exc.status_code >= 500 else "http_error")
        super().__init__(exc.detail, code=code)
        self.status = exc.status_code  # type: ignore[misc] - per instance, as Litestar's own


def render_http_error(_: Request[Any, Any, Any], exc: HTTPException) -> Response[Any]:
    """Any other Litestar HTTP error, with its status and headers."""
    response = error_response(_HttpError(exc))
    if exc.headers:
        response.headers.update(exc.headers)
    if exc.status_code == 429 and "Retry-After" not in response.headers:  # Litestar's rate limit says RateLimit-Reset
        response.headers["Retry-After"] = response.headers.get("RateLimit-Reset", "1")
    return response


def render_error(request: Request[Any, Any, Any], exc: Exception) -> Response[Any]:
    """Everything else goes through the table (the unknown logged, answered 500 without its text)."""
    return error_response(service_error(exc, where=f"{request.method} {request.url.path}"))


EXCEPTION_HANDLERS: dict[int | type[Exception], Any] = {
    ValidationException: render_validation_error,
    HTTPException: render_http_error,
    Exception: render_error,
}
