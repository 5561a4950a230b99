"""The HTTP protocol the service runs under uvicorn: httptools, with a bounded kernel send buffer.

``python -m service`` uses it, and so does the README's production command
(``uvicorn ... --http service.api.http_protocol:HttpProtocol``). It is uvicorn's own
``HttpToolsProtocol`` with two intentional divergences.

1. Each connection's socket gets a fixed send buffer of :data:`SEND_BUFFER_BYTES` instead of
   Linux's autotuned one (up to 4 MB, ``net.ipv4.tcp_wmem``).
2. What a connection writes in one turn of the event loop leaves in one write (:class:`_TurnWriter`):
   uvicorn writes each ASGI message at once, one system call each, and on loopback or a busy
   host a write is dear (the kernel's TCP path runs in it). A short run's stream ends with its
   last events and the end of the chunked body in the same turn, and a response answered at
   once has its head and body together; each such pair is one write fewer. Order is kept: every
   write of the connection goes through the same buffer, and it is written before a close.
   A connection upgraded to WebSocket hands the WebSocket protocol the socket's own transport
   (that protocol groups its frames itself, ``api/ws_protocol.py`` divergence 7).

Why 1: a client that stops reading an event stream is noticed only once a send blocks, and a send
blocks only once the kernel's buffer and the transport's are full. With autotuning, a stalled
reader of a 30 KB/s stream had 2.7 MB queued for it and was dropped after 105 s, though the send
timeout was 10 s; with this buffer its send blocks within seconds and it costs the service about
0.2 MB (``tests/integration/test_sse_stall.py``). Connections upgraded to WebSocket keep the same
socket, so a stalled WebSocket reader is bounded the same way.

The cost of 1: one connection cannot have more than this buffer in flight, so a single large response
over a long round trip is slower (256 KB per round trip: 2.5 MB/s at 100 ms). Event streams and
JSON answers of this service are far below that.

``shutdown()`` (uvicorn's graceful shutdown begins) also tells the app, so that it drains its streams
(``api/drain.py``); uvicorn's own behaviour is kept (idle connections close, busy ones after their
response).
"""

from __future__ import annotations

import asyncio
import socket
from typing import Any, Final, cast

from uvicorn.protocols.http.httptools_impl import HttpToolsProtocol

from service.api.drain import server_drain

SEND_BUFFER_BYTES: Final = 64 * 1024
"""Requested ``SO_SNDBUF`` (Linux doubles it for its own bookkeeping)."""


class _TurnWriter:
    """A connection's transport whose writes of one event-loop turn are joined into one (divergence 2).

    Everything but ``write`` and ``close`` is the socket's transport's own.
    """

    def __init__(self, transport: asyncio.Transport) -> None:
        self.transport = transport
        self._pending: list[bytes] = []
        self._loop = asyncio.get_running_loop()

    def write(self, data: bytes) -> None:
        if not self._pending:
            self._loop.call_soon(self.flush)
        self._pending.append(data)

    def flush(self) -> None:
        """Write what this turn wrote (nothing once the socket is closing: it cannot take it)."""
        if self._pending:
            data = b"".join(self._pending)
            self._pending.clear()
            if not self.transport.is_closing():
                self.transport.write(data)

    def close(self) -> None:
        self.flush()
        self.transport.close()

    def __getattr__(self, name: str) -> Any:
        return getattr(self.transport, name)


class HttpProtocol(HttpToolsProtocol):
    """uvicorn's httptools protocol with the divergences of the module docstring."""

    def connection_made(self, transport: asyncio.Transport) -> None:  # type: ignore[override]  # noqa: D102
        sock: socket.socket | None = transport.get_extra_info("socket")
        if sock is not None and sock.family in (socket.AF_INET, socket.AF_INET6):
            sock.setsockopt(socket.SOL_SOCKET, socket.SO_SNDBUF, SEND_BUFFER_BYTES)
        super().connection_made(cast("asyncio.Transport", _TurnWriter(transport)))
        server_drain(self.app_state)  # in the state each request's scope copies, for DrainMiddleware

    def handle_websocket_upgrade(self) -> None:  # noqa: D102
        writer = cast("_TurnWriter", self.transport)
        writer.flush()
        self.transport = writer.transport
        super().handle_websocket_upgrade()

    def shutdown(self) -> None:  # noqa: D102
        server_drain(self.app_state).begin()
        super().shutdown()
