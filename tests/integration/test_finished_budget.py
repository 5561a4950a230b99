"""Finished runs are bounded in bytes as well as in count (issue 15 item 6, decision 48).

10,000 finished runs of 1,000 tokens held about 1.4 GB in the memory backend: only their count (10,000)
and their retention (10 minutes) bounded them. With ``SERVICE_MAX_FINISHED_RUN_BYTES`` the oldest finished
runs are dropped first once their estimated size passes it; their events then answer 410 ``run_expired``
(their answers stay in the chat), the newer ones replay as before.
"""

from __future__ import annotations

import time
import uuid

from service.events import RunCompleted, RunStarted, TextDelta
from service.runs.base import RunExpiredError, RunRecord
from service.runs.memory import EVENT_OVERHEAD, RUN_OVERHEAD, MemoryRunBackend
from tests.integration.conftest import ServiceFactory, text_of
from tests.support.sse import collect_events
from tests.support.upstream import finish, text
from tests.support.wait import until

WORDS = 200


async def test_the_oldest_finished_runs_go_first_once_their_bytes_pass_the_budget(make_service: ServiceFactory) -> None:
    service = await make_service(max_finished_run_bytes=100_000)
    runs: list[tuple[str, list[dict[str, object]]]] = []
    for n in range(6):
        service.upstream.enqueue(text(" ".join(f"r{n}w{i}" for i in range(WORDS)), pieces=WORDS), finish())
        chat = await service.create_chat()
        events = await service.stream_run(chat, "go")
        runs.append((chat, events))
    answers = []
    for _, events in runs:
        response, replay = await collect_events(service.http, "GET", f"/v1/runs/{events[0]['run_id']}/events")
        answers.append((response.status_code, replay))
    kept = [status for status, _ in answers]
    stored = [(await service.http.get(f"/v1/chats/{chat}")).json()["messages"][-1]["content"] for chat, _ in runs]

    assert kept == [410] * (6 - kept.count(200)) + [200] * kept.count(200), kept  # oldest first
    assert 2 <= kept.count(200) <= 4, kept  # about 27 KB each under a 100 KB budget
    for (status, replay), (_, events) in zip(answers, runs, strict=True):
        if status == 200:
            assert replay == events
    assert stored == [text_of(events) for _, events in runs]  # dropped runs' answers stay in the chat


async def write_run(backend: MemoryRunBackend, tokens: int = 100) -> str:
    run_id = uuid.uuid4().hex
    await backend.create_run(RunRecord(id=run_id, chat_id=uuid.uuid4().hex, model="m", created_at=time.time()))
    await backend.append(run_id, RunStarted(run_id=run_id, chat_id="c", model="m", created_at=1.0))
    for i in range(tokens):
        await backend.append(run_id, TextDelta(run_id=run_id, delta=f"token {i} "))
    await backend.append(run_id, RunCompleted(run_id=run_id, finish_reason="stop", message_id="m"))
    return run_id


async def expired(backend: MemoryRunBackend, run_id: str) -> bool:
    try:
        await backend.get_run(run_id)
    except RunExpiredError:
        return True
    return False


async def test_the_byte_count_follows_finished_runs_in_and_out() -> None:
    """The estimate (JSON + overhead per event and run) is counted at the end and given back on expiry."""
    probe = MemoryRunBackend(retention_s=600, max_events_per_run=1000)
    await probe.start(lambda run_id, reason: None)
    await write_run(probe)
    each = probe.finished_bytes
    await probe.close()
    assert RUN_OVERHEAD + 102 * (EVENT_OVERHEAD + 60) < each < RUN_OVERHEAD + 102 * (EVENT_OVERHEAD + 120)

    backend = MemoryRunBackend(retention_s=600, max_events_per_run=1000, max_finished_bytes=int(each * 2.5))
    await backend.start(lambda run_id, reason: None)
    try:
        ids = [await write_run(backend) for _ in range(4)]
        assert [await expired(backend, run_id) for run_id in ids] == [True, True, False, False]
        assert backend.finished_bytes == 2 * each
    finally:
        await backend.close()

    short = MemoryRunBackend(retention_s=0.1, max_events_per_run=1000)
    await short.start(lambda run_id, reason: None)
    try:
        await write_run(short)

        async def swept() -> bool:
            return short.finished_bytes == 0

        await until(swept, timeout=5)
    finally:
        await short.close()
