"""Hostile WebSocket peers against the real service processes (``service.api.ws_protocol``, ACCEPTANCE W2).

Each test runs the service as the README runs it in production (``uvicorn ... --ws
service.api.ws_protocol:WebSocketProtocol``, via ``ServiceProcess``) or as ``python -m service``, and
reads the process's resident memory from ``/proc``. uvicorn's own protocol fails each of them (see the
figures in docs/decisions.md).
"""

from __future__ import annotations

import asyncio
import base64
import json
import os
import socket
import statistics
import sys
import time
from pathlib import Path

import httpx
import pytest
import websockets

from tests.support.live_server import ServiceProcess, free_port

pytestmark = [pytest.mark.slow, pytest.mark.xdist_group("ws-hostile"), pytest.mark.timeout(120)]
MiB = 1024 * 1024


def rss_mb(pid: int) -> float:
    for line in Path(f"/proc/{pid}/status").read_text().splitlines():
        if line.startswith("VmRSS:"):
            return int(line.split()[1]) / 1024
    raise AssertionError("no VmRSS")


def production(tmp_path: Path, **env: str) -> ServiceProcess:
    return ServiceProcess({"SERVICE_DATABASE_URL": f"sqlite+aiosqlite:///{tmp_path / 'chat.db'}", **env})


def python_m_service(tmp_path: Path) -> ServiceProcess:
    process = production(tmp_path, SERVICE_PORT="0")
    process.port = free_port()
    process.url = f"http://127.0.0.1:{process.port}"
    process.env["SERVICE_PORT"] = str(process.port)
    process.command = [sys.executable, "-m", "service"]
    return process


async def oversize(url: str, size: int) -> tuple[int | None, float]:
    """Send one message of ``size`` bytes; the close code the server sent and how long it took."""
    started = time.monotonic()
    try:
        async with websockets.connect(url, max_size=None, compression=None) as ws:
            await ws.send("x" * size)
            await ws.recv()
    except websockets.ConnectionClosed as closed:
        return (closed.rcvd.code if closed.rcvd else None), time.monotonic() - started
    raise AssertionError("the socket stayed open")


@pytest.mark.parametrize("command", ["production", "python -m service"])
async def test_oversize_messages_close_with_1009_and_leave_no_memory_behind(tmp_path: Path, command: str) -> None:
    """W2: 100 messages of 2 MiB, each closed with 1009 within 1 s, grow RSS < 10 MB."""
    process = production(tmp_path) if command == "production" else python_m_service(tmp_path)
    async with process:
        url = process.url.replace("http", "ws") + "/v1/ws"
        await oversize(url, 2 * MiB)  # the first one warms up what any connection allocates
        before = rss_mb(process.pid)
        results = [await oversize(url, 2 * MiB) for _ in range(100)]
        grown = rss_mb(process.pid) - before
    assert {code for code, _ in results} == {1009}
    assert max(seconds for _, seconds in results) < 1.0
    assert grown < 10, f"RSS grew {grown:.1f} MB"


async def test_idle_sockets_do_not_keep_their_last_big_message(tmp_path: Path) -> None:
    """100 sockets, each after one 1 MB message (within the limit): they hold < 10 MB between them."""
    async with production(tmp_path) as process:
        url = process.url.replace("http", "ws") + "/v1/ws"
        before = rss_mb(process.pid)
        sockets = []
        for _ in range(100):
            ws = await websockets.connect(url, max_size=None, compression=None)
            await ws.send("x" * 1_000_000)
            assert json.loads(await ws.recv())["code"] == "frame_too_large"  # an error frame; the socket stays
            sockets.append(ws)
        held = rss_mb(process.pid) - before
        for ws in sockets:
            await ws.close()
    assert held < 10, f"100 idle sockets hold {held:.1f} MB"


async def test_the_service_caps_messages_whatever_uvicorns_limit(tmp_path: Path) -> None:
    """Under plain uvicorn (its own protocol, 16 MiB messages) the app still closes a 2 MiB message with 1009."""
    process = production(tmp_path)
    process.command = [
        sys.executable,
        "-m",
        "uvicorn",
        "service.app:create_app",
        "--factory",
        "--port",
        str(process.port),
    ]
    async with process:
        code, _ = await oversize(process.url.replace("http", "ws") + "/v1/ws", 2 * MiB)
    assert code == 1009


def _ping_flood(port: int, pings: int) -> tuple[int, str]:
    """Send up to ``pings`` masked pings with 125-byte payloads and never read the pongs."""
    sock = socket.create_connection(("127.0.0.1", port), timeout=10)
    key = base64.b64encode(os.urandom(16)).decode()
    sock.sendall(
        f"GET /v1/ws HTTP/1.1\r\nHost: 127.0.0.1:{port}\r\nUpgrade: websocket\r\nConnection: Upgrade\r\n"
        f"Sec-WebSocket-Key: {key}\r\nSec-WebSocket-Version: 13\r\n\r\n".encode()
    )
    assert b" 101 " in sock.recv(4096)
    batch = (b"\x89\xfd\x00\x00\x00\x00" + b"p" * 125) * 10_000
    sent, deadline = 0, time.monotonic() + 20
    try:
        while sent < pings and time.monotonic() < deadline:
            sock.sendall(batch)
            sent += 10_000
    except OSError as exc:  # the server closed the socket: the flood was refused
        return sent, type(exc).__name__
    finally:
        sock.close()
    return sent, "sent"


async def _stream_gaps(url: str) -> list[float]:
    async with httpx.AsyncClient(base_url=url) as http:
        chat = (await http.post("/v1/chats", json={})).json()["id"]
    async with websockets.connect(url.replace("http", "ws") + "/v1/ws") as ws:
        message = " ".join(f"w{i}" for i in range(300))  # the demo echoes it: ~300 deltas, 10 ms apart
        await ws.send(json.dumps({"type": "run.create", "chat_id": chat, "message": message}))
        last, gaps = None, []
        while True:
            event = json.loads(await ws.recv())
            if event["type"] == "text.delta":
                now = time.monotonic()
                if last is not None:
                    gaps.append(now - last)
                last = now
            if event["type"] in {"run.completed", "run.failed", "run.cancelled"}:
                return gaps


async def test_a_ping_flood_is_refused_without_growing_memory_or_stalling_others(tmp_path: Path) -> None:
    """600,000 pings never read: RSS grows <= 10 MB, another stream's gap p99 stays <= 100 ms."""
    async with production(tmp_path, SERVICE_DEMO_TOKEN_DELAY_MS="10") as process:
        before = rss_mb(process.pid)
        other = asyncio.create_task(_stream_gaps(process.url))
        await asyncio.sleep(0.2)  # the other stream is flowing
        flood = asyncio.get_running_loop().run_in_executor(None, _ping_flood, process.port, 600_000)
        peak = before
        while not flood.done():
            peak = max(peak, rss_mb(process.pid))
            await asyncio.sleep(0.05)
        sent, outcome = await flood
        gaps = await other
    assert outcome != "sent", f"all {sent} pings were taken"  # the socket was closed on the flooder
    assert peak - before <= 10, f"RSS grew {peak - before:.1f} MB"
    assert statistics.quantiles(gaps, n=100)[98] <= 0.1, f"gap p99 {statistics.quantiles(gaps, n=100)[98]:.3f} s"
