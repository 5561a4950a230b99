"""The service's HTTP protocol writes what a connection sends in one event-loop turn at once (its divergence 2).

A tiny ASGI app streams a chunked body: its head and three parts back to back, then, after a pause,
two parts and the end. The protocol is the service's, with its socket's writes counted; a real
HTTP client (httpx2) reads the response, on a kept-alive connection and on one it asks to close.
"""

from __future__ import annotations

import asyncio
from typing import Any

import httpx2
import pytest
import websockets

from service.api.http_protocol import HttpProtocol
from tests.support.live_server import CountedTransport, serve

WRITES: list[bytes] = []


class _CountingProtocol(HttpProtocol):
    def connection_made(self, transport: Any) -> None:  # type: ignore[override]
        super().connection_made(CountedTransport(transport, WRITES))


async def _app(scope: dict[str, Any], receive: Any, send: Any) -> None:
    if scope["type"] == "websocket":
        await receive()
        await send({"type": "websocket.accept"})
        await send({"type": "websocket.send", "text": "hello"})
        await send({"type": "websocket.close", "code": 1000})
        return
    await receive()
    await send({"type": "http.response.start", "status": 200, "headers": [(b"content-type", b"text/plain")]})
    for part in (b"one ", b"two ", b"three "):
        await send({"type": "http.response.body", "body": part, "more_body": True})
    await asyncio.sleep(0.05)
    await send({"type": "http.response.body", "body": b"four ", "more_body": True})
    await send({"type": "http.response.body", "body": b"five", "more_body": False})


@pytest.mark.parametrize("connection", ["keep-alive", "close"])
async def test_messages_sent_in_one_turn_leave_in_one_write_in_order(connection: str) -> None:
    WRITES.clear()
    async with serve(_app, http=_CountingProtocol, lifespan="off") as url, httpx2.AsyncClient() as client:
        response = await client.get(url + "/", headers={"connection": connection})
    assert response.text == "one two three four five"
    assert len(WRITES) == 2, WRITES  # the head and three parts, then the last two and the body's end
    assert WRITES[0].startswith(b"HTTP/1.1 200 OK\r\n")
    assert WRITES[0].index(b"one") < WRITES[0].index(b"two") < WRITES[0].index(b"three")
    assert WRITES[1].index(b"four") < WRITES[1].index(b"five") < WRITES[1].index(b"0\r\n\r\n")
    assert WRITES[1].endswith(b"0\r\n\r\n")


async def test_an_upgraded_connection_writes_through_the_websocket_protocol() -> None:
    WRITES.clear()
    async with (
        serve(_app, http=_CountingProtocol, lifespan="off") as url,
        websockets.connect(url.replace("http", "ws") + "/ws") as ws,
    ):
        assert [message async for message in ws] == ["hello"]
    assert WRITES[0].startswith(b"HTTP/1.1 101")  # the handshake's answer, on the socket's own transport
