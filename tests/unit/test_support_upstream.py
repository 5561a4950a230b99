"""The scripted upstream, driven through the real `openai.AsyncOpenAI` client over real HTTP.

Also pins down which exceptions the SDK raises for a dropped connection and a malformed chunk,
which the engine's error mapping relies on.
"""

from __future__ import annotations

import asyncio
import json
import signal
import time
from collections.abc import AsyncIterator
from typing import Any

import httpx
import openai
import pytest
from openai.types.chat import ChatCompletionChunk

from tests.support.live_server import ServiceProcess, serve
from tests.support.sse import SSEMessage, iter_sse
from tests.support.upstream import (
    ScriptedUpstream,
    cut,
    finish,
    gate,
    interleave,
    no_done,
    raw,
    reasoning,
    refusal,
    scripted_upstream,
    stall,
    status,
    text,
    tool_call,
    ttft,
    usage,
)

MESSAGES: Any = [{"role": "user", "content": "hi"}]


@pytest.fixture
async def upstream() -> AsyncIterator[ScriptedUpstream]:
    async with scripted_upstream(models=["alpha", "beta"]) as server:
        yield server


@pytest.fixture
async def client(upstream: ScriptedUpstream) -> AsyncIterator[openai.AsyncOpenAI]:
    async with openai.AsyncOpenAI(base_url=upstream.base_url, api_key="test", max_retries=0) as sdk:
        yield sdk


async def stream_chunks(client: openai.AsyncOpenAI, **kwargs: Any) -> list[ChatCompletionChunk]:
    stream = await client.chat.completions.create(model="m1", messages=MESSAGES, stream=True, **kwargs)
    return [chunk async for chunk in stream]


async def test_text_arrives_in_order_with_role_finish_and_usage(
    upstream: ScriptedUpstream, client: openai.AsyncOpenAI
) -> None:
    upstream.enqueue(text("Hello, world", pieces=4), finish("stop"), usage(prompt=10, completion=20))
    chunks = await stream_chunks(client, stream_options={"include_usage": True})
    deltas = [c.choices[0].delta for c in chunks if c.choices]
    assert [d.content for d in deltas if d.content] == ["Hel", "lo,", " wo", "rld"]
    assert deltas[0].role == "assistant"
    assert all(d.role is None for d in deltas[1:])
    assert [c.choices[0].finish_reason for c in chunks if c.choices][-1] == "stop"
    assert chunks[-1].choices == []
    assert chunks[-1].usage is not None
    assert (chunks[-1].usage.prompt_tokens, chunks[-1].usage.total_tokens) == (10, 30)
    assert {c.model for c in chunks} == {"m1"}
    assert len({c.id for c in chunks}) == 1
    (request,) = await upstream.wait_for_requests(1)
    assert request.body["messages"] == MESSAGES
    assert request.body["stream"] is True
    assert request.headers["authorization"] == "Bearer test"
    assert request.finished_at is not None
    assert not request.client_disconnected


async def test_text_splits_per_word_by_default(upstream: ScriptedUpstream, client: openai.AsyncOpenAI) -> None:
    upstream.enqueue(text("one two  three "), finish())
    chunks = await stream_chunks(client)
    assert [c.choices[0].delta.content for c in chunks if c.choices[0].delta.content] == ["one", " two", "  three "]


async def test_queue_empty_answers_ok(client: openai.AsyncOpenAI) -> None:
    chunks = await stream_chunks(client)
    assert "".join(c.choices[0].delta.content or "" for c in chunks if c.choices) == "ok"


async def test_interleaved_tool_call_fragments_reassemble(
    upstream: ScriptedUpstream, client: openai.AsyncOpenAI
) -> None:
    upstream.enqueue(
        interleave(
            tool_call(index=0, call_id="call_1", name="clock", arguments='{"tz": "UTC"}', pieces=5),
            tool_call(index=1, call_id="call_2", name="search", arguments='{"q": "a \\"b\\""}', pieces=7),
        ),
        finish("tool_calls"),
    )
    calls: dict[int, dict[str, str]] = {}
    for chunk in await stream_chunks(client):
        for call in chunk.choices[0].delta.tool_calls or []:
            slot = calls.setdefault(call.index, {"id": "", "name": "", "arguments": ""})
            slot["id"] += call.id or ""
            assert call.function is not None
            slot["name"] += call.function.name or ""
            slot["arguments"] += call.function.arguments or ""
    assert calls == {
        0: {"id": "call_1", "name": "clock", "arguments": '{"tz": "UTC"}'},
        1: {"id": "call_2", "name": "search", "arguments": '{"q": "a \\"b\\""}'},
    }
    assert json.loads(calls[1]["arguments"]) == {"q": 'a "b"'}


def test_tool_call_fragments_cut_inside_keys_and_strings() -> None:
    steps = tool_call(arguments='{"tz": "UTC"}', pieces=5)
    fragments = [step.delta["tool_calls"][0]["function"]["arguments"] for step in steps]  # type: ignore[union-attr]
    assert fragments == ["", '{"t', 'z"', ': "', "UT", 'C"}']


async def test_reasoning_and_refusal_deltas(upstream: ScriptedUpstream, client: openai.AsyncOpenAI) -> None:
    upstream.enqueue(reasoning("think hard", pieces=2), refusal("I can't help with that"), finish())
    deltas = [c.choices[0].delta for c in await stream_chunks(client)]
    assert [(d.model_extra or {}).get("reasoning_content") for d in deltas[:2]] == ["think", " hard"]
    assert "".join(d.refusal or "" for d in deltas) == "I can't help with that"


async def test_429_raises_rate_limit_error(upstream: ScriptedUpstream, client: openai.AsyncOpenAI) -> None:
    upstream.enqueue(status(429, headers={"retry-after": "0"}))
    with pytest.raises(openai.RateLimitError) as caught:
        await stream_chunks(client)
    assert caught.value.status_code == 429
    assert caught.value.response.headers["retry-after"] == "0"


async def test_500_raises_internal_server_error(upstream: ScriptedUpstream, client: openai.AsyncOpenAI) -> None:
    upstream.enqueue(status(500, body={"error": {"message": "boom", "type": "server_error"}}))
    with pytest.raises(openai.InternalServerError, match="boom"):
        await stream_chunks(client)


async def test_cut_raises_api_connection_error_from_stream(
    upstream: ScriptedUpstream, client: openai.AsyncOpenAI
) -> None:
    """The SDK maps the incomplete chunked body to `APIConnectionError` (not a timeout, not a clean end)."""
    upstream.enqueue(text("Hello there"), cut())
    stream = await client.chat.completions.create(model="m1", messages=MESSAGES, stream=True)
    received: list[str] = []

    async def read_all() -> None:
        async for chunk in stream:
            received.append(chunk.choices[0].delta.content or "")

    with pytest.raises(openai.APIConnectionError) as caught:
        await read_all()
    assert type(caught.value) is openai.APIConnectionError
    assert type(caught.value.__cause__).__name__ == "RemoteProtocolError"  # httpx2's, under the SDK
    assert received == ["Hello", " there"]


async def test_cut_is_a_protocol_error_for_plain_httpx(upstream: ScriptedUpstream) -> None:
    upstream.enqueue(text("x"), cut())
    async with (
        httpx.AsyncClient(base_url=upstream.url) as http,
        http.stream("POST", "/v1/chat/completions", json={"stream": True}) as response,
    ):
        assert response.status_code == 200
        with pytest.raises(httpx.RemoteProtocolError, match="incomplete chunked read"):
            await response.aread()


async def test_invalid_json_chunk_raises_json_decode_error(
    upstream: ScriptedUpstream, client: openai.AsyncOpenAI
) -> None:
    """A malformed `data:` line surfaces as a bare `json.JSONDecodeError` (a ValueError), not an OpenAIError."""
    upstream.enqueue(text("a"), raw(b"data: {not json\n\n"), finish())
    with pytest.raises(json.JSONDecodeError):
        await stream_chunks(client)


async def test_client_closing_mid_gate_is_recorded_quickly(
    upstream: ScriptedUpstream, client: openai.AsyncOpenAI
) -> None:
    never = asyncio.Event()
    upstream.enqueue(text("first"), gate(never), text("never sent"), finish())
    stream = await client.chat.completions.create(model="m1", messages=MESSAGES, stream=True)
    first = await anext(aiter(stream))
    assert first.choices[0].delta.content == "first"
    closed_at = time.monotonic()
    await stream.close()
    (request,) = upstream.requests
    async with asyncio.timeout(0.5):
        await request.disconnected_event.wait()
    assert request.client_disconnected
    assert request.finished_at is not None
    assert request.finished_at - closed_at < 0.5


async def test_gate_releases_the_rest(upstream: ScriptedUpstream, client: openai.AsyncOpenAI) -> None:
    release = asyncio.Event()
    upstream.enqueue(text("a"), gate(release), text("b"), finish())
    stream = await client.chat.completions.create(model="m1", messages=MESSAGES, stream=True)
    iterator = aiter(stream)
    assert (await anext(iterator)).choices[0].delta.content == "a"
    pending = asyncio.ensure_future(anext(iterator))
    await asyncio.sleep(0.05)
    assert not pending.done()
    release.set()
    assert (await pending).choices[0].delta.content == "b"
    assert [c async for c in iterator][-1].choices[0].finish_reason == "stop"


async def test_ttft_delays_the_response_headers(upstream: ScriptedUpstream, client: openai.AsyncOpenAI) -> None:
    upstream.enqueue(ttft(0.3), text("late"), finish())
    started = time.monotonic()
    await client.chat.completions.create(model="m1", messages=MESSAGES, stream=True)
    assert time.monotonic() - started >= 0.3


async def test_non_streaming_request_gets_a_completion(upstream: ScriptedUpstream, client: openai.AsyncOpenAI) -> None:
    upstream.enqueue(text("Hi there"), tool_call(arguments='{"a": 1}'), finish("tool_calls"), usage(3, 4))
    completion = await client.chat.completions.create(model="m1", messages=MESSAGES)
    message = completion.choices[0].message
    assert message.content == "Hi there"
    assert message.tool_calls is not None
    call = message.tool_calls[0]
    assert call.type == "function"
    assert (call.id, call.function.name, call.function.arguments) == ("call_1", "clock", '{"a": 1}')
    assert completion.choices[0].finish_reason == "tool_calls"
    assert completion.usage is not None
    assert completion.usage.total_tokens == 7


async def test_models_are_listed(client: openai.AsyncOpenAI) -> None:
    assert [model.id async for model in client.models.list()] == ["alpha", "beta"]


async def test_wait_for_requests_times_out(upstream: ScriptedUpstream) -> None:
    with pytest.raises(TimeoutError):
        await upstream.wait_for_requests(1, timeout=0.05)


async def test_serve_passes_uvicorn_config_and_stops() -> None:
    async def app(scope: dict[str, Any], receive: Any, send: Any) -> None:
        assert scope["type"] == "http"
        await send({"type": "http.response.start", "status": 200, "headers": []})
        await send({"type": "http.response.body", "body": b"hi"})

    async with serve(app, lifespan="off", timeout_graceful_shutdown=1) as url:
        assert url.startswith("http://127.0.0.1:")
        async with httpx.AsyncClient() as http:
            assert (await http.get(url)).text == "hi"
    async with httpx.AsyncClient() as http:
        with pytest.raises(httpx.ConnectError):
            await http.get(url)


async def test_service_process_runs_stops_and_kills() -> None:
    """A stand-in app (the scripted upstream, built by its factory) in a real subprocess."""
    spec = {"app": "tests.support.upstream:ScriptedUpstream", "health_path": "/v1/models"}
    async with ServiceProcess({"SERVICE_EXAMPLE": "1"}, **spec) as proc:
        async with httpx.AsyncClient() as http:
            assert (await http.get(f"{proc.url}/v1/models")).json()["data"][0]["id"] == "scripted"
        # uvicorn shuts down gracefully, then re-raises the SIGTERM it caught: the exit status says so.
        assert await proc.stop() == -signal.SIGTERM
        assert "Application shutdown complete" in proc.logs()
    crashing = ServiceProcess(**spec)
    await crashing.start()
    crashing.kill()
    assert crashing.returncode == -signal.SIGKILL


async def test_service_process_start_failure_includes_output() -> None:
    with pytest.raises(RuntimeError, match="service exited") as caught:
        async with ServiceProcess(app="tests.support.no_such_module:create_app"):
            pass
    assert "no_such_module" in str(caught.value)


async def test_wire_shape_done_and_no_done(upstream: ScriptedUpstream) -> None:
    upstream.enqueue(text("hi"), finish("length"))
    upstream.enqueue(text("hi"), no_done())
    async with httpx.AsyncClient(base_url=upstream.base_url) as http:
        response, messages = await collect_raw(http)
        assert response.headers["content-type"].startswith("text/event-stream")
        assert messages[-1].data == "[DONE]"
        first, last = messages[0].json(), messages[-2].json()
        assert set(first) == {"id", "object", "created", "model", "choices"}
        assert (first["object"], first["model"], type(first["created"])) == ("chat.completion.chunk", "m1", int)
        assert first["choices"] == [
            {"index": 0, "delta": {"role": "assistant", "content": "hi"}, "logprobs": None, "finish_reason": None}
        ]
        assert last["choices"][0]["finish_reason"] == "length"
        _, messages = await collect_raw(http)
        assert [m.data for m in messages][-1] != "[DONE]"


async def collect_raw(http: httpx.AsyncClient) -> tuple[httpx.Response, list[SSEMessage]]:
    body = {"model": "m1", "messages": MESSAGES, "stream": True}
    async with http.stream("POST", "/chat/completions", json=body) as response:
        return response, [message async for message in iter_sse(response)]


async def test_stall_keeps_the_connection_open(upstream: ScriptedUpstream) -> None:
    upstream.enqueue(text("a"), stall(5), finish())
    async with httpx.AsyncClient(base_url=upstream.base_url, timeout=httpx.Timeout(5, read=0.2)) as http:
        with pytest.raises(httpx.ReadTimeout):
            await collect_raw(http)
    (request,) = await upstream.wait_for_requests(1)
    async with asyncio.timeout(1):
        await request.disconnected_event.wait()
