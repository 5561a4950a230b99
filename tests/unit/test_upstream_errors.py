"""The upstream error table (service/engine/upstream_errors.py): each failure's code, most specific first.

The codes are API (DESIGN's error codes, the ``run.failed`` event's ``error.code``); the messages are
not, so only what every message must carry is checked here.
"""

from __future__ import annotations

import httpx2
import msgspec
import openai
import pytest

from service.engine.state import InvalidOutputError, UpstreamChunkError, UpstreamStreamEndedError
from service.engine.upstream_errors import UPSTREAM_ERRORS, error_info

REQUEST = httpx2.Request("POST", "http://127.0.0.1:9/v1/chat/completions")


def status_error(cls: type[openai.APIStatusError], status: int) -> openai.APIStatusError:
    response = httpx2.Response(status, request=REQUEST, json={"error": {"message": "no"}})
    return cls(f"Error code: {status}", response=response, body={"message": "no"})


def decode_error() -> msgspec.DecodeError:
    try:
        msgspec.json.decode(b"{not json")
    except msgspec.DecodeError as exc:
        return exc
    raise AssertionError("decoded")


TABLE: list[tuple[BaseException, str]] = [
    # A timeout is a connection error in the SDK and a transport error in httpx2: it must win over both.
    (openai.APITimeoutError(request=REQUEST), "timeout"),
    (httpx2.ReadTimeout("read timed out", request=REQUEST), "timeout"),
    (httpx2.ConnectTimeout("connect timed out", request=REQUEST), "timeout"),
    # A 429 is a status error: rate_limited must win over upstream_error.
    (status_error(openai.RateLimitError, 429), "rate_limited"),
    (status_error(openai.InternalServerError, 503), "upstream_error"),
    (status_error(openai.AuthenticationError, 401), "upstream_error"),
    (status_error(openai.BadRequestError, 400), "upstream_error"),
    (openai.APIConnectionError(request=REQUEST), "upstream_error"),
    (httpx2.ConnectError("refused", request=REQUEST), "upstream_error"),
    (httpx2.RemoteProtocolError("peer closed the connection mid-body", request=REQUEST), "upstream_error"),
    (httpx2.StreamClosed(), "upstream_error"),
    (decode_error(), "upstream_error"),
    (UpstreamChunkError("overloaded"), "upstream_error"),
    (UpstreamStreamEndedError("the upstream stream ended before the completion finished"), "upstream_error"),
    (InvalidOutputError("structured output does not match the schema: 'n' is a required property"), "invalid_output"),
]


@pytest.mark.parametrize(("exc", "code"), TABLE, ids=[f"{type(e).__name__}-{c}" for e, c in TABLE])
def test_each_upstream_failure_has_its_code_and_a_message(exc: BaseException, code: str) -> None:
    info = error_info(exc)
    assert info.code == code
    assert info.message
    assert isinstance(exc, UPSTREAM_ERRORS)  # the engine catches it, so it becomes run.failed with this code


@pytest.mark.parametrize("status", [400, 401, 404, 500, 503])
def test_a_status_error_says_which_status(status: int) -> None:
    assert str(status) in error_info(status_error(openai.APIStatusError, status)).message


@pytest.mark.parametrize("exc", [ValueError("a bug, with details"), KeyError("run-secret"), RuntimeError("x")])
def test_anything_else_is_internal_and_tells_nothing_of_itself(exc: BaseException) -> None:
    info = error_info(exc)
    assert info.code == "internal"
    assert str(exc).strip("'") not in info.message
    assert not isinstance(exc, UPSTREAM_ERRORS)  # the engine lets it through to the run manager's crash path
