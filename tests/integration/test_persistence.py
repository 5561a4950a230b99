"""Conversations survive restarts; providers route by ``provider/model``; a database outage fails cleanly."""

from __future__ import annotations

import asyncio
import contextlib
import json
import uuid
from collections.abc import AsyncIterator
from pathlib import Path
from typing import Any

import asyncpg  # type: ignore[import-untyped]
import httpx
import pytest

from tests.integration.conftest import MODEL, ServiceFactory
from tests.support.live_server import ServiceProcess
from tests.support.sse import collect_events
from tests.support.upstream import ScriptedUpstream, finish, gate, scripted_upstream, text


@contextlib.asynccontextmanager
async def fresh_database(postgres_url: str) -> AsyncIterator[str]:
    """A new PostgreSQL database for one test, dropped afterwards."""
    name = f"t_{uuid.uuid4().hex[:16]}"
    admin = await asyncpg.connect(postgres_url.replace("postgresql+asyncpg", "postgresql"))
    try:
        await admin.execute(f'CREATE DATABASE "{name}"')
        yield postgres_url.rsplit("/", 1)[0] + f"/{name}"
        await admin.execute(f'DROP DATABASE IF EXISTS "{name}" WITH (FORCE)')
    finally:
        await admin.close()


@pytest.fixture(params=["sqlite", pytest.param("postgres", marks=[pytest.mark.postgres])])
async def database_url(request: pytest.FixtureRequest, tmp_path: Path) -> AsyncIterator[str]:
    """A fresh SQLite file, or a fresh PostgreSQL database."""
    if request.param == "sqlite":
        yield f"sqlite+aiosqlite:///{tmp_path / 'chat.db'}"
        return
    async with fresh_database(request.getfixturevalue("postgres_url")) as url:
        yield url


def env_for(database_url: str, upstream: ScriptedUpstream, **extra: str) -> dict[str, str]:
    return {
        "SERVICE_DATABASE_URL": database_url,
        "SERVICE_OPENAI_BASE_URL": upstream.base_url,
        "SERVICE_OPENAI_API_KEY": "test",
        "SERVICE_UPSTREAM_MAX_RETRIES": "0",
        "SERVICE_DEFAULT_MODEL": MODEL,
        "SERVICE_LOG_LEVEL": "warning",
        **extra,
    }


async def turn(url: str, chat: str, message: str) -> list[dict[str, Any]]:
    async with httpx.AsyncClient(base_url=url, timeout=20) as client:
        response, events = await collect_events(
            client, "POST", f"/v1/chats/{chat}/runs", json={"message": message}, headers={"accept": "text/event-stream"}
        )
    assert response.status_code == 200
    assert events[-1]["type"] == "run.completed", events[-1]
    return events


@pytest.mark.slow
async def test_a_conversation_continues_after_a_restart_with_its_full_history(database_url: str) -> None:
    async with scripted_upstream() as upstream:
        env = env_for(database_url, upstream)
        for i in range(3):
            upstream.enqueue(text(f"answer {i}"), finish())
        async with ServiceProcess(env) as first:
            async with httpx.AsyncClient(base_url=first.url) as client:
                created = await client.post("/v1/chats", json={"model": MODEL, "system": "You are terse."})
            chat = created.json()["id"]
            for i in range(3):
                await turn(first.url, chat, f"question {i}")
        upstream.enqueue(text("answer 3"), finish())
        async with ServiceProcess(env) as second:
            await turn(second.url, chat, "question 3")
            async with httpx.AsyncClient(base_url=second.url) as client:
                stored = (await client.get(f"/v1/chats/{chat}")).json()

    sent = upstream.requests[-1].body["messages"]
    expected = [{"role": "system", "content": "You are terse."}]
    for i in range(3):
        expected += [{"role": "user", "content": f"question {i}"}, {"role": "assistant", "content": f"answer {i}"}]
    expected.append({"role": "user", "content": "question 3"})
    assert sent == expected
    assert [m["content"] for m in stored["messages"]] == [m["content"] for m in expected[1:]] + ["answer 3"]


async def test_two_providers_are_each_reached_by_their_model_id_and_keys_never_show(tmp_path: Path) -> None:
    async with scripted_upstream(models=("m1",)) as alpha, scripted_upstream(models=("m2",)) as beta:
        providers = {
            "providers": {
                "alpha": {"base_url": alpha.base_url, "api_key": "sk-alpha-secret", "models": ["m1"]},
                "beta": {"base_url": beta.base_url, "api_key_env": "BETA_KEY", "timeout_s": 5, "max_retries": 0},
            }
        }
        path = tmp_path / "providers.json"
        path.write_text(json.dumps(providers))
        alpha.enqueue(text("from alpha"), finish())
        beta.enqueue(text("from beta"), finish())
        env = {
            "SERVICE_DATABASE_URL": f"sqlite+aiosqlite:///{tmp_path / 'chat.db'}",
            "SERVICE_PROVIDERS": str(path),
            "SERVICE_DEFAULT_MODEL": "alpha/m1",
            "SERVICE_LOG_LEVEL": "debug",
            "BETA_KEY": "sk-beta-secret",
        }
        async with ServiceProcess(env) as service, httpx.AsyncClient(base_url=service.url) as client:
            models = (await client.get("/v1/models")).json()
            answers = {}
            for model in ["alpha/m1", "beta/anything"]:
                chat = (await client.post("/v1/chats", json={"model": model})).json()["id"]
                answers[model] = await turn(service.url, chat, "hi")
            unknown = await client.post("/v1/chats", json={"model": "alpha/m9"})
            logs = service.logs()

    # alpha's configured list, beta's own (no demo once upstreams are configured)
    assert {m["id"] for m in models["data"]} == {"alpha/m1", "beta/m2"}
    assert (alpha.model_requests, len(beta.model_requests)) == ([], 1)
    assert beta.model_requests[0].headers["authorization"] == "Bearer sk-beta-secret"
    assert alpha.requests[0].body["model"] == "m1"
    assert alpha.requests[0].headers["authorization"] == "Bearer sk-alpha-secret"
    assert beta.requests[0].body["model"] == "anything"
    assert beta.requests[0].headers["authorization"] == "Bearer sk-beta-secret"
    assert "from alpha" in json.dumps(answers["alpha/m1"])
    assert "from beta" in json.dumps(answers["beta/anything"])
    assert unknown.status_code == 400
    for secret in ["sk-alpha-secret", "sk-beta-secret"]:
        assert secret not in json.dumps(models)
        assert secret not in logs


async def test_a_bad_providers_file_stops_start_up_with_a_clear_message(tmp_path: Path) -> None:
    path = tmp_path / "providers.json"
    path.write_text('{"providers": {"x": {"base_url": 5}}}')
    env = {
        "SERVICE_PROVIDERS": str(path),
        "SERVICE_DEFAULT_MODEL": "x/m",
        "SERVICE_DATABASE_URL": "sqlite+aiosqlite:///:memory:",
    }
    process = ServiceProcess(env)
    with pytest.raises(RuntimeError) as failed:
        await process.start()
    await process.stop()
    assert "SERVICE_PROVIDERS file" in str(failed.value)
    assert "base_url" in str(failed.value)


async def test_a_database_that_is_down_at_start_up_stops_the_service_with_a_clear_message() -> None:
    process = ServiceProcess({"SERVICE_DATABASE_URL": "postgresql+asyncpg://postgres@127.0.0.1:1/test"})
    with pytest.raises(RuntimeError) as failed:
        await process.start()
    await process.stop()
    assert "StoreUnavailableError" in str(failed.value)


@pytest.mark.postgres
async def test_a_database_outage_mid_run_fails_the_run_and_writes_nothing_half(
    make_service: ServiceFactory, postgres_url: str
) -> None:
    async with fresh_database(postgres_url) as database_url:
        await outage_mid_run(make_service, database_url, postgres_url)


async def outage_mid_run(make_service: ServiceFactory, database_url: str, postgres_url: str) -> None:
    service = await make_service(database_url=database_url, final_write_retry_s=0.5)  # the store stays down
    name = database_url.rsplit("/", 1)[1]
    hold = asyncio.Event()
    service.upstream.enqueue(text("half an answer"), gate(hold), finish())
    chat = await service.create_chat()
    run = (await service.http.post(f"/v1/chats/{chat}/runs", json={"message": "hi"})).json()
    admin = await asyncpg.connect(postgres_url.replace("postgresql+asyncpg", "postgresql"))
    try:
        await admin.execute(f'ALTER DATABASE "{name}" ALLOW_CONNECTIONS false')
        await admin.execute("SELECT pg_terminate_backend(pid) FROM pg_stat_activity WHERE datname = $1", name)
        hold.set()
        _, events = await collect_events(service.http, "GET", run["events_url"])
        during = await service.http.get(f"/v1/chats/{chat}")
        ready = await service.http.get("/readyz")
        await admin.execute(f'ALTER DATABASE "{name}" ALLOW_CONNECTIONS true')
    finally:
        await admin.close()

    assert events[-1]["type"] == "run.failed"
    assert events[-1]["error"]["code"] == "store_unavailable"
    assert (during.status_code, during.json()["error"]["code"]) == (503, "store_unavailable")
    assert ready.status_code == 503
    after = await service.http.get(f"/v1/chats/{chat}")
    assert after.status_code == 200
    assert [m["role"] for m in after.json()["messages"]] == ["user"]  # the answer was not half-written
    assert (await service.http.get(f"/v1/runs/{run['id']}")).json()["status"] == "failed"
    assert (await service.http.get("/readyz")).status_code == 200


async def test_chats_page_newest_first_without_loss_and_deleted_chats_are_gone(service_factory_db: Any) -> None:
    service = service_factory_db
    created = [await service.create_chat(system=f"chat {i}") for i in range(7)]
    seen: list[str] = []
    cursor = None
    pages = 0
    while True:
        params = {"limit": 3, **({"cursor": cursor} if cursor else {})}
        page = (await service.http.get("/v1/chats", params=params)).json()
        seen += [chat["id"] for chat in page["items"]]
        pages += 1
        cursor = page["next_cursor"]
        if cursor is None:
            break
    assert seen == list(reversed(created))
    assert pages == 3

    assert (await service.http.delete(f"/v1/chats/{created[3]}")).status_code == 204
    assert (await service.http.get(f"/v1/chats/{created[3]}")).status_code == 404
    assert (await service.http.delete(f"/v1/chats/{created[3]}")).status_code == 404
    remaining = (await service.http.get("/v1/chats", params={"limit": 100})).json()["items"]
    assert created[3] not in [chat["id"] for chat in remaining]
    assert len(remaining) == 6


@pytest.fixture
async def service_factory_db(make_service: ServiceFactory, database_url: str) -> Any:
    return await make_service(database_url=database_url)
