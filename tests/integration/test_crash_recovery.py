"""A ``kill -9`` of the service on its embedded run backend strands no run (decision 67).

The process is really killed mid-answer; a new one on the same database must answer for the run:
``failed`` with its partial answer (checkpointed every ``SERVICE_CHECKPOINT_INTERVAL_S``, 2 s) in the
chat, events 410, the chat free for the next run.
"""

from __future__ import annotations

import asyncio
import json
import time

import httpx
import pytest

from tests.integration.test_persistence import database_url  # noqa: F401 - the fixture
from tests.support.live_server import ServiceProcess
from tests.support.sse import iter_sse

pytestmark = pytest.mark.slow

CHECKPOINT_S = 2.0  # the default, the loss window the docs promise
SLACK_S = 1.0  # the tick and its write, on a loaded machine


def env_for(url: str) -> dict[str, str]:
    return {
        "SERVICE_DATABASE_URL": url,
        "SERVICE_DEMO_TOKEN_DELAY_MS": "20",
        "SERVICE_LOG_LEVEL": "warning",
    }


async def stream_for(
    client: httpx.AsyncClient, chat: str, message: str, seconds: float
) -> tuple[str, list[tuple[float, str]]]:
    """Start a run and read its text for ``seconds``; returns the run id and ``(time, text so far)`` pairs."""
    seen: list[tuple[float, str]] = []
    run_id, text = "", ""
    async with client.stream(
        "POST", f"/v1/chats/{chat}/runs", json={"message": message}, headers={"accept": "text/event-stream"}
    ) as response:
        assert response.status_code == 200
        deadline = time.monotonic() + seconds
        async for sse in iter_sse(response):
            if not sse.data:
                continue
            event = json.loads(sse.data)
            run_id = event["run_id"]
            if event["type"] == "text.delta":
                text += event["delta"]
                seen.append((time.monotonic(), text))
            if time.monotonic() >= deadline:
                break
    return run_id, seen


async def test_a_run_killed_mid_answer_is_failed_interrupted_after_the_restart(database_url: str) -> None:  # noqa: F811
    message = " ".join(f"word{i}" for i in range(400))  # ~420 chunks at 20 ms: ~8 s of answer
    env = env_for(database_url)
    async with ServiceProcess(env) as first, httpx.AsyncClient(base_url=first.url, timeout=20) as client:
        chat = (await client.post("/v1/chats", json={})).json()["id"]
        run_id, seen = await stream_for(client, chat, message, seconds=3 * CHECKPOINT_S)
        first.kill()  # SIGKILL: no shutdown, no final write
        killed_at = time.monotonic()
    assert seen and seen[-1][0] < killed_at
    streamed = seen[-1][1]

    async with ServiceProcess(env) as second, httpx.AsyncClient(base_url=second.url, timeout=20) as client:
        run = await client.get(f"/v1/runs/{run_id}")
        assert run.status_code == 200, run.text
        assert run.json()["status"] == "failed"
        assert run.json()["finished_at"] is not None
        assert (await client.get(f"/v1/runs/{run_id}/events")).status_code == 410
        active = await client.get(f"/v1/chats/{chat}/active-run")
        assert (active.status_code, active.json()) == (200, None)

        messages = (await client.get(f"/v1/chats/{chat}")).json()["messages"]
        answer = next(m for m in messages if m["role"] == "assistant" and m["run_id"] == run_id)
        assert (answer["status"], answer["finish_reason"]) == ("failed", "interrupted")
        assert answer["id"] == run.json()["message_id"]
        stored = answer["content"] or ""
        # What the checkpoint kept: a prefix of what was streamed, at most the loss window behind it.
        assert streamed.startswith(stored)
        window_start = killed_at - CHECKPOINT_S - SLACK_S
        must_have = max((text for at, text in seen if at <= window_start), key=len, default="")
        assert len(must_have) > 0
        assert stored.startswith(must_have), (len(stored), len(must_have), len(streamed))

        # The chat is free: a new run completes and sees the partial answer in its history.
        again = await client.post(f"/v1/chats/{chat}/runs", json={"message": "again"})
        assert again.status_code == 202, again.text
        assert (await client.post(f"/v1/runs/{again.json()['id']}/cancel")).status_code == 200
        assert (await client.delete(f"/v1/chats/{chat}")).status_code == 204
        assert (await client.get(f"/v1/runs/{run_id}")).status_code == 404  # its record went with the chat


async def test_runs_that_ended_before_the_crash_keep_their_status_after_the_restart(
    database_url: str,  # noqa: F811
) -> None:
    env = env_for(database_url)
    async with ServiceProcess(env) as first, httpx.AsyncClient(base_url=first.url, timeout=20) as client:
        chat = (await client.post("/v1/chats", json={})).json()["id"]
        run_id = (await client.post(f"/v1/chats/{chat}/runs", json={"message": "hello"})).json()["id"]
        for _ in range(500):
            finished = (await client.get(f"/v1/runs/{run_id}")).json()
            if finished["status"] != "running":
                break
            await asyncio.sleep(0.02)
        first.kill()
    assert finished["status"] == "completed"

    async with ServiceProcess(env) as second, httpx.AsyncClient(base_url=second.url, timeout=20) as client:
        after = (await client.get(f"/v1/runs/{run_id}")).json()
        assert {k: after[k] for k in ("status", "last_seq", "message_id", "chat_id")} == {
            k: finished[k] for k in ("status", "last_seq", "message_id", "chat_id")
        }
        assert (await client.get(f"/v1/runs/{run_id}/events")).status_code == 410
