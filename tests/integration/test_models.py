"""Issue 17 item 4: ``GET /v1/models`` lists each provider's own models; ``provider/*`` is no model.

A provider configured without a ``models`` list is asked for its own ``GET /v1/models`` (through its
SDK client), and the answer is kept for ``SERVICE_MODELS_CACHE_S``; a failed fetch leaves the provider
out, with a warning. A configured list is the list (no fetch). ``openai/*`` (what the listing once
showed) is never listed and never reaches the upstream: a chat or run naming it answers 400.
"""

from __future__ import annotations

import asyncio
import json
import time
from pathlib import Path

import httpx
import websockets

from service.engine.providers import ProviderRegistry
from tests.integration.conftest import ServiceFactory, service_settings
from tests.support.log_records import recorded
from tests.support.upstream import ScriptedUpstream, status


async def listed(http: httpx.AsyncClient) -> list[str]:
    response = await http.get("/v1/models")
    assert response.status_code == 200, response.text
    return [m["id"] for m in response.json()["data"]]


async def test_models_are_the_providers_own_list_kept_for_the_cache_time(make_service: ServiceFactory) -> None:
    service = await make_service(models_cache_s=2.0)
    service.upstream.models = ["gpt-a", "gpt-b", "*"]
    assert await listed(service.http) == ["openai/gpt-a", "openai/gpt-b"]  # the wildcard is never listed
    assert await listed(service.http) == ["openai/gpt-a", "openai/gpt-b"]
    (request,) = service.upstream.model_requests  # the second call within the cache time did not ask again
    assert request.headers["authorization"] == "Bearer test"  # through the provider's SDK client

    service.upstream.models = ["gpt-c"]
    deadline = time.monotonic() + 10
    while (models := await listed(service.http)) != ["openai/gpt-c"]:
        assert models == ["openai/gpt-a", "openai/gpt-b"]
        assert time.monotonic() < deadline, "the cached list never expired"
        await asyncio.sleep(0.1)
    assert len(service.upstream.model_requests) == 2


async def test_concurrent_callers_share_one_fetch(tmp_path: Path, upstream: ScriptedUpstream) -> None:
    registry = ProviderRegistry(service_settings(tmp_path, upstream))
    upstream.models, upstream.model_list_gate = ["m1", "m2"], asyncio.Event()
    try:
        callers = [asyncio.create_task(registry.list_models()) for _ in range(5)]
        await upstream.wait_for_model_requests(1)
        callers[0].cancel()  # a caller that goes away does not cancel the others' fetch
        upstream.model_list_gate.set()
        answers = await asyncio.gather(*callers[1:])
    finally:
        await registry.close()
    assert answers == [[("openai/m1", "openai"), ("openai/m2", "openai")]] * 4
    assert len(upstream.model_requests) == 1


async def test_a_provider_whose_list_fails_is_left_out_with_a_warning(make_service: ServiceFactory) -> None:
    service = await make_service(models_cache_s=0.5)
    service.upstream.model_list_error = status(503)
    with recorded("service.engine") as log:
        assert await listed(service.http) == []
    assert len(service.upstream.model_requests) == 1
    (warning,) = [m for m in log.messages() if "could not list its models" in m]
    assert "provider openai" in warning
    assert "503" in warning

    service.upstream.model_list_error = None  # the upstream is back: asked again once the failure expires
    deadline = time.monotonic() + 10
    while await listed(service.http) != ["openai/scripted"]:
        assert time.monotonic() < deadline, "the failed fetch was never retried"
        await asyncio.sleep(0.1)


async def test_a_configured_model_list_is_the_list_and_is_not_fetched(
    make_service: ServiceFactory, upstream: ScriptedUpstream, tmp_path: Path
) -> None:
    pinned = {"base_url": upstream.base_url, "models": ["x1", "x2"]}
    providers = tmp_path / "providers.json"
    providers.write_text(json.dumps({"providers": {"pinned": pinned, "open": {"base_url": upstream.base_url}}}))
    service = await make_service(providers=str(providers), openai_base_url=None, default_model="pinned/x1")
    assert await listed(service.http) == ["pinned/x1", "pinned/x2", "open/scripted"]
    assert len(upstream.model_requests) == 1  # only the provider without a list was asked


async def test_a_wildcard_model_is_refused_with_400_naming_the_field(make_service: ServiceFactory) -> None:
    service = await make_service()
    response = await service.http.post("/v1/chats", json={"model": "openai/*"})
    assert response.status_code == 400, response.text
    error = response.json()["error"]
    assert (error["code"], error["detail"]["field"]) == ("unknown_model", "model")
    assert "wildcard" in error["message"]

    chat = await service.create_chat()
    response = await service.http.post(f"/v1/chats/{chat}/runs", json={"message": "hi", "model": "openai/*"})
    assert response.status_code == 400, response.text
    assert response.json()["error"]["detail"]["field"] == "model"

    async with websockets.connect(service.ws_url) as ws:
        frame = {"type": "run.create", "client_ref": "w", "chat_id": chat, "message": "hi", "model": "openai/*"}
        await ws.send(json.dumps(frame))
        answer = json.loads(await ws.recv())
    assert (answer["type"], answer["code"], answer["ref"]) == ("error", "unknown_model", "w")
    assert answer["detail"]["field"] == "model"
    assert service.upstream.requests == []  # "*" never went upstream as a model
