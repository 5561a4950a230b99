"""Four workers (or four hosts) started at once on one fresh PostgreSQL database and one Redis.

All start, the schema is migrated once (the migration's advisory lock, ``service/store/sql.py``),
and each serves the runs the others started. Two shapes of the same fleet: ``uvicorn --workers 4``
(one port; every request below goes on a new connection, so the kernel hands it to any worker)
and four separate service processes (four ports, so a run started on one is read on another).
"""

from __future__ import annotations

import asyncio
import time
import uuid
from collections.abc import AsyncIterator
from dataclasses import dataclass
from pathlib import Path

import asyncpg  # type: ignore[import-untyped]
import httpx
import pytest
import redis.asyncio

from service.store.sql import MIGRATIONS
from tests.integration.conftest import MODEL, delete_prefix, text_of
from tests.integration.test_instances import instance_env
from tests.integration.test_persistence import fresh_database
from tests.support.live_server import ServiceProcess
from tests.support.sse import collect_events
from tests.support.upstream import ScriptedUpstream, finish, gate, text

pytestmark = [
    pytest.mark.redis,
    pytest.mark.postgres,
    pytest.mark.xdist_group("redis"),
    pytest.mark.slow,
    pytest.mark.timeout(240),
]

FLEET = 4
STARTUP_S = 90.0
"""Four service processes importing and migrating at once on two shared cores."""
STARTED = "Application startup complete."
"""uvicorn's line when one worker's lifespan start-up (store, migration, run backend) has finished."""


@dataclass
class Fleet:
    """The started processes, the URL of each member (one URL per worker with ``--workers``)."""

    processes: list[ServiceProcess]
    urls: list[str]
    database_url: str
    redis_url: str
    prefix: str
    started_in_s: float

    def logs(self) -> str:
        return "\n".join(p.logs() for p in self.processes)


@pytest.fixture(params=["workers", "processes"])
async def fleet(
    request: pytest.FixtureRequest, redis_url: str, postgres_url: str, upstream: ScriptedUpstream, tmp_path: Path
) -> AsyncIterator[Fleet]:
    prefix = f"test-{uuid.uuid4().hex}"
    async with fresh_database(postgres_url) as database_url:
        env = instance_env(tmp_path, upstream, redis_url, prefix)
        env |= {"SERVICE_DATABASE_URL": database_url, "SERVICE_LOG_LEVEL": "info"}  # info: alembic's lines
        if request.param == "workers":
            processes = [ServiceProcess(env, extra_args=["--workers", str(FLEET)], startup_timeout=STARTUP_S)]
        else:
            processes = [ServiceProcess(env, startup_timeout=STARTUP_S) for _ in range(FLEET)]
        started = time.monotonic()
        try:
            await asyncio.gather(*(p.start() for p in processes))
            urls = [p.url for p in processes] * (FLEET // len(processes))
            fleet = Fleet(processes, urls, database_url, redis_url, prefix, 0.0)
            await _wait_for_instances(fleet)
            fleet.started_in_s = time.monotonic() - started
            print(f"{request.param}: {FLEET} instances up in {fleet.started_in_s:.1f} s")
            yield fleet
        finally:
            await asyncio.gather(*(p.stop() for p in processes))
            await delete_prefix(redis_url, prefix)


async def _instances(fleet: Fleet) -> int:
    """Instances whose run backend has a live heartbeat key in Redis (one per worker or process)."""
    client = redis.asyncio.Redis.from_url(fleet.redis_url)
    try:
        return len([key async for key in client.scan_iter(match=f"{fleet.prefix}:instance:*")])
    finally:
        await client.aclose()


async def _wait_for_instances(fleet: Fleet) -> None:
    """``/healthz`` answers once one worker is up; the others may still be starting."""
    deadline = time.monotonic() + STARTUP_S
    while fleet.logs().count(STARTED) < FLEET:
        assert time.monotonic() < deadline, f"not all {FLEET} instances started:\n{fleet.logs()}"
        await asyncio.sleep(0.1)


def _fresh(url: str) -> httpx.AsyncClient:
    """A client whose every request opens a new connection (with ``--workers``: any worker's)."""
    return httpx.AsyncClient(base_url=url, timeout=20, limits=httpx.Limits(max_keepalive_connections=0))


async def test_a_fleet_started_at_once_migrates_once_and_serves_each_others_runs(
    fleet: Fleet, upstream: ScriptedUpstream
) -> None:
    admin = await asyncpg.connect(fleet.database_url.replace("postgresql+asyncpg", "postgresql"))
    try:
        versions = await admin.fetch("SELECT version_num FROM alembic_version")
        tables = {
            r["tablename"] for r in await admin.fetch("SELECT tablename FROM pg_tables WHERE schemaname = 'public'")
        }
    finally:
        await admin.close()
    assert len(versions) == 1
    assert {"chats", "messages", "alembic_version"} <= tables
    assert await _instances(fleet) == FLEET
    logs = fleet.logs()
    revisions = list((MIGRATIONS / "versions").glob("[0-9]*.py"))
    assert logs.count("Running upgrade") == len(revisions), logs  # alembic's line per revision applied
    assert "ERROR" not in logs, logs
    assert "Traceback" not in logs, logs

    for i in range(FLEET):  # started through member i, followed through i + 1, its chat read through i + 2
        starter, follower, reader = (_fresh(fleet.urls[(i + k) % FLEET]) for k in range(3))
        async with starter, follower, reader:
            hold = asyncio.Event()
            upstream.enqueue(text(f"answer {i}", pieces=3), gate(hold), text(" done"), finish())
            chat = (await starter.post("/v1/chats", json={"model": MODEL})).json()["id"]
            run = (await starter.post(f"/v1/chats/{chat}/runs", json={"message": "hi"})).json()
            assert (await follower.get(f"/v1/runs/{run['id']}")).json()["status"] == "running"
            hold.set()
            response, events = await collect_events(follower, "GET", run["events_url"])
            assert response.status_code == 200
            assert events[-1]["type"] == "run.completed"
            assert text_of(events) == f"answer {i} done"
            stored = (await reader.get(f"/v1/chats/{chat}")).json()["messages"]
            assert [m["role"] for m in stored] == ["user", "assistant"]
            assert stored[-1]["content"] == f"answer {i} done"
