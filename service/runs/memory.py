"""The embedded run backend: everything in this process's memory.

Bounded three ways: events kept per run (oldest dropped past the cap, and
folded into the run's base snapshot; a cursor before the first kept event is
refused), finished runs kept
(``retention_s`` after their end, at most ``max_finished_runs`` and at most
``max_finished_bytes`` of them, oldest dropped first), and tombstones of
expired runs (so they answer 410, not 404).

A finished run's size is estimated once, when it ends (decision 48): its events'
JSON plus :data:`EVENT_OVERHEAD` bytes per event and :data:`RUN_OVERHEAD` per run.
"""

from __future__ import annotations

import asyncio
import time
import uuid
from collections import OrderedDict
from collections.abc import AsyncGenerator

import msgspec

from service.events import AnyEvent, RunCancelled, RunCompleted, RunFailed, RunSnapshot, encode_json, is_terminal
from service.runs.base import (
    MAX_BATCH,
    CancelCallback,
    ChatBusyError,
    CursorError,
    IdempotencyKeyReusedError,
    RunBackend,
    RunExpiredError,
    RunNotFoundError,
    RunRecord,
    RunStatus,
    TooManyRunsError,
)
from service.runs.snapshot import SnapshotFold

_TOMBSTONES = 100_000
EVENT_OVERHEAD = 48
"""Bytes an event holds beyond its JSON: 10,000 finished runs of 1,000 tokens grew the process by 1,457 MB,
145 bytes per event, whose JSON is 97 bytes (``just bench-resume --finished-runs 10000 --events 1002``)."""
RUN_OVERHEAD = 1024
"""A finished run's own objects (its record, log list and bookkeeping)."""
_USAGE_KEPT = 100_000


class _Run:
    __slots__ = ("base", "events", "first_seq", "idempotency_key", "loop", "readers", "record", "size", "waiters")

    def __init__(self, record: RunRecord, idempotency_key: str | None) -> None:
        self.loop = asyncio.get_running_loop()  # kept: each get_running_loop() is a getpid() system call
        self.record = record
        self.events: list[AnyEvent] = []
        self.first_seq = 1  # seq of events[0]
        self.base: SnapshotFold | None = None  # the events before first_seq, folded
        self.size = 0  # estimated bytes, once finished
        self.readers = 0
        self.idempotency_key = idempotency_key
        # One future per waiting reader: a reader cancelled while waiting cancels only its own
        # (cheaper per wait than sharing one future behind ``asyncio.shield``).
        self.waiters: list[asyncio.Future[None]] = []

    def wake(self) -> None:
        for waiter in self.waiters:
            if not waiter.done():
                waiter.set_result(None)
        self.waiters.clear()

    async def next_change(self) -> None:
        waiter = self.loop.create_future()
        self.waiters.append(waiter)
        try:
            await waiter
        except asyncio.CancelledError:
            if waiter in self.waiters:  # not yet taken out by wake()
                self.waiters.remove(waiter)
            raise


def terminal_status(event: AnyEvent) -> RunStatus:
    """The run status a terminal event leaves behind."""
    match event:
        case RunCompleted():
            return "completed"
        case RunCancelled():
            return "cancelled"
        case RunFailed():
            return "failed"
        case _:
            return "running"


def terminal_message_id(event: AnyEvent) -> str | None:
    """The stored message a terminal event points at."""
    return event.message_id if isinstance(event, RunCompleted | RunCancelled | RunFailed) else None


class MemoryRunBackend(RunBackend):
    """Runs of this process only. See the module docstring for its bounds."""

    def __init__(
        self,
        *,
        retention_s: float,
        max_events_per_run: int,
        max_finished_runs: int = 10_000,
        max_finished_bytes: int = 256 * 1024 * 1024,
    ) -> None:
        self.instance_id = uuid.uuid4().hex[:12]
        self._retention_s = retention_s
        self._max_events = max_events_per_run
        self._max_finished = max_finished_runs
        self._max_finished_bytes = max_finished_bytes
        self.finished_bytes = 0
        """Estimated bytes held by finished runs (see the module docstring)."""
        self._runs: dict[str, _Run] = {}
        self._finished: OrderedDict[str, float] = OrderedDict()  # run id -> expiry (monotonic)
        self._tombstones: OrderedDict[str, str | None] = OrderedDict()  # run id -> its subject
        self._active: dict[str, str] = {}  # chat id -> run id
        self._running: dict[str, set[str]] = {}  # subject -> ids of its running runs
        self._usage: dict[tuple[str, int], int] = {}  # (subject, window number) -> tokens
        self._idempotency: dict[str, tuple[str, str]] = {}  # key -> (run id, request hash)
        self._on_cancel: CancelCallback | None = None
        self._sweeper: asyncio.Task[None] | None = None

    async def start(self, on_cancel: CancelCallback) -> None:  # noqa: D102
        self._on_cancel = on_cancel
        self._sweeper = asyncio.create_task(self._sweep_forever())

    async def close(self) -> None:  # noqa: D102
        if self._sweeper is not None:
            self._sweeper.cancel()
            await asyncio.gather(self._sweeper, return_exceptions=True)

    async def ping(self) -> bool:  # noqa: D102
        return True

    async def create_run(  # noqa: D102
        self, record: RunRecord, *, idempotency_key: str | None = None, request_hash: str = "", max_active: int = 0
    ) -> tuple[RunRecord, bool]:
        if idempotency_key is not None and (existing := self._idempotency.get(idempotency_key)):
            run_id, first_hash = existing
            if first_hash != request_hash:
                raise IdempotencyKeyReusedError(run_id)
            return await self.get_run(run_id), False
        if active := self._active.get(record.chat_id):
            raise ChatBusyError(active)
        if record.subject is not None:
            running = self._running.setdefault(record.subject, set())
            if max_active and len(running) >= max_active:
                raise TooManyRunsError(record.subject)
            running.add(record.id)
        record = msgspec.structs.replace(record, owner=self.instance_id)
        self._runs[record.id] = _Run(record, idempotency_key)
        self._active[record.chat_id] = record.id
        if idempotency_key is not None:
            self._idempotency[idempotency_key] = (record.id, request_hash)
        return record, True

    async def get_run(self, run_id: str) -> RunRecord:  # noqa: D102
        run = self._get(run_id)
        if run.record.finished_at is not None:
            return run.record
        # A running run's record is not rebuilt for every event: its last seq is read here.
        return msgspec.structs.replace(run.record, last_seq=run.first_seq + len(run.events) - 1)

    async def active_run(self, chat_id: str) -> str | None:  # noqa: D102
        return self._active.get(chat_id)

    async def append(self, run_id: str, event: AnyEvent) -> AnyEvent:  # noqa: D102
        run = self._get(run_id)
        if run.record.finished_at is not None:
            return event  # the run already ended: nothing follows its terminal event
        seq = run.first_seq + len(run.events)
        event = msgspec.structs.replace(event, seq=seq)
        run.events.append(event)
        if len(run.events) > self._max_events:
            drop = len(run.events) - self._max_events
            run.base = run.base or SnapshotFold()
            for dropped in run.events[:drop]:
                run.base.add(dropped)
            del run.events[:drop]
            run.first_seq += drop
        if is_terminal(event):
            self._finish(run, event)
        run.wake()
        return event

    def _finish(self, run: _Run, event: AnyEvent) -> None:
        run.record = msgspec.structs.replace(
            run.record,
            status=terminal_status(event),
            finished_at=time.time(),
            last_seq=event.seq,
            message_id=terminal_message_id(event),
        )
        if self._active.get(run.record.chat_id) == run.record.id:
            del self._active[run.record.chat_id]
        subject = run.record.subject
        if subject is not None and (running := self._running.get(subject)) is not None:
            running.discard(run.record.id)
            if not running:
                del self._running[subject]
        run.size = self._held_bytes(run)
        self.finished_bytes += run.size
        self._finished[run.record.id] = time.monotonic() + self._retention_s
        while len(self._finished) > self._max_finished or (
            self.finished_bytes > self._max_finished_bytes and len(self._finished) > 1  # the newest stays
        ):
            self._expire(next(iter(self._finished)))

    def _held_bytes(self, run: _Run) -> int:
        """Estimated memory of a finished run (and its base snapshot, compacted now that it is final)."""
        size = RUN_OVERHEAD + len(encode_json(run.events)) + EVENT_OVERHEAD * len(run.events)
        if run.base is not None:
            snapshot = run.base.event(run.record.id, run.first_seq - 1)
            run.base = SnapshotFold(snapshot)
            size += len(encode_json(snapshot))
        return size

    async def read_batches(self, run_id: str, after: int) -> AsyncGenerator[list[AnyEvent]]:  # noqa: D102
        run = self._get(run_id)
        last = run.first_seq + len(run.events) - 1
        if after < 0 or after > last:
            raise CursorError(f"cursor {after} is outside the run's log (0..{last})")
        if after < run.first_seq - 1:
            raise CursorError(f"events up to {run.first_seq - 1} are no longer kept")
        cursor = after  # seq of the last event handed out
        while True:
            index = cursor + 1 - run.first_seq
            if index < 0:
                raise CursorError(f"events up to {run.first_seq - 1} are no longer kept")
            if index < len(run.events):
                batch = run.events[index : index + MAX_BATCH]
                yield batch
                if is_terminal(batch[-1]):  # nothing follows a terminal event in the log
                    return
                cursor = batch[-1].seq
            elif run.record.finished_at is not None:
                return
            else:
                await run.next_change()

    async def snapshot(self, run_id: str) -> RunSnapshot:  # noqa: D102
        run = self._get(run_id)
        if run.base is None:
            return RunSnapshot(run_id=run_id)
        return run.base.event(run_id, run.first_seq - 1)

    async def request_cancel(self, run_id: str, reason: str) -> None:  # noqa: D102
        run = self._get(run_id)
        if run.record.finished_at is None and self._on_cancel is not None:
            self._on_cancel(run_id, reason)

    async def attach(self, run_id: str) -> None:  # noqa: D102
        self._get(run_id).readers += 1

    async def detach(self, run_id: str) -> int:  # noqa: D102
        run = self._runs.get(run_id)
        if run is None:
            return 0
        run.readers = max(0, run.readers - 1)
        return run.readers

    async def add_usage(self, subject: str, tokens: int, window_s: float) -> None:  # noqa: D102
        window = int(time.time() // window_s)
        key = (subject, window)
        self._usage[key] = self._usage.get(key, 0) + tokens
        if len(self._usage) > _USAGE_KEPT:  # drop past windows
            self._usage = {k: v for k, v in self._usage.items() if k[1] >= window}

    async def usage(self, subject: str, window_s: float) -> tuple[int, float]:  # noqa: D102
        now = time.time()
        window = int(now // window_s)
        return self._usage.get((subject, window), 0), (window + 1) * window_s - now

    def _get(self, run_id: str) -> _Run:
        run = self._runs.get(run_id)
        if run is not None:
            return run
        if run_id in self._tombstones:
            raise RunExpiredError(run_id, self._tombstones[run_id])
        raise RunNotFoundError(run_id)

    def _expire(self, run_id: str) -> None:
        if self._finished.pop(run_id, None) is not None and (finished := self._runs.get(run_id)) is not None:
            self.finished_bytes -= finished.size
        run = self._runs.pop(run_id, None)
        if run is not None and run.idempotency_key is not None:
            self._idempotency.pop(run.idempotency_key, None)
        self._tombstones[run_id] = None if run is None else run.record.subject
        while len(self._tombstones) > _TOMBSTONES:
            self._tombstones.popitem(last=False)

    async def _sweep_forever(self) -> None:
        while True:
            await asyncio.sleep(min(1.0, max(0.05, self._retention_s / 4)))
            now = time.monotonic()
            while self._finished:
                run_id, expires = next(iter(self._finished.items()))
                if expires > now:
                    break
                self._expire(run_id)
