"""Typed event streams for the Python client that openapi-python-client generates from openapi/openapi.json.

The generated ``create_run_stream`` and ``stream_run`` functions read the whole response as one JSON
document, so they cannot follow a run. This module builds the same requests (with the generated
functions' own request builders) on the generated client's httpx client (its base URL, its bearer
token, its timeout), reads the Server-Sent Events as they arrive, and yields each event as an instance
of the generated model class its ``type`` names (the discriminator mapping of the API document, kept
equal to it by the suite). An event type this module does not know (a newer service) is skipped, as
the API asks of clients; its ``seq`` still counts for resuming.

It needs only the generated package, installed or on the path as ``chat_service_client``, and httpx
(which that package depends on). Copy this file next to it::

    openapi-python-client generate --path openapi/openapi.json --output-path chat_service_client --meta none

Resume after a cut with :func:`stream_run` from the last ``seq`` received (the run goes on without its
stream). A stream can also end before its terminal event when the service's run backend stays down
(``: runs_unavailable``): resume the same way once it is back.
"""

from __future__ import annotations

import json
from collections.abc import AsyncIterator, Iterator
from typing import Any

import httpx
from chat_service_client import AuthenticatedClient, Client
from chat_service_client.api.chats import create_run_stream as _create_run_stream
from chat_service_client.api.runs import stream_run as _stream_run
from chat_service_client.models import (
    ErrorEnvelope,
    OutputDone,
    OutputPartial,
    ReasoningDelta,
    ReasoningDone,
    RefusalDelta,
    RefusalDone,
    RunCancelled,
    RunCompleted,
    RunCreate,
    RunFailed,
    RunSnapshot,
    RunStarted,
    StepDone,
    StepStarted,
    TextDelta,
    TextDone,
    ToolCallDelta,
    ToolCallDone,
    ToolCallStarted,
    ToolResult,
    Usage,
)
from chat_service_client.types import UNSET

__all__ = ["EVENT_TYPES", "TERMINAL", "Event", "StreamError", "astart_run", "astream_run", "start_run", "stream_run"]

Event = (
    RunStarted
    | StepStarted
    | StepDone
    | TextDelta
    | TextDone
    | ReasoningDelta
    | ReasoningDone
    | ToolCallStarted
    | ToolCallDelta
    | ToolCallDone
    | ToolResult
    | OutputPartial
    | OutputDone
    | RefusalDelta
    | RefusalDone
    | Usage
    | RunSnapshot
    | RunCompleted
    | RunCancelled
    | RunFailed
)
"""A run's event: match it by class (``case TextDelta(delta=delta):``)."""

EVENT_TYPES: dict[str, type[Event]] = {
    "run.started": RunStarted,
    "step.started": StepStarted,
    "step.done": StepDone,
    "text.delta": TextDelta,
    "text.done": TextDone,
    "reasoning.delta": ReasoningDelta,
    "reasoning.done": ReasoningDone,
    "tool_call.started": ToolCallStarted,
    "tool_call.delta": ToolCallDelta,
    "tool_call.done": ToolCallDone,
    "tool.result": ToolResult,
    "output.partial": OutputPartial,
    "output.done": OutputDone,
    "refusal.delta": RefusalDelta,
    "refusal.done": RefusalDone,
    "usage": Usage,
    "run.snapshot": RunSnapshot,
    "run.completed": RunCompleted,
    "run.cancelled": RunCancelled,
    "run.failed": RunFailed,
}
"""The event stream's discriminator mapping: ``type`` -> the generated model class."""

TERMINAL = (RunCompleted, RunCancelled, RunFailed)
"""The classes of the events that end a run's stream."""

# The generated functions' own request builders (URL, path quoting, query, headers, JSON body, as the
# document says); only reading the response differs, so they are reused rather than written again.
_START = _create_run_stream._get_kwargs  # pyright: ignore[reportPrivateUsage]
_FOLLOW = _stream_run._get_kwargs  # pyright: ignore[reportPrivateUsage]


class StreamError(Exception):
    """The service refused the stream (any status but 200); ``error`` is its error body."""

    def __init__(self, status_code: int, error: ErrorEnvelope) -> None:
        super().__init__(f"{status_code} {error.error.code}: {error.error.message}")
        self.status_code = status_code
        self.error = error


def start_run(
    client: AuthenticatedClient | Client, chat_id: str, body: RunCreate, *, idempotency_key: str | None = None
) -> Iterator[Event]:
    """Start a run on ``chat_id`` (``POST /v1/chats/{chat_id}/runs/stream``) and yield its events as they come."""
    request = _START(chat_id, body=body, idempotency_key=UNSET if idempotency_key is None else idempotency_key)
    return _events(client.get_httpx_client(), request)


def stream_run(
    client: AuthenticatedClient | Client, run_id: str, *, after: int = 0, snapshot: bool = False
) -> Iterator[Event]:
    """Yield the run's events after seq ``after`` (``GET /v1/runs/{run_id}/stream``), then live ones.

    ``after`` is the ``seq`` of the last event received (sent as ``Last-Event-ID``); a finished run with
    nothing after it yields nothing. ``snapshot`` starts with one ``RunSnapshot`` of the run so far.
    """
    request = _FOLLOW(run_id, last_event_id=str(after), snapshot=snapshot)
    return _events(client.get_httpx_client(), request)


def astart_run(
    client: AuthenticatedClient | Client, chat_id: str, body: RunCreate, *, idempotency_key: str | None = None
) -> AsyncIterator[Event]:
    """:func:`start_run` on the client's ``httpx.AsyncClient``."""
    request = _START(chat_id, body=body, idempotency_key=UNSET if idempotency_key is None else idempotency_key)
    return _aevents(client.get_async_httpx_client(), request)


def astream_run(
    client: AuthenticatedClient | Client, run_id: str, *, after: int = 0, snapshot: bool = False
) -> AsyncIterator[Event]:
    """:func:`stream_run` on the client's ``httpx.AsyncClient``."""
    request = _FOLLOW(run_id, last_event_id=str(after), snapshot=snapshot)
    return _aevents(client.get_async_httpx_client(), request)


def _events(http: httpx.Client, request: dict[str, Any]) -> Iterator[Event]:
    with http.stream(**request) as response:
        if response.status_code != 200:
            raise _refused(response, response.read())
        frames = _Frames()
        for line in response.iter_lines():
            event = frames.feed(line)
            if event is not None:
                yield event


async def _aevents(http: httpx.AsyncClient, request: dict[str, Any]) -> AsyncIterator[Event]:
    async with http.stream(**request) as response:
        if response.status_code != 200:
            raise _refused(response, await response.aread())
        frames = _Frames()
        async for line in response.aiter_lines():
            event = frames.feed(line)
            if event is not None:
                yield event


def _refused(response: httpx.Response, content: bytes) -> StreamError:
    return StreamError(response.status_code, ErrorEnvelope.from_dict(json.loads(content)))


class _Frames:
    """Server-Sent Events, one line at a time: ``data:`` lines up to a blank line make one event.

    The service sends one ``data:`` line per event (its JSON), an ``id:`` (the ``seq``), a ``retry:``
    frame first and comment lines (``:``) as heartbeats, which are ignored here.
    """

    def __init__(self) -> None:
        self._data: list[str] = []

    def feed(self, line: str) -> Event | None:
        """The event that ``line`` completes, if any."""
        if line.startswith("data:"):
            self._data.append(line.removeprefix("data:").removeprefix(" "))
            return None
        if line or not self._data:
            return None
        payload: dict[str, Any] = json.loads("\n".join(self._data))
        self._data.clear()
        event_type = EVENT_TYPES.get(payload.get("type", ""))
        return None if event_type is None else event_type.from_dict(payload)
