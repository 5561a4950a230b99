"""Issue 15 item 2: the run backend's Redis paused, restarted (with and without its data) or down at boot.

Each test starts a redis-server of its own on a free port (``tests/support/redis_server.py``) and
pauses it with SIGSTOP or restarts it; the shared Redis is never touched. The service runs under
uvicorn in the test's loop, the upstream is the scripted one over real HTTP.
"""

from __future__ import annotations

import asyncio
import contextlib
import json
import time
from collections.abc import Awaitable, Callable
from pathlib import Path
from typing import Any

import pytest
import websockets

from tests.integration.conftest import TERMINAL, Service, ServiceFactory, text_of
from tests.support.redis_server import RedisServer
from tests.support.sse import collect_events
from tests.support.upstream import finish, gate, text
from tests.support.wait import until

pytestmark = [pytest.mark.redis, pytest.mark.xdist_group("redis-outage")]

PAUSE_S = 8.0


async def start_held_run(service: Service, chat: str, hold: asyncio.Event, words: int = 3) -> dict[str, Any]:
    """A run whose upstream sends ``words`` words, then waits for ``hold``, then ``"end"``."""
    service.upstream.enqueue([s for i in range(words) for s in text(f"w{i} ")], gate(hold), text("end"), finish())
    response = await service.http.post(f"/v1/chats/{chat}/runs", json={"message": "go"})
    assert response.status_code == 202, response.text
    run = dict(response.json())
    await until(lambda: _last_seq_at_least(service, run["id"], words + 1), timeout=10)
    return run


async def _last_seq_at_least(service: Service, run_id: str, seq: int) -> bool:
    return int((await service.http.get(f"/v1/runs/{run_id}")).json()["last_seq"]) >= seq


async def ws_follow(service: Service, run_id: str) -> list[dict[str, Any]]:
    """Resume ``run_id`` from 0 over a WebSocket; every frame up to a terminal event or an ``error`` frame."""
    frames: list[dict[str, Any]] = []
    async with websockets.connect(service.ws_url) as ws:
        await ws.send(json.dumps({"type": "run.resume", "run_id": run_id, "after": 0}))
        assert json.loads(await ws.recv())["type"] == "run.resumed"
        while not frames or frames[-1]["type"] not in {*TERMINAL, "error"}:
            frames.append(json.loads(await ws.recv()))
    return frames


async def ws_create(service: Service, chat: str) -> dict[str, Any]:
    async with websockets.connect(service.ws_url) as ws:
        await ws.send(json.dumps({"type": "run.create", "client_ref": "c1", "chat_id": chat, "message": "hi"}))
        async with asyncio.timeout(15):  # today: no frame at all
            return dict(json.loads(await ws.recv()))


def assert_exact(events: list[dict[str, Any]], words: int) -> None:
    assert [e["seq"] for e in events] == list(range(1, len(events) + 1))
    assert events[-1]["type"] == "run.completed"
    assert text_of(events) == "".join(f"w{i} " for i in range(words)) + "end"


async def test_a_pause_answers_503_runs_unavailable_and_runs_and_readers_carry_on(
    make_service: ServiceFactory, tmp_path: Path
) -> None:
    """Redis SIGSTOPped 8 s: requests get typed 503s (WS: an error frame); the open run and its readers go on."""
    async with RedisServer(tmp_path) as redis:
        service = await make_service(redis_url=redis.url, runs_outage_s=30)
        chat, other = await service.create_chat(), await service.create_chat()
        hold = asyncio.Event()
        run = await start_held_run(service, chat, hold)
        sse_reader = asyncio.create_task(collect_events(service.http, "GET", run["events_url"]))
        ws_reader = asyncio.create_task(ws_follow(service, run["id"]))
        await asyncio.sleep(0.3)  # both readers are tailing
        with redis.paused():
            started = time.monotonic()
            # The upstream goes on: the owner's next append times out (5 s) while Redis is paused and is
            # repeated; Redis runs both once it resumes, and the repeat must find its own event, not add it again.
            hold.set()
            post, get, frame, ready = await asyncio.gather(
                service.http.post(f"/v1/chats/{other}/runs", json={"message": "hi"}),
                service.http.get(f"/v1/runs/{run['id']}"),
                ws_create(service, other),
                service.http.get("/readyz"),
            )
            await asyncio.sleep(max(0.0, PAUSE_S - (time.monotonic() - started)))
        for response in (post, get):
            assert response.status_code == 503, response.text
            assert response.json()["error"]["code"] == "runs_unavailable"
        assert (frame["type"], frame["code"], frame["ref"]) == ("error", "runs_unavailable", "c1")
        assert ready.status_code == 503

        async with asyncio.timeout(20):
            (_, sse_events), ws_frames = await sse_reader, await ws_reader
        assert_exact(sse_events, 3)
        assert_exact(ws_frames, 3)
        service.upstream.enqueue(text("again"), finish())
        again = await service.stream_run(other, "again")  # the service reconnected by itself
        assert again[-1]["type"] == "run.completed"
        assert (await service.http.get("/readyz")).status_code == 200


async def test_an_outage_past_the_bound_fails_the_run_ends_every_stream_and_frees_the_chat(
    make_service: ServiceFactory, tmp_path: Path
) -> None:
    """Redis paused past SERVICE_RUNS_OUTAGE_S: SSE ends with a documented close, WS gets an error frame,
    and once Redis is back the owner's terminal event is there: failed runs_unavailable, the chat free."""
    async with RedisServer(tmp_path) as redis:
        service = await make_service(redis_url=redis.url, runs_outage_s=2)
        chat = await service.create_chat()
        hold = asyncio.Event()
        run = await start_held_run(service, chat, hold)
        sse_reader = asyncio.create_task(collect_events(service.http, "GET", run["events_url"]))
        ws_reader = asyncio.create_task(ws_follow(service, run["id"]))
        await asyncio.sleep(0.3)
        with redis.paused():
            hold.set()
            async with asyncio.timeout(PAUSE_S):  # the readers give up within the pause
                (response, sse_events), ws_frames = await sse_reader, await ws_reader
            assert response.status_code == 200
            assert sse_events[-1]["type"] == "text.delta"  # no terminal event: the body ended cleanly
            assert ws_frames[-1]["type"] == "error"
            assert (ws_frames[-1]["code"], ws_frames[-1]["ref"]) == ("runs_unavailable", run["id"])
            await asyncio.sleep(max(0.0, PAUSE_S - 7))

        async def finished() -> bool:
            body = (await service.http.get(f"/v1/runs/{run['id']}")).json()
            return body.get("status") not in (None, "running")

        await until(finished, timeout=15)
        record = (await service.http.get(f"/v1/runs/{run['id']}")).json()
        assert record["status"] == "failed"
        _, tail = await collect_events(service.http, "GET", run["events_url"], params={"after": 4})
        assert tail[-1]["type"] == "run.failed"
        assert tail[-1]["error"]["code"] == "runs_unavailable"
        assert (await service.http.get(f"/v1/chats/{chat}/active-run")).json() is None
        stored = (await service.http.get(f"/v1/chats/{chat}")).json()["messages"][-1]
        assert stored["status"] == "failed"
        service.upstream.enqueue(text("next"), finish())
        assert (await service.stream_run(chat, "next"))[-1]["type"] == "run.completed"


@pytest.mark.parametrize("runs", [10])
async def test_runs_survive_a_restart_of_a_persistent_redis(
    make_service: ServiceFactory, tmp_path: Path, runs: int
) -> None:
    """Redis restarted with its data while runs stream: every run completes exactly; none stays running."""
    async with RedisServer(tmp_path, persistent=True) as redis:
        service = await make_service(redis_url=redis.url, runs_outage_s=30)
        holds = [asyncio.Event() for _ in range(runs)]
        chats = [await service.create_chat() for _ in range(runs)]
        started = [await start_held_run(service, chat, hold) for chat, hold in zip(chats, holds, strict=True)]
        readers = [asyncio.create_task(collect_events(service.http, "GET", r["events_url"])) for r in started]
        await asyncio.sleep(0.3)
        await redis.restart(down_s=1.0)
        for hold in holds:
            hold.set()
        async with asyncio.timeout(30):
            results = await asyncio.gather(*readers, return_exceptions=True)

        async def statuses() -> list[str]:
            return [(await service.http.get(f"/v1/runs/{r['id']}")).json()["status"] for r in started]

        with contextlib.suppress(TimeoutError):
            await until(lambda: _none_running(statuses), timeout=15)
        stranded = (await statuses()).count("running")
        intact = sum(not isinstance(r, BaseException) and _is_exact(r[1], 3) for r in results)
        print(f"restart with persistence: stranded {stranded}/{runs}, streams intact {intact}/{runs}")
        assert (stranded, intact) == (0, runs)
        assert await statuses() == ["completed"] * runs
        for chat in chats:
            assert (await service.http.get(f"/v1/chats/{chat}/active-run")).json() is None


async def _none_running(statuses: Callable[[], Awaitable[list[str]]]) -> bool:
    return "running" not in await statuses()


def _is_exact(events: list[dict[str, Any]], words: int) -> bool:
    try:
        assert_exact(events, words)
    except AssertionError:
        return False
    return True


async def test_a_restart_that_loses_redis_data_ends_runs_and_streams(
    make_service: ServiceFactory, tmp_path: Path
) -> None:
    """Redis restarted empty: the owner stops the run, readers get a terminal event, the chat is free."""
    async with RedisServer(tmp_path) as redis:
        service = await make_service(redis_url=redis.url, runs_outage_s=30)
        chat = await service.create_chat()
        hold = asyncio.Event()
        run = await start_held_run(service, chat, hold)
        sse_reader = asyncio.create_task(collect_events(service.http, "GET", run["events_url"]))
        ws_reader = asyncio.create_task(ws_follow(service, run["id"]))
        await asyncio.sleep(0.3)
        await redis.restart(down_s=0.5)
        hold.set()
        async with asyncio.timeout(20):
            (_, sse_events), ws_frames = await sse_reader, await ws_reader
        for events in (sse_events, ws_frames):
            assert events[-1]["type"] == "run.failed"
            assert events[-1]["error"]["code"] == "runs_unavailable"
        assert (await service.http.get(f"/v1/runs/{run['id']}")).status_code == 404
        await until(lambda: _stored_status(service, chat, "failed"), timeout=10)
        service.upstream.enqueue(text("next"), finish())
        assert (await service.stream_run(chat, "next"))[-1]["type"] == "run.completed"
        assert not await redis_keys_without_ttl(redis.url)


async def _stored_status(service: Service, chat: str, status: str) -> bool:
    messages = (await service.http.get(f"/v1/chats/{chat}")).json()["messages"]
    return messages[-1].get("status") == status


async def redis_keys_without_ttl(url: str) -> list[bytes]:
    """Run keys left without an expiry once nothing runs (a stream re-created without its record)."""
    import redis.asyncio as aioredis

    client = aioredis.Redis.from_url(url)
    try:
        leftovers = []
        async for key in client.scan_iter(match="*:run:*"):
            if await client.ttl(key) == -1:
                leftovers.append(key)
        return leftovers
    finally:
        await client.aclose()


async def test_the_service_starts_without_redis_answers_not_ready_and_recovers(
    make_service: ServiceFactory, tmp_path: Path
) -> None:
    """Redis unreachable at boot: the service starts, /readyz and runs answer 503, and it recovers by itself."""
    redis = RedisServer(tmp_path)
    service = await make_service(redis_url=redis.url)  # nothing listens there yet
    chat = await service.create_chat()
    assert (await service.http.get("/healthz")).status_code == 200
    assert (await service.http.get("/readyz")).status_code == 503
    refused = await service.http.post(f"/v1/chats/{chat}/runs", json={"message": "hi"})
    assert refused.status_code == 503, refused.text
    assert refused.json()["error"]["code"] == "runs_unavailable"
    async with redis:

        async def ready() -> bool:
            return (await service.http.get("/readyz")).status_code == 200

        await until(ready, timeout=10)
        service.upstream.enqueue(text("up"), finish())
        assert (await service.stream_run(chat, "up"))[-1]["type"] == "run.completed"
