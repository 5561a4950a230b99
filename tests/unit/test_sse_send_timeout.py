"""The SSE response's send timeout (a watchdog instead of sse-starlette's per-send cancel scope)."""

from __future__ import annotations

import asyncio
import time
from collections.abc import AsyncIterator
from typing import Any

import pytest
from sse_starlette.sse import SendTimeoutError

from service.api.streaming import _EventStream  # pyright: ignore[reportPrivateUsage]

SCOPE: dict[str, Any] = {"type": "http", "method": "GET", "path": "/", "headers": [], "query_string": b""}


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
            await asyncio.sleep(0.05)  # 0.3 s in all, each send immediate
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
    async def frames() -> AsyncIterator[bytes]:
        await asyncio.Event().wait()
        yield b""

    async def send(message: dict[str, Any]) -> None:
        return None

    async def receive() -> dict[str, Any]:
        await asyncio.Event().wait()
        return {}

    task = asyncio.create_task(_EventStream(frames(), ping=60, send_timeout=0.1)(SCOPE, receive, send))  # type: ignore[arg-type]
    await asyncio.sleep(0.3)
    task.cancel()
    with pytest.raises(asyncio.CancelledError):
        await task
