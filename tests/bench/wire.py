"""Raw SSE and WebSocket stream readers on asyncio protocols, cheap enough not to be the bottleneck.

Each reader follows one stream and fills a :class:`Tally`: when the request was written, when
each token event arrived (one ``time.monotonic()`` per socket read), the text received, and the
first error. Two event dialects are understood:

- ``events``: the service's (and the floor's) JSON events; tokens are ``text.delta``, the stream
  ends with ``run.completed`` (``run.failed`` / ``run.cancelled`` / ``error`` are errors).
- ``openai``: ``chat.completion.chunk`` JSON as forwarded by the relay; tokens are chunks with a
  non-empty ``delta.content``; the stream ends with ``[DONE]``.

The SSE reader speaks HTTP/1.1 with chunked bodies; the WebSocket reader speaks RFC 6455 with
masked client frames, answers pings, and offers no extensions (so no compression).
"""

from __future__ import annotations

import asyncio
import base64
import os
import time
from typing import Any, Literal, cast

import msgspec

Kind = Literal["events", "openai"]


class _Event(msgspec.Struct):
    type: str = ""
    delta: Any = None
    error: Any = None


class _Delta(msgspec.Struct):
    content: str | None = None


class _Choice(msgspec.Struct):
    delta: _Delta | None = None


class _Chunk(msgspec.Struct):
    choices: list[_Choice] = []


_EVENT = msgspec.json.Decoder(_Event)
_CHUNK = msgspec.json.Decoder(_Chunk)
_FAILED = {"run.failed", "run.cancelled", "error"}


class Tally:
    """What one stream delivered."""

    __slots__ = ("chars", "error", "gaps", "t_first", "t_last", "t_sent", "terminal", "tokens")

    def __init__(self) -> None:
        self.t_sent = 0.0
        self.t_first: float | None = None
        self.t_last = 0.0
        self.tokens = 0
        self.chars = 0
        self.gaps: list[float] = []
        self.error: str | None = None
        self.terminal = False

    def fail(self, why: str) -> None:
        """Record ``why`` unless an earlier error is already recorded."""
        if self.error is None:
            self.error = why

    def token(self, text: str, now: float) -> None:
        """Count one token event arriving at ``now``."""
        if self.t_first is None:
            self.t_first = now
        else:
            self.gaps.append(now - self.t_last)
        self.t_last = now
        self.tokens += 1
        self.chars += len(text)

    def payload(self, kind: Kind, data: bytes, now: float) -> None:
        """Classify one SSE ``data`` payload or one WebSocket text message."""
        if kind == "openai":
            if data == b"[DONE]":
                self.terminal = True
                return
            for choice in _CHUNK.decode(data).choices:
                if choice.delta is not None and choice.delta.content:
                    self.token(choice.delta.content, now)
            return
        event = _EVENT.decode(data)
        if event.type == "text.delta":
            self.token(event.delta, now)
        elif event.type == "run.completed":
            self.terminal = True
        elif event.type in _FAILED:
            self.terminal = event.type != "error"
            self.fail(f"{event.type}: {data[:200].decode(errors='replace')}")


class _Reader(asyncio.Protocol):
    """Shared plumbing: the transport, the input buffer and the 'finished' future."""

    def __init__(self, kind: Kind, tally: Tally) -> None:
        self.kind: Kind = kind
        self.tally = tally
        self.buf: bytearray = bytearray()
        self.transport: asyncio.Transport | None = None
        self.finished: asyncio.Future[None] = asyncio.get_running_loop().create_future()

    def connection_made(self, transport: asyncio.BaseTransport) -> None:
        self.transport = cast(asyncio.Transport, transport)  # uvloop's transports do not subclass asyncio's

    def connection_lost(self, exc: Exception | None) -> None:
        if not self.tally.terminal:
            self.tally.fail(f"connection lost: {exc!r}")
        self._finish()

    def _finish(self) -> None:
        if not self.finished.done():
            self.finished.set_result(None)

    def close(self) -> None:
        """Close the connection (flushing what was written)."""
        if self.transport is not None:
            self.transport.close()


class SSEReader(_Reader):
    """One HTTP request whose response is an SSE stream."""

    def __init__(self, kind: Kind, tally: Tally) -> None:
        super().__init__(kind, tally)
        self.head_done = False
        self.chunked = False
        self.sse = b""

    def start(self, request: bytes) -> None:
        """Write the request; the clock for this stream starts now."""
        assert self.transport is not None
        self.tally.t_sent = time.monotonic()
        self.transport.write(request)

    def data_received(self, data: bytes) -> None:
        now = time.monotonic()
        self.buf += data
        if not self.head_done and not self._head():
            return
        if self.chunked:
            self._chunks(now)
        else:
            self._sse(bytes(self.buf), now)
            self.buf.clear()

    def _head(self) -> bool:
        end = self.buf.find(b"\r\n\r\n")
        if end < 0:
            return False
        head = bytes(self.buf[:end]).lower()
        del self.buf[: end + 4]
        self.head_done = True
        self.chunked = b"transfer-encoding: chunked" in head
        status = head.split(b" ", 2)[1]
        if status != b"200":
            self.tally.fail(f"HTTP {status.decode()}: {bytes(self.buf[:200]).decode(errors='replace')}")
            self.close()
            return False
        return True

    def _chunks(self, now: float) -> None:
        buf = self.buf
        while True:
            eol = buf.find(b"\r\n")
            if eol < 0:
                return
            size = int(bytes(buf[:eol]).split(b";")[0], 16)
            if size == 0:
                self._end()
                return
            if len(buf) < eol + size + 4:
                return
            self._sse(bytes(buf[eol + 2 : eol + 2 + size]), now)
            del buf[: eol + size + 4]

    def _sse(self, text: bytes, now: float) -> None:
        if b"\r" in text:
            text = text.replace(b"\r\n", b"\n")
        *blocks, self.sse = (self.sse + text).split(b"\n\n")
        for block in blocks:
            data = [line[5:].removeprefix(b" ") for line in block.split(b"\n") if line.startswith(b"data:")]
            if data:
                self.tally.payload(self.kind, b"\n".join(data), now)

    def _end(self) -> None:
        if not self.tally.terminal:
            self.tally.fail("stream ended without a terminal event")
        self._finish()
        self.close()


class WSReader(_Reader):
    """One WebSocket connection carrying one stream."""

    def __init__(self, kind: Kind, tally: Tally) -> None:
        super().__init__(kind, tally)
        self.open: asyncio.Future[None] = asyncio.get_running_loop().create_future()
        self.fragments = b""
        self.closing = False

    def handshake(self, host: str, path: str) -> asyncio.Future[None]:
        """Send the upgrade request; the returned future resolves on ``101``."""
        assert self.transport is not None
        key = base64.b64encode(os.urandom(16)).decode()
        self.transport.write(
            f"GET {path} HTTP/1.1\r\nHost: {host}\r\nUpgrade: websocket\r\nConnection: Upgrade\r\n"
            f"Sec-WebSocket-Key: {key}\r\nSec-WebSocket-Version: 13\r\n\r\n".encode()
        )
        return self.open

    def start(self, text: str) -> None:
        """Send the first message (``run.create``); the clock for this stream starts now."""
        self.tally.t_sent = time.monotonic()
        self.send(0x1, text.encode())

    def send(self, opcode: int, payload: bytes) -> None:
        """Send one masked frame."""
        assert self.transport is not None
        n = len(payload)
        if n < 126:
            head = bytes((0x80 | opcode, 0x80 | n))
        elif n < 1 << 16:
            head = bytes((0x80 | opcode, 0x80 | 126)) + n.to_bytes(2, "big")
        else:
            head = bytes((0x80 | opcode, 0x80 | 127)) + n.to_bytes(8, "big")
        mask = os.urandom(4)
        masked = int.from_bytes(payload, "big") ^ (int.from_bytes(mask * ((n + 3) // 4), "big") >> (8 * (-n % 4)))
        self.transport.write(head + mask + masked.to_bytes(n, "big"))

    def data_received(self, data: bytes) -> None:
        now = time.monotonic()
        self.buf += data
        if not self.open.done():
            end = self.buf.find(b"\r\n\r\n")
            if end < 0:
                return
            status = bytes(self.buf[:end]).split(b" ", 2)[1]
            del self.buf[: end + 4]
            if status != b"101":
                self.open.set_exception(ConnectionError(f"WebSocket handshake got HTTP {status.decode()}"))
                self.close()
                return
            self.open.set_result(None)
        self._frames(now)

    def _frames(self, now: float) -> None:
        buf = self.buf
        while len(buf) >= 2:
            n, pos = buf[1] & 0x7F, 2
            if n >= 126:
                pos = 4 if n == 126 else 10
                if len(buf) < pos:
                    return
                n = int.from_bytes(buf[2:pos], "big")
            if len(buf) < pos + n:
                return
            fin, opcode, payload = buf[0] & 0x80, buf[0] & 0x0F, bytes(buf[pos : pos + n])
            del buf[: pos + n]
            self._frame(bool(fin), opcode, payload, now)

    def _frame(self, fin: bool, opcode: int, payload: bytes, now: float) -> None:
        if opcode in (0x0, 0x1, 0x2):
            self.fragments += payload
            if fin:
                message, self.fragments = self.fragments, b""
                self._message(message, now)
        elif opcode == 0x8:
            code = int.from_bytes(payload[:2], "big") if len(payload) >= 2 else 1005
            if not self.tally.terminal:
                self.tally.fail(f"WebSocket closed by the server: {code} {payload[2:].decode(errors='replace')}")
            self._close_handshake()
            self.close()
            self._finish()
        elif opcode == 0x9:
            self.send(0xA, payload)

    def _message(self, message: bytes, now: float) -> None:
        self.tally.payload(self.kind, message, now)
        if self.tally.terminal:
            self._close_handshake()
            self._finish()

    def _close_handshake(self) -> None:
        if not self.closing:
            self.closing = True
            self.send(0x8, (1000).to_bytes(2, "big"))
