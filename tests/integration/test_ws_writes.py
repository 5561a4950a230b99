"""The service's WebSocket protocol writes the messages of one event-loop turn together (ws_protocol divergence 7).

A tiny ASGI app sends messages back to back, then one after a pause, then closes; the protocol is the
service's, with its transport's writes counted. A real ``websockets`` client reads them.
"""

from __future__ import annotations

import asyncio
from asyncio import Transport
from typing import Any, cast

import websockets

from service.api.ws_protocol import WebSocketProtocol
from tests.support.live_server import CountedTransport, serve

BACK_TO_BACK = 5


WRITES: list[bytes] = []


class _CountingProtocol(WebSocketProtocol):
    def connection_made(self, transport: Any) -> None:
        super().connection_made(cast("Transport", CountedTransport(transport, WRITES)))


async def _app(scope: dict[str, Any], receive: Any, send: Any) -> None:
    await receive()  # websocket.connect
    await send({"type": "websocket.accept"})
    for i in range(BACK_TO_BACK):
        await send({"type": "websocket.send", "text": f"event {i}"})
    await asyncio.sleep(0.05)
    await send({"type": "websocket.send", "text": "later"})
    await send({"type": "websocket.send", "text": "last"})
    await send({"type": "websocket.close", "code": 1000})


async def _read_all(url: str) -> list[str | bytes]:
    async with websockets.connect(url, compression=None) as client:  # uncompressed: the frames are readable
        return [message async for message in client]


async def test_messages_sent_in_one_turn_leave_in_one_write_in_order() -> None:
    WRITES.clear()
    async with serve(_app, ws=_CountingProtocol, lifespan="off") as url:
        received = await _read_all(url.replace("http", "ws") + "/ws")
    assert received == [f"event {i}" for i in range(BACK_TO_BACK)] + ["later", "last"]
    frames = WRITES[1:]  # WRITES[0] is the handshake's answer
    assert len(frames) == 2, [len(w) for w in WRITES]  # the five, then "later" and "last" with the close
    assert all(f"event {i}".encode() in frames[0] for i in range(BACK_TO_BACK))
    assert frames[1].index(b"later") < frames[1].index(b"last")
    assert frames[1].endswith(b"\x88\x02\x03\xe8")  # the close frame (code 1000) comes after them
