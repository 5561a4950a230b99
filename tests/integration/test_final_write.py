"""The end of a run (its answer stored, then its terminal event) is written once and survives a short outage.

Issue 15 items 7 and 8. Before: a cancel that landed while the answer was being written (the SQLite
write lock held by another connection) wrote the answer a second time, hit the message's unique id
and wrote no terminal event at all, so the run stayed ``running`` (3 of 3 tries); and PostgreSQL down
for 8 s at the end of 10 runs lost all 10 answers (``store_unavailable`` at once).
"""

from __future__ import annotations

import asyncio
import sqlite3
import threading
from pathlib import Path
from typing import Any

import asyncpg  # type: ignore[import-untyped]
import pytest

from tests.integration.conftest import TERMINAL, Service, ServiceFactory
from tests.integration.test_persistence import fresh_database
from tests.support.sse import collect_events
from tests.support.upstream import finish, gate, text


class WriteLock:
    """Another connection holding SQLite's write lock (``BEGIN IMMEDIATE``), as a second process would."""

    def __init__(self, path: Path) -> None:
        self.path = path
        self.taken, self.release = threading.Event(), threading.Event()
        self.thread = threading.Thread(target=self._hold, daemon=True)

    def _hold(self) -> None:
        connection = sqlite3.connect(self.path, isolation_level=None, timeout=10)
        try:
            connection.execute("BEGIN IMMEDIATE")
            self.taken.set()
            self.release.wait(10)
            connection.execute("ROLLBACK")
        finally:
            connection.close()

    async def __aenter__(self) -> WriteLock:
        self.thread.start()
        assert await asyncio.to_thread(self.taken.wait, 5)
        return self

    async def __aexit__(self, *_: object) -> None:
        self.release.set()
        await asyncio.to_thread(self.thread.join, 5)


async def events_of(service: Service, run: dict[str, Any]) -> list[dict[str, Any]]:
    _, events = await collect_events(service.http, "GET", run["events_url"], timeout=15)
    return events


async def test_a_cancel_during_the_final_write_leaves_exactly_one_terminal_event(
    make_service: ServiceFactory, tmp_path: Path
) -> None:
    service = await make_service()
    for attempt in range(3):
        chat = await service.create_chat()
        upstream_done = asyncio.Event()
        service.upstream.enqueue(text("the whole answer"), gate(upstream_done), finish())
        before = len(service.upstream.requests)
        run = (await service.http.post(f"/v1/chats/{chat}/runs", json={"message": f"try {attempt}"})).json()
        request = (await service.upstream.wait_for_requests(before + 1))[before]
        async with WriteLock(tmp_path / "chat.db"):
            upstream_done.set()  # the answer ends: its final write now waits on the lock
            await asyncio.wait_for(request.finished_event.wait(), 5)
            await asyncio.sleep(0.2)  # the engine has read [DONE]; its store write is waiting
            cancel = await service.http.post(f"/v1/runs/{run['id']}/cancel")
            await asyncio.sleep(1.8)  # the lock is held 2 s in all
        events = await events_of(service, run)
        terminals = [event for event in events if event["type"] in TERMINAL]
        assert len(terminals) == 1, [event["type"] for event in events]
        assert terminals[0]["type"] == "run.completed"  # the answer was complete: the cancel came too late
        assert cancel.status_code == 200 and cancel.json()["status"] == "completed", cancel.text
        assert (await service.http.get(f"/v1/runs/{run['id']}")).json()["status"] == "completed"
        messages = (await service.http.get(f"/v1/chats/{chat}")).json()["messages"]
        assert [m["role"] for m in messages] == ["user", "assistant"]
        service.upstream.enqueue(text("again"), finish())
        again = await service.http.post(f"/v1/chats/{chat}/runs", json={"message": "again"})
        assert again.status_code == 202, again.text  # the chat is not left busy


@pytest.mark.postgres
async def test_the_final_write_waits_out_a_store_outage(make_service: ServiceFactory, postgres_url: str) -> None:
    """PostgreSQL refuses every connection for 8 s while 10 runs end: all 10 answers are kept."""
    async with fresh_database(postgres_url) as database_url:
        service = await make_service(database_url=database_url)
        name = database_url.rsplit("/", 1)[1]
        hold = asyncio.Event()
        runs = []
        for i in range(10):
            service.upstream.enqueue(text(f"answer {i}"), gate(hold), finish())
            chat = await service.create_chat()
            runs.append((chat, (await service.http.post(f"/v1/chats/{chat}/runs", json={"message": "hi"})).json()))
        admin = await asyncpg.connect(postgres_url.replace("postgresql+asyncpg", "postgresql"))
        try:
            await admin.execute(f'ALTER DATABASE "{name}" ALLOW_CONNECTIONS false')
            await admin.execute("SELECT pg_terminate_backend(pid) FROM pg_stat_activity WHERE datname = $1", name)
            hold.set()
            await asyncio.sleep(8)
            statuses = [(await service.http.get(f"/v1/runs/{run['id']}")).json()["status"] for _, run in runs]
            await admin.execute(f'ALTER DATABASE "{name}" ALLOW_CONNECTIONS true')
        finally:
            await admin.close()
        assert statuses == ["running"] * 10  # still retrying: not failed at the first refusal
        kept = 0
        for i, (chat, run) in enumerate(runs):
            events = await events_of(service, run)
            assert events[-1]["type"] == "run.completed", events[-1]
            messages = (await service.http.get(f"/v1/chats/{chat}")).json()["messages"]
            kept += [m["role"] for m in messages] == ["user", "assistant"] and f"answer {i}" in str(messages[-1])
        assert kept == 10
