"""``UpstreamTransport`` under the real openai SDK, against the scripted upstream over real HTTP.

Covers what the default httpx2 transport gave us: chunked and content-length bodies, keep-alive
reuse, typed errors for refused, cut and stalled connections, timeouts from the SDK's request
extensions, and a closed upstream connection when a stream is abandoned. Close-delimited bodies
and a stale keep-alive connection need a raw server, so they have one of their own.
"""

from __future__ import annotations

import asyncio
import contextlib
import time
from collections.abc import AsyncIterator
from typing import Any

import httpx2
import msgspec
import openai
import pytest

from service.engine.transport import READ_BODY, UpstreamTransport
from tests.support.upstream import (
    ScriptedUpstream,
    cut,
    finish,
    gate,
    scripted_upstream,
    stall,
    status,
    text,
    usage,
)
from tests.support.wait import until

MESSAGES = [{"role": "user", "content": "hi"}]


@pytest.fixture
async def upstream() -> AsyncIterator[ScriptedUpstream]:
    async with scripted_upstream() as server:
        yield server


def sdk(base_url: str, transport: UpstreamTransport, *, timeout: float = 10.0) -> openai.AsyncOpenAI:
    http_client = openai.DefaultAsyncHttpxClient(transport=transport)
    return openai.AsyncOpenAI(
        base_url=base_url, api_key="test", max_retries=0, timeout=timeout, http_client=http_client
    )


async def streamed_text(client: openai.AsyncOpenAI) -> str:
    stream = await client.chat.completions.create(model="scripted", messages=MESSAGES, stream=True)  # type: ignore[arg-type]
    parts = [chunk.choices[0].delta.content or "" async for chunk in stream if chunk.choices]
    return "".join(parts)


async def test_streams_a_chunked_completion_and_reuses_the_connection(upstream: ScriptedUpstream) -> None:
    transport = UpstreamTransport()
    client = sdk(upstream.base_url, transport)
    upstream.enqueue(text("Hello, world", pieces=4), finish("stop"), usage())
    upstream.enqueue(text("again", pieces=2), finish("stop"))
    assert await streamed_text(client) == "Hello, world"
    first = [c for idle in transport._idle.values() for c in idle]
    assert len(first) == 1
    assert await streamed_text(client) == "again"
    second = [c for idle in transport._idle.values() for c in idle]
    assert second == first  # the same connection carried both requests
    (request, _) = await upstream.wait_for_requests(2)
    assert request.headers["authorization"] == "Bearer test"
    assert request.body["stream"] is True
    await client.close()
    assert first[0].closed


async def test_reads_a_content_length_body(upstream: ScriptedUpstream) -> None:
    client = sdk(upstream.base_url, UpstreamTransport())
    upstream.enqueue(text("whole answer"), finish("stop"), usage())
    completion = await client.chat.completions.create(model="scripted", messages=MESSAGES)  # type: ignore[arg-type]
    assert completion.choices[0].message.content == "whole answer"
    await client.close()


async def test_an_error_status_is_the_sdks_typed_error(upstream: ScriptedUpstream) -> None:
    client = sdk(upstream.base_url, UpstreamTransport())
    upstream.enqueue(status(429, {"retry-after": "1"}, {"error": {"message": "slow down", "type": "rate_limit"}}))
    with pytest.raises(openai.RateLimitError, match="slow down"):
        await streamed_text(client)
    await client.close()


async def test_a_cut_stream_raises_a_read_error(upstream: ScriptedUpstream) -> None:
    client = sdk(upstream.base_url, UpstreamTransport())
    upstream.enqueue(text("partial", pieces=2), cut())
    with pytest.raises((httpx2.ReadError, httpx2.RemoteProtocolError, openai.APIConnectionError)):
        await streamed_text(client)
    await client.close()


async def test_a_stall_raises_read_timeout_after_the_sdks_read_timeout(upstream: ScriptedUpstream) -> None:
    client = sdk(upstream.base_url, UpstreamTransport(), timeout=0.5)
    upstream.enqueue(text("a", pieces=1), stall(30))
    started = time.monotonic()
    with pytest.raises((httpx2.ReadTimeout, openai.APITimeoutError)):
        await streamed_text(client)
    assert 0.4 < time.monotonic() - started < 3
    await client.close()


async def test_a_slow_but_steady_stream_does_not_time_out(upstream: ScriptedUpstream) -> None:
    client = sdk(upstream.base_url, UpstreamTransport(), timeout=0.3)
    steps = [step for i in range(8) for step in (*text(f"{i}", pieces=1), stall(0.1))]
    upstream.enqueue(*steps, finish("stop"))
    assert await streamed_text(client) == "01234567"  # 0.8 s in all, never 0.3 s without a byte
    await client.close()


async def test_abandoning_a_stream_closes_the_upstream_connection(upstream: ScriptedUpstream) -> None:
    transport = UpstreamTransport()
    client = sdk(upstream.base_url, transport)
    release = asyncio.Event()
    upstream.enqueue(text("first", pieces=1), gate(release), text("never"), finish("stop"))

    async def consume() -> None:
        await streamed_text(client)

    task = asyncio.create_task(consume())
    (request,) = await upstream.wait_for_requests(1)
    await asyncio.sleep(0.1)  # the first chunk is in; the stream waits on the gate
    task.cancel()
    with pytest.raises(asyncio.CancelledError):
        await task
    async with asyncio.timeout(2):
        await request.disconnected_event.wait()
    assert not transport._idle.get(("http", "127.0.0.1", int(upstream.url.rsplit(":", 1)[1])))
    await client.close()


async def test_a_refused_connection_is_a_connection_error() -> None:
    client = sdk("http://127.0.0.1:9/v1", UpstreamTransport())
    with pytest.raises(openai.APIConnectionError):
        await streamed_text(client)
    await client.close()


async def _raw_server(handler: object) -> tuple[asyncio.Server, str]:
    server = await asyncio.start_server(handler, "127.0.0.1", 0)  # type: ignore[arg-type]
    return server, f"http://127.0.0.1:{server.sockets[0].getsockname()[1]}"


async def test_a_close_delimited_body_ends_with_the_connection() -> None:
    async def handle(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        await reader.readuntil(b"\r\n\r\n")
        writer.write(b"HTTP/1.1 200 OK\r\ncontent-type: text/plain\r\nconnection: close\r\n\r\nall of ")
        await writer.drain()
        writer.write(b"it")
        writer.close()

    server, url = await _raw_server(handle)
    async with server, httpx2.AsyncClient(transport=UpstreamTransport()) as http:
        response = await http.get(f"{url}/x")
        assert response.status_code == 200
        assert response.text == "all of it"


async def test_a_stale_keepalive_connection_is_retried_on_a_new_one() -> None:
    connections: list[int] = []

    async def handle(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        connections.append(1)
        await reader.readuntil(b"\r\n\r\n")
        writer.write(b"HTTP/1.1 200 OK\r\ncontent-length: 2\r\n\r\nok")
        await writer.drain()
        await reader.readuntil(b"\r\n\r\n")
        writer.close()  # the next request on this connection finds it closed, with no answer

    server, url = await _raw_server(handle)
    async with server, httpx2.AsyncClient(transport=UpstreamTransport()) as http:
        assert (await http.get(f"{url}/1")).text == "ok"
        assert (await http.get(f"{url}/2")).text == "ok"
    assert len(connections) == 2


async def test_the_service_streams_through_the_transport() -> None:
    """Smoke test that the providers wire it in: the service's own client uses it for configured upstreams."""
    from service.engine.providers import ProviderRegistry
    from service.settings import Settings

    async with scripted_upstream() as server:
        registry = ProviderRegistry(Settings(openai_base_url=server.base_url, openai_api_key="k"))
        _, client, _ = registry.resolve("openai/scripted")
        server.enqueue(text("via transport", pieces=3), finish("stop"))
        assert await streamed_text(client) == "via transport"
        assert isinstance(client._client._transport, UpstreamTransport)  # pyright: ignore[reportPrivateUsage]
        await registry.close()


def _sse_response(*events: bytes) -> bytes:
    """A whole chunked ``text/event-stream`` response, terminator included."""
    body = b"".join(b"%x\r\n%s\r\n" % (len(e), e) for e in (b"data: %s\n\n" % event for event in events))
    return (
        b"HTTP/1.1 200 OK\r\ncontent-type: text/event-stream\r\ntransfer-encoding: chunked\r\n\r\n"
        + body
        + b"0\r\n\r\n"
    )


async def test_a_run_that_stops_at_done_leaves_its_connection_for_the_next_run() -> None:
    """The engine stops reading at ``[DONE]``; a response that had fully arrived is still read to its end."""
    from service.engine.engine import ChatEngine, RunRequest
    from service.engine.providers import ProviderRegistry
    from service.events import RunCompleted, TextDelta
    from service.settings import Settings

    connections: list[int] = []
    chunk = msgspec.json.encode(
        {
            "id": "c",
            "object": "chat.completion.chunk",
            "created": 0,
            "model": "m",
            "choices": [{"index": 0, "delta": {"content": "hi"}, "finish_reason": "stop"}],
        }
    )

    async def handle(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        connections.append(1)
        with contextlib.suppress(asyncio.IncompleteReadError, ConnectionError):
            while True:
                head = await reader.readuntil(b"\r\n\r\n")
                length = int(head.lower().split(b"content-length: ")[1].split(b"\r\n")[0])
                await reader.readexactly(length)
                writer.write(_sse_response(chunk, b"[DONE]"))  # one write: [DONE] and the body's end together
                await writer.drain()

    server, url = await _raw_server(handle)
    registry = ProviderRegistry(Settings(openai_base_url=f"{url}/v1", openai_api_key="k", default_model="openai/m"))
    engine = ChatEngine(registry, max_tool_rounds=1)
    async with server:
        for n in range(3):
            request = RunRequest(
                run_id=f"run{n}",
                chat_id="c",
                model="openai/m",
                messages=[{"role": "user", "content": "hi"}],
                message_id="m",
            )
            events = [event async for event in engine.run(request)]
            assert [e.delta for e in events if isinstance(e, TextDelta)] == ["hi"]
            assert isinstance(events[-1], RunCompleted)
        await registry.close()
    assert len(connections) == 1


async def test_a_response_with_bytes_left_unread_is_not_reused() -> None:
    """Bytes that arrived after the reader's last read (here: the rest of the body) close the connection."""
    connections: list[int] = []
    more = asyncio.Event()

    async def handle(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        connections.append(1)
        with contextlib.suppress(asyncio.IncompleteReadError, ConnectionError):
            while True:
                await reader.readuntil(b"\r\n\r\n")
                whole = _sse_response(b"first", b"second")
                cut_at = whole.index(b"data: second") - 4
                writer.write(whole[:cut_at])
                await more.wait()
                writer.write(whole[cut_at:])
                await writer.drain()
                more.clear()

    server, url = await _raw_server(handle)
    transport = UpstreamTransport()
    async with server, httpx2.AsyncClient(transport=transport) as http:
        for _ in range(2):
            request = http.build_request("GET", f"{url}/x")
            response = await http.send(request, stream=True)
            read = response.extensions[READ_BODY]
            assert b"first" in await read()
            more.set()
            connection = read.__self__  # the connection's own read(): wait until the rest has arrived, unread

            async def arrived(c: Any = connection) -> bool:
                return bool(c._complete)

            await until(arrived, timeout=5)
            await response.aclose()
    assert len(connections) == 2
