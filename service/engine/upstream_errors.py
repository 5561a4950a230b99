"""Map upstream failures to typed error codes, most specific first.

::

    openai.APITimeoutError, httpx2.TimeoutException ........ timeout
    openai.RateLimitError (429) ............................ rate_limited
    openai.APIStatusError (other 4xx/5xx) .................. upstream_error
    openai.APIConnectionError, httpx2.HTTPError ............ upstream_error
      (refused, reset, cut mid-stream)
    msgspec.DecodeError (a chunk that is not JSON) ......... upstream_error
    UpstreamChunkError (an error object in the stream) ..... upstream_error
    UpstreamStreamEndedError (closed before finishing) ..... upstream_error
    InvalidOutputError ..................................... invalid_output
"""

from __future__ import annotations

import httpx2
import msgspec
import openai

from service.engine.state import InvalidOutputError, UpstreamChunkError, UpstreamStreamEndedError
from service.events import ErrorInfo

UPSTREAM_ERRORS: tuple[type[BaseException], ...] = (
    openai.APIError,
    httpx2.HTTPError,
    httpx2.StreamError,
    msgspec.DecodeError,
    UpstreamChunkError,
    UpstreamStreamEndedError,
    InvalidOutputError,
)
"""Exceptions ``error_info`` maps; anything else is a bug and becomes ``internal``."""


def error_info(exc: BaseException) -> ErrorInfo:
    """The typed error for an upstream failure."""
    match exc:
        case openai.APITimeoutError() | httpx2.TimeoutException():
            return ErrorInfo("timeout", "the upstream did not answer in time")
        case openai.RateLimitError():
            return ErrorInfo("rate_limited", f"the upstream is rate limiting requests: {_status_message(exc)}")
        case openai.APIStatusError():
            return ErrorInfo("upstream_error", f"the upstream answered {exc.status_code}: {_status_message(exc)}")
        case openai.APIConnectionError() | httpx2.HTTPError() | httpx2.StreamError():
            return ErrorInfo("upstream_error", f"the upstream connection failed: {type(exc).__name__}")
        case msgspec.DecodeError():
            return ErrorInfo("upstream_error", f"the upstream sent a chunk that is not valid JSON: {exc}")
        case UpstreamStreamEndedError():
            return ErrorInfo("upstream_error", str(exc))
        case UpstreamChunkError():
            return ErrorInfo("upstream_error", f"the upstream reported an error: {exc}")
        case InvalidOutputError():
            return ErrorInfo("invalid_output", str(exc))
        case _:
            return ErrorInfo("internal", "an internal error stopped the run")


def _status_message(exc: openai.APIStatusError) -> str:
    body = exc.body
    if isinstance(body, dict):
        message = body.get("message")  # type: ignore[union-attr]
        if isinstance(message, str):
            return message[:300]
    return exc.message[:300]
