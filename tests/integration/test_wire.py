"""The wire: SSE framing and headers on every stream (S1), heartbeats, burst ids (R4), and one
WebSocket multiplexing 50 runs with a cancel and bad frames in the middle (W6)."""

from __future__ import annotations

import asyncio
import base64
import json
import os
from collections.abc import Callable
from typing import Any

import httpx
import websockets

from tests.integration.conftest import TERMINAL, Service, ServiceFactory, text_of
from tests.support.sse import SSEMessage, collect_events, iter_sse
from tests.support.upstream import finish, gate, text


async def raw_stream(
    client: httpx.AsyncClient, method: str, url: str, **kwargs: Any
) -> tuple[httpx.Response, list[SSEMessage]]:
    """Every SSE block of a response (events, comments and control blocks), in order."""
    headers = {"accept-encoding": "gzip, deflate, br", **kwargs.pop("headers", {})}
    async with client.stream(method, url, headers=headers, **kwargs) as response:
        return response, [message async for message in iter_sse(response)]


def assert_sse_wire(response: httpx.Response, messages: list[SSEMessage]) -> None:
    assert response.status_code == 200
    assert response.headers["content-type"].startswith("text/event-stream")
    assert response.headers["cache-control"] == "no-cache"
    assert response.headers["x-accel-buffering"] == "no"
    assert "content-encoding" not in response.headers
    assert messages[0].kind == "control"
    assert messages[0].retry is not None and 1000 <= messages[0].retry <= 5000
    events = [m for m in messages if m.kind == "event"]
    assert events
    for message in events:
        assert message.id == str(message.json()["seq"])
        assert message.event is None  # the type is inside the JSON, so `onmessage` sees every event


async def test_every_sse_response_has_the_documented_wire_format(service: Service) -> None:
    """S1: 1000 sampled streams (request-bound POSTs and EventSource replays)."""
    run_ids = []
    for i in range(20):
        service.upstream.enqueue(text(f"answer number {i}", pieces=4), finish())
        chat = await service.create_chat()
        response, messages = await raw_stream(
            service.http,
            "POST",
            f"/v1/chats/{chat}/runs",
            json={"message": "hi"},
            headers={"accept": "text/event-stream"},
        )
        assert_sse_wire(response, messages)
        run_ids.append(messages[1].json()["run_id"])
    limiter = asyncio.Semaphore(25)

    async def replay(i: int) -> None:
        async with limiter:
            after = i % 5
            response, messages = await raw_stream(
                service.http, "GET", f"/v1/runs/{run_ids[i % 20]}/events?after={after}"
            )
        assert_sse_wire(response, messages)
        assert next(m.json()["seq"] for m in messages if m.kind == "event") == after + 1

    await asyncio.gather(*(replay(i) for i in range(980)))


async def test_an_idle_stream_sends_heartbeat_comments(service: Service) -> None:
    hold = asyncio.Event()
    service.upstream.enqueue(text("a"), gate(hold), text("b"), finish())
    chat = await service.create_chat()
    blocks: list[SSEMessage] = []
    async with service.http.stream(
        "POST", f"/v1/chats/{chat}/runs", json={"message": "x"}, headers={"accept": "text/event-stream"}
    ) as response:
        async for message in iter_sse(response):
            blocks.append(message)
            if message.kind == "comment":
                hold.set()  # a heartbeat arrived while the run was idle (sse_ping_s = 1 in tests)
    kinds = [m.kind for m in blocks]
    assert "comment" in kinds
    assert blocks[-1].json()["type"] == "run.completed"


async def test_a_burst_of_ten_thousand_events_has_unique_increasing_ids(make_service: ServiceFactory) -> None:
    """R4: the upstream sends 10,000 chunks at once; every SSE id is unique and strictly increasing."""
    service = await make_service(max_events_per_run=20_000)
    service.upstream.enqueue(text("x" * 10_000, pieces=10_000), finish())
    chat = await service.create_chat()

    async def ids(response_messages: list[SSEMessage]) -> list[int]:
        return [int(m.id) for m in response_messages if m.kind == "event" and m.id is not None]

    _, live = await raw_stream(
        service.http, "POST", f"/v1/chats/{chat}/runs", json={"message": "go"}, headers={"accept": "text/event-stream"}
    )
    live_ids = await ids(live)
    run_id = live[1].json()["run_id"]
    _, late = await raw_stream(service.http, "GET", f"/v1/runs/{run_id}/events")

    assert len(live_ids) >= 10_003
    assert live_ids == list(range(1, len(live_ids) + 1))
    assert await ids(late) == live_ids


async def test_one_socket_multiplexes_fifty_runs_through_a_cancel_and_bad_frames(service: Service) -> None:
    """W6: 50 concurrent runs on one socket; cancel 1, send 2 bad frames; 49 complete with exact text."""
    hold = asyncio.Event()
    for _ in range(50):
        service.upstream.enqueue(text("The same answer for every run,"), gate(hold), text(" ending here."), finish())
    chats = [await service.create_chat() for _ in range(50)]
    async with websockets.connect(service.ws_url, max_queue=None) as ws:
        for i, chat in enumerate(chats):
            await ws.send(json.dumps({"type": "run.create", "client_ref": f"r{i}", "chat_id": chat, "message": "go"}))
        frames, run_of = await read_until_accepted(ws, 50)
        await service.upstream.wait_for_requests(50)
        await ws.send(json.dumps({"type": "run.cancel", "run_id": run_of["r7"]}))
        await ws.send('{"type": "run.create", "client_ref": "bad-json", ')
        await ws.send(json.dumps({"type": "run.teleport", "client_ref": "bad-type"}))
        errors = await read_until_ended(ws, frames, 50, on_two_errors=hold.set)
        await ws.send(json.dumps({"type": "ping", "nonce": "still-open"}))
        assert json.loads(await ws.recv()) == {"type": "pong", "nonce": "still-open"}

    by_run: dict[str, list[dict[str, Any]]] = {}
    for frame in frames:
        if "seq" in frame:
            by_run.setdefault(frame["run_id"], []).append(frame)
    assert [(e["code"], e["ref"]) for e in errors] == [("invalid_frame", None), ("invalid_frame", "bad-type")]
    for ref, run_id in run_of.items():
        events = by_run[run_id]
        assert [e["seq"] for e in events] == list(range(1, len(events) + 1))
        if ref == "r7":
            assert events[-1]["type"] == "run.cancelled"
        else:
            assert events[-1]["type"] == "run.completed"
            assert text_of(events) == "The same answer for every run, ending here."


async def read_until_accepted(ws: Any, runs: int) -> tuple[list[dict[str, Any]], dict[str, str]]:
    """Frames until ``runs`` runs were accepted, and each ``client_ref``'s run id."""
    frames: list[dict[str, Any]] = []
    run_of: dict[str, str] = {}
    while len(run_of) < runs:
        frames.append(json.loads(await ws.recv()))
        if frames[-1]["type"] == "run.accepted":
            run_of[frames[-1]["client_ref"]] = frames[-1]["run_id"]
    return frames, run_of


async def read_until_ended(
    ws: Any, frames: list[dict[str, Any]], runs: int, on_two_errors: Callable[[], None]
) -> list[dict[str, Any]]:
    """Read (into ``frames``) until ``runs`` runs ended; returns the error frames."""
    errors: list[dict[str, Any]] = []
    ended: set[str] = set()
    while len(ended) < runs:
        frame = json.loads(await ws.recv())
        frames.append(frame)
        if frame["type"] == "error":
            errors.append(frame)
            if len(errors) == 2:
                on_two_errors()
        elif frame["type"] in TERMINAL:
            ended.add(frame["run_id"])
    return errors


async def test_a_dead_websocket_peer_is_closed_by_keepalive_and_its_runs_go_on(make_service: ServiceFactory) -> None:
    """W3 (with 1 s ping interval and timeout instead of 20 s): a client that never answers pings is closed
    within interval + timeout (+ slack), and the run it followed completes and stays resumable."""
    service = await make_service(uvicorn={"ws_ping_interval": 1.0, "ws_ping_timeout": 1.0})
    hold = asyncio.Event()
    service.upstream.enqueue(text("first "), gate(hold), text("second"), finish())
    chat = await service.create_chat()
    run = (await service.http.post(f"/v1/chats/{chat}/runs", json={"message": "go"})).json()
    port = int(service.url.rsplit(":", 1)[1])
    reader, writer = await asyncio.open_connection("127.0.0.1", port)
    key = base64.b64encode(os.urandom(16)).decode()
    writer.write(
        f"GET /v1/ws HTTP/1.1\r\nHost: 127.0.0.1:{port}\r\nUpgrade: websocket\r\nConnection: Upgrade\r\n"
        f"Sec-WebSocket-Key: {key}\r\nSec-WebSocket-Version: 13\r\n\r\n".encode()
    )
    assert (await reader.readuntil(b"\r\n\r\n")).startswith(b"HTTP/1.1 101")
    writer.write(masked_text_frame(json.dumps({"type": "run.resume", "run_id": run["id"], "after": 0}).encode()))
    loop = asyncio.get_running_loop()
    opened = loop.time()
    async with asyncio.timeout(10):
        while await reader.read(65536):  # read what comes (events, pings) but never answer a ping
            pass
    closed_after = loop.time() - opened
    writer.close()
    hold.set()

    _, events = await collect_events(service.http, "GET", run["events_url"])
    assert closed_after <= 1.0 + 1.0 + 2.0
    assert events[-1]["type"] == "run.completed"
    assert text_of(events) == "first second"


def masked_text_frame(payload: bytes) -> bytes:
    """One client-to-server WebSocket text frame (RFC 6455: clients mask), for payloads under 64 KiB."""
    mask = os.urandom(4)
    length = bytes([0x80 | len(payload)]) if len(payload) < 126 else bytes([0x80 | 126]) + len(payload).to_bytes(2)
    return bytes([0x81]) + length + mask + bytes(b ^ mask[i % 4] for i, b in enumerate(payload))
