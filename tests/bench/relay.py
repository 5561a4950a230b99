"""Target (b), the usual choice: a plain FastAPI relay over the openai SDK.

Written the way most tutorials and relays do it: one ``AsyncOpenAI`` client,
``chat.completions.create(stream=True)``, and every ``ChatCompletionChunk`` forwarded as
``chunk.model_dump_json()``.

- ``POST /chat`` (JSON ``{"message": "hi"}``): Starlette ``StreamingResponse`` with
  ``media_type="text/event-stream"``, frames ``data: <chunk json>\\n\\n``, then ``data: [DONE]``.
- ``WS /ws``: each text frame ``{"type": "run.create", "message": ...}`` starts a stream; every
  chunk is sent with ``send_text(chunk.model_dump_json())``, then ``[DONE]``.

The upstream base URL comes from ``BENCH_UPSTREAM_URL`` (e.g. ``http://127.0.0.1:8001/v1``).
Run with ``uvicorn tests.bench.relay:create_app --factory``.
"""

from __future__ import annotations

import json
import os
from collections.abc import AsyncIterator

from fastapi import FastAPI, WebSocket, WebSocketDisconnect
from fastapi.responses import StreamingResponse
from openai import AsyncOpenAI
from openai.types.chat import ChatCompletionChunk
from pydantic import BaseModel


class ChatIn(BaseModel):
    """The request body."""

    message: str


def create_app() -> FastAPI:
    """Build the relay app; the openai client lives as long as the app."""
    client = AsyncOpenAI(
        base_url=os.environ.get("BENCH_UPSTREAM_URL", "http://127.0.0.1:8001/v1"),
        api_key="bench",
        max_retries=0,
    )
    app = FastAPI()

    async def completion(message: str) -> AsyncIterator[ChatCompletionChunk]:
        stream = await client.chat.completions.create(
            model="fake",
            messages=[{"role": "user", "content": message}],
            stream=True,
            stream_options={"include_usage": True},
        )
        try:
            async for chunk in stream:
                yield chunk
        finally:
            await stream.close()

    @app.post("/chat")
    async def chat(body: ChatIn) -> StreamingResponse:
        async def frames() -> AsyncIterator[str]:
            async for chunk in completion(body.message):
                yield f"data: {chunk.model_dump_json()}\n\n"
            yield "data: [DONE]\n\n"

        return StreamingResponse(frames(), media_type="text/event-stream", headers={"Cache-Control": "no-cache"})

    @app.websocket("/ws")
    async def ws(websocket: WebSocket) -> None:
        await websocket.accept()
        try:
            while True:
                request = json.loads(await websocket.receive_text())
                async for chunk in completion(request.get("message", "")):
                    await websocket.send_text(chunk.model_dump_json())
                await websocket.send_text("[DONE]")
        except WebSocketDisconnect:
            return

    return app
