"""One suite for every run backend: memory and Redis (two instances sharing one Redis)."""

from __future__ import annotations

import asyncio
import time
import uuid
import warnings
from collections.abc import AsyncIterator
from contextlib import aclosing
from dataclasses import dataclass, field
from typing import Any

import pytest
import redis.asyncio as aioredis

from service.events import AnyEvent, RunCompleted, RunFailed, TextDelta, is_terminal
from service.runs.base import (
    MAX_BATCH,
    ChatBusyError,
    CursorError,
    RunBackend,
    RunExpiredError,
    RunNotFoundError,
    RunRecord,
)
from service.runs.memory import MemoryRunBackend
from service.runs.redis import RedisRunBackend

with warnings.catch_warnings():  # xdist registers this marker; keep `-p no:xdist` importable
    warnings.simplefilter("ignore", pytest.PytestUnknownMarkWarning)
    REDIS = [pytest.mark.redis, pytest.mark.xdist_group("redis")]


@dataclass
class Node:
    """A started backend and the cancel requests it received."""

    backend: RunBackend
    cancels: list[tuple[str, str]] = field(default_factory=list)
    cancelled: asyncio.Event = field(default_factory=asyncio.Event)

    def on_cancel(self, run_id: str, reason: str) -> None:
        self.cancels.append((run_id, reason))
        self.cancelled.set()


class Cluster:
    """Backends of one kind. ``peer`` is another instance on the same state (memory: the same one)."""

    def __init__(self, kind: str, redis_url: str | None) -> None:
        self.kind = kind
        self.redis_url = redis_url
        self.prefix = f"test-{uuid.uuid4().hex}"
        self.nodes: list[Node] = []
        self._options: dict[int, dict[str, Any]] = {}

    async def node(self, **options: Any) -> Node:
        options = {"retention_s": 60.0, "max_events_per_run": 100_000, **options}
        if self.kind == "memory":
            options.pop("owner_ttl_s", None)
            backend: RunBackend = MemoryRunBackend(**options)
        else:
            assert self.redis_url is not None
            backend = RedisRunBackend(self.redis_url, prefix=self.prefix, **options)
        node = Node(backend)
        await backend.start(node.on_cancel)
        self.nodes.append(node)
        self._options[id(node)] = options
        return node

    async def peer(self, node: Node) -> Node:
        if self.kind == "memory":
            return node
        return await self.node(**self._options[id(node)])

    async def aclose(self) -> None:
        for node in self.nodes:
            await node.backend.close()
        if self.redis_url is not None:
            client = aioredis.Redis.from_url(self.redis_url)
            keys = [key async for key in client.scan_iter(match=f"{self.prefix}:*", count=1000)]
            if keys:
                await client.delete(*keys)
            await client.aclose()


@pytest.fixture(params=["memory", pytest.param("redis", marks=REDIS)])
async def cluster(request: pytest.FixtureRequest) -> AsyncIterator[Cluster]:
    url = request.getfixturevalue("redis_url") if request.param == "redis" else None
    cluster = Cluster(request.param, url)
    yield cluster
    await cluster.aclose()


@pytest.fixture
async def redis_only(redis_url: str) -> AsyncIterator[Cluster]:
    """Backends of several instances on the real Redis, for behaviour only a shared backend has."""
    cluster = Cluster("redis", redis_url)
    yield cluster
    await cluster.aclose()


def new_record(chat_id: str | None = None) -> RunRecord:
    return RunRecord(id=uuid.uuid4().hex, chat_id=chat_id or uuid.uuid4().hex, model="demo", created_at=time.time())


async def new_run(backend: RunBackend, chat_id: str | None = None) -> str:
    record, created = await backend.create_run(new_record(chat_id))
    assert created
    return record.id


async def finished_run(backend: RunBackend, n: int) -> str:
    """A run of ``n`` events: n - 1 deltas and ``run.completed``."""
    run_id = await new_run(backend)
    for i in range(n - 1):
        await backend.append(run_id, TextDelta(run_id=run_id, delta=f"d{i}"))
    await backend.append(run_id, done(run_id))
    return run_id


def done(run_id: str) -> RunCompleted:
    return RunCompleted(run_id=run_id, finish_reason="stop", message_id="msg-1")


async def collect(backend: RunBackend, run_id: str, after: int, limit: int | None = None) -> list[AnyEvent]:
    events: list[AnyEvent] = []
    async with aclosing(backend.read(run_id, after)) as stream:
        async for event in stream:
            events.append(event)
            if len(events) == limit:
                break
    return events


def seqs(events: list[AnyEvent]) -> list[int]:
    return [event.seq for event in events]


async def test_append_stamps_seq_and_every_cursor_replays_the_rest(cluster: Cluster) -> None:
    backend = (await cluster.node()).backend
    run_id = await new_run(backend)
    n = 500
    stamped = [await backend.append(run_id, TextDelta(run_id=run_id, delta=str(i))) for i in range(n - 1)]
    stamped.append(await backend.append(run_id, done(run_id)))
    assert seqs(stamped) == list(range(1, n + 1))

    reader = (await cluster.peer(cluster.nodes[0])).backend
    passed = 0
    for k in range(n + 1):
        events = await collect(reader, run_id, after=k)
        assert seqs(events) == list(range(k + 1, n + 1)), k
        assert events == stamped[k:]
        passed += 1
    assert passed == n + 1
    record = await reader.get_run(run_id)
    assert (record.status, record.last_seq, record.message_id) == ("completed", n, "msg-1")
    assert record.finished_at is not None


async def test_a_long_backlog_comes_in_bounded_batches_in_order(cluster: Cluster) -> None:
    backend = (await cluster.node()).backend
    run_id = await finished_run(backend, 2 * MAX_BATCH + 500)
    reader = (await cluster.peer(cluster.nodes[0])).backend

    async with aclosing(reader.read_batches(run_id, 0)) as stream:
        batches = [batch async for batch in stream]

    assert [len(batch) for batch in batches] == [MAX_BATCH, MAX_BATCH, 500]
    assert seqs([event for batch in batches for event in batch]) == list(range(1, 2 * MAX_BATCH + 501))


@pytest.mark.parametrize("after", [-1, 11, 2**63])
async def test_read_refuses_cursors_outside_the_log(cluster: Cluster, after: int) -> None:
    backend = (await cluster.node()).backend
    run_id = await finished_run(backend, 10)
    with pytest.raises(CursorError):
        await collect(backend, run_id, after=after)


async def test_read_refuses_cursor_beyond_a_running_runs_end(cluster: Cluster) -> None:
    backend = (await cluster.node()).backend
    run_id = await new_run(backend)
    await backend.append(run_id, TextDelta(run_id=run_id, delta="a"))
    with pytest.raises(CursorError):
        await collect(backend, run_id, after=2)


async def test_unknown_run_is_not_found(cluster: Cluster) -> None:
    backend = (await cluster.node()).backend
    with pytest.raises(RunNotFoundError):
        await backend.get_run("nope")
    with pytest.raises(RunNotFoundError):
        await collect(backend, "nope", after=0)
    with pytest.raises(RunNotFoundError):
        await backend.append("nope", TextDelta(run_id="nope", delta="x"))
    with pytest.raises(RunNotFoundError):
        await backend.attach("nope")
    assert await backend.detach("nope") == 0


async def test_readers_joining_during_a_burst_get_every_seq_once(cluster: Cluster) -> None:
    writer = (await cluster.node()).backend
    reader = (await cluster.peer(cluster.nodes[0])).backend
    run_id = await new_run(writer)
    n = 10_000
    readers: list[asyncio.Task[list[AnyEvent]]] = []

    async def write() -> None:
        for i in range(n - 1):
            await writer.append(run_id, TextDelta(run_id=run_id, delta="x"))
            if i % 1000 == 0:  # let a reader join at this point
                readers.append(asyncio.create_task(collect(reader, run_id, after=0)))
                await asyncio.sleep(0)
        await writer.append(run_id, done(run_id))

    # 10,000 Redis round trips: 20 s at load average 10; a full run under load missed a 40 s bound
    async with asyncio.timeout(90):
        await write()
        results = await asyncio.gather(*readers)
    assert len(results) == 10
    for events in results:
        assert seqs(events) == list(range(1, n + 1))
        assert is_terminal(events[-1])


async def test_reader_resumes_after_disconnecting_at_every_point(cluster: Cluster) -> None:
    writer = (await cluster.node()).backend
    reader = (await cluster.peer(cluster.nodes[0])).backend
    run_id = await new_run(writer)
    n = 60

    async def disconnect_and_resume(j: int) -> list[int]:
        first = await collect(reader, run_id, after=0, limit=j) if j else []
        rest = await collect(reader, run_id, after=j)
        return seqs(first) + seqs(rest)

    tasks = [asyncio.create_task(disconnect_and_resume(j)) for j in range(n)]
    async with asyncio.timeout(20):
        for i in range(n - 1):
            await writer.append(run_id, TextDelta(run_id=run_id, delta=str(i)))
            await asyncio.sleep(0.002)
        await writer.append(run_id, done(run_id))
        results = await asyncio.gather(*tasks)
    for j, got in enumerate(results):
        assert got == list(range(1, n + 1)), j


async def test_run_expires_after_retention(cluster: Cluster) -> None:
    backend = (await cluster.node(retention_s=0.5)).backend
    run_id = await finished_run(backend, 3)
    assert len(await collect(backend, run_id, after=0)) == 3
    async with asyncio.timeout(5):
        while True:
            try:
                await backend.get_run(run_id)
            except RunExpiredError:
                break
            await asyncio.sleep(0.05)
    with pytest.raises(RunExpiredError):
        await collect(backend, run_id, after=0)


async def test_idempotency_key_returns_the_same_run(cluster: Cluster) -> None:
    backend = (await cluster.node()).backend
    first, created = await backend.create_run(new_record(), idempotency_key="k1")
    again, created_again = await backend.create_run(new_record(), idempotency_key="k1")
    assert created
    assert not created_again
    assert again.id == first.id
    assert again.owner == backend.instance_id


async def test_concurrent_creates_with_one_key_create_one_run(cluster: Cluster) -> None:
    a = (await cluster.node()).backend
    b = (await cluster.peer(cluster.nodes[0])).backend
    chat_id = uuid.uuid4().hex
    results = await asyncio.gather(
        *((a if i % 2 else b).create_run(new_record(chat_id), idempotency_key="same") for i in range(50))
    )
    assert sum(created for _, created in results) == 1
    assert len({record.id for record, _ in results}) == 1
    assert await a.active_run(chat_id) == results[0][0].id


async def test_busy_chat_is_refused_until_the_run_ends(cluster: Cluster) -> None:
    backend = (await cluster.node()).backend
    chat_id = uuid.uuid4().hex
    run_id = await new_run(backend, chat_id)
    with pytest.raises(ChatBusyError) as busy:
        await backend.create_run(new_record(chat_id), idempotency_key="other")
    assert busy.value.active_run_id == run_id
    assert await backend.active_run(chat_id) == run_id
    await backend.append(run_id, done(run_id))
    assert await backend.active_run(chat_id) is None
    second, created = await backend.create_run(new_record(chat_id), idempotency_key="other")
    assert created  # the refused attempt did not keep the key
    assert await backend.active_run(chat_id) == second.id


async def test_cancel_reaches_the_owner(cluster: Cluster) -> None:
    owner = await cluster.node()
    other = await cluster.peer(owner)
    run_id = await new_run(owner.backend)
    await other.backend.request_cancel(run_id, "user")
    async with asyncio.timeout(1):
        await owner.cancelled.wait()
    assert owner.cancels == [(run_id, "user")]


async def test_attach_and_detach_count_readers(cluster: Cluster) -> None:
    a = (await cluster.node()).backend
    b = (await cluster.peer(cluster.nodes[0])).backend
    run_id = await new_run(a)
    await a.attach(run_id)
    await b.attach(run_id)
    assert await a.detach(run_id) == 1
    assert await b.detach(run_id) == 0
    assert await a.detach(run_id) == 0


async def test_stalled_reader_does_not_slow_the_writer(cluster: Cluster) -> None:
    backend = (await cluster.node()).backend
    run_id = await new_run(backend)
    await backend.append(run_id, TextDelta(run_id=run_id, delta="first"))
    async with aclosing(backend.read(run_id, 0)) as stalled:
        assert (await anext(stalled)).seq == 1
        started = time.monotonic()
        for _ in range(10_000):
            await backend.append(run_id, TextDelta(run_id=run_id, delta="x"))
        await backend.append(run_id, done(run_id))
        assert time.monotonic() - started < 20
        rest = [event.seq async for event in stalled]
    assert rest == list(range(2, 10_003))


async def test_reader_behind_the_cap_is_refused(cluster: Cluster) -> None:
    backend = (await cluster.node(max_events_per_run=100)).backend
    run_id = await new_run(backend)
    await backend.append(run_id, TextDelta(run_id=run_id, delta="first"))
    async with aclosing(backend.read(run_id, 0)) as stalled:
        assert (await anext(stalled)).seq == 1
        for _ in range(1000):
            await backend.append(run_id, TextDelta(run_id=run_id, delta="x"))
        with pytest.raises(CursorError):
            await anext(stalled)
    with pytest.raises(CursorError):
        await collect(backend, run_id, after=1)


async def test_a_thousand_readers_follow_one_run(cluster: Cluster) -> None:
    writer = (await cluster.node()).backend
    reader = (await cluster.peer(cluster.nodes[0])).backend
    run_id = await new_run(writer)
    await writer.append(run_id, TextDelta(run_id=run_id, delta="a"))
    tasks = [asyncio.create_task(collect(reader, run_id, after=i % 2)) for i in range(1000)]
    async with asyncio.timeout(30):
        await asyncio.sleep(0.2)  # most readers are now blocked in the tail
        for _ in range(8):
            await writer.append(run_id, TextDelta(run_id=run_id, delta="b"))
        await writer.append(run_id, done(run_id))
        results = await asyncio.gather(*tasks)
    for i, events in enumerate(results):
        assert seqs(events) == list(range(i % 2 + 1, 11))


# -- Redis only: another instance's failure --------------------------------------------


@pytest.mark.redis
@pytest.mark.xdist_group("redis")
async def test_readers_finish_a_run_whose_owner_is_gone_once(redis_only: Cluster) -> None:
    owner = await redis_only.node(owner_ttl_s=0.6)
    other = (await redis_only.peer(owner)).backend
    chat_id = uuid.uuid4().hex
    run_id = await new_run(owner.backend, chat_id)
    for i in range(5):
        await owner.backend.append(run_id, TextDelta(run_id=run_id, delta=str(i)))
    await owner.backend.close()

    async with asyncio.timeout(6):
        first, second = await asyncio.gather(collect(other, run_id, 0), collect(other, run_id, 3))
    assert seqs(first) == [1, 2, 3, 4, 5, 6]
    assert seqs(second) == [4, 5, 6]
    failed = first[-1]
    assert isinstance(failed, RunFailed)
    assert failed.error.code == "owner_lost"
    assert second[-1] == failed
    assert seqs(await collect(other, run_id, 0)) == [1, 2, 3, 4, 5, 6]
    record = await other.get_run(run_id)
    assert (record.status, record.last_seq) == ("failed", 6)
    assert await other.active_run(chat_id) is None


@pytest.mark.redis
@pytest.mark.xdist_group("redis")
async def test_owner_that_lost_its_run_drops_events_and_cancels(redis_only: Cluster) -> None:
    owner = await redis_only.node(owner_ttl_s=30)  # its next heartbeat is 10 s away
    other = (await redis_only.peer(owner)).backend
    run_id = await new_run(owner.backend)
    await owner.backend.append(run_id, TextDelta(run_id=run_id, delta="a"))
    client = aioredis.Redis.from_url(redis_only.redis_url or "")
    await client.delete(f"{redis_only.prefix}:instance:{owner.backend.instance_id}")
    await client.aclose()

    async with asyncio.timeout(5):
        events = await collect(other, run_id, 0)
    assert isinstance(events[-1], RunFailed)
    await owner.backend.append(run_id, TextDelta(run_id=run_id, delta="late"))
    await owner.backend.append(run_id, done(run_id))
    assert owner.cancels == [(run_id, "owner_lost")]
    assert seqs(await collect(other, run_id, 0)) == [1, 2]
    assert (await other.get_run(run_id)).status == "failed"


@pytest.mark.redis
@pytest.mark.xdist_group("redis")
async def test_chat_held_by_a_lost_run_is_freed_on_create(redis_only: Cluster) -> None:
    owner = await redis_only.node()
    other = (await redis_only.peer(owner)).backend
    chat_id = uuid.uuid4().hex
    lost = await new_run(owner.backend, chat_id)
    await owner.backend.close()
    record, created = await other.create_run(new_record(chat_id))
    assert created
    assert (await other.get_run(lost)).status == "failed"
    assert await other.active_run(chat_id) == record.id


async def test_ping(cluster: Cluster) -> None:
    assert await (await cluster.node()).backend.ping()


@pytest.mark.parametrize("delay", [0, 0.001, 0.005, 0.05])
async def test_cancelled_readers_stop_promptly(cluster: Cluster, delay: float) -> None:
    """A reader task cancelled at any point (connecting, replaying, tailing) ends; the others carry on."""
    backend = (await cluster.node()).backend
    run_id = await new_run(backend)
    await backend.append(run_id, TextDelta(run_id=run_id, delta="a"))
    survivor = asyncio.create_task(collect(backend, run_id, after=0))
    for _ in range(5):
        readers = [asyncio.create_task(collect(backend, run_id, after=i % 2)) for i in range(50)]
        await asyncio.sleep(delay)
        for reader in readers:
            reader.cancel()
        finished, pending = await asyncio.wait(readers, timeout=1)
        assert not pending
        assert all(reader.cancelled() for reader in finished)
    await backend.append(run_id, done(run_id))
    async with asyncio.timeout(5):
        assert seqs(await survivor) == [1, 2]
    assert seqs(await collect(backend, run_id, after=0)) == [1, 2]


async def test_nothing_is_appended_after_the_terminal_event(cluster: Cluster) -> None:
    backend = (await cluster.node()).backend
    run_id = await finished_run(backend, 3)
    await backend.append(run_id, TextDelta(run_id=run_id, delta="late"))
    events = await collect(backend, run_id, 0)
    assert isinstance(events[-1], RunCompleted)
    assert (await backend.get_run(run_id)).last_seq == events[-1].seq
