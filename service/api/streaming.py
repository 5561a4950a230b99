"""SSE framing of a run's events, shared by every SSE endpoint (sse-starlette does the transport)."""

from __future__ import annotations

import asyncio
import contextlib
import logging
import time
from collections.abc import AsyncIterator, Coroutine, Generator, Mapping
from typing import Any, cast

from litestar.types import ASGIApp
from sse_starlette import EventSourceResponse
from sse_starlette.sse import SendTimeoutError
from starlette.types import Message, Receive, Scope, Send

from service import errors, metrics
from service.events import AnyEvent, sse_frame
from service.settings import Settings

log = logging.getLogger("service.sse")

SSE_HEADERS = {"Cache-Control": "no-cache", "X-Accel-Buffering": "no"}
SSE_DESCRIPTION = (
    "The run's events as Server-Sent Events: each event is `id: <seq>` and one `data:` line holding the "
    "event JSON (its `type` is inside). The first frame sets `retry:`; comment lines are heartbeats. "
    "The stream ends after the terminal event (`run.completed`, `run.cancelled` or `run.failed`), "
    "or, when the run backend (Redis) has not answered for `SERVICE_RUNS_OUTAGE_S`, with a `: runs_unavailable` "
    "comment and no terminal event: resume with `Last-Event-ID` once it is back. "
    "Clients must ignore event types they do not know."
)


def sse_response(batches: AsyncIterator[list[AnyEvent]] | None, settings: Settings) -> ASGIApp:
    """Stream events as SSE: ``retry:`` first, then one pre-framed ``id``/``data`` event per event.

    A batch of events goes out as one body message (one write); ``None`` (a finished run with nothing
    left to send) is a stream with no event.
    """

    async def frames() -> AsyncIterator[bytes]:
        with open_stream():
            try:
                yield b"retry: %d\n\n" % settings.sse_retry_ms
                if batches is not None:
                    async for batch in batches:
                        yield b"".join([sse_frame(event) for event in batch])
            except errors.ServiceError as exc:  # the run backend stayed down: end the body; the client resumes
                yield b": %s\n\n" % exc.code.encode()

    return stream_response(frames(), settings)


@contextlib.contextmanager
def open_stream() -> Generator[None]:
    """Count an open SSE stream (``chat_service_open_streams{transport="sse"}``) while the block runs."""
    streams = metrics.OPEN_STREAMS.labels("sse")
    streams.inc()
    try:
        yield
    finally:
        streams.dec()


def stream_response(
    frames: AsyncIterator[bytes], settings: Settings, headers: Mapping[str, str] = SSE_HEADERS
) -> ASGIApp:
    """An SSE response of pre-framed ``frames``, with heartbeats, the send timeout and disconnect detection."""
    return as_asgi(
        _EventStream(
            frames,
            headers=dict(headers),
            ping=max(1, int(settings.sse_ping_s)),
            send_timeout=settings.sse_send_timeout_s,
        )
    )


WATCHES_PER_TIMEOUT = 8
"""How often per send timeout the watchdog looks at a stream's send under way."""


class _EventStream(EventSourceResponse):
    """sse-starlette's response, run with two plain tasks instead of a task group of four.

    sse-starlette's ``__call__`` runs four tasks per response in an anyio task group: the stream,
    pings, a disconnect listener and a shutdown listener, each under a ``cancel_on_finish`` wrapper.
    That set-up cost about 240 µs of CPU per response and 20 KB of memory per open stream in the
    bench (1,000 one-token runs; 1,000 open streams), some 14 % of a whole SSE run. Here sse-starlette's
    own parts run in a cheaper arrangement, with the same outcomes:

    - the stream (``_stream_response``: headers, framing, end of body) runs in the request's task;
    - ``_ping`` and ``_listen_for_disconnect`` run as one plain asyncio task each; when one of them
      ends, the stream is cancelled: quietly when the client went away, with the helper's error when
      it failed;
    - no shutdown listener: at shutdown the run manager drains (decision 46), so a stream ends with
      its run's terminal event, or, for a run that goes on elsewhere, as if its log had ended; either
      way its body is completed (sse-starlette's listener cut every stream mid-body at once);
    - a send blocked for ``send_timeout`` or longer fails the response with ``SendTimeoutError``:
      instead of sse-starlette's cancel scope around every send (about 6 µs of CPU per event, some
      7 % of the service's cost per streamed token), a watchdog looks every ``send_timeout / 8``
      seconds whether the send under way started too long ago, so a stalled client is noticed
      after 1 to 1.125 times the timeout (the socket's send buffer, ``api/http_protocol.py``,
      decides how soon after the client stops reading a send blocks).

    HEAD requests, WebSocket scopes and a ``data_sender_callable`` take sse-starlette's own path.
    """

    _blocked_since: float | None = None

    async def _send_with_timeout(self, send: Send, message: Message) -> None:
        # time.monotonic, not loop.time(): asyncio.get_running_loop() is a getpid() system call.
        self._blocked_since = time.monotonic()
        await send(message)
        self._blocked_since = None

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        task = asyncio.current_task()
        if task is None or scope["type"] != "http" or scope["method"] == "HEAD" or self.data_sender_callable:
            return await super().__call__(scope, receive, send)
        helpers: list[Coroutine[Any, Any, None]] = [self._listen_for_disconnect(receive)]
        if self.ping_interval > 0:
            helpers.append(self._ping(send))
        guard = _Guard(self, task, helpers)
        try:
            await self._stream_response(send)
        except asyncio.CancelledError:
            error = guard.cancelled()
            if isinstance(error, SendTimeoutError):  # logged here once; the server's traceback is filtered out
                log.warning(
                    "%s %s: the client read nothing for %g s (SERVICE_SSE_SEND_TIMEOUT_S); its stream is dropped",
                    scope["method"],
                    scope["path"],
                    self.send_timeout,
                )
            if error is not None:
                raise error from None
        finally:
            guard.close()
        if self.background is not None:
            await self.background()


class _Guard:
    """Cancels one response's stream (the request's task) for its helpers and its watchdog."""

    def __init__(
        self, response: _EventStream, task: asyncio.Task[Any], helpers: list[Coroutine[Any, Any, None]]
    ) -> None:
        self._response = response
        self._task = task
        self._ending: list[BaseException | None] = []  # why this guard cancelled the stream (None: quietly)
        loop = task.get_loop()
        self._helpers = [loop.create_task(helper) for helper in helpers]
        for helper in self._helpers:
            helper.add_done_callback(self._helper_done)
        timeout = response.send_timeout
        self._watchdog = (
            None if timeout is None else loop.call_later(timeout / WATCHES_PER_TIMEOUT, self._watch, timeout)
        )

    def end(self, error: BaseException | None) -> None:
        """Cancel the stream; the response then ends quietly (``error`` None) or raises ``error``."""
        if not self._ending:
            self._ending.append(error)
            self._task.cancel()

    def cancelled(self) -> BaseException | None:
        """After the stream was cancelled: the error to raise, or None to end quietly.

        Raises ``CancelledError`` again when the cancel came from outside (too).
        """
        if not self._ending or self._task.uncancel() > 0:
            raise asyncio.CancelledError
        return self._ending[0]

    def close(self) -> None:
        """The stream is over: stop the helpers and the watchdog; nothing cancels the task any more."""
        self._ending.append(None)
        for helper in self._helpers:
            helper.cancel()
        if self._watchdog is not None:
            self._watchdog.cancel()

    def _helper_done(self, helper: asyncio.Task[None]) -> None:
        if not helper.cancelled():
            self.end(helper.exception())

    def _watch(self, timeout: float) -> None:
        since = self._response._blocked_since  # pyright: ignore[reportPrivateUsage]
        if since is not None and time.monotonic() - since >= timeout:
            self.end(SendTimeoutError())
        else:
            self._watchdog = self._task.get_loop().call_later(timeout / WATCHES_PER_TIMEOUT, self._watch, timeout)


def as_asgi(response: object) -> ASGIApp:
    """Type a response for a handler annotated ``-> ASGIApp``.

    Handlers that answer either a Litestar ``Response`` or an sse-starlette stream are annotated
    ``ASGIApp`` so that Litestar passes the stream through untouched (a union annotation makes it
    serialise the stream as data); Litestar still renders a ``Response`` returned from them.
    """
    return cast("ASGIApp", response)
