"""Per-subject limits with auth on (ACCEPTANCE X4): running runs, request rate, token budget, sizes."""

from __future__ import annotations

import asyncio
import json
import uuid
from collections.abc import AsyncIterator
from typing import Any

import httpx
import pytest
import websockets

from tests.integration.conftest import Service, ServiceFactory, delete_prefix
from tests.support.auth import AUDIENCE, SECRET, hs256
from tests.support.upstream import finish, gate, text, usage

pytestmark = pytest.mark.xdist_group("auth")


def limited(**overrides: Any) -> dict[str, Any]:
    return {"auth": "jwt", "jwt_secret": SECRET, "jwt_audience": AUDIENCE, "stream_token_secret": "s" * 32, **overrides}


@pytest.fixture
async def clients() -> AsyncIterator[dict[str, httpx.AsyncClient]]:
    made: dict[str, httpx.AsyncClient] = {}
    yield made
    for client in made.values():
        await client.aclose()


def client_for(service: Service, clients: dict[str, httpx.AsyncClient], sub: str) -> httpx.AsyncClient:
    token = hs256(sub, iss=None)
    clients[sub] = httpx.AsyncClient(base_url=service.url, headers={"authorization": f"Bearer {token}"}, timeout=20)
    return clients[sub]


async def new_chat(client: httpx.AsyncClient) -> str:
    response = await client.post("/v1/chats", json={})
    assert response.status_code == 201, response.text
    return str(response.json()["id"])


@pytest.mark.parametrize("backend", ["memory", pytest.param("redis", marks=pytest.mark.redis)])
async def test_running_runs_per_subject_are_capped_on_http_and_websocket(
    backend: str, make_service: ServiceFactory, clients: dict[str, httpx.AsyncClient], request: pytest.FixtureRequest
) -> None:
    overrides: dict[str, Any] = {"max_active_runs_per_subject": 2}
    if backend == "redis":
        redis_url = request.getfixturevalue("redis_url")
        overrides |= {"redis_url": redis_url, "redis_prefix": f"limits-{uuid.uuid4().hex[:12]}"}
    service = await make_service(**limited(**overrides))
    try:
        await _running_runs_are_capped(service, clients)
    finally:
        if backend == "redis":
            await delete_prefix(overrides["redis_url"], overrides["redis_prefix"])


async def _running_runs_are_capped(service: Service, clients: dict[str, httpx.AsyncClient]) -> None:
    alice, bob = client_for(service, clients, "alice"), client_for(service, clients, "bob")
    release = asyncio.Event()
    for _ in range(2):
        service.upstream.enqueue(text("held"), gate(release), finish())
    held = []
    for _ in range(2):
        response = await alice.post(f"/v1/chats/{await new_chat(alice)}/runs", json={"message": "hi"})
        assert response.status_code == 202, response.text
        held.append(response.json()["id"])
    await service.upstream.wait_for_requests(2)

    third = await alice.post(f"/v1/chats/{await new_chat(alice)}/runs", json={"message": "hi"})
    assert third.status_code == 429, third.text
    assert third.json()["error"]["code"] == "too_many_runs"
    assert int(third.headers["retry-after"]) >= 1
    chat = await new_chat(alice)
    token = (await alice.post("/v1/ws-token")).json()["token"]
    async with websockets.connect(f"{service.ws_url}?token={token}") as ws:
        await ws.send(json.dumps({"type": "run.create", "chat_id": chat, "message": "hi", "client_ref": "c"}))
        frame = json.loads(await ws.recv())
    assert (frame["type"], frame["code"], frame["ref"]) == ("error", "too_many_runs", "c")
    assert len(service.upstream.requests) == 2  # the refused starts reached no upstream

    other = await bob.post(f"/v1/chats/{await new_chat(bob)}/runs", json={"message": "hi"})
    assert other.status_code == 202  # another subject is not affected

    release.set()
    for run in held:
        async with asyncio.timeout(10):
            while (await alice.get(f"/v1/runs/{run}")).json()["status"] == "running":
                await asyncio.sleep(0.02)
    again = await alice.post(f"/v1/chats/{chat}/runs", json={"message": "hi"})
    assert again.status_code == 202, again.text


async def test_request_rate_per_subject(make_service: ServiceFactory, clients: dict[str, httpx.AsyncClient]) -> None:
    service = await make_service(**limited(rate_limit_per_minute=5))
    alice, bob = client_for(service, clients, "alice"), client_for(service, clients, "bob")
    statuses = [(await alice.get("/v1/chats")).status_code for _ in range(6)]
    assert statuses == [200] * 5 + [429]
    refused = await alice.get("/v1/chats")
    assert refused.json()["error"]["code"] == "rate_limited"
    assert int(refused.headers["retry-after"]) >= 1
    assert (await bob.get("/v1/chats")).status_code == 200  # keyed by subject, not by address
    assert (await service.http.get("/healthz")).status_code == 200  # health is not limited


async def test_token_budget_refuses_before_any_upstream_call(
    make_service: ServiceFactory, clients: dict[str, httpx.AsyncClient]
) -> None:
    service = await make_service(**limited(token_budget=25))
    alice, bob = client_for(service, clients, "alice"), client_for(service, clients, "bob")
    service.upstream.enqueue(text("costly"), finish(), usage(10, 20))  # 30 tokens: over the budget after it
    chat = await new_chat(alice)
    first = await alice.post(f"/v1/chats/{chat}/runs", json={"message": "hi"}, headers={"accept": "text/event-stream"})
    assert first.status_code == 200
    assert '"run.completed"' in first.text

    second = await alice.post(f"/v1/chats/{chat}/runs", json={"message": "again"})
    assert second.status_code == 429, second.text
    assert second.json()["error"]["code"] == "budget_exhausted"
    assert second.json()["error"]["detail"] == {"token_budget": 25, "used": 30}
    assert 1 <= int(second.headers["retry-after"]) <= 3600
    assert len(service.upstream.requests) == 1
    assert (await bob.post(f"/v1/chats/{await new_chat(bob)}/runs", json={"message": "hi"})).status_code == 202


async def test_message_size_and_parts_limits_answer_422_naming_the_field(
    make_service: ServiceFactory, clients: dict[str, httpx.AsyncClient]
) -> None:
    service = await make_service(**limited(max_message_chars=100, max_content_parts=3))
    alice = client_for(service, clients, "alice")
    chat = await new_chat(alice)
    parts = [{"type": "text", "text": "x"}]
    for body in [{"message": "x" * 101}, {"message": parts * 4}]:
        response = await alice.post(f"/v1/chats/{chat}/runs", json=body)
        assert response.status_code == 422, response.text
        assert response.json()["error"]["code"] == "limit_exceeded"
        assert response.json()["error"]["detail"]["field"] == "message"
    assert (await alice.post(f"/v1/chats/{chat}/runs", json={"message": "x" * 100})).status_code == 202
    async with asyncio.timeout(10):
        while (await alice.get(f"/v1/chats/{chat}/active-run")).json() is not None:
            await asyncio.sleep(0.02)
    assert (await alice.post(f"/v1/chats/{chat}/runs", json={"message": parts * 3})).status_code == 202
    assert len(service.upstream.requests) <= 2


async def test_history_sent_upstream_is_capped_to_the_newest_turns(
    make_service: ServiceFactory, clients: dict[str, httpx.AsyncClient]
) -> None:
    service = await make_service(**limited(max_history_chars=70))
    alice = client_for(service, clients, "alice")
    chat = await new_chat(alice)
    for turn in range(3):
        service.upstream.enqueue(text(f"answer {turn}"), finish())  # 8 characters
        message = f"{turn}" * 30
        response = await alice.post(
            f"/v1/chats/{chat}/runs", json={"message": message}, headers={"accept": "text/event-stream"}
        )
        assert '"run.completed"' in response.text
    sent = [[m["content"] for m in r.body["messages"]] for r in service.upstream.requests]
    assert sent[0] == ["0" * 30]
    assert sent[1] == ["0" * 30, "answer 0", "1" * 30]  # 68 characters: all of it fits
    assert sent[2] == ["1" * 30, "answer 1", "2" * 30]  # the oldest turn is left out
    stored = (await alice.get(f"/v1/chats/{chat}")).json()["messages"]
    assert len(stored) == 6  # the store keeps everything
