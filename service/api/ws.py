"""``/v1/ws``: one socket, many runs (multiplexed by ``run_id``), resumable after a reconnect.

Client frames (JSON text): ``run.create``, ``run.resume``, ``run.cancel``, ``ping``.
Server frames: the run events (the same JSON as SSE ``data``), ``run.accepted``,
``run.resumed``, ``run.cancel_ack``, ``pong`` and ``error``. A bad frame gets an
``error`` frame and the socket stays open; so does any failure of a handler
(:mod:`service.api.error_map`: the unexpected ones are logged and answered
``internal``). Closing codes: 1008 when a client sends frames faster than the rate
limit allows (or pings faster than the protocol's ping budget), 1009 for a
message over 1 MiB, 1012 when the service shuts down (once every run the socket
follows has sent its terminal event; reconnect and resume, on another instance
with Redis). A disallowed ``Origin`` never opens a socket: the handshake is
answered 403.

Each followed run has a task of its own that reads the run's log and sends;
a dropped socket cancels those tasks (the runs go on, unless created with
``on_disconnect: "cancel"``).
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import time
from collections.abc import AsyncIterator, Coroutine
from typing import Any, assert_never
from urllib.parse import urlsplit

import msgspec
from litestar import WebSocket, post, websocket
from litestar.connection import ASGIConnection
from litestar.di import NamedDependency
from litestar.exceptions import NotAuthorizedException, WebSocketDisconnect
from litestar.handlers import BaseRouteHandler

from service import metrics
from service.api.auth import BEARER, STREAM_TOKEN_OPT
from service.api.error_map import ErrorFrame, error_frame, field_of
from service.api.nesting import nests_deeper
from service.api.schemas import RunCreate, run_options
from service.api.ws_protocol import MAX_MESSAGE_BYTES
from service.events import AnyEvent, ws_frame
from service.metrics import SKIP_HTTP_METRICS
from service.runs.manager import RunManager
from service.security import Authenticator, Principal, StreamToken
from service.settings import Settings


class CreateFrame(RunCreate, frozen=True, kw_only=True, tag_field="type", tag="run.create", forbid_unknown_fields=True):
    """Start a run on ``chat_id`` (the same options as ``POST /v1/chats/{id}/runs``)."""

    chat_id: str
    client_ref: str | None = None
    """Echoed in ``run.accepted`` and in ``error`` frames, to match answers to requests."""
    idempotency_key: str | None = None


class ResumeFrame(msgspec.Struct, frozen=True, tag_field="type", tag="run.resume", forbid_unknown_fields=True):
    """Follow a run again from after ``after`` (the last seq received).

    With ``snapshot`` (or when ``after`` is older than the events still kept) one ``run.snapshot`` of the
    run so far comes first, then the events after it.
    """

    run_id: str
    after: int = 0
    snapshot: bool = False


class CancelFrame(msgspec.Struct, frozen=True, tag_field="type", tag="run.cancel", forbid_unknown_fields=True):
    """Stop a run."""

    run_id: str


class PingFrame(msgspec.Struct, frozen=True, tag_field="type", tag="ping", forbid_unknown_fields=True):
    """Ask for a ``pong``."""

    nonce: str | int | None = None


ClientFrame = CreateFrame | ResumeFrame | CancelFrame | PingFrame


class RunAccepted(msgspec.Struct, frozen=True, tag_field="type", tag="run.accepted"):
    """A ``run.create`` started (or, for a repeated idempotency key, found) a run; its events follow."""

    client_ref: str | None
    run_id: str
    created: bool


class RunResumed(msgspec.Struct, frozen=True, tag_field="type", tag="run.resumed"):
    """A ``run.resume`` was accepted; events after ``after`` follow unless the run has none left."""

    run_id: str
    after: int
    last_seq: int
    status: str


class RunCancelAck(msgspec.Struct, frozen=True, tag_field="type", tag="run.cancel_ack"):
    """A ``run.cancel`` was carried out, also sent to a socket that does not follow the run.

    ``status`` is the state the run ended in: ``cancelled``, or the state it had already finished in.
    """

    run_id: str
    status: str
    last_seq: int


class Pong(msgspec.Struct, frozen=True, tag_field="type", tag="pong"):
    """The answer to ``ping``."""

    nonce: str | int | None = None


ServerFrame = RunAccepted | RunResumed | RunCancelAck | Pong | ErrorFrame

log = logging.getLogger("service.ws")
_decoder = msgspec.json.Decoder(ClientFrame)
RATE_LIMIT_CLOSE = 1008
MESSAGE_TOO_BIG_CLOSE = 1009
SHUTDOWN_CLOSE = 1012
"""Service restart: the instance drained (decision 46); the client reconnects and resumes."""


def origin_guard(connection: ASGIConnection[Any, Any, Any, Any], _: BaseRouteHandler) -> None:
    """Refuse cross-site WebSocket handshakes: the Origin must be the service's own (scheme too) or allow-listed.

    A refused handshake is never upgraded: the client gets HTTP 403 (no socket, so no close code).
    """
    origin = connection.headers.get("origin")
    if origin is None:
        return  # not a browser
    settings: Settings = connection.app.state.settings
    if origin in settings.allowed_origins:
        return
    parts = urlsplit(origin)
    own_scheme = "https" if connection.scope["scheme"] == "wss" else "http"
    if parts.scheme == own_scheme and parts.netloc == connection.headers.get("host"):
        return
    raise NotAuthorizedException(f"origin {origin!r} is not allowed")


class _Session:
    """One socket's runs and frames."""

    def __init__(
        self, socket: WebSocket[Any, Any, Any], runs: RunManager, settings: Settings, principal: Principal
    ) -> None:
        self.socket = socket
        self.runs = runs
        self.settings = settings
        self.owner = principal.owner
        self.followers: dict[str, asyncio.Task[None]] = {}
        self.tasks: set[asyncio.Task[None]] = set()
        self.send_lock = asyncio.Lock()
        self.tokens = float(settings.ws_frame_burst)
        self.refilled = time.monotonic()
        self.closing: asyncio.Task[None] | None = None
        self.ended = False

    async def send(self, frame: object) -> None:
        # The ASGI event itself: ``send_data`` would only rebuild it (the socket is accepted).
        async with self.send_lock:
            await self.socket.send({"type": "websocket.send", "bytes": None, "text": ws_frame(frame)})

    async def serve(self) -> None:
        unsubscribe = self.runs.on_drain(self._close_if_drained)
        try:
            self._close_if_drained()
            while await self._next_frame():
                pass
        except WebSocketDisconnect:
            return
        finally:
            self.ended = True
            unsubscribe()
            for task in [*self.followers.values(), *self.tasks]:
                task.cancel()
            await asyncio.gather(*self.followers.values(), *self.tasks, return_exceptions=True)
            if self.closing is not None:
                await self.closing

    def _close_if_drained(self) -> None:
        """While the service drains, close the socket once it follows no run and has no frame under way."""
        if self.ended or self.closing is not None or not self.runs.draining:
            return
        if not self.followers and not self.tasks:
            self.closing = asyncio.create_task(self._close_for_shutdown())

    async def _close_for_shutdown(self) -> None:
        with contextlib.suppress(WebSocketDisconnect, RuntimeError):  # the peer may have gone already
            async with self.send_lock:
                await self.socket.close(SHUTDOWN_CLOSE, "the service is shutting down; reconnect")

    async def _next_frame(self) -> bool:
        """Receive and handle one frame; False once the socket is done.

        A function of its own so that nothing holds the frame while the socket waits for the next one:
        in a loop, the last frame (up to the transport's 1 MiB) stayed bound to a local of every idle socket.
        """
        message = await self.socket.receive()
        if message["type"] == "websocket.disconnect":
            return False
        if not self._take_token():
            await self.socket.close(RATE_LIMIT_CLOSE, "too many frames")
            return False
        text = message.get("text")
        if text is not None and len(text) > MAX_MESSAGE_BYTES:  # a server run with a larger --ws-max-size
            await self.socket.close(MESSAGE_TOO_BIG_CLOSE, "message too big")
            return False
        await self._handle(text)
        return True

    def _take_token(self) -> bool:
        now = time.monotonic()
        rate, burst = self.settings.ws_frames_per_s, self.settings.ws_frame_burst
        self.tokens = min(burst, self.tokens + (now - self.refilled) * rate)
        self.refilled = now
        self.tokens -= 1
        return self.tokens >= 0

    async def _handle(self, text: str | None) -> None:
        frame = parse_frame(text, self.settings.ws_max_frame_bytes, self.settings.max_json_depth)
        match frame:
            case ErrorFrame():
                await self.send(frame)
            case CreateFrame():
                self._spawn(self._answering(self._create(frame), frame.client_ref, "run.create"))
            case ResumeFrame():
                self._spawn(self._answering(self._resume(frame), frame.run_id, "run.resume"))
            case CancelFrame():
                self._spawn(self._answering(self._cancel(frame), frame.run_id, "run.cancel"))
            case PingFrame():
                await self.send(Pong(frame.nonce))
            case _:
                assert_never(frame)

    def _spawn(self, work: Coroutine[Any, Any, None]) -> None:
        task: asyncio.Task[None] = asyncio.create_task(work)
        self.tasks.add(task)
        task.add_done_callback(self._task_done)

    def _task_done(self, task: asyncio.Task[None]) -> None:
        self.tasks.discard(task)
        self._close_if_drained()

    async def _answering(self, work: Coroutine[Any, Any, None], ref: str | None, kind: str) -> None:
        """Run a frame's handler; any failure is answered with an ``error`` frame (the unexpected also logged)."""
        try:
            await work
        except WebSocketDisconnect:
            return  # the socket is gone: nobody to answer
        except Exception as exc:
            await self._send_error(error_frame(exc, ref=ref, where=f"websocket {kind}"))

    async def _send_error(self, frame: ErrorFrame) -> None:
        try:
            await self.send(frame)
        except Exception as exc:  # the socket closed meanwhile: what it would have said is in the log
            log.info("websocket: could not send an error frame (%s): %r", frame.code, exc)

    async def _create(self, frame: CreateFrame) -> None:
        options = run_options(frame, self.settings)
        record, created = await self.runs.start_run(frame.chat_id, options, frame.idempotency_key, owner=self.owner)
        events = await self.runs.open_events(record.id, 0, self.owner)
        await self.send(RunAccepted(frame.client_ref, record.id, created))
        if events is not None:
            self._follow(record.id, events)

    async def _resume(self, frame: ResumeFrame) -> None:
        record = await self.runs.get_run(frame.run_id, self.owner)
        events = await self.runs.open_events(frame.run_id, frame.after, self.owner, snapshot=frame.snapshot)
        await self.send(RunResumed(frame.run_id, frame.after, record.last_seq, record.status))
        if events is not None:
            self._follow(frame.run_id, events)

    async def _cancel(self, frame: CancelFrame) -> None:
        record = await self.runs.cancel(frame.run_id, self.owner)
        await self.send(RunCancelAck(record.id, record.status, record.last_seq))

    def _follow(self, run_id: str, events: AsyncIterator[list[AnyEvent]]) -> None:
        previous = self.followers.pop(run_id, None)
        if previous is not None:
            previous.cancel()
        task = asyncio.create_task(self._answering(self._pump(events), run_id, "events"))
        self.followers[run_id] = task
        task.add_done_callback(lambda t: self._follower_done(run_id, t))

    def _follower_done(self, run_id: str, task: asyncio.Task[None]) -> None:
        if self.followers.get(run_id) is task:
            del self.followers[run_id]
        self._close_if_drained()

    async def _pump(self, batches: AsyncIterator[list[AnyEvent]]) -> None:
        async for batch in batches:
            for event in batch:
                await self.send(event)


def parse_frame(text: str | None, max_bytes: int, max_depth: int = 64) -> ClientFrame | ErrorFrame:
    """Decode one client frame, or say what is wrong with it (``text`` is None for a binary frame).

    A frame nesting deeper than ``max_depth`` is refused before it is decoded (decoding recurses per level).
    ``detail.field`` names the field a validation error is about.
    """
    if text is None:
        return ErrorFrame("invalid_frame", "binary frames are not supported; send JSON text")
    if len(text) > max_bytes or (4 * len(text) > max_bytes and len(text.encode()) > max_bytes):
        return ErrorFrame("frame_too_large", f"frame is larger than {max_bytes} bytes")
    if nests_deeper(text, max_depth):
        message = f"frame nests arrays and objects deeper than {max_depth} levels"
        return ErrorFrame("invalid_frame", message, detail={"field": None, "max_depth": max_depth})
    try:
        return _decoder.decode(text)
    except msgspec.DecodeError as exc:
        message = str(exc)
        return ErrorFrame("invalid_frame", message, ref=_guess_ref(text), detail={"field": field_of(message)})


def _guess_ref(text: str) -> str | None:
    """The ``client_ref`` or ``run_id`` of a frame that failed validation, if it is a JSON object."""
    with contextlib.suppress(msgspec.DecodeError):
        raw = msgspec.json.decode(text)
        if isinstance(raw, dict):
            ref = raw.get("client_ref") or raw.get("run_id")  # type: ignore[union-attr]
            return ref if isinstance(ref, str) else None
    return None


# Not in the HTTP request metrics: a socket's "request duration" is its whole life, and wrapping
# every frame's send costs ~2 % of the CPU per event; chat_service_open_streams counts sockets.
@websocket("/v1/ws", guards=[origin_guard], opt={SKIP_HTTP_METRICS: True, STREAM_TOKEN_OPT: "ws"})
async def chat_socket(
    socket: WebSocket[Any, Any, Any],
    runs: NamedDependency[RunManager],
    settings: NamedDependency[Settings],
    principal: NamedDependency[Principal],
) -> None:
    """The multiplexed WebSocket (see the module docstring and ``openapi/asyncapi.yaml``).

    The handshake is authenticated before it is accepted; the session keeps the caller's identity for
    its whole life, also after the token it was opened with expires.
    """
    await socket.accept()
    streams = metrics.OPEN_STREAMS.labels("websocket")
    streams.inc()
    try:
        await _Session(socket, runs, settings, principal).serve()
    finally:
        streams.dec()


@post("/v1/ws-token", operation_id="CreateWsToken", status_code=201, tags=["runs"], security=BEARER)
async def create_ws_token(auth: NamedDependency[Authenticator], principal: NamedDependency[Principal]) -> StreamToken:
    """A short-lived token that opens the WebSocket `/v1/ws` as `?token=` (browsers cannot send headers there).

    It is accepted for at most 60 s (a setting) and only by `/v1/ws`; a socket opened with it keeps its
    session after the token expires.
    """
    return auth.mint(principal, "ws")
