"""With in-memory runs, one process per database: a second one refuses to start and says why.

Before: ``uvicorn --workers 2`` on the embedded defaults answered 404 for the other worker's runs
and accepted a second run on a busy chat. Both databases, real processes.
"""

from __future__ import annotations

import asyncio
from collections.abc import AsyncIterator
from pathlib import Path

import httpx
import pytest

from tests.integration.test_persistence import database_url, env_for  # noqa: F401 - database_url is a fixture
from tests.support.live_server import ServiceProcess
from tests.support.upstream import ScriptedUpstream, finish, gate, scripted_upstream, text

REFUSAL = (
    "with in-memory runs; several processes (uvicorn --workers, or more instances) must share runs: "
    "set SERVICE_REDIS_URL"
)


@pytest.fixture
async def upstream() -> AsyncIterator[ScriptedUpstream]:
    async with scripted_upstream() as scripted:
        yield scripted


async def test_a_second_instance_on_the_same_database_refuses_to_start(
    database_url: str,  # noqa: F811 - the fixture
    upstream: ScriptedUpstream,
) -> None:
    env = env_for(database_url, upstream)
    async with ServiceProcess(env) as first:
        second = ServiceProcess(env, startup_timeout=30)
        with pytest.raises(RuntimeError, match="service exited with 3"):
            await second.start()
        assert REFUSAL in second.logs()
        assert (await httpx.AsyncClient(base_url=first.url).get("/healthz")).status_code == 200
    # Once the first has stopped, the database is free again.
    async with ServiceProcess(env):
        pass


async def test_workers_without_redis_leave_one_serving_and_no_run_is_lost(
    tmp_path: Path, upstream: ScriptedUpstream
) -> None:
    env = env_for(f"sqlite+aiosqlite:///{tmp_path / 'chat.db'}", upstream)
    async with ServiceProcess(env, extra_args=["--workers", "2"], startup_timeout=60) as proc:
        await proc.wait_for_log(REFUSAL, timeout=60)
        held = asyncio.Event()
        not_found = accepted_twice = 0
        # A fresh connection per request, so that every worker that listens gets some.
        async with httpx.AsyncClient(
            base_url=proc.url, timeout=20, limits=httpx.Limits(max_keepalive_connections=0)
        ) as http:
            for _ in range(8):
                upstream.enqueue(text("slow"), gate(held), finish())
                chat = (await http.post("/v1/chats", json={})).json()["id"]
                run = (await http.post(f"/v1/chats/{chat}/runs", json={"message": "a"})).json()
                not_found += (await http.get(f"/v1/runs/{run['id']}")).status_code == 404
                accepted_twice += (await http.post(f"/v1/chats/{chat}/runs", json={"message": "b"})).status_code == 202
                held.set()
                held.clear()
        assert (not_found, accepted_twice) == (0, 0)
