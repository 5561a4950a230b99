"""The real service under uvicorn on a free port, fed by a scripted upstream over real HTTP."""

from __future__ import annotations

import json
import uuid
from collections.abc import AsyncIterator, Awaitable, Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import httpx
import msgspec
import pytest
import redis.asyncio
import websockets

from service.api.http_protocol import HttpProtocol
from service.api.ws_protocol import WebSocketProtocol
from service.app import create_app
from service.settings import Settings
from tests.support.live_server import serve
from tests.support.sse import collect_events
from tests.support.upstream import ScriptedUpstream, scripted_upstream

MODEL = "openai/scripted"
TERMINAL = {"run.completed", "run.cancelled", "run.failed"}


@dataclass
class Service:
    """A live service and the clients a test needs."""

    url: str
    http: httpx.AsyncClient
    upstream: ScriptedUpstream
    settings: Settings

    @property
    def ws_url(self) -> str:
        return self.url.replace("http://", "ws://") + "/v1/ws"

    async def create_chat(self, **body: Any) -> str:
        response = await self.http.post("/v1/chats", json={"model": MODEL, **body})
        assert response.status_code == 201, response.text
        return str(response.json()["id"])

    async def stream_run(self, chat_id: str, body: dict[str, Any] | str, **kwargs: Any) -> list[dict[str, Any]]:
        """POST a run with ``Accept: text/event-stream`` and read every event."""
        payload = {"message": body} if isinstance(body, str) else body
        response, events = await collect_events(
            self.http,
            "POST",
            f"/v1/chats/{chat_id}/runs",
            json=payload,
            headers={"accept": "text/event-stream"},
            **kwargs,
        )
        assert response.status_code == 200, response.text
        return events

    async def ws_run(self, chat_id: str, message: str, **options: Any) -> list[dict[str, Any]]:
        """Start a run over the WebSocket and read its events to the terminal one."""
        async with websockets.connect(self.ws_url) as ws:
            frame = {"type": "run.create", "client_ref": "r1", "chat_id": chat_id, "message": message, **options}
            await ws.send(json.dumps(frame))
            accepted = json.loads(await ws.recv())
            assert accepted["type"] == "run.accepted", accepted
            events = []
            while not events or events[-1]["type"] not in TERMINAL:
                events.append(json.loads(await ws.recv()))
            return events


ServiceFactory = Callable[..., Awaitable[Service]]


@pytest.fixture
async def upstream() -> AsyncIterator[ScriptedUpstream]:
    async with scripted_upstream() as scripted:
        yield scripted


def service_settings(tmp_path: Path, upstream: ScriptedUpstream, **overrides: Any) -> Settings:
    values: dict[str, Any] = {
        "database_url": f"sqlite+aiosqlite:///{tmp_path / 'chat.db'}",
        "openai_base_url": upstream.base_url,
        "openai_api_key": "test",
        "upstream_max_retries": 0,
        "demo_token_delay_ms": 0,
        "default_model": MODEL,
        "sse_ping_s": 1,
        **overrides,
    }
    return msgspec.convert(values, Settings)


@pytest.fixture
async def make_service(tmp_path: Path, upstream: ScriptedUpstream) -> AsyncIterator[ServiceFactory]:
    """Start services with settings overrides; all stop at the end of the test."""
    stack: list[Any] = []

    async def start(uvicorn: dict[str, Any] | None = None, **overrides: Any) -> Service:
        settings = service_settings(tmp_path, upstream, **overrides)
        options = {
            "http": HttpProtocol,
            "ws": WebSocketProtocol,
            "ws_max_size": 1024 * 1024,
            "ws_per_message_deflate": False,
            **(uvicorn or {}),
        }
        server = serve(create_app(settings), **options)
        url = await server.__aenter__()
        stack.append(server)
        client = httpx.AsyncClient(base_url=url, timeout=20)
        stack.append(client)
        return Service(url, client, upstream, settings)

    yield start
    for item in reversed(stack):
        await item.__aexit__(None, None, None)


@pytest.fixture
async def service(make_service: ServiceFactory) -> Service:
    return await make_service()


@pytest.fixture(params=["memory", pytest.param("redis", marks=[pytest.mark.redis, pytest.mark.xdist_group("redis")])])
async def backend(request: pytest.FixtureRequest) -> AsyncIterator[dict[str, Any]]:
    """Settings overrides that select the run backend (a Redis prefix of its own, deleted afterwards)."""
    if request.param == "memory":
        yield {}
        return
    redis_url = request.getfixturevalue("redis_url")
    prefix = f"test-{uuid.uuid4().hex}"
    yield {"redis_url": redis_url, "redis_prefix": prefix}
    await delete_prefix(redis_url, prefix)


async def delete_prefix(redis_url: str, prefix: str) -> None:
    """Delete every Redis key a test wrote under its prefix."""
    client = redis.asyncio.Redis.from_url(redis_url)
    try:
        keys = [key async for key in client.scan_iter(match=f"{prefix}:*", count=1000)]
        if keys:
            await client.delete(*keys)
    finally:
        await client.aclose()


def types(events: list[dict[str, Any]]) -> list[str]:
    return [e["type"] for e in events]


def text_of(events: list[dict[str, Any]]) -> str:
    return "".join(e["delta"] for e in events if e["type"] == "text.delta")
