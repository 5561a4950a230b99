"""Target (a+), the floor with its upstream: ``floor.py``'s bare ASGI app, each run streamed from the upstream.

Per run it makes the one request a run of the service cannot do without: a streamed chat
completion through the service's own SDK client (``UpstreamClient`` on ``UpstreamTransport``,
the same request body the engine sends), read with the engine's own SSE decoder. Nothing else:
no framework, no run manager, no run log, no store, no metrics. It emits the floor's pre-encoded
events: ``run.started`` and ``step.started`` once the upstream answered, one ``text.delta`` per
upstream token chunk as it arrives, then the rest once the upstream's body ended. Scenario (v)
run on it is what the issue's constraints (the openai SDK as the client) make a run cost at the least.

Same paths and query as ``floor.py``; the upstream comes from ``BENCH_UPSTREAM_URL``.
Run with ``uvicorn tests.bench.floor_sdk:create_app --factory``.
"""

from __future__ import annotations

import itertools
import os
from collections.abc import AsyncIterator
from typing import Any

import msgspec

from service.engine.chunks import SseDataDecoder
from service.engine.providers import UpstreamClient, UpstreamHttpClient
from service.engine.transport import READ_BODY, UpstreamTransport
from tests.bench.floor import (
    ACCEPTED,
    HEAD,
    SSE_HEADERS,
    Receive,
    Scope,
    Send,
    config_from,
    lifespan,
    sse_frames,
    ws_frames,
)

_ENC = msgspec.json.Encoder()
_IDS = itertools.count()


def create_app() -> _SdkFloor:
    """The ASGI app, with one SDK client for its life (as the service has one per provider)."""
    return _SdkFloor(
        UpstreamClient(
            base_url=os.environ.get("BENCH_UPSTREAM_URL", "http://127.0.0.1:8001/v1"),
            api_key="bench",
            max_retries=0,
            http_client=UpstreamHttpClient(transport=UpstreamTransport()),
        )
    )


class _SdkFloor:
    def __init__(self, client: UpstreamClient) -> None:
        self.client = client

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] == "http":
            await self.sse(scope, receive, send)
        elif scope["type"] == "websocket":
            await self.ws(scope, receive, send)
        elif scope["type"] == "lifespan":
            await lifespan(receive, send)
            await self.client.close()

    async def relayed(self, frames: tuple[Any, ...]) -> AsyncIterator[Any]:
        """``frames`` paced by one streamed completion: the head once it answered, a delta per token chunk."""
        body = {
            "model": "fake",
            "messages": [{"role": "user", "content": "hi"}],
            "stream": True,
            "stream_options": {"include_usage": True},
        }
        response = await self.client.stream_post("/chat/completions", _ENC.encode(body), f"floor-{next(_IDS)}")
        try:
            for frame in frames[:HEAD]:
                yield frame
            read, sse, chunk, tokens = response.extensions[READ_BODY], SseDataDecoder(), 0, len(frames) - HEAD - 4
            while (piece := await read()) is not None:
                for _ in sse.feed(piece):  # the role chunk, one per token, the finish chunk, usage, [DONE]
                    chunk += 1
                    if 2 <= chunk <= tokens + 1:
                        yield frames[HEAD + chunk - 2]
            for frame in frames[HEAD + tokens :]:
                yield frame
        finally:
            await response.aclose()

    async def sse(self, scope: Scope, receive: Receive, send: Send) -> None:
        more = True
        while more:
            more = (await receive()).get("more_body", False)
        if scope["method"] != "POST" or scope["path"] != "/chat":
            await send({"type": "http.response.start", "status": 404, "headers": []})
            await send({"type": "http.response.body", "body": b""})
            return
        frames = sse_frames(config_from(scope).tokens)
        await send({"type": "http.response.start", "status": 200, "headers": SSE_HEADERS})
        async for frame in self.relayed(frames):
            await send({"type": "http.response.body", "body": frame, "more_body": True})
        await send({"type": "http.response.body", "body": b""})

    async def ws(self, scope: Scope, receive: Receive, send: Send) -> None:
        await receive()  # websocket.connect
        await send({"type": "websocket.accept"})
        frames = ws_frames(config_from(scope).tokens)
        while (await receive())["type"] != "websocket.disconnect":
            await send({"type": "websocket.send", "text": ACCEPTED})
            async for text in self.relayed(frames):
                await send({"type": "websocket.send", "text": text})
