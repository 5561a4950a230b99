"""A client that stops reading an event stream is dropped after the send timeout, not megabytes later.

The reader is a raw socket that sends its request and then never reads: nothing in the client
library drains the connection behind the test's back. The server's side is watched through its
open-streams gauge (the service runs in this process), and the drop is one WARNING line.
"""

from __future__ import annotations

import asyncio
import json
import logging
import socket
import time
from collections.abc import AsyncIterator
from typing import Any

from service import metrics
from tests.integration.conftest import Service, ServiceFactory
from tests.support.log_records import recorded
from tests.support.upstream import finish, sleep, text

SEND_TIMEOUT_S = 2.0
WORD = "x" * 1000 + " "


def open_sse_streams() -> float:
    return metrics.OPEN_STREAMS.labels("sse")._value.get()  # pyright: ignore[reportPrivateUsage]


async def stalled_reader(service: Service, chat: str) -> AsyncIterator[socket.socket]:
    loop = asyncio.get_running_loop()
    sock = socket.socket(socket.AF_INET, socket.SOCK_STREAM)
    sock.setblocking(False)
    host, port = service.url.removeprefix("http://").split(":")
    await loop.sock_connect(sock, (host, int(port)))
    body = json.dumps({"message": "hi"}).encode()
    head = (
        f"POST /v1/chats/{chat}/runs HTTP/1.1\r\nhost: {host}\r\ncontent-type: application/json\r\n"
        f"accept: text/event-stream\r\ncontent-length: {len(body)}\r\n\r\n"
    )
    await loop.sock_sendall(sock, head.encode() + body)
    try:
        yield sock
    finally:
        sock.close()


async def test_a_reader_that_stops_reading_is_dropped_after_the_send_timeout(make_service: ServiceFactory) -> None:
    service = await make_service(sse_send_timeout_s=SEND_TIMEOUT_S, shutdown_grace_s=0.5)
    # A handler on each logger itself: each one's own filters apply before its handlers.
    with recorded("uvicorn.error", "service.sse") as seen:
        chat = await service.create_chat()
        # About 200 KB/s of events for 60 s: with Linux's autotuned send buffer (up to 4 MB) the
        # reader took tens of seconds to be noticed.
        steps: list[Any] = []
        for _ in range(12_000):
            steps += [*text(WORD, pieces=1), sleep(0.005)]
        service.upstream.enqueue(*steps, finish())
        before = open_sse_streams()
        readers = stalled_reader(service, chat)
        await anext(readers)
        async with asyncio.timeout(5):
            while open_sse_streams() == before:
                await asyncio.sleep(0.01)
        opened = time.monotonic()
        async with asyncio.timeout(30):
            while open_sse_streams() > before:
                await asyncio.sleep(0.05)
        dropped_after = time.monotonic() - opened
        await readers.aclose()
        # The send timeout, an eighth more for the watchdog, and the time to fill the client's receive
        # buffer plus the server's 64 KB send buffer and transport buffer at 200 KB/s (about 1.5 s).
        assert dropped_after < SEND_TIMEOUT_S * 1.125 + 3.0, dropped_after
    # One WARNING line that says what happened; before, uvicorn's ERROR "Exception in ASGI application"
    # with the SendTimeoutError traceback, per stalled client.
    warnings = [r for r in seen.records if r.levelno >= logging.WARNING]
    lines = [(r.name, r.levelname, r.getMessage(), r.exc_info is not None) for r in warnings]
    assert lines == [
        (
            "service.sse",
            "WARNING",
            f"POST /v1/chats/{chat}/runs: the client read nothing for {SEND_TIMEOUT_S:g} s "
            "(SERVICE_SSE_SEND_TIMEOUT_S); its stream is dropped",
            False,
        )
    ]
