"""The SSE response: sse-starlette's parts in two plain tasks, a send-timeout watchdog, shutdown."""

from __future__ import annotations

import asyncio
import time
from collections.abc import AsyncIterator
from typing import Any

import pytest
from sse_starlette.sse import AppStatus, SendTimeoutError

from service.api.streaming import _EventStream  # pyright: ignore[reportPrivateUsage]

SCOPE: dict[str, Any] = {"type": "http", "method": "GET", "path": "/", "headers": [], "query_string": b""}


async def settled() -> None:
    """Return once the callbacks and tasks the event loop already holds have run a few steps.

    A response's helpers are cancelled when it returns; a helper's end reaches its done callback two
    loop iterations later. A cancel it wrongly sent the request's task would arrive within those: this
    waits for loop iterations, not for time, and fails the caller if the task was cancelled.
    """
    for _ in range(10):
        await asyncio.sleep(0)
    task = asyncio.current_task()
    assert task is not None and task.cancelling() == 0


async def test_a_send_blocked_past_the_timeout_ends_the_response() -> None:
    closed = asyncio.Event()
    sent: list[bytes] = []
    stuck = asyncio.Event()

    async def frames() -> AsyncIterator[bytes]:
        try:
            for i in range(1000):
                yield b"data: %d\n\n" % i
        finally:
            closed.set()

    async def send(message: dict[str, Any]) -> None:
        if message["type"] == "http.response.body":
            sent.append(message["body"])
            if len(sent) == 3:
                await stuck.wait()  # the client stopped reading: this send never completes

    async def receive() -> dict[str, Any]:
        await asyncio.Event().wait()  # no disconnect
        return {}

    response = _EventStream(frames(), ping=60, send_timeout=0.2)
    started = time.monotonic()
    with pytest.raises(SendTimeoutError):
        await response(SCOPE, receive, send)  # type: ignore[arg-type]
    assert 0.2 <= time.monotonic() - started < 1.0
    assert len(sent) == 3
    assert closed.is_set()


async def test_a_steady_stream_longer_than_the_timeout_is_not_cut() -> None:
    async def frames() -> AsyncIterator[bytes]:
        for i in range(6):
            await asyncio.sleep(0.05)  # the time is the subject: 0.3 s in all, each send immediate
            yield b"data: %d\n\n" % i

    sent: list[bytes] = []

    async def send(message: dict[str, Any]) -> None:
        if message["type"] == "http.response.body" and message["body"]:
            sent.append(message["body"])

    async def receive() -> dict[str, Any]:
        await asyncio.Event().wait()
        return {}

    await _EventStream(frames(), ping=60, send_timeout=0.1)(SCOPE, receive, send)  # type: ignore[arg-type]
    assert sent == [b"data: %d\n\n" % i for i in range(6)]


async def test_an_outside_cancel_still_cancels() -> None:
    waiting = asyncio.Event()

    async def frames() -> AsyncIterator[bytes]:
        waiting.set()  # the response is streaming: its helpers and watchdog are running
        await asyncio.Event().wait()
        yield b""

    async def send(message: dict[str, Any]) -> None:
        return None

    async def receive() -> dict[str, Any]:
        await asyncio.Event().wait()
        return {}

    task = asyncio.create_task(_EventStream(frames(), ping=60, send_timeout=0.1)(SCOPE, receive, send))  # type: ignore[arg-type]
    async with asyncio.timeout(5):
        await waiting.wait()
    task.cancel()
    with pytest.raises(asyncio.CancelledError):
        await task


def _never_ending_receive() -> Any:
    async def receive() -> dict[str, Any]:
        await asyncio.Event().wait()
        return {}

    return receive


async def test_a_client_disconnect_ends_the_response_quietly_and_closes_the_stream() -> None:
    closed = asyncio.Event()
    gone = asyncio.Event()

    async def frames() -> AsyncIterator[bytes]:
        try:
            yield b"data: 1\n\n"
            await asyncio.Event().wait()  # the run has nothing more yet
            yield b"data: 2\n\n"
        finally:
            closed.set()

    async def send(message: dict[str, Any]) -> None:
        if message.get("body") == b"data: 1\n\n":
            gone.set()

    async def receive() -> dict[str, Any]:
        await gone.wait()
        return {"type": "http.disconnect"}

    await asyncio.wait_for(_EventStream(frames(), ping=60)(SCOPE, receive, send), 2)  # type: ignore[arg-type]
    assert closed.is_set()
    await settled()  # nothing cancels this task once the response has returned


async def test_the_task_goes_on_undisturbed_after_a_complete_response() -> None:
    async def frames() -> AsyncIterator[bytes]:
        yield b"data: 1\n\n"

    sent: list[dict[str, Any]] = []

    async def send(message: dict[str, Any]) -> None:
        sent.append(message)

    await _EventStream(frames(), ping=60, send_timeout=0.02)(SCOPE, _never_ending_receive(), send)  # type: ignore[arg-type]
    await settled()  # the helpers' cancellation
    await asyncio.sleep(0.1)  # the time is the subject: five watchdog periods, which must not fire
    assert [m["type"] for m in sent] == ["http.response.start", "http.response.body", "http.response.body"]
    assert sent[-1] == {"type": "http.response.body", "body": b"", "more_body": False}


async def test_a_disconnect_that_comes_with_the_end_of_the_response_cancels_nothing() -> None:
    ended = asyncio.Event()

    async def frames() -> AsyncIterator[bytes]:
        yield b"data: 1\n\n"

    async def send(message: dict[str, Any]) -> None:
        if message.get("more_body") is False:
            ended.set()  # the client reads the end and hangs up at once
            await asyncio.sleep(0)

    async def receive() -> dict[str, Any]:
        await ended.wait()
        return {"type": "http.disconnect"}

    await _EventStream(frames(), ping=60)(SCOPE, receive, send)  # type: ignore[arg-type]
    await settled()  # the listener's end is seen after the response returned: it cancels nothing


async def test_a_failing_ping_fails_the_response_with_its_error() -> None:
    closed = asyncio.Event()

    async def frames() -> AsyncIterator[bytes]:
        try:
            await asyncio.Event().wait()
            yield b""
        finally:
            closed.set()

    async def send(message: dict[str, Any]) -> None:
        if message["type"] == "http.response.body" and message["body"].startswith(b":"):
            raise OSError("the socket is gone")

    with pytest.raises(OSError, match="the socket is gone"):
        await asyncio.wait_for(_EventStream(frames(), ping=0.05)(SCOPE, _never_ending_receive(), send), 2)  # type: ignore[arg-type]
    assert closed.is_set()


async def test_pings_are_sent_while_the_stream_is_idle_and_stop_with_it() -> None:
    pings: list[bytes] = []
    third_ping = asyncio.Event()

    async def frames() -> AsyncIterator[bytes]:
        await third_ping.wait()  # idle until three pings went out
        yield b"data: 1\n\n"

    async def send(message: dict[str, Any]) -> None:
        if message["type"] == "http.response.body" and message["body"].startswith(b":"):
            pings.append(message["body"])
            if len(pings) == 3:
                third_ping.set()

    async with asyncio.timeout(5):
        await _EventStream(frames(), ping=0.02)(SCOPE, _never_ending_receive(), send)  # type: ignore[arg-type]
    assert all(p.startswith(b": ping - ") for p in pings)
    sent = len(pings)
    await asyncio.sleep(0.1)  # five ping periods: the time is the subject here, nothing is awaited
    assert len(pings) == sent


async def test_server_shutdown_leaves_open_streams_to_the_run_managers_drain() -> None:
    """sse-starlette's exit signal no longer cuts a stream mid-body: it ends when its events end (decision 46)."""
    opened, release = asyncio.Event(), asyncio.Event()
    sent: list[dict[str, Any]] = []

    async def frames() -> AsyncIterator[bytes]:
        opened.set()
        await release.wait()
        yield b"data: last\n\n"

    async def send(message: dict[str, Any]) -> None:
        sent.append(message)

    response = asyncio.create_task(_EventStream(frames(), ping=60)(SCOPE, _never_ending_receive(), send))  # type: ignore[arg-type]
    async with asyncio.timeout(5):
        await opened.wait()
    AppStatus.should_exit = True
    try:
        await asyncio.sleep(1.2)  # sse-starlette looks every 0.5 s: the time is the subject here
        assert not response.done()
        release.set()
        await asyncio.wait_for(response, 2)
    finally:
        AppStatus.should_exit = False
    bodies = [m for m in sent if m["type"] == "http.response.body"]
    assert bodies[-2:] == [
        {"type": "http.response.body", "body": b"data: last\n\n", "more_body": True},
        {"type": "http.response.body", "body": b"", "more_body": False},
    ]
