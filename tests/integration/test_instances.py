"""Several service processes behind one Redis serve each other's runs.

Two (and, for the crash test, three) real uvicorn processes share one Redis
prefix and one SQLite file; the scripted upstream runs in the test process.
"""

from __future__ import annotations

import asyncio
import json
import statistics
import uuid
from collections.abc import AsyncIterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import httpx
import pytest
import pytest_asyncio
import websockets

from tests.integration.conftest import MODEL, TERMINAL, delete_prefix, text_of
from tests.support.live_server import ServiceProcess
from tests.support.sse import collect_events, iter_sse
from tests.support.upstream import ScriptedUpstream, finish, gate, scripted_upstream, sleep, text
from tests.support.wait import until

pytestmark = [
    pytest.mark.redis,
    pytest.mark.xdist_group("redis"),
    pytest.mark.asyncio(loop_scope="module"),
]


@dataclass
class Cluster:
    """Two instances, the upstream they share, and a client for each."""

    upstream: ScriptedUpstream
    env: dict[str, str]
    a: httpx.AsyncClient
    b: httpx.AsyncClient
    b_url: str

    async def create_chat(self) -> str:
        response = await self.a.post("/v1/chats", json={"model": MODEL})
        assert response.status_code == 201, response.text
        return str(response.json()["id"])

    async def start_on_a(self, chat: str, message: str = "go") -> dict[str, Any]:
        response = await self.a.post(f"/v1/chats/{chat}/runs", json={"message": message})
        assert response.status_code == 202, response.text
        return dict(response.json())


def instance_env(tmp: Path, upstream: ScriptedUpstream, redis_url: str, prefix: str) -> dict[str, str]:
    return {
        "SERVICE_DATABASE_URL": f"sqlite+aiosqlite:///{tmp / 'shared.db'}",
        "SERVICE_REDIS_URL": redis_url,
        "SERVICE_REDIS_PREFIX": prefix,
        "SERVICE_OPENAI_BASE_URL": upstream.base_url,
        "SERVICE_OPENAI_API_KEY": "test",
        "SERVICE_UPSTREAM_MAX_RETRIES": "0",
        "SERVICE_DEFAULT_MODEL": MODEL,
        "SERVICE_LOG_LEVEL": "warning",
    }


@pytest_asyncio.fixture(scope="module", loop_scope="module")
async def cluster(redis_url: str, tmp_path_factory: pytest.TempPathFactory) -> AsyncIterator[Cluster]:
    prefix = f"test-{uuid.uuid4().hex}"
    async with scripted_upstream() as upstream:
        env = instance_env(tmp_path_factory.mktemp("cluster"), upstream, redis_url, prefix)
        async with (
            ServiceProcess(env) as a,
            ServiceProcess(env) as b,
            httpx.AsyncClient(base_url=a.url, timeout=20) as ca,
            httpx.AsyncClient(base_url=b.url, timeout=20) as cb,
        ):
            yield Cluster(upstream, env, ca, cb, b.url)
    await delete_prefix(redis_url, prefix)


async def test_a_run_started_on_a_is_followed_resumed_and_cancelled_from_b(cluster: Cluster) -> None:
    hold = asyncio.Event()
    cluster.upstream.enqueue([s for i in range(6) for s in text(f"part{i} ")], gate(hold), text("never"), finish())
    chat = await cluster.create_chat()
    token = uuid.uuid4().hex
    run = await cluster.start_on_a(chat, message=token)
    upstream_request = await _upstream_request_for(cluster.upstream, token)

    seen: list[dict[str, Any]] = []
    async with cluster.b.stream("GET", run["events_url"]) as first:
        async for message in iter_sse(first):
            if message.kind == "event":
                seen.append(message.json())
                if len(seen) == 4:
                    break
    resumed = cluster.b.stream("GET", run["events_url"], headers={"Last-Event-ID": str(seen[-1]["seq"])})
    async with resumed as second:
        async for message in iter_sse(second):
            if message.kind == "event":
                seen.append(message.json())
                if seen[-1]["type"] == "text.delta" and seen[-1]["delta"] == "part5 ":
                    break
    ws_url = cluster.b_url.replace("http://", "ws://") + "/v1/ws"
    async with websockets.connect(ws_url) as ws:
        await ws.send(json.dumps({"type": "run.resume", "run_id": run["id"], "after": seen[-1]["seq"]}))
        assert json.loads(await ws.recv())["type"] == "run.resumed"
        assert (await cluster.b.post(f"/v1/runs/{run['id']}/cancel")).status_code == 200
        while seen[-1]["type"] not in TERMINAL:
            seen.append(json.loads(await ws.recv()))
    async with asyncio.timeout(10):  # a guard; the figures are test_cancel_across_instances_latency's
        await upstream_request.disconnected_event.wait()
    assert upstream_request.finished_at is not None

    assert [e["seq"] for e in seen] == list(range(1, len(seen) + 1))
    assert seen[-1]["type"] == "run.cancelled"
    assert text_of(seen) == "".join(f"part{i} " for i in range(6))
    stored = (await cluster.b.get(f"/v1/chats/{chat}")).json()["messages"][-1]
    assert (stored["status"], stored["content"]) == ("cancelled", text_of(seen))


async def cancel_trials(cluster: Cluster, trials: int) -> tuple[list[float], list[float]]:
    """``trials`` runs started on A and cancelled on B, overlapping a few at a time.

    Each must end in ``run.cancelled`` with nothing the upstream sent after the cancel, its upstream
    request closed, and a second cancel answered 200. Returns, per trial and sorted, the seconds from the
    cancel to the terminal event on B's stream, and to the upstream request's end.
    """
    chats = [await cluster.create_chat() for _ in range(trials)]
    loop = asyncio.get_running_loop()
    limiter = asyncio.Semaphore(5)  # trials overlap, but not so many that the test measures its own load

    async def trial(chat: str) -> tuple[float, float]:
        async with limiter:
            token = uuid.uuid4().hex
            hold = asyncio.Event()
            cluster.upstream.enqueue(text(f"{token} "), gate(hold), text("late"), finish())
            run = await cluster.start_on_a(chat, message=token)
            request = await _upstream_request_for(cluster.upstream, token)
            reader = asyncio.create_task(collect_events(cluster.b, "GET", run["events_url"]))
            while (await cluster.b.get(f"/v1/runs/{run['id']}")).json()["last_seq"] < 2:
                await asyncio.sleep(0.01)
            cancelled_at = loop.time()
            first = await cluster.b.post(f"/v1/runs/{run['id']}/cancel")
            _, events = await reader
            terminal_after = loop.time() - cancelled_at
            async with asyncio.timeout(10):  # a guard, not the figure
                await request.disconnected_event.wait()
            assert request.finished_at is not None
            second = await cluster.b.post(f"/v1/runs/{run['id']}/cancel")
            assert (first.status_code, second.status_code) == (200, 200)
            assert events[-1]["type"] == "run.cancelled"
            assert "late" not in text_of(events)
            return terminal_after, request.finished_at - cancelled_at

    results = await asyncio.gather(*(trial(chat) for chat in chats))
    terminal, closed = sorted(r[0] for r in results), sorted(r[1] for r in results)
    p99 = terminal[int(0.99 * len(terminal)) - 1]
    print(f"R12: terminal p50 {statistics.median(terminal):.3f}s p99 {p99:.3f}s; upstream closed max {closed[-1]:.3f}s")
    return terminal, closed


async def test_cancel_across_instances_100_trials(cluster: Cluster) -> None:
    """R12, what must hold whatever the machine's load: every cancel on B ends A's run and its upstream."""
    terminal, closed = await cancel_trials(cluster, 100)
    assert len(terminal) == len(closed) == 100


@pytest.mark.latency
async def test_cancel_across_instances_latency(cluster: Cluster) -> None:
    """R12's figures (`just test-latency`): terminal event p99 <= 1 s, upstream closed <= 2 s after the cancel."""
    terminal, closed = await cancel_trials(cluster, 100)
    assert terminal[int(0.99 * len(terminal)) - 1] <= 1.0
    assert closed[-1] <= 2.0


async def test_a_crashed_owner_fails_its_run_for_readers_on_other_instances(cluster: Cluster) -> None:
    """The owner dies mid-run: readers elsewhere get run.failed owner_lost, and the chat is usable again."""
    async with ServiceProcess(cluster.env) as doomed, httpx.AsyncClient(base_url=doomed.url, timeout=20) as c:
        chat = (await c.post("/v1/chats", json={"model": MODEL})).json()["id"]
        cluster.upstream.enqueue_for("crash", text("before the crash "), sleep(60), finish())
        run = (await c.post(f"/v1/chats/{chat}/runs", json={"message": "crash"})).json()
        reader = asyncio.create_task(collect_events(cluster.b, "GET", run["events_url"]))
        while (await cluster.b.get(f"/v1/runs/{run['id']}")).json()["last_seq"] < 2:
            await asyncio.sleep(0.02)
        doomed.kill()
        async with asyncio.timeout(15):
            _, events = await reader

    assert events[-1]["type"] == "run.failed"
    assert events[-1]["error"]["code"] == "owner_lost"
    assert sum(e["type"] == "run.failed" for e in events) == 1
    assert (await cluster.b.get(f"/v1/runs/{run['id']}")).json()["status"] == "failed"
    cluster.upstream.enqueue(text("after"), finish())
    retry = await cluster.b.post(
        f"/v1/chats/{chat}/runs", json={"message": "again"}, headers={"accept": "text/event-stream"}
    )
    assert retry.status_code == 200


async def _upstream_request_for(upstream: ScriptedUpstream, message: str) -> Any:
    while True:
        for request in upstream.requests:
            if request.body["messages"][-1]["content"] == message:
                return request
        await asyncio.sleep(0.01)


async def test_a_chat_deleted_on_a_cannot_start_a_run_on_b_that_ran_it_before(cluster: Cluster) -> None:
    cluster.upstream.enqueue(text("first"), finish())
    chat = await cluster.create_chat()
    first = await cluster.b.post(f"/v1/chats/{chat}/runs", json={"message": "one"})
    assert first.status_code == 202  # B now keeps the chat's settings
    while (await cluster.b.get(f"/v1/chats/{chat}/active-run")).json() is not None:
        await asyncio.sleep(0.02)

    assert (await cluster.a.delete(f"/v1/chats/{chat}")).status_code == 204
    again = await cluster.b.post(f"/v1/chats/{chat}/runs", json={"message": "two"})

    assert again.status_code == 404
    assert again.json()["error"]["code"] == "not_found"
    assert (await cluster.b.get(f"/v1/chats/{chat}")).status_code == 404
    assert (await cluster.a.get(f"/v1/chats/{chat}")).status_code == 404


async def test_runs_of_one_chat_alternating_between_instances_send_its_whole_history(cluster: Cluster) -> None:
    """Each instance keeps the newest messages of the chats it ran; what the other instance added in between
    (its questions and answers) still reaches the model, in order."""
    chat, token = await cluster.create_chat(), uuid.uuid4().hex
    for turn in range(5):
        cluster.upstream.enqueue(text(f"answer {turn}"), finish())
        client = cluster.a if turn % 2 == 0 else cluster.b
        response = await client.post(
            f"/v1/chats/{chat}/runs", json={"message": f"{token} {turn}"}, headers={"accept": "text/event-stream"}
        )
        assert '"run.completed"' in response.text

    ours = [r for r in cluster.upstream.requests if r.body["messages"][0]["content"] == f"{token} 0"]
    expected: list[str] = []
    for turn, request in enumerate(ours):
        expected.append(f"{token} {turn}")
        assert [m["content"] for m in request.body["messages"]] == expected
        expected.append(f"answer {turn}")
    assert len(ours) == 5


@pytest.mark.parametrize("path", ["run", "active-run", "delete"])
async def test_every_status_read_finishes_a_run_whose_owner_was_killed(cluster: Cluster, path: str) -> None:
    """Issue 15 item 3: with nobody reading the run, GET run, active-run and DELETE of the chat on B
    finish a kill -9'd owner's run as owner_lost (not running / 409 for ever)."""
    async with ServiceProcess(cluster.env) as doomed, httpx.AsyncClient(base_url=doomed.url, timeout=20) as c:
        chat = (await c.post("/v1/chats", json={"model": MODEL})).json()["id"]
        cluster.upstream.enqueue_for(f"crash {path}", text("before the crash "), sleep(60), finish())
        run = (await c.post(f"/v1/chats/{chat}/runs", json={"message": f"crash {path}"})).json()
        while (await cluster.b.get(f"/v1/runs/{run['id']}")).json()["last_seq"] < 2:
            await asyncio.sleep(0.02)
        doomed.kill()

    async def finished() -> bool:
        match path:
            case "run":
                return (await cluster.b.get(f"/v1/runs/{run['id']}")).json()["status"] != "running"
            case "active-run":
                return (await cluster.b.get(f"/v1/chats/{chat}/active-run")).json() is None
            case _:
                return (await cluster.b.delete(f"/v1/chats/{chat}")).status_code != 409

    await until(finished, timeout=20)  # the owner's liveness key expires after its TTL (5 s)
    record = (await cluster.b.get(f"/v1/runs/{run['id']}")).json()
    assert record["status"] == "failed"
    _, events = await collect_events(cluster.b, "GET", run["events_url"], params={"after": record["last_seq"] - 1})
    assert [e["error"]["code"] for e in events if e["type"] == "run.failed"] == ["owner_lost"]
