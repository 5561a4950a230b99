"""``run.snapshot``: a cursor older than the kept events (or a reader who asks) gets the run's state, then the tail.

Issue 15 item 5 (decision 47). With more events than ``SERVICE_MAX_EVENTS_PER_RUN``, ``GET events?after=0``
answered 200 with an empty body and ``run.resume`` sent ``run.resumed`` and then nothing, on both backends,
also for a running run. Every test runs on both run backends and reads over both transports.
"""

from __future__ import annotations

import asyncio
import json
from typing import Any

import httpx
import websockets

from tests.integration.conftest import TERMINAL, Service, ServiceFactory, text_of
from tests.support.sse import collect_events, iter_sse
from tests.support.upstream import finish, gate, reasoning, text, tool_call, usage
from tests.support.wait import until

KEPT = 20
"""``max_events_per_run`` of these tests."""
WORDS = 300
"""Text deltas per run: past the cap on both backends (Redis trims ``MAXLEN ~`` by whole nodes of 100)."""
BEFORE_TAIL = 1 + 3 + WORDS
"""Events logged before the held tail: ``run.started``, three reasoning deltas, the text deltas."""
ANSWER = " ".join(f"w{i}" for i in range(WORDS))


async def read_sse(
    service: Service, run_id: str, *, until_type: str | None = None, **params: Any
) -> list[dict[str, Any]]:
    """The events of ``GET /v1/runs/{id}/events`` (to the end, or to the first event of ``until_type``)."""
    events: list[dict[str, Any]] = []
    async with service.http.stream("GET", f"/v1/runs/{run_id}/events", params=params) as response:
        assert response.status_code == 200, await response.aread()
        async for message in iter_sse(response):
            if message.kind == "event":
                events.append(message.json())
                if events[-1]["type"] == until_type:
                    break
    return events


async def ws_frames(ws: websockets.ClientConnection, *, until_type: str) -> list[dict[str, Any]]:
    """Frames until one of ``until_type`` (a terminal type stands for any terminal event)."""
    frames: list[dict[str, Any]] = []
    while not frames or not (
        frames[-1]["type"] == until_type or (until_type in TERMINAL and frames[-1]["type"] in TERMINAL)
    ):
        frames.append(json.loads(await asyncio.wait_for(ws.recv(), 10)))
    return frames


def run_script(tail: asyncio.Event | None = None) -> list[Any]:
    """Reasoning, ``WORDS`` text deltas, (the held tail), usage: far more events than ``KEPT``."""
    held = [gate(tail), *text("tail")] if tail is not None else []
    return [*reasoning("let me think", pieces=3), *text(ANSWER, pieces=WORDS), *held, finish(), usage(7, 41)]


async def logged(service: Service, run_id: str, seq: int) -> None:
    """Wait until the run's log reaches ``seq`` (nothing announces it to a client that does not read)."""

    async def reached() -> bool:
        return (await service.http.get(f"/v1/runs/{run_id}")).json()["last_seq"] >= seq

    await until(reached, timeout=20)


async def finished(service: Service, run_id: str) -> dict[str, Any]:
    async def done() -> bool:
        return (await service.http.get(f"/v1/runs/{run_id}")).json()["status"] != "running"

    await until(done, timeout=20)
    return dict((await service.http.get(f"/v1/runs/{run_id}")).json())


async def test_a_cursor_older_than_the_kept_events_gets_a_snapshot_then_the_live_tail(
    make_service: ServiceFactory, backend: dict[str, Any]
) -> None:
    """A running run past the cap: SSE ``after=0`` and WebSocket ``run.resume`` start with ``run.snapshot``."""
    service = await make_service(max_events_per_run=KEPT, **backend)
    tail = asyncio.Event()
    service.upstream.enqueue(run_script(tail))
    chat = await service.create_chat()
    run = (await service.http.post(f"/v1/chats/{chat}/runs", json={"message": "go"})).json()
    await logged(service, run["id"], BEFORE_TAIL)
    before = (await service.http.get(f"/v1/runs/{run['id']}")).json()["last_seq"]
    sse = asyncio.create_task(read_sse(service, run["id"], after=0))
    async with websockets.connect(service.ws_url) as ws:
        await ws.send(json.dumps({"type": "run.resume", "run_id": run["id"], "after": 0}))
        head = await ws_frames(ws, until_type="run.snapshot")
        tail.set()
        rest = await ws_frames(ws, until_type="run.completed")
    over_sse = await sse

    for events in (over_sse, head[1:] + rest):
        snapshot, after = events[0], events[1:]
        assert snapshot["type"] == "run.snapshot"
        assert snapshot["seq"] == before  # the state through the last event logged when the reader came
        assert snapshot["text"] == ANSWER
        assert snapshot["reasoning"] == "let me think"
        assert (snapshot["chat_id"], snapshot["model"], snapshot["usage"]) == (chat, run["model"], None)
        assert [e["seq"] for e in after] == list(range(before + 1, before + 1 + len(after)))
        assert text_of(after) == "tail"
        assert after[-1]["type"] == "run.completed"
    assert head[0]["type"] == "run.resumed"


async def test_snapshot_on_request_replaces_the_replay_of_a_finished_run(
    make_service: ServiceFactory, backend: dict[str, Any]
) -> None:
    """``?snapshot=true`` / ``run.resume {snapshot: true}``: the state (tool call and result too), then the end.

    The run keeps all its events (under the cap), so without the flag they replay one by one.
    """
    service = await make_service(**backend)
    service.upstream.enqueue(tool_call(0, "c1", "calculator", '{"expression": "6*7"}', pieces=3), finish("tool_calls"))
    service.upstream.enqueue(text("It is 42.", pieces=3), finish(), usage(3, 4))
    chat = await service.create_chat(tools=["calculator"])
    events = await service.stream_run(chat, "calculate 6*7")
    run_id = events[0]["run_id"]
    over_sse = await read_sse(service, run_id, snapshot="true")
    async with websockets.connect(service.ws_url) as ws:
        await ws.send(json.dumps({"type": "run.resume", "run_id": run_id, "after": 0, "snapshot": True}))
        over_ws = (await ws_frames(ws, until_type="run.completed"))[1:]
    _, replay = await collect_events(service.http, "GET", f"/v1/runs/{run_id}/events")

    assert over_sse == over_ws
    assert [e["type"] for e in over_sse] == ["run.snapshot", "run.completed"]
    snapshot = over_sse[0]
    assert snapshot["seq"] == events[-1]["seq"] - 1
    assert over_sse[1] == events[-1] == replay[-1]
    assert snapshot["text"] == text_of(events) == "It is 42."
    assert snapshot["tool_calls"] == [
        {
            "call_id": "c1",
            "name": "calculator",
            "arguments": '{"expression": "6*7"}',
            "parsed": {"expression": "6*7"},
            "done": True,
        }
    ]
    result = next(e for e in events if e["type"] == "tool.result")
    assert snapshot["tool_results"] == [
        {"call_id": "c1", "name": "calculator", "output": result["output"], "is_error": False}
    ]
    assert len(replay) == len(events) > 2


async def test_a_finished_run_past_the_cap_answers_a_snapshot_and_its_terminal_event(
    make_service: ServiceFactory, backend: dict[str, Any]
) -> None:
    """``after=0`` on a finished run whose first events were dropped: never an empty stream."""
    service = await make_service(max_events_per_run=KEPT, **backend)
    service.upstream.enqueue(run_script())
    chat = await service.create_chat()
    run_id = (await service.http.post(f"/v1/chats/{chat}/runs", json={"message": "go"})).json()["id"]
    record = await finished(service, run_id)
    over_sse = await read_sse(service, run_id, after=0)
    async with websockets.connect(service.ws_url) as ws:
        await ws.send(json.dumps({"type": "run.resume", "run_id": run_id, "after": 3}))
        over_ws = (await ws_frames(ws, until_type="run.completed"))[1:]
    cut = await service.http.get(f"/v1/runs/{run_id}/events", params={"after": 0})

    assert over_sse == over_ws
    assert [e["type"] for e in over_sse] == ["run.snapshot", "run.completed"]
    snapshot = over_sse[0]
    assert (snapshot["seq"], over_sse[1]["seq"]) == (record["last_seq"] - 1, record["last_seq"])
    assert (snapshot["text"], snapshot["reasoning"]) == (ANSWER, "let me think")
    assert snapshot["usage"] == {"prompt_tokens": 7, "completion_tokens": 41, "total_tokens": 48}
    assert over_sse[1]["message_id"] == record["message_id"]
    assert cut.status_code == 200 and cut.text.count("run.snapshot") == 1


async def test_a_reader_resuming_after_a_snapshot_gets_exactly_the_rest(
    make_service: ServiceFactory, backend: dict[str, Any]
) -> None:
    """The snapshot's seq is a cursor like any event's: ``Last-Event-ID`` = it resumes with the next event."""
    service = await make_service(max_events_per_run=KEPT, **backend)
    tail = asyncio.Event()
    service.upstream.enqueue(run_script(tail))
    chat = await service.create_chat()
    run = (await service.http.post(f"/v1/chats/{chat}/runs", json={"message": "go"})).json()
    await logged(service, run["id"], BEFORE_TAIL)
    snapshot = (await read_sse(service, run["id"], until_type="run.snapshot", after=0))[-1]
    tail.set()
    headers = {"Last-Event-ID": str(snapshot["seq"])}
    async with httpx.AsyncClient(base_url=service.url, timeout=10) as client:
        _, rest = await collect_events(client, "GET", f"/v1/runs/{run['id']}/events", headers=headers)

    assert [e["seq"] for e in rest] == list(range(snapshot["seq"] + 1, snapshot["seq"] + 1 + len(rest)))
    assert text_of(rest) == "tail" and rest[-1]["type"] == "run.completed"
