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
    """The typed error a client sees for an upstream failure: the service's own words only.

    An upstream's error text can echo what it was sent (a 401 that quotes the API key, a 400 that
    quotes the prompt), so none of it is relayed: ``upstream_detail`` gives it to the server log.
    """
    match exc:
        case openai.APITimeoutError() | httpx2.TimeoutException():
            return ErrorInfo("timeout", "the upstream did not answer in time")
        case openai.RateLimitError():
            return ErrorInfo("rate_limited", "the upstream is rate limiting requests")
        case openai.APIStatusError():
            return ErrorInfo("upstream_error", f"the upstream answered {exc.status_code}")
        case openai.APIConnectionError() | httpx2.HTTPError() | httpx2.StreamError():
            return ErrorInfo("upstream_error", f"the upstream connection failed: {type(exc).__name__}")
        case msgspec.DecodeError():
            return ErrorInfo("upstream_error", "the upstream sent a chunk that is not valid JSON")
        case UpstreamStreamEndedError():
            return ErrorInfo("upstream_error", str(exc))
        case UpstreamChunkError():
            return ErrorInfo("upstream_error", "the upstream reported an error in the stream")
        case InvalidOutputError():
            return ErrorInfo("invalid_output", str(exc))
        case _:
            return ErrorInfo("internal", "an internal error stopped the run")


def upstream_detail(exc: BaseException) -> str:
    """What the upstream said, for the server log (redacted there like every log line)."""
    if isinstance(exc, openai.APIStatusError):
        body = exc.body if exc.body is not None else exc.message
        return f"{exc.status_code} {str(body)[:_DETAIL_CHARS]}"
    detail = f"{type(exc).__name__}: {exc}"
    cause = exc.__cause__ or exc.__context__
    if cause is not None and isinstance(exc, openai.APIConnectionError):
        detail += f" ({type(cause).__name__}: {cause})"
    return detail[:_DETAIL_CHARS]


_DETAIL_CHARS = 1000
