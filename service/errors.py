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
    ├── LimitExceededError (422 limit_exceeded)
    │   └── IdempotencyKeyReusedError (422 idempotency_key_reused)
    ├── TooManyRequestsError (429 too_many_runs | budget_exhausted; ``Retry-After``)
    └── UnavailableError (503 store_unavailable | mcp_unavailable | shutting_down)
        └── RunsUnavailableError (503 runs_unavailable)

Only the classes live here (no web framework: ``runs/`` and ``engine/`` raise them too). The one
table that maps these and the other modules' errors to HTTP responses and WebSocket ``error``
frames is :mod:`service.api.error_map`: Litestar's own validation errors become 400
``invalid_request`` naming the field, other ``HTTPException``s keep their status, and anything else
is logged and answered 500 ``internal`` without its text.
"""

from __future__ import annotations

from collections.abc import Mapping
from typing import Any, ClassVar

import msgspec


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


class IdempotencyKeyReusedError(LimitExceededError):
    """An ``Idempotency-Key`` already used for a run with a different request; ``detail.run_id`` names that run."""

    code = "idempotency_key_reused"


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


class RunsUnavailableError(UnavailableError):
    """The run backend (Redis) cannot be reached: runs can be neither started nor followed."""

    code = "runs_unavailable"
