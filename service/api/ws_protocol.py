"""The WebSocket protocol the service runs under uvicorn: websockets-sansio, bounded against hostile peers.

``python -m service`` uses it, and so does the README's production command
(``uvicorn ... --ws service.api.ws_protocol:WebSocketProtocol``). It is uvicorn's own
``WebSocketsSansIOProtocol`` with seven intentional divergences, the first five measured by
``tests/integration/test_ws_hostile.py``, the sixth by ``tests/integration/test_shutdown.py``, the
seventh by ``just bench`` (decision 73):

1. **A message cap whatever ``--ws-max-size`` says.** A message over :data:`MAX_MESSAGE_BYTES` (1 MiB)
   is closed with 1009 while it is read; uvicorn's default would buffer up to 16 MiB first.
2. **A frame's payload is let go once its message is queued for the app.** websockets' parser is a
   generator whose local still names the last frame while it waits for the next one, so every idle
   socket kept its last message's bytes (1 MB frames on 100 sockets: +104 MB).
3. **Nothing of a closed connection waits for the cyclic GC.** The protocol, its parser generator
   and the parser's exception (with its traceback) form reference cycles; the service raises the GC
   thresholds (``service.app.tune_gc``), so a closed socket's buffers stayed until a rare full
   collection. On ``connection_lost`` the parser is closed and the exception dropped.
4. **Reading pauses while the write buffer is over its high-water mark.** A peer that sends pings
   and never reads the pongs no longer grows the server's buffers: TCP pushes back on it instead.
5. **A ping budget.** Past :data:`PING_BURST` pings, more than :data:`PINGS_PER_S` a second close the
   socket with 1008 (policy violation): answering a flood of pings took the event loop from every
   other stream.
6. **Shutdown drains.** uvicorn's graceful shutdown closes every open socket with 1012 at once, while
   its runs go on with nobody reading. Here ``shutdown()`` tells the app (``api/drain.py``), which
   keeps streaming for the grace period and closes each socket itself once its runs have sent their
   terminal event (decision 46); a socket not yet accepted, or one whose app does not listen for
   the drain, is closed as uvicorn does.
7. **Messages sent in one turn of the event loop leave in one write.** uvicorn writes each
   ``websocket.send`` to the socket at once, one system call per frame; here the frame is framed at
   once (websockets keeps it, in order, with anything else it has to send) and written by a flush
   at the end of the turn, so a batch of run events sent back to back is one write.
"""

from __future__ import annotations

import time
from typing import Any, Final

from uvicorn.protocols.utils import ClientDisconnected
from uvicorn.protocols.websockets.websockets_sansio_impl import WebSocketsSansIOProtocol
from websockets.exceptions import InvalidState
from websockets.frames import Frame

from service.api.drain import server_drain

MAX_MESSAGE_BYTES: Final = 1024 * 1024
"""The largest message the service reads (ACCEPTANCE W2: 1 MiB; larger ones close with 1009)."""
PINGS_PER_S: Final = 10.0
PING_BURST: Final = 50
POLICY_VIOLATION: Final = 1008


class WebSocketProtocol(WebSocketsSansIOProtocol):
    """uvicorn's websockets-sansio protocol with the divergences of the module docstring."""

    def __init__(self, *args: Any, **kwargs: Any) -> None:
        super().__init__(*args, **kwargs)
        limit = self.config.ws_max_size
        self.conn.max_message_size = MAX_MESSAGE_BYTES if limit > MAX_MESSAGE_BYTES else limit  # divergence 1
        self.writes_paused = False
        self.ping_allowance = float(PING_BURST)
        self.ping_refilled = time.monotonic()
        self.flush_pending = False

    # -- divergence 2 ------------------------------------------------------------------------

    def handle_text(self, event: Frame) -> None:  # noqa: D102
        super().handle_text(event)
        event.data = b""

    def handle_bytes(self, event: Frame) -> None:  # noqa: D102
        super().handle_bytes(event)
        event.data = b""

    def handle_cont(self, event: Frame) -> None:  # noqa: D102
        super().handle_cont(event)
        event.data = b""

    # -- divergence 3 ------------------------------------------------------------------------

    def connection_lost(self, exc: Exception | None) -> None:  # noqa: D102
        super().connection_lost(exc)
        self.conn.parser.close()
        self.conn.parser_exc = None

    # -- divergence 4 ------------------------------------------------------------------------

    def pause_writing(self) -> None:  # noqa: D102
        super().pause_writing()
        self.writes_paused = True
        self.transport.pause_reading()

    def resume_writing(self) -> None:  # noqa: D102
        super().resume_writing()
        self.writes_paused = False
        if not self.read_paused:
            self.transport.resume_reading()

    async def receive(self) -> Any:  # noqa: D102 - uvicorn's, but reading stays paused while writes are
        message = await self.queue.get()
        if self.read_paused and self.queue.empty():
            self.read_paused = False
            if not self.writes_paused:
                self.transport.resume_reading()
        return message

    # -- divergence 5 ------------------------------------------------------------------------

    def handle_ping(self) -> None:  # noqa: D102
        if self.close_sent:
            return  # the rest of a flood that was already refused
        now = time.monotonic()
        self.ping_allowance = min(PING_BURST, self.ping_allowance + (now - self.ping_refilled) * PINGS_PER_S)
        self.ping_refilled = now
        self.ping_allowance -= 1
        if self.ping_allowance < 0:
            self.conn.send_close(POLICY_VIOLATION, "too many pings")
            self.transport.write(b"".join(self.conn.data_to_send()))
            self.close_sent = True
            self.queue.put_nowait({"type": "websocket.disconnect", "code": POLICY_VIOLATION})
            self.transport.close()
            return
        super().handle_ping()

    # -- divergence 6 ------------------------------------------------------------------------

    def shutdown(self) -> None:  # noqa: D102
        drain = server_drain(self.app_state)
        drain.begin()
        if self.handshake_complete and not self.close_sent and drain.heard:
            return  # the app closes the socket once its runs are done
        super().shutdown()

    # -- divergence 7 ------------------------------------------------------------------------

    async def send(self, message: Any) -> None:  # noqa: D102
        if message["type"] != "websocket.send":
            await super().send(message)  # the handshake, a close, an HTTP answer: uvicorn's, unchanged
            return
        await self.writable.wait()
        if self.disconnected:
            raise ClientDisconnected
        if not self.handshake_complete or self.close_sent or self.initial_response is not None:
            await super().send(message)  # a message out of turn: uvicorn's answer to it
            return
        try:
            if (data := message.get("bytes")) is not None:
                self.conn.send_binary(data)
            else:
                self.conn.send_text(message["text"].encode())
        except InvalidState as exc:
            raise ClientDisconnected from exc
        if not self.flush_pending:
            self.flush_pending = True
            self.loop.call_soon(self.flush)

    def flush(self) -> None:
        """Write what websockets holds to send (frames of this turn; a ping's or close's write takes it too)."""
        self.flush_pending = False
        data = self.conn.data_to_send()
        if data and not self.transport.is_closing():
            self.transport.write(b"".join(data))
