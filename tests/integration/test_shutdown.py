"""Shutdown: running runs get a grace period, then are cancelled with reason ``shutdown``; nothing is lost."""

from __future__ import annotations

import asyncio
import signal
from pathlib import Path

import httpx

from tests.integration.conftest import MODEL
from tests.support.live_server import ServiceProcess
from tests.support.sse import collect_events
from tests.support.upstream import finish, gate, scripted_upstream, sleep, text


async def test_sigterm_lets_short_runs_finish_and_cancels_long_ones_after_the_grace_period(tmp_path: Path) -> None:
    async with scripted_upstream() as upstream:
        env = {
            "SERVICE_DATABASE_URL": f"sqlite+aiosqlite:///{tmp_path / 'chat.db'}",
            "SERVICE_OPENAI_BASE_URL": upstream.base_url,
            "SERVICE_OPENAI_API_KEY": "test",
            "SERVICE_DEFAULT_MODEL": MODEL,
            "SERVICE_SHUTDOWN_GRACE_S": "1.5",
        }
        never = asyncio.Event()
        upstream.enqueue(text("short and "), sleep(0.5), text("done"), finish())
        upstream.enqueue(text("long and "), gate(never), text("never"), finish())
        async with ServiceProcess(env) as service, httpx.AsyncClient(base_url=service.url, timeout=20) as client:
            chats = [(await client.post("/v1/chats", json={"model": MODEL})).json()["id"] for _ in range(2)]
            short = (await client.post(f"/v1/chats/{chats[0]}/runs", json={"message": "short"})).json()
            await upstream.wait_for_requests(1)  # the scripts are served in request order
            long = (await client.post(f"/v1/chats/{chats[1]}/runs", json={"message": "long"})).json()
            long_request = (await upstream.wait_for_requests(2))[1]
            while (await client.get(f"/v1/runs/{long['id']}")).json()["last_seq"] < 2:
                await asyncio.sleep(0.02)
            reader = asyncio.create_task(collect_events(client, "GET", long["events_url"]))
            await asyncio.sleep(0.1)
            service.process.send_signal(signal.SIGTERM)  # type: ignore[union-attr]
            loop = asyncio.get_running_loop()
            asked_at = loop.time()
            status = await asyncio.to_thread(service.process.wait, 15)  # type: ignore[union-attr]
            stopped_after = loop.time() - asked_at
            await asyncio.gather(reader, return_exceptions=True)
            assert long_request.client_disconnected

        async with ServiceProcess(env) as again, httpx.AsyncClient(base_url=again.url) as client:
            short_messages = (await client.get(f"/v1/chats/{chats[0]}")).json()["messages"]
            long_messages = (await client.get(f"/v1/chats/{chats[1]}")).json()["messages"]

    assert status == -signal.SIGTERM  # uvicorn re-raises the signal after a clean shutdown
    assert stopped_after < 1.5 + 5
    assert (short_messages[-1]["status"], short_messages[-1]["content"]) == ("completed", "short and done")
    assert (long_messages[-1]["status"], long_messages[-1]["content"]) == ("cancelled", "long and ")
    assert short["id"] != long["id"]
