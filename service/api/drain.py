"""How the service learns that its server is shutting down (decision 46).

uvicorn's graceful shutdown (SIGTERM) stops accepting connections, calls ``shutdown()`` on each open
connection's protocol, waits for the connections to end (up to ``--timeout-graceful-shutdown``) and only
then runs the app's lifespan shutdown. By then nobody reads the runs any more, so the app must hear of
the shutdown at its start. The service's protocol classes (``api/http_protocol.py``,
``api/ws_protocol.py``) are where uvicorn says it: their ``shutdown()`` calls :meth:`ServerDrain.begin`.

One :class:`ServerDrain` per server lives in the server's ASGI lifespan state (the protocols put it
there; uvicorn copies that state into every request's ``scope["state"]``), so two servers in one process
drain independently. :class:`DrainMiddleware` subscribes the app's ``RunManager.begin_drain`` to the
drain of the server it runs under, on the first request.

Under uvicorn's stock protocols there is no such call; sse-starlette's exit signal (SIGTERM seen by
uvicorn, polled every 0.5 s) begins the drain instead (:func:`drain_on_exit_signal`), but the stock
WebSocket protocol then closes every socket with 1012 at once.
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Any, Final, cast

from litestar.types import ASGIApp, Receive, Scope, Send
from sse_starlette import EventSourceResponse

STATE_KEY: Final = "service.drain"
"""Key of the server's :class:`ServerDrain` in the ASGI lifespan state (and so in ``scope["state"]``)."""


class ServerDrain:
    """One server's shutdown notice: begun once, heard by whoever listens (the app's run manager)."""

    __slots__ = ("begun", "listeners")

    def __init__(self) -> None:
        self.begun = False
        self.listeners: list[Callable[[], None]] = []

    @property
    def heard(self) -> bool:
        """Whether an app listens, i.e. will end its streams by itself (else the protocols close them)."""
        return bool(self.listeners)

    def listen(self, listener: Callable[[], None]) -> None:
        """Call ``listener`` when the drain begins (at once if it has)."""
        if listener not in self.listeners:
            self.listeners.append(listener)
            if self.begun:
                listener()

    def begin(self) -> None:
        """The server started its graceful shutdown (idempotent)."""
        if not self.begun:
            self.begun = True
            for listener in self.listeners:
                listener()


def server_drain(app_state: dict[str, Any]) -> ServerDrain:
    """The drain of the server whose lifespan state is ``app_state`` (a protocol's ``app_state``)."""
    drain = app_state.get(STATE_KEY)
    if not isinstance(drain, ServerDrain):
        drain = app_state[STATE_KEY] = ServerDrain()
    return drain


class DrainMiddleware:
    """Subscribes ``begin_drain`` to the drain of the server the app runs under (see the module docstring)."""

    def __init__(self, app: ASGIApp, begin_drain: Callable[[], None]) -> None:
        self.app = app
        self._begin_drain = begin_drain
        self._drain: ServerDrain | None = None

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:  # noqa: D102
        state = cast("dict[str, Any]", scope).get("state")
        drain: object = cast("dict[str, object]", state).get(STATE_KEY) if isinstance(state, dict) else None
        if drain is not self._drain and isinstance(drain, ServerDrain):
            self._drain = drain
            drain.listen(self._begin_drain)
        await self.app(scope, receive, send)


async def drain_on_exit_signal(begin_drain: Callable[[], None]) -> None:
    """Begin the drain on sse-starlette's exit signal (uvicorn's stock protocols; see the module docstring)."""
    await EventSourceResponse._listen_for_exit_signal()  # pyright: ignore[reportPrivateUsage]
    begin_drain()
