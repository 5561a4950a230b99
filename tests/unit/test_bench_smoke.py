"""Smoke test of the bench harness pieces (not the benchmark itself): a few short streams each.

- the fake upstream speaks valid OpenAI streaming to the real ``openai.AsyncOpenAI`` client;
- the floor and the relay stream correct SSE and WebSocket frames;
- the harness's own raw SSE / WebSocket readers count tokens and text exactly.
"""

from __future__ import annotations

import asyncio
import json
import socket
import time
from collections.abc import AsyncIterator
from contextlib import asynccontextmanager
from typing import Any

import httpx
import pytest
import uvicorn
import websockets
from openai import AsyncOpenAI
from openai.types.chat import ChatCompletionChunk

from tests.bench import floor, relay
from tests.bench.client import Plan, Stream, TargetPlan, run_round
from tests.bench.upstream import StreamConfig, configure, expected_text, start_upstream

pytestmark = pytest.mark.timeout(10)
TOKENS = 7


@asynccontextmanager
async def serve(app: Any) -> AsyncIterator[int]:
    """Run ``app`` under uvicorn on a free 127.0.0.1 port; yields the port."""
    sock = socket.socket()
    sock.bind(("127.0.0.1", 0))
    server = uvicorn.Server(uvicorn.Config(app, log_level="warning", access_log=False))
    task = asyncio.create_task(server.serve(sockets=[sock]))
    try:
        async with asyncio.timeout(5):
            while not server.started:
                if task.done():
                    task.result()
                await asyncio.sleep(0.01)
        yield int(sock.getsockname()[1])
    finally:
        server.should_exit = True
        await asyncio.wait_for(task, 5)


@pytest.fixture
async def upstream_port() -> AsyncIterator[int]:
    server, _ = await start_upstream(StreamConfig(tokens=TOKENS, delay_ms=1, ttft_ms=5))
    async with server:
        yield int(server.sockets[0].getsockname()[1])


async def test_fake_upstream_speaks_openai_streaming(upstream_port: int) -> None:
    client = AsyncOpenAI(base_url=f"http://127.0.0.1:{upstream_port}/v1", api_key="x", max_retries=0)
    async with client:
        stream = await client.chat.completions.create(
            model="m", messages=[{"role": "user", "content": "hi"}], stream=True, stream_options={"include_usage": True}
        )
        chunks = [chunk async for chunk in stream]
        await configure(upstream_port, StreamConfig(tokens=3))
        whole = await client.chat.completions.create(model="m", messages=[{"role": "user", "content": "hi"}])
    text = "".join(c.choices[0].delta.content or "" for c in chunks if c.choices)
    assert text == expected_text(TOKENS)
    assert chunks[0].choices[0].delta.role == "assistant"
    assert [c.choices[0].finish_reason for c in chunks if c.choices][-1] == "stop"
    assert chunks[-1].choices == []
    assert chunks[-1].usage is not None
    assert chunks[-1].usage.completion_tokens == TOKENS
    assert whole.choices[0].message.content == expected_text(3)


def _sse_frames(body: str) -> list[dict[str, str]]:
    frames = []
    for block in body.split("\n\n"):
        if block.strip():
            frames.append(dict(line.split(": ", 1) for line in block.split("\n")))
    return frames


async def test_floor_streams_sse_and_ws_frames() -> None:
    query = f"tokens={TOKENS}&delay_ms=1&ttft_ms=2"
    async with serve(floor.app) as port, httpx.AsyncClient() as http:
        response = await http.post(f"http://127.0.0.1:{port}/chat?{query}", json={"message": "hi"})
        async with websockets.connect(f"ws://127.0.0.1:{port}/ws?{query}", compression=None) as ws:
            await ws.send(json.dumps({"type": "run.create", "client_ref": "c1", "chat_id": "", "message": "hi"}))
            messages = [json.loads(await ws.recv()) for _ in range(TOKENS + 7)]
    assert response.headers["content-type"].startswith("text/event-stream")
    frames = _sse_frames(response.text)
    assert [int(f["id"]) for f in frames] == list(range(1, TOKENS + 7))
    events = [json.loads(f["data"]) for f in frames]
    for stream in (events, messages[1:]):
        assert [e["seq"] for e in stream] == list(range(1, TOKENS + 7))
        assert [e["type"] for e in stream][:3] == ["run.started", "step.started", "text.delta"]
        assert [e["type"] for e in stream][-4:] == ["text.done", "step.done", "usage", "run.completed"]
        assert "".join(e["delta"] for e in stream if e["type"] == "text.delta") == expected_text(TOKENS)
    assert messages[0]["type"] == "run.accepted"


async def test_relay_forwards_chunks_over_sse_and_ws(upstream_port: int, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("BENCH_UPSTREAM_URL", f"http://127.0.0.1:{upstream_port}/v1")
    async with serve(relay.create_app()) as port, httpx.AsyncClient() as http:
        response = await http.post(f"http://127.0.0.1:{port}/chat", json={"message": "hi"})
        async with websockets.connect(f"ws://127.0.0.1:{port}/ws", compression=None) as ws:
            await ws.send(json.dumps({"type": "run.create", "message": "hi"}))
            messages = []
            while (message := await ws.recv()) != "[DONE]":
                messages.append(message)
    datas = [f["data"] for f in _sse_frames(response.text)]
    assert datas[-1] == "[DONE]"
    for stream in (datas[:-1], messages):
        chunks = [ChatCompletionChunk.model_validate_json(d) for d in stream]
        assert "".join(c.choices[0].delta.content or "" for c in chunks if c.choices) == expected_text(TOKENS)
        assert chunks[-1].usage is not None


@pytest.mark.parametrize("transport", ["sse", "ws"])
async def test_harness_readers_count_floor_stream_exactly(transport: Any) -> None:
    async with serve(floor.app) as port:
        target = TargetPlan(name="floor", kind="events", port=port, sse_path="/chat?{query}", ws_path="/ws?{query}")
        plan = Plan(target=target, transport=transport, streams=2, tokens=TOKENS, delay_ms=1, ttft_ms=3)
        streams = [Stream(plan, None, TOKENS, 1, 3) for _ in range(2)]
        for stream in streams:
            await stream.connect()
        await run_round(streams, 5)
    for result in (s.result(0) for s in streams):
        assert result.error is None
        assert result.tokens == TOKENS
        assert len(result.gaps_ms) == TOKENS - 1
        assert result.ttft_s is not None
        assert result.ttft_s >= 0.002


async def test_harness_paces_steady_arrivals_on_a_schedule() -> None:
    """Scenario (iv)'s shape: streams start ``1 / arrivals_per_s`` apart, each still counted exactly."""
    async with serve(floor.app) as port:
        target = TargetPlan(name="floor", kind="events", port=port, sse_path="/chat?{query}", ws_path="/ws?{query}")
        plan = Plan(target=target, transport="sse", streams=5, tokens=TOKENS, delay_ms=1, ttft_ms=1, arrivals_per_s=50)
        streams = [Stream(plan, None, TOKENS, 1, 1) for _ in range(5)]
        for stream in streams:
            await stream.connect()
        before = time.monotonic()
        await run_round(streams, 5, plan.arrivals_per_s)
    results = [s.result(0) for s in streams]
    assert all(r.error is None and r.tokens == TOKENS for r in results)
    # Stream i is due 20 ms x i after the round starts; a timer may fire late, never early (1 ms of clock slack).
    assert all(r.t_sent >= before + i * 0.02 - 0.001 for i, r in enumerate(results))
