"""A small HTTP/1.1 transport under the openai SDK, on asyncio protocols: the upstream's wire, cheaply.

Why: with httpx2's default transport every network read of a streamed completion goes through
httpcore2, h11 and anyio (a cancel scope and a timeout per read), and a streamed token is one
read: this transport took 40-50 µs of CPU off every token in the bench's scenario (ii). It keeps
the SDK as the client (it builds the request, adds auth, retries, maps errors to its typed
exceptions) and replaces only the bytes on the wire: the request is written in one go, the
response is parsed by httptools (the C parser uvicorn uses) inside ``data_received``, and a reader
waiting for body bytes is woken with everything that arrived meanwhile.

What it does:

1. HTTP/1.1 to ``http://`` and ``https://`` URLs; ``content-length``, chunked and
   close-delimited response bodies.
2. Keep-alive: a connection whose response was read to its end by its reader (every byte of a
   complete response taken, whether or not the reader then asked for more), and that the server
   lets live, goes back to a per-origin idle list (at most ``max_idle_per_origin``); idle
   connections expire after ``keepalive_expiry``. A response closed unread (the SDK closes an error
   response it retries without reading it) closes its connection, as httpcore does: reusing it once
   fed the unread error body to the next response, whose first event was lost. A request on a
   reused connection that the server closed meanwhile is retried once on a new one.
3. Timeouts from the request's ``timeout`` extension (the SDK sets it): ``connect`` bounds the
   TCP (and TLS) set-up (``httpx2.ConnectTimeout``); ``read`` bounds the time without a byte from
   the upstream while a response is due (``httpx2.ReadTimeout``). ``write`` and ``pool`` have no
   use here: requests are small and written at once, and there is no limit on open connections.
4. Failures are httpx2's exceptions (``ConnectError``, ``ReadError``, ``RemoteProtocolError`` ...),
   so the SDK and ``upstream_errors`` map them exactly as with the default transport.
5. Closing a response before its end (a cancelled run, an early exit) closes its connection,
   which the upstream sees as a disconnect.

Not supported: proxies (``providers.py`` keeps httpx2's transport when one is configured),
HTTP/2, ``Expect: 100-continue``, streamed request bodies (they are read whole first).
"""

from __future__ import annotations

import asyncio
import ssl
import time
from collections.abc import AsyncIterator
from typing import cast

import httptools
import httpx2

READ_BODY = "service.read_body"
"""Response extension: the connection's ``read()``, for readers that skip httpx2's stream layers."""

_MAX_BUFFERED = 1 << 20
"""Body bytes buffered unread before reading from the socket pauses (the consumer is slow)."""


class _Connection(asyncio.Protocol):
    """One upstream connection: feeds received bytes to the parser, buffers the response for a reader."""

    def __init__(self, origin: tuple[str, str, int]) -> None:
        self.origin = origin
        self.loop = asyncio.get_running_loop()
        self.transport: asyncio.Transport | None = None
        self.closed = False
        self.idle_since = 0.0
        self._parser = httptools.HttpResponseParser(self)
        self._status = 0
        self._headers: list[tuple[bytes, bytes]] = []
        self._head_done = False
        self._body: list[bytes] = []
        self._buffered = 0
        self._paused = False
        self._complete = False
        self._drained = False  # the reader got the end of the body
        self._keep_alive = False
        self._received_any = False
        self._error: Exception | None = None
        self._waiter: asyncio.Future[None] | None = None
        self._read_timeout: float | None = None
        self._last_read = 0.0
        self._timer: asyncio.TimerHandle | None = None

    # --- asyncio.Protocol ---------------------------------------------------------------------

    def connection_made(self, transport: asyncio.BaseTransport) -> None:
        self.transport = cast("asyncio.Transport", transport)  # uvloop's transports do not subclass asyncio's

    def data_received(self, data: bytes) -> None:
        self._last_read = self.loop.time()
        self._received_any = True
        try:
            self._parser.feed_data(data)
        except httptools.HttpParserError as exc:
            self._fail(httpx2.RemoteProtocolError(f"malformed HTTP response from the upstream: {exc}"))

    def connection_lost(self, exc: Exception | None) -> None:
        self.closed = True
        if self._head_done and not self._complete and self._error is None and self._close_delimited():
            self._complete = True  # a body without length or chunking ends with the connection
        elif not self._complete:
            self._fail(httpx2.ReadError(f"the upstream closed the connection ({exc or 'EOF'})"))
        self._stop_timer()
        self._wake()

    # --- httptools callbacks --------------------------------------------------------------------

    def on_header(self, name: bytes, value: bytes) -> None:
        self._headers.append((name, value))

    def on_headers_complete(self) -> None:
        self._status = self._parser.get_status_code()
        self._head_done = True
        self._wake()

    def on_body(self, body: bytes) -> None:
        self._body.append(body)
        self._buffered += len(body)
        if self._buffered > _MAX_BUFFERED and not self._paused and self.transport is not None:
            self._paused = True
            self.transport.pause_reading()
        self._wake()

    def on_message_complete(self) -> None:
        self._keep_alive = self._parser.should_keep_alive()  # only meaningful inside this callback
        self._complete = True
        self._stop_timer()
        self._wake()

    # --- used by the transport and the response stream ------------------------------------------

    def send(self, request: bytes, read_timeout: float | None) -> None:
        """Write a request and start waiting for its response."""
        assert self.transport is not None  # noqa: S101 - set by connection_made before this is reachable
        self._parser = httptools.HttpResponseParser(self)
        self._status, self._headers, self._head_done, self._complete = 0, [], False, False
        self._body, self._buffered, self._drained = [], 0, False  # (a reused connection has read its last to the end)
        self._received_any = False
        self._read_timeout = read_timeout
        self._last_read = self.loop.time()
        if read_timeout is not None:
            self._timer = self.loop.call_later(read_timeout, self._check_read_timeout)
        self.transport.write(request)

    async def head(self) -> tuple[int, list[tuple[bytes, bytes]]]:
        """Wait for the response's status and headers."""
        while not self._head_done:
            if self._error is not None:
                raise self._error
            await self._wait()
        return self._status, self._headers

    async def read(self) -> bytes | None:
        """Every body byte received since the last call (waiting for some), or None at the end."""
        while True:
            if self._body:
                data = self._body[0] if len(self._body) == 1 else b"".join(self._body)
                self._body.clear()
                self._buffered = 0
                if self._paused and self.transport is not None:
                    self._paused = False
                    self.transport.resume_reading()
                return data
            if self._error is not None:
                raise self._error
            if self._complete:
                self._drained = True
                return None
            # (not ``self._wait()``: one coroutine frame fewer on the path of every streamed read)
            self._waiter = self.loop.create_future()
            try:
                await self._waiter
            finally:
                self._waiter = None

    def reusable(self) -> bool:
        """Whether the response was read to its end and the connection may carry another request.

        Read to its end: the reader saw the end of the body, or the whole response has arrived and
        the reader took every byte of it. The second case is the usual one for a streamed
        completion: the engine stops at ``data: [DONE]``, whose bytes come with the body's end,
        and never asks for the ``None`` after them. Treating that connection as unread closed one
        upstream connection per run (a new TCP connection for every run start).
        """
        read_to_end = self._drained or (self._complete and not self._body)
        return read_to_end and self._keep_alive and self._error is None and not self.closed

    def failed_before_response(self) -> bool:
        """Whether the connection broke before any byte of the response (a stale keep-alive connection)."""
        return self._error is not None and not self._received_any

    def close(self) -> None:
        """Close the connection (the upstream sees the client go away)."""
        self._stop_timer()
        if self.transport is not None and not self.closed:
            self.closed = True
            self.transport.close()

    # --- internals ------------------------------------------------------------------------------

    async def _wait(self) -> None:
        self._waiter = self.loop.create_future()
        try:
            await self._waiter
        finally:
            self._waiter = None

    def _wake(self) -> None:
        if self._waiter is not None and not self._waiter.done():
            self._waiter.set_result(None)

    def _fail(self, error: Exception) -> None:
        if self._error is None:
            self._error = error
        self.close()
        self._wake()

    def _close_delimited(self) -> bool:
        names = {name.lower() for name, _ in self._headers}
        return b"content-length" not in names and b"transfer-encoding" not in names

    def _check_read_timeout(self) -> None:
        # One timer per response, not one per read: it fires ``read_timeout`` after the last byte
        # and either fails the response or, if bytes came since, sleeps until the new deadline.
        self._timer = None
        timeout = self._read_timeout
        if timeout is None or self._complete or self._error is not None:
            return
        quiet = self.loop.time() - self._last_read
        if self._paused or quiet < timeout:
            delay = timeout if self._paused else timeout - quiet
            self._timer = self.loop.call_later(delay, self._check_read_timeout)
            return
        self._fail(httpx2.ReadTimeout(f"no data from the upstream for {timeout:g} s"))

    def _stop_timer(self) -> None:
        if self._timer is not None:
            self._timer.cancel()
            self._timer = None


class _ResponseStream(httpx2.AsyncByteStream):
    """A response body: yields whatever arrived since the last read; closing returns or drops the connection."""

    def __init__(self, pool: UpstreamTransport, connection: _Connection) -> None:
        self._pool = pool
        self._connection: _Connection | None = connection

    async def __aiter__(self) -> AsyncIterator[bytes]:
        connection = self._connection
        if connection is None:
            raise httpx2.StreamClosed()
        while (data := await connection.read()) is not None:
            yield data

    async def aclose(self) -> None:
        connection, self._connection = self._connection, None
        if connection is not None:
            self._pool.release(connection)


class UpstreamTransport(httpx2.AsyncBaseTransport):
    """HTTP/1.1 with keep-alive for the SDK's upstream requests. See the module docstring."""

    def __init__(
        self,
        *,
        keepalive_expiry: float = 5.0,
        max_idle_per_origin: int = 100,
        ssl_context: ssl.SSLContext | None = None,
    ) -> None:
        self._keepalive_expiry = keepalive_expiry
        self._max_idle = max_idle_per_origin  # the SDK's own default keep-alive limit
        self._ssl_context = ssl_context
        self._idle: dict[tuple[str, str, int], list[_Connection]] = {}

    async def handle_async_request(self, request: httpx2.Request) -> httpx2.Response:  # noqa: D102
        url = request.url
        if url.scheme not in ("http", "https"):
            raise httpx2.UnsupportedProtocol(f"unsupported URL scheme {url.scheme!r}")
        origin = (url.scheme, url.host, url.port or (443 if url.scheme == "https" else 80))
        timeouts: dict[str, float | None] = request.extensions.get("timeout", {})
        wire = _request_bytes(request, await request.aread())
        connection = self._idle_connection(origin)
        if connection is not None:
            try:
                return await self._exchange(connection, wire, timeouts.get("read"))
            except (httpx2.ReadError, httpx2.RemoteProtocolError):
                if not connection.failed_before_response():
                    raise
                # The server closed the idle connection as we reused it: one more try, on a new one.
        connection = await self._connect(origin, timeouts.get("connect"))
        return await self._exchange(connection, wire, timeouts.get("read"))

    async def aclose(self) -> None:  # noqa: D102
        for connections in self._idle.values():
            for connection in connections:
                connection.close()
        self._idle.clear()

    def release(self, connection: _Connection) -> None:
        """Take a connection back after its response was closed: keep it idle if reusable, else close it."""
        idle = self._idle.setdefault(connection.origin, [])
        if connection.reusable() and len(idle) < self._max_idle:
            connection.idle_since = time.monotonic()
            idle.append(connection)
        else:
            connection.close()

    async def _exchange(self, connection: _Connection, wire: bytes, read_timeout: float | None) -> httpx2.Response:
        try:
            connection.send(wire, read_timeout)
            status, headers = await connection.head()
        except BaseException:
            connection.close()
            raise
        return httpx2.Response(
            status,
            headers=headers,
            stream=_ResponseStream(self, connection),
            extensions={"http_version": b"HTTP/1.1", READ_BODY: connection.read},
        )

    def _idle_connection(self, origin: tuple[str, str, int]) -> _Connection | None:
        idle = self._idle.get(origin)
        now = time.monotonic()
        while idle:
            connection = idle.pop()  # the most recently used: the least likely to be closed by now
            if not connection.closed and now - connection.idle_since < self._keepalive_expiry:
                return connection
            connection.close()
        return None

    async def _connect(self, origin: tuple[str, str, int], connect_timeout: float | None) -> _Connection:
        scheme, host, port = origin
        loop = asyncio.get_running_loop()
        tls = None
        if scheme == "https":
            if self._ssl_context is None:
                self._ssl_context = httpx2.create_ssl_context()
            tls = self._ssl_context
        try:
            async with asyncio.timeout(connect_timeout):
                _, connection = await loop.create_connection(
                    lambda: _Connection(origin), host, port, ssl=tls, server_hostname=host if tls else None
                )
        except TimeoutError as exc:
            raise httpx2.ConnectTimeout(f"connecting to {host}:{port} took longer than {connect_timeout} s") from exc
        except OSError as exc:
            raise httpx2.ConnectError(f"could not connect to {host}:{port}: {exc}") from exc
        return connection


def _request_bytes(request: httpx2.Request, body: bytes) -> bytes:
    """The request as it goes on the wire; a body is always sent with its length."""
    lines = [b"%s %s HTTP/1.1" % (request.method.encode(), request.url.raw_path)]
    for name, value in request.headers.raw:
        if name.lower() not in (b"content-length", b"transfer-encoding"):
            lines.append(b"%s: %s" % (name, value))
    if body or request.method in ("POST", "PUT", "PATCH"):
        lines.append(b"content-length: %d" % len(body))
    return b"\r\n".join(lines) + b"\r\n\r\n" + body
