"""Runs outlive connections: resume with no lost or duplicated event, cancel, retention, idempotency.

Every test runs on both run backends: in-process memory and the real Redis server.
"""

from __future__ import annotations

import asyncio
import json
import time
from typing import Any

import httpx
import websockets

from tests.integration.conftest import TERMINAL, Service, ServiceFactory, text_of, types
from tests.support.sse import collect_events, iter_sse
from tests.support.upstream import finish, gate, sleep, text, ttft, usage
from tests.support.wait import until


async def finished_run(service: Service, words: int) -> tuple[str, str, list[dict[str, Any]]]:
    """A completed run with ``words`` text deltas; returns (chat id, run id, its events)."""
    service.upstream.enqueue(text(" ".join(f"w{i}" for i in range(words))), finish(), usage(1, words))
    chat = await service.create_chat()
    events = await service.stream_run(chat, "go")
    return chat, events[0]["run_id"], events


async def read_events(service: Service, run_id: str, **headers: str) -> tuple[httpx.Response, list[dict[str, Any]]]:
    return await collect_events(service.http, "GET", f"/v1/runs/{run_id}/events", headers=headers)


async def test_every_cursor_of_a_finished_run_replays_exactly_the_rest(
    make_service: ServiceFactory, backend: dict[str, Any]
) -> None:
    """R2: N = 500 events; for every k, Last-Event-ID k gives k+1..N then closes; k = N gives 204."""
    service = await make_service(**backend)
    _, run_id, events = await finished_run(service, 494)
    n = len(events)
    assert n == 500
    limiter = asyncio.Semaphore(16)

    async def check(k: int) -> None:
        async with limiter:
            response, replay = await read_events(service, run_id, **{"Last-Event-ID": str(k)})
        if k == n:
            assert response.status_code == 204
        else:
            assert response.status_code == 200
            assert [e["seq"] for e in replay] == list(range(k + 1, n + 1)), k
            assert replay == events[k:]

    await asyncio.gather(*(check(k) for k in range(n + 1)))


async def test_bad_cursors_are_400_and_never_leak_another_runs_events(
    make_service: ServiceFactory, backend: dict[str, Any]
) -> None:
    """R3: abc, -1, N+1, 2**63 are 400 invalid_cursor; another run's seq gives only this run's events."""
    service = await make_service(**backend)
    _, short_run, short_events = await finished_run(service, 3)
    _, long_run, long_events = await finished_run(service, 30)
    n = len(short_events)
    for bad in ["abc", "-1", str(n + 1), str(2**63), "1.5", ""]:
        response, _ = await read_events(service, short_run, **{"Last-Event-ID": bad})
        assert response.status_code == 400, bad
        assert response.json()["error"]["code"] == "invalid_cursor"
    for bad_after in ["-1", "x", str(n + 1)]:
        response = await service.http.get(f"/v1/runs/{short_run}/events", params={"after": bad_after})
        assert response.status_code == 400, bad_after
    response, _ = await read_events(service, short_run, **{"Last-Event-ID": str(len(long_events) - 1)})
    assert response.status_code == 400
    _, replay = await read_events(service, long_run, **{"Last-Event-ID": str(n - 1)})
    assert {e["run_id"] for e in replay} == {long_run}


async def test_a_reader_cut_at_every_point_resumes_gaplessly_over_sse_and_websocket(
    make_service: ServiceFactory, backend: dict[str, Any]
) -> None:
    """A reader that disconnects after j events and resumes gets exactly the run's sequence, for every j."""
    service = await make_service(**backend)
    words = 24
    service.upstream.enqueue([s for i in range(words) for s in (*text(f"t{i} "), sleep(0.03))], finish(), usage(1, 1))
    chat = await service.create_chat()
    response = await service.http.post(f"/v1/chats/{chat}/runs", json={"message": "go"})
    assert response.status_code == 202
    run = response.json()
    expected_length = words + 6  # run.started, step.started, deltas, text.done, step.done, usage, run.completed

    async def sse_reader(j: int) -> list[int]:
        seen: list[dict[str, Any]] = []
        async with service.http.stream("GET", run["events_url"]) as first:
            async for message in iter_sse(first):
                if message.kind == "event":
                    seen.append(message.json())
                    if len(seen) == j:
                        break
        headers = {"Last-Event-ID": str(seen[-1]["seq"])}
        response, rest = await collect_events(service.http, "GET", run["events_url"], headers=headers)
        assert response.status_code in (200, 204)
        return [e["seq"] for e in seen + rest]

    async def ws_reader(j: int) -> list[int]:
        seen: list[dict[str, Any]] = []
        async with websockets.connect(service.ws_url) as ws:
            await ws.send(json.dumps({"type": "run.resume", "run_id": run["id"], "after": 0}))
            assert json.loads(await ws.recv())["type"] == "run.resumed"
            while len(seen) < j:
                seen.append(json.loads(await ws.recv()))
        async with websockets.connect(service.ws_url) as ws:
            await ws.send(json.dumps({"type": "run.resume", "run_id": run["id"], "after": seen[-1]["seq"]}))
            resumed = json.loads(await ws.recv())
            assert resumed["type"] == "run.resumed"
            while seen[-1]["type"] not in TERMINAL:
                seen.append(json.loads(await ws.recv()))
        return [e["seq"] for e in seen]

    cut_points = range(1, expected_length)
    results = await asyncio.gather(*(sse_reader(j) for j in cut_points), *(ws_reader(j) for j in cut_points))
    for sequence in results:
        assert sequence == list(range(1, expected_length + 1))
    assert len(service.upstream.requests) == 1


async def test_the_streaming_operations_answer_only_event_streams_without_an_accept_header(
    make_service: ServiceFactory, backend: dict[str, Any]
) -> None:
    """CreateRunStream and StreamRun stream with any Accept; a finished run read to its end is 200, not 204."""
    service = await make_service(**backend)
    service.upstream.enqueue(text("one two three"), finish(), usage(1, 3))
    chat = await service.create_chat()
    started, events = await collect_events(
        service.http, "POST", f"/v1/chats/{chat}/runs/stream", json={"message": "go"}, headers={"accept": "*/*"}
    )
    assert started.status_code == 200
    assert started.headers["content-type"].startswith("text/event-stream")
    assert [e["seq"] for e in events] == list(range(1, len(events) + 1))
    assert events[-1]["type"] == "run.completed"
    run_id, n = events[0]["run_id"], len(events)

    for k in range(n + 1):
        response, rest = await collect_events(
            service.http, "GET", f"/v1/runs/{run_id}/stream", headers={"Last-Event-ID": str(k)}
        )
        assert response.status_code == 200, k
        assert response.headers["content-type"].startswith("text/event-stream")
        assert rest == events[k:]
    _, after = await collect_events(service.http, "GET", f"/v1/runs/{run_id}/stream", params={"after": n - 1})
    assert after == events[-1:]
    assert (await service.http.get(f"/v1/runs/{run_id}/events", params={"after": n})).status_code == 204
    for path, status in [(f"/v1/runs/{run_id}/stream?after={n + 1}", 400), ("/v1/runs/nope/stream", 404)]:
        response = await service.http.get(path)
        assert response.status_code == status, path
    busy_gate = asyncio.Event()
    service.upstream.enqueue(text("slow"), gate(busy_gate), finish())
    async with service.http.stream("POST", f"/v1/chats/{chat}/runs/stream", json={"message": "again"}) as first:
        assert first.status_code == 200
        second = await service.http.post(f"/v1/chats/{chat}/runs/stream", json={"message": "busy"})
        assert second.status_code == 409
        assert second.json()["error"]["code"] == "chat_busy"
        busy_gate.set()
        await first.aread()


async def test_a_finished_run_answers_204_then_410_after_retention_and_the_answer_stays_in_the_chat(
    make_service: ServiceFactory, backend: dict[str, Any]
) -> None:
    """R7: late join within retention replays everything; after it, 410; the message is readable; 1 upstream call."""
    retention_s = 1.0
    service = await make_service(run_retention_s=retention_s, **backend)
    chat, run_id, events = await finished_run(service, 5)
    finished_at = (await service.http.get(f"/v1/runs/{run_id}")).json()["finished_at"]

    _, replay = await read_events(service, run_id, **{"Last-Event-ID": "0"})
    assert replay == events
    assert (await service.http.get(f"/v1/runs/{run_id}/events", params={"after": len(events)})).status_code == 204

    async def expired() -> bool:
        return (await service.http.get(f"/v1/runs/{run_id}")).status_code == 410

    await until(expired, timeout=retention_s + 10)  # a Redis TTL or the memory sweep: nothing announces it
    assert time.time() >= finished_at + retention_s  # not before its retention
    for path in [f"/v1/runs/{run_id}", f"/v1/runs/{run_id}/events"]:
        response = await service.http.get(path)
        assert response.status_code == 410, path
        assert response.json()["error"]["code"] == "run_expired"
    messages = (await service.http.get(f"/v1/chats/{chat}")).json()["messages"]
    assert messages[-1]["content"] == text_of(events)
    assert len(service.upstream.requests) == 1


async def test_one_active_run_per_chat_and_idempotent_retries(
    make_service: ServiceFactory, backend: dict[str, Any]
) -> None:
    service = await make_service(**backend)
    release = asyncio.Event()
    service.upstream.enqueue(text("first"), gate(release), finish())
    chat = await service.create_chat()
    headers = {"Idempotency-Key": "k-1"}

    first = await service.http.post(f"/v1/chats/{chat}/runs", json={"message": "a"}, headers=headers)
    retry = await service.http.post(f"/v1/chats/{chat}/runs", json={"message": "a"}, headers=headers)
    busy = await service.http.post(f"/v1/chats/{chat}/runs", json={"message": "b"})

    assert first.status_code == retry.status_code == 202
    assert retry.json()["id"] == first.json()["id"]
    assert busy.status_code == 409
    assert busy.json()["error"] == {
        "code": "chat_busy",
        "message": busy.json()["error"]["message"],
        "detail": {"active_run_id": first.json()["id"]},
    }
    active = await service.http.get(f"/v1/chats/{chat}/active-run")
    assert active.json()["id"] == first.json()["id"]
    assert (await service.http.delete(f"/v1/chats/{chat}")).status_code == 409
    release.set()
    _, events = await read_events(service, first.json()["id"])
    assert events[-1]["type"] == "run.completed"
    assert (await service.http.get(f"/v1/chats/{chat}/active-run")).json() is None
    run = (await service.http.get(f"/v1/runs/{first.json()['id']}")).json()
    assert (run["status"], run["last_seq"], run["message_id"]) == (
        "completed",
        events[-1]["seq"],
        events[-1]["message_id"],
    )
    messages = (await service.http.get(f"/v1/chats/{chat}")).json()["messages"]
    assert [m["role"] for m in messages] == ["user", "assistant"]  # the retry and the 409 wrote nothing


async def test_fifty_parallel_posts_with_one_idempotency_key_start_one_run(
    make_service: ServiceFactory, backend: dict[str, Any]
) -> None:
    """R14: exactly 1 run, 1 upstream call, 50/50 responses with the same run id."""
    service = await make_service(**backend)
    chat = await service.create_chat()
    headers = {"Idempotency-Key": "same-key"}

    responses = await asyncio.gather(
        *(service.http.post(f"/v1/chats/{chat}/runs", json={"message": "once"}, headers=headers) for _ in range(50))
    )

    assert {r.status_code for r in responses} == {202}
    assert len({r.json()["id"] for r in responses}) == 1
    _, events = await read_events(service, responses[0].json()["id"])
    assert events[-1]["type"] == "run.completed"
    assert len(service.upstream.requests) == 1


async def test_cancel_closes_the_upstream_stores_the_partial_answer_and_is_idempotent(
    make_service: ServiceFactory, backend: dict[str, Any]
) -> None:
    service = await make_service(**backend)
    hold = asyncio.Event()
    service.upstream.enqueue(text("partial answer", pieces=2), gate(hold), text(" never sent"), finish())
    chat = await service.create_chat()
    run = (await service.http.post(f"/v1/chats/{chat}/runs", json={"message": "go"})).json()
    (upstream_request,) = await service.upstream.wait_for_requests(1)

    async def read_all() -> list[dict[str, Any]]:
        return (await read_events(service, run["id"]))[1]

    reader = asyncio.create_task(read_all())
    while (await service.http.get(f"/v1/runs/{run['id']}")).json()["last_seq"] < 3:
        await asyncio.sleep(0.01)
    loop = asyncio.get_running_loop()
    cancelled_at = loop.time()
    first = await service.http.post(f"/v1/runs/{run['id']}/cancel")
    async with asyncio.timeout(2):
        await upstream_request.disconnected_event.wait()
    upstream_closed_after = loop.time() - cancelled_at
    events = await reader
    second = await service.http.post(f"/v1/runs/{run['id']}/cancel")

    assert first.status_code == second.status_code == 200
    assert second.json()["status"] == "cancelled"
    assert upstream_closed_after < 1.0
    assert types(events)[-1] == "run.cancelled"
    assert "never sent" not in text_of(events)
    stored = (await service.http.get(f"/v1/chats/{chat}")).json()["messages"][-1]
    assert (stored["id"], stored["status"], stored["content"]) == (
        events[-1]["message_id"],
        "cancelled",
        "partial answer",
    )
    assert (await service.http.get(f"/v1/chats/{chat}/active-run")).json() is None


async def test_a_background_run_continues_when_every_reader_leaves(
    make_service: ServiceFactory, backend: dict[str, Any]
) -> None:
    """R13 (a): dropping every client does not stop the run; the upstream stream is read to the end."""
    service = await make_service(**backend)
    service.upstream.enqueue([s for i in range(10) for s in (*text(f"x{i} "), sleep(0.02))], finish())
    chat = await service.create_chat()

    seen = await service.stream_run(chat, "go", until=lambda e: e["type"] == "text.delta")
    (request,) = await service.upstream.wait_for_requests(1)
    async with asyncio.timeout(5):
        await request.finished_event.wait()
        while (await service.http.get(f"/v1/runs/{seen[0]['run_id']}")).json()["status"] == "running":
            await asyncio.sleep(0.01)

    assert not request.client_disconnected
    messages = (await service.http.get(f"/v1/chats/{chat}")).json()["messages"]
    assert messages[-1]["content"] == "".join(f"x{i} " for i in range(10))


async def test_cancel_on_disconnect_aborts_the_upstream_even_before_the_first_token(
    make_service: ServiceFactory, backend: dict[str, Any]
) -> None:
    """R13 (b): 100 streams with on_disconnect=cancel drop 0.5 s into a 5 s TTFT; the upstream is aborted in 2 s."""
    service = await make_service(**backend)
    trials = 100
    chats = [await service.create_chat() for _ in range(trials)]
    for _ in range(trials):
        service.upstream.enqueue(ttft(5.0), text("late"), finish())
    loop = asyncio.get_running_loop()

    async def upstream_request_for(message: str) -> Any:
        while True:
            for request in service.upstream.requests:
                if request.body["messages"][-1]["content"] == message:
                    return request
            await asyncio.sleep(0.01)

    async def trial(i: int) -> float:
        message = f"hi {i}"
        body = {"message": message, "on_disconnect": "cancel"}
        reader = asyncio.create_task(service.stream_run(chats[i], body))
        request = await upstream_request_for(message)
        await asyncio.sleep(0.5)  # well inside the 5 s before the first token
        reader.cancel()  # the client goes away
        dropped_at = loop.time()
        await asyncio.gather(reader, return_exceptions=True)
        async with asyncio.timeout(2.0):
            await request.disconnected_event.wait()
        return loop.time() - dropped_at

    delays = await asyncio.gather(*(trial(i) for i in range(trials)))

    assert len(delays) == trials and max(delays) <= 2.0
    for chat in chats[:5]:
        async with asyncio.timeout(5):
            while (await service.http.get(f"/v1/chats/{chat}/active-run")).json() is not None:
                await asyncio.sleep(0.01)
        assert (await service.http.get(f"/v1/chats/{chat}")).json()["messages"][-1]["status"] == "cancelled"
