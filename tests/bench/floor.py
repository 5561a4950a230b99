"""Target (a), the floor: a bare ASGI app that emits pre-encoded events, no framework, no upstream.

It streams the same event shapes as the service (``run.started``, ``step.started``, ``text.delta``
per token, ``text.done``, ``step.done``, ``usage``, ``run.completed``), paced like the fake upstream (first delta at
``ttft_ms``, then one every ``delay_ms``), so its numbers are the cost of uvicorn itself.
The stream shape comes from the query string: ``?tokens=50&delay_ms=50&ttft_ms=50``.

- ``POST /chat``: SSE, frames ``id: <seq>\\ndata: <json>\\n\\n``, one ASGI body message per event.
- ``WS /ws``: after the client's first text frame (``run.create``), ``run.accepted`` then one text
  frame per event; the app then waits for the client to close.

Run with ``uvicorn tests.bench.floor:app``.
"""

from __future__ import annotations

import asyncio
import functools
import time
from collections.abc import Awaitable, Callable, MutableMapping, Sequence
from typing import Any
from urllib.parse import parse_qs

import msgspec

from tests.bench.upstream import StreamConfig, expected_text, token_text

Scope = MutableMapping[str, Any]
Message = MutableMapping[str, Any]
Receive = Callable[[], Awaitable[Message]]
Send = Callable[[Message], Awaitable[None]]

RUN_ID = "run_floor"
ACCEPTED = '{"type":"run.accepted","client_ref":"c1","run_id":"%s"}' % RUN_ID  # noqa: UP031
"""The answer to the client's ``run.create`` frame."""
HEAD = 2
"""Events before the first delta (``run.started``, ``step.started``)."""
_ENC = msgspec.json.Encoder()
SSE_HEADERS = [
    (b"content-type", b"text/event-stream; charset=utf-8"),
    (b"cache-control", b"no-cache"),
    (b"x-accel-buffering", b"no"),
]


@functools.lru_cache(maxsize=32)
def event_payloads(tokens: int) -> tuple[bytes, ...]:
    """The JSON of every event of a run of ``tokens`` deltas, in order (seq from 1)."""
    started: dict[str, object] = {
        "type": "run.started",
        "chat_id": "chat_floor",
        "model": "floor",
        "created_at": 1.7e9,
        "message_id": "msg_floor",
    }
    events: list[dict[str, object]] = [started, {"type": "step.started", "step": 1}]
    events += [{"type": "text.delta", "delta": token_text(i)} for i in range(tokens)]
    events += [
        {"type": "text.done", "text": expected_text(tokens)},
        {"type": "step.done", "step": 1, "finish_reason": "stop"},
        {"type": "usage", "prompt_tokens": 8, "completion_tokens": tokens, "total_tokens": tokens + 8},
        {"type": "run.completed", "finish_reason": "stop", "message_id": "msg_floor"},
    ]
    return tuple(_ENC.encode({**ev, "run_id": RUN_ID, "seq": seq}) for seq, ev in enumerate(events, 1))


@functools.lru_cache(maxsize=32)
def sse_frames(tokens: int) -> tuple[bytes, ...]:
    """Every event framed for SSE."""
    return tuple(b"id: %d\ndata: %s\n\n" % (seq, p) for seq, p in enumerate(event_payloads(tokens), 1))


@functools.lru_cache(maxsize=32)
def ws_frames(tokens: int) -> tuple[str, ...]:
    """Every event as a WebSocket text frame."""
    return tuple(p.decode() for p in event_payloads(tokens))


def config_from(scope: Scope) -> StreamConfig:
    """The stream shape asked for in the query string."""
    query = {k: v[-1] for k, v in parse_qs(scope.get("query_string", b"").decode()).items()}
    return msgspec.convert(query, StreamConfig, strict=False)


async def paced(frames: Sequence[Any], cfg: StreamConfig, emit: Callable[[Any], Awaitable[None]]) -> None:
    """Emit ``run.started`` and ``step.started`` now, delta ``i`` at ``ttft + i * delay``, then the tail at once."""
    start = time.monotonic() + cfg.ttft_ms / 1000  # not loop.time(): uvloop caches it per iteration
    delay = cfg.delay_ms / 1000
    for frame in frames[:HEAD]:
        await emit(frame)
    for i in range(cfg.tokens):
        wait = start + i * delay - time.monotonic()
        if wait > 0:
            await asyncio.sleep(wait)
        await emit(frames[HEAD + i])
    for frame in frames[HEAD + cfg.tokens :]:
        await emit(frame)


async def _sse(scope: Scope, receive: Receive, send: Send) -> None:
    more = True
    while more:  # read the request body, as any real endpoint would
        more = (await receive()).get("more_body", False)
    if scope["method"] != "POST" or scope["path"] != "/chat":
        await send({"type": "http.response.start", "status": 404, "headers": []})
        await send({"type": "http.response.body", "body": b""})
        return
    cfg = config_from(scope)
    await send({"type": "http.response.start", "status": 200, "headers": SSE_HEADERS})

    async def emit(frame: bytes) -> None:
        await send({"type": "http.response.body", "body": frame, "more_body": True})

    await paced(sse_frames(cfg.tokens), cfg, emit)
    await send({"type": "http.response.body", "body": b""})


async def _ws(scope: Scope, receive: Receive, send: Send) -> None:
    await receive()  # websocket.connect
    await send({"type": "websocket.accept"})
    cfg = config_from(scope)

    async def emit(text: str) -> None:
        await send({"type": "websocket.send", "text": text})

    while True:
        message = await receive()
        if message["type"] == "websocket.disconnect":
            return
        await emit(ACCEPTED)
        await paced(ws_frames(cfg.tokens), cfg, emit)


async def lifespan(receive: Receive, send: Send) -> None:
    while True:
        message = await receive()
        if message["type"] == "lifespan.startup":
            await send({"type": "lifespan.startup.complete"})
        elif message["type"] == "lifespan.shutdown":
            await send({"type": "lifespan.shutdown.complete"})
            return


async def app(scope: Scope, receive: Receive, send: Send) -> None:
    """The ASGI entry point."""
    if scope["type"] == "http":
        await _sse(scope, receive, send)
    elif scope["type"] == "websocket":
        await _ws(scope, receive, send)
    elif scope["type"] == "lifespan":
        await lifespan(receive, send)
