"""Shutdown: running runs get a grace period, then are cancelled with reason ``shutdown``; nothing is lost.

Every open stream keeps flowing through the grace period and ends with a terminal event and a clean end
(decision 46); a reader of a run another instance owns is handed over to it (with Redis).
"""

from __future__ import annotations

import asyncio
import contextlib
import json
import signal
import uuid
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import httpx
import pytest
import websockets

from service.api.http_protocol import HttpProtocol
from service.api.ws_protocol import WebSocketProtocol
from service.app import create_app
from tests.integration.conftest import MODEL, delete_prefix, service_settings
from tests.support.live_server import ServiceProcess, serve
from tests.support.sse import collect_events, iter_sse
from tests.support.upstream import ScriptedUpstream, finish, gate, scripted_upstream, sleep, text


async def test_sigterm_lets_short_runs_finish_and_cancels_long_ones_after_the_grace_period(tmp_path: Path) -> None:
    async with scripted_upstream() as upstream:
        env = {
            "SERVICE_DATABASE_URL": f"sqlite+aiosqlite:///{tmp_path / 'chat.db'}",
            "SERVICE_OPENAI_BASE_URL": upstream.base_url,
            "SERVICE_OPENAI_API_KEY": "test",
            "SERVICE_DEFAULT_MODEL": MODEL,
            "SERVICE_SHUTDOWN_GRACE_S": "1.5",
        }
        never = asyncio.Event()
        upstream.enqueue(text("short and "), sleep(0.5), text("done"), finish())
        upstream.enqueue(text("long and "), gate(never), text("never"), finish())
        async with ServiceProcess(env) as service, httpx.AsyncClient(base_url=service.url, timeout=20) as client:
            chats = [(await client.post("/v1/chats", json={"model": MODEL})).json()["id"] for _ in range(2)]
            short = (await client.post(f"/v1/chats/{chats[0]}/runs", json={"message": "short"})).json()
            await upstream.wait_for_requests(1)  # the scripts are served in request order
            long = (await client.post(f"/v1/chats/{chats[1]}/runs", json={"message": "long"})).json()
            long_request = (await upstream.wait_for_requests(2))[1]
            while (await client.get(f"/v1/runs/{long['id']}")).json()["last_seq"] < 2:
                await asyncio.sleep(0.02)
            reader = asyncio.create_task(collect_events(client, "GET", long["events_url"]))
            await asyncio.sleep(0.1)
            service.process.send_signal(signal.SIGTERM)  # type: ignore[union-attr]
            loop = asyncio.get_running_loop()
            asked_at = loop.time()
            status = await asyncio.to_thread(service.process.wait, 15)  # type: ignore[union-attr]
            stopped_after = loop.time() - asked_at
            await asyncio.gather(reader, return_exceptions=True)
            assert long_request.client_disconnected

        async with ServiceProcess(env) as again, httpx.AsyncClient(base_url=again.url) as client:
            short_messages = (await client.get(f"/v1/chats/{chats[0]}")).json()["messages"]
            long_messages = (await client.get(f"/v1/chats/{chats[1]}")).json()["messages"]

    assert status == -signal.SIGTERM  # uvicorn re-raises the signal after a clean shutdown
    assert stopped_after < 1.5 + 5
    assert (short_messages[-1]["status"], short_messages[-1]["content"]) == ("completed", "short and done")
    assert (long_messages[-1]["status"], long_messages[-1]["content"]) == ("cancelled", "long and ")
    assert short["id"] != long["id"]


# -- draining (issue 15 item 4, decision 46) ---------------------------------------------------------


@dataclass
class Stream:
    """What one client saw: its events, whether the transport ended cleanly, and how."""

    name: str
    events: list[dict[str, Any]] = field(default_factory=list[dict[str, Any]])
    complete: bool = False
    """SSE: the chunked body ended with its terminator. WebSocket: the server sent a close frame."""
    close_code: int | None = None
    errors: list[dict[str, Any]] = field(default_factory=list[dict[str, Any]])

    @property
    def ended_with_shutdown(self) -> bool:
        last = self.events[-1] if self.events else {}
        return self.complete and (last.get("type"), last.get("reason")) == ("run.cancelled", "shutdown")


async def read_sse(stream: Stream, client: httpx.AsyncClient, method: str, url: str, **kwargs: Any) -> Stream:
    """Read an SSE response to its end; an incomplete chunked body leaves ``complete`` false."""
    try:
        async with client.stream(method, url, **kwargs) as response:
            assert response.status_code == 200, await response.aread()
            async for message in iter_sse(response):
                if message.kind == "event":
                    stream.events.append(message.json())
        stream.complete = True
    except httpx.TransportError:  # "peer closed connection without sending complete message body"
        pass
    return stream


async def read_ws(stream: Stream, ws: websockets.ClientConnection) -> Stream:
    """Read a socket's frames until it closes; ``complete`` when the server closed it with a close frame."""
    try:
        async for raw in ws:
            frame = json.loads(raw)
            if frame["type"] == "error":
                stream.errors.append(frame)
            elif frame["type"] not in ("run.resumed", "run.accepted", "pong"):
                stream.events.append(frame)
    except websockets.ConnectionClosedError:
        pass
    close = ws.protocol.close_rcvd
    stream.complete, stream.close_code = close is not None, None if close is None else close.code
    return stream


async def saw_delta(stream: Stream, delta: str) -> None:
    while not any(e.get("delta") == delta for e in stream.events):
        await asyncio.sleep(0.01)


def drain_env(tmp_path: Path, upstream: ScriptedUpstream, **more: str) -> dict[str, str]:
    return {
        "SERVICE_DATABASE_URL": f"sqlite+aiosqlite:///{tmp_path / 'chat.db'}",
        "SERVICE_OPENAI_BASE_URL": upstream.base_url,
        "SERVICE_OPENAI_API_KEY": "test",
        "SERVICE_UPSTREAM_MAX_RETRIES": "0",
        "SERVICE_DEFAULT_MODEL": MODEL,
        "SERVICE_SSE_PING_S": "1",
        **more,
    }


async def held_request(port: int, path: str, body: bytes) -> tuple[asyncio.StreamReader, asyncio.StreamWriter]:
    """A POST whose headers are sent now and whose body is not (the test sends it later)."""
    reader, writer = await asyncio.open_connection("127.0.0.1", port)
    head = (
        f"POST {path} HTTP/1.1\r\nHost: 127.0.0.1:{port}\r\nContent-Type: application/json\r\n"
        f"Content-Length: {len(body)}\r\n\r\n"
    )
    writer.write(head.encode())
    await writer.drain()
    return reader, writer


async def test_sigterm_drains_every_open_stream_to_a_shutdown_event_and_a_clean_end(tmp_path: Path) -> None:
    """SSE (resumable and request-bound) and WebSocket readers of running runs, and an idle socket.

    On SIGTERM the streams keep flowing for the grace period (the upstream's next text reaches them after
    the signal); the runs still going then are cancelled with reason ``shutdown``; every stream gets that
    event and then a clean end: the SSE body's chunked terminator, the WebSocket's close 1012. An idle
    socket is closed with 1012 at once; a run asked for on an open socket, or on a request whose body
    arrives during the drain, is refused with ``shutting_down``.
    """
    async with scripted_upstream() as upstream:
        more, never = asyncio.Event(), asyncio.Event()
        for _ in range(2):
            upstream.enqueue(text("before "), gate(more), text("during "), gate(never), text("never"), finish())
        env = drain_env(tmp_path, upstream, SERVICE_SHUTDOWN_GRACE_S="2")
        async with ServiceProcess(env) as service, httpx.AsyncClient(base_url=service.url, timeout=20) as client:
            chats = [(await client.post("/v1/chats", json={"model": MODEL})).json()["id"] for _ in range(3)]
            run = (await client.post(f"/v1/chats/{chats[0]}/runs", json={"message": "background"})).json()
            await upstream.wait_for_requests(1)
            sse = [Stream(f"GET events #{i}") for i in range(3)]
            readers = [asyncio.create_task(read_sse(s, client, "GET", run["events_url"])) for s in sse]
            bound = Stream("POST runs (request-bound)")
            readers.append(
                asyncio.create_task(
                    read_sse(
                        bound,
                        client,
                        "POST",
                        f"/v1/chats/{chats[1]}/runs",
                        json={"message": "bound"},
                        headers={"accept": "text/event-stream"},
                    )
                )
            )
            ws_url = service.url.replace("http://", "ws://") + "/v1/ws"
            sockets = [await websockets.connect(ws_url) for _ in range(3)]
            for ws in sockets[:2]:
                await ws.send(json.dumps({"type": "run.resume", "run_id": run["id"], "after": 0}))
            ws_streams = [Stream(f"WebSocket #{i}") for i in range(2)]
            readers += [asyncio.create_task(read_ws(s, ws)) for s, ws in zip(ws_streams, sockets, strict=False)]
            idle = asyncio.create_task(read_ws(Stream("idle WebSocket"), sockets[2]))
            streams = [*sse, bound, *ws_streams]
            async with asyncio.timeout(10):
                await asyncio.gather(*(saw_delta(s, "before ") for s in streams))
            late_reader, late_writer = await held_request(
                service.port, f"/v1/chats/{chats[2]}/runs", b'{"message":"x"}'
            )

            service.process.send_signal(signal.SIGTERM)  # type: ignore[union-attr]
            async with asyncio.timeout(5):
                idle_stream = await idle  # closed once the drain began
            with contextlib.suppress(websockets.ConnectionClosed):  # (closed at once before decision 46)
                frame = {"type": "run.create", "client_ref": "late", "chat_id": chats[2], "message": "x"}
                await sockets[0].send(json.dumps(frame))
            late_writer.write(b'{"message":"x"}')
            try:
                late_answer = await asyncio.wait_for(late_reader.read(), 10)
            except OSError:
                late_answer = b""
            late_writer.close()
            more.set()  # the upstream goes on after the signal: the streams still flow
            async with asyncio.timeout(15):
                await asyncio.gather(*readers)
            status = await asyncio.to_thread(service.process.wait, 15)  # type: ignore[union-attr]

    clean = [s.name for s in streams if s.ended_with_shutdown]
    assert len(clean) == len(streams), f"streams ending cleanly: {len(clean)}/{len(streams)}: {streams}"
    for stream in streams:
        assert [e["seq"] for e in stream.events] == list(range(1, len(stream.events) + 1)), stream
        assert "during " in [e.get("delta") for e in stream.events], stream  # flowed after the signal
    assert [s.close_code for s in ws_streams] == [1012, 1012]
    assert (idle_stream.complete, idle_stream.close_code, idle_stream.events) == (True, 1012, [])
    assert [(e["code"], e["ref"]) for e in ws_streams[0].errors] == [("shutting_down", "late")]
    assert late_answer.startswith(b"HTTP/1.1 503 "), late_answer
    assert b'"code":"shutting_down"' in late_answer
    assert status == -signal.SIGTERM


async def test_a_draining_instance_is_not_ready_and_refuses_new_runs(tmp_path: Path) -> None:
    """While the run manager drains: ``/readyz`` 503 ``draining``, a new run 503 ``shutting_down``, a socket 1012.

    (uvicorn stops accepting at SIGTERM, so over a real signal only requests already under way see these;
    here the drain is begun on an instance that still accepts, as a server kept listening would be.)
    """
    async with scripted_upstream() as upstream:
        app = create_app(service_settings(tmp_path, upstream))
        async with (
            serve(app, http=HttpProtocol, ws=WebSocketProtocol) as url,
            httpx.AsyncClient(base_url=url, timeout=10) as client,
        ):
            chat = (await client.post("/v1/chats", json={"model": MODEL})).json()["id"]
            assert (await client.get("/readyz")).status_code == 200
            app.state.runs.begin_drain()
            ready = await client.get("/readyz")
            refused = await client.post(f"/v1/chats/{chat}/runs", json={"message": "hello"})
            async with websockets.connect(url.replace("http://", "ws://") + "/v1/ws") as ws:
                socket = await read_ws(Stream("new socket"), ws)

    assert (ready.status_code, ready.json()["status"]) == (503, "draining")
    assert (refused.status_code, refused.json()["error"]["code"]) == (503, "shutting_down")
    assert (socket.complete, socket.close_code) == (True, 1012)
    assert upstream.requests == []


@pytest.mark.redis
@pytest.mark.xdist_group("redis")
async def test_sigterm_with_redis_hands_readers_of_other_instances_runs_over(redis_url: str, tmp_path: Path) -> None:
    """Two instances on one Redis. A drains: its own run ends with ``run.cancelled`` (``shutdown``) for every
    reader, also B's; its reader of B's run ends cleanly when A's runs are done and resumes on B with
    ``Last-Event-ID``, getting the rest: no event lost or repeated.
    """
    prefix = f"test-{uuid.uuid4().hex}"
    try:
        async with scripted_upstream() as upstream:
            on_b, on_a, during = asyncio.Event(), asyncio.Event(), asyncio.Event()
            upstream.enqueue(text("b1 "), gate(during), text("b2 "), gate(on_b), text("b3 "), finish())
            upstream.enqueue(text("a1 "), gate(on_a), finish())
            env = drain_env(
                tmp_path,
                upstream,
                SERVICE_REDIS_URL=redis_url,
                SERVICE_REDIS_PREFIX=prefix,
                SERVICE_SHUTDOWN_GRACE_S="1.5",
            )
            async with (
                ServiceProcess(env) as a,
                ServiceProcess(env) as b,
                httpx.AsyncClient(base_url=a.url, timeout=20) as ca,
                httpx.AsyncClient(base_url=b.url, timeout=20) as cb,
            ):
                chats = [(await cb.post("/v1/chats", json={"model": MODEL})).json()["id"] for _ in range(2)]
                b_run = (await cb.post(f"/v1/chats/{chats[0]}/runs", json={"message": "on b"})).json()
                await upstream.wait_for_requests(1)
                a_run = (await ca.post(f"/v1/chats/{chats[1]}/runs", json={"message": "on a"})).json()
                await upstream.wait_for_requests(2)
                of_b, of_a, of_a_on_b = Stream("A: B's run"), Stream("A: A's run"), Stream("B: A's run")
                readers = [
                    asyncio.create_task(read_sse(of_b, ca, "GET", b_run["events_url"])),
                    asyncio.create_task(read_sse(of_a, ca, "GET", a_run["events_url"])),
                    asyncio.create_task(read_sse(of_a_on_b, cb, "GET", a_run["events_url"])),
                ]
                async with asyncio.timeout(10):
                    await asyncio.gather(saw_delta(of_b, "b1 "), saw_delta(of_a, "a1 "), saw_delta(of_a_on_b, "a1 "))
                a.process.send_signal(signal.SIGTERM)  # type: ignore[union-attr]
                await a.wait_for_log("Shutting down")
                during.set()  # B's run goes on while A drains: A's reader still gets it
                async with asyncio.timeout(15):
                    await asyncio.gather(*readers)
                    status = await asyncio.to_thread(a.process.wait, 15)  # type: ignore[union-attr]
                on_b.set()
                resumed = Stream("B: B's run, resumed")
                last = str(of_b.events[-1]["seq"])
                await read_sse(resumed, cb, "GET", b_run["events_url"], headers={"Last-Event-ID": last})
                _, whole = await collect_events(cb, "GET", b_run["events_url"])
                after_end = await cb.get(a_run["events_url"], headers={"Last-Event-ID": str(of_a.events[-1]["seq"])})
    finally:
        await delete_prefix(redis_url, prefix)

    assert status == -signal.SIGTERM
    for own in (of_a, of_a_on_b):
        assert own.ended_with_shutdown, own
    assert of_a.events == of_a_on_b.events
    assert after_end.status_code == 204  # everything of A's run was delivered
    assert of_b.complete, of_b  # ended cleanly at the end of A's drain, without a terminal event
    assert "b2 " in [e.get("delta") for e in of_b.events] and of_b.events[-1]["type"] == "text.delta"
    assert of_b.events + resumed.events == whole  # nothing lost, nothing twice
    assert [e["seq"] for e in whole] == list(range(1, len(whole) + 1))
    assert whole[-1]["type"] == "run.completed"
