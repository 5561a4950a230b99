"""Client JSON schemas cannot freeze the service: caps up front, RE2 matching, a bounded demo model."""

from __future__ import annotations

import asyncio
import json
import time
from pathlib import Path
from typing import Any

import pytest
import websockets

from service.settings import Settings, SettingsError
from tests.integration.conftest import Service, ServiceFactory
from tests.support.upstream import chunk, finish, gate, text

REDOS = {"type": "string", "pattern": "^(a+)+$"}


def schema_format(schema: dict[str, Any]) -> dict[str, Any]:
    return {"type": "json_schema", "json_schema": {"name": "answer", "schema": schema}}


async def test_a_catastrophic_pattern_does_not_stall_other_streams(service: Service) -> None:
    """The output `"aaa…a!"` against ^(a+)+$ took 11.6 s of the event loop at 28 characters; now none."""
    release = asyncio.Event()
    service.upstream.enqueue(text("steady", pieces=3), gate(release), text(" stream", pieces=2), finish())
    service.upstream.enqueue(chunk({"content": json.dumps("a" * 28 + "!")}), finish())
    steady_chat = await service.create_chat()
    steady = asyncio.create_task(service.stream_run(steady_chat, "hi"))
    await service.upstream.wait_for_requests(1)
    chat = await service.create_chat(response_format=schema_format(REDOS))

    started = time.monotonic()
    async with asyncio.timeout(2):
        events = await service.stream_run(chat, "hi")
    assert events[-1]["type"] == "run.failed"
    assert "does not match" in events[-1]["error"]["message"]
    release.set()
    async with asyncio.timeout(2):
        assert (await steady)[-1]["type"] == "run.completed"
    assert time.monotonic() - started < 2


async def test_an_oversized_schema_is_refused_before_any_work(service: Service) -> None:
    big = {"type": "object", "description": "x" * 1_500_000}
    started = time.monotonic()
    response = await service.http.post("/v1/chats", json={"response_format": schema_format(big)})
    assert time.monotonic() - started < 1.0  # checking it whole took 8 s
    assert response.status_code == 400
    assert response.json()["error"]["detail"]["field"] == "response_format.json_schema.schema"
    assert "bytes" in response.json()["error"]["message"]


@pytest.mark.parametrize(
    "schema",
    [
        {"type": "object", "properties": {f"p{i}": {"type": "string"} for i in range(5_001)}},
        {"enum": list(range(1_001))},
        {"type": "string", "pattern": "(a)\\1"},
    ],
    ids=["properties", "enum-values", "backreference"],
)
async def test_schemas_over_a_cap_are_400_on_http_and_websocket(service: Service, schema: dict[str, Any]) -> None:
    chat = await service.create_chat()
    response = await service.http.post(
        f"/v1/chats/{chat}/runs", json={"message": "hi", "response_format": schema_format(schema)}
    )
    assert response.status_code == 400, response.text
    assert response.json()["error"]["detail"]["field"] == "response_format.json_schema.schema"
    async with websockets.connect(service.ws_url) as ws:
        frame = {"type": "run.create", "chat_id": chat, "message": "hi", "client_ref": "s"}
        await ws.send(json.dumps({**frame, "response_format": schema_format(schema)}))
        error = json.loads(await ws.recv())
    assert (error["type"], error["ref"]) == ("error", "s")
    assert error["detail"]["field"] == "response_format.json_schema.schema"
    assert service.upstream.requests == []


async def test_the_demo_model_answers_any_schema_with_a_bounded_stream(make_service: ServiceFactory) -> None:
    service = await make_service(demo=True)
    schema = {"type": "array", "minItems": 200_000, "items": {"type": "array", "minItems": 200_000}}
    chat = await service.create_chat(model="demo", response_format=schema_format(schema))
    async with asyncio.timeout(10):
        events = await service.stream_run(chat, "hi")
    assert len(events) < 1_500  # 200,000 x 200,000 items asked for
    assert events[-1]["type"] in {"run.completed", "run.failed"}


def test_the_demo_model_is_off_once_an_upstream_is_configured() -> None:
    assert Settings().demo_enabled
    upstream = {"openai_base_url": "http://127.0.0.1:1/v1", "default_model": "openai/m"}
    assert not Settings(**upstream).demo_enabled
    assert Settings(**upstream, demo=True).demo_enabled
    with pytest.raises(SettingsError, match="SERVICE_DEMO=true"):
        Settings.from_env({"SERVICE_OPENAI_BASE_URL": "http://127.0.0.1:1/v1"})


async def test_models_list_the_demo_only_when_it_is_on(make_service: ServiceFactory, tmp_path: Path) -> None:
    without = await make_service()
    assert "demo" not in {m["id"] for m in (await without.http.get("/v1/models")).json()["data"]}
    response = await without.http.post("/v1/chats", json={"model": "demo"})
    assert response.status_code == 400
    assert response.json()["error"]["code"] == "unknown_model"
    with_demo = await make_service(demo=True, database_url=f"sqlite+aiosqlite:///{tmp_path / 'demo.db'}")  # its own
    assert "demo" in {m["id"] for m in (await with_demo.http.get("/v1/models")).json()["data"]}
