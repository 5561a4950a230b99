"""Run records in the chat store, for the in-memory run backend: what a restart still answers (decision 67).

The in-memory backend's runs die with its process. So that a crash (``kill -9``, the OOM killer, a
lost host) strands no run and loses at most a little of its answer, the run manager keeps each
run's record (:class:`service.store.base.StoredRun`) in the chat store:

- written with the run's user message when it starts and with its answer when it ends (the same
  transactions: no extra round trip per run);
- checkpointed while it runs: every ``interval_s`` (``SERVICE_CHECKPOINT_INTERVAL_S``, 2 s) one
  transaction writes the partial answer and last seq of every run that moved since the last
  checkpoint. That interval is the loss window: a crash loses at most its last 2 s of answer;
- at start-up (the process holds :class:`service.runs.solo.SoloLock`, so no other one serves these
  runs), each run left ``running`` fails with code ``interrupted``, its last checkpoint stored as
  its answer (``status: failed``, ``finish_reason: interrupted``).

A run the backend does not know (its process died, or the backend dropped it) is answered from its
record: ``GET /v1/runs/{id}`` with its status, its events with 410 (the answer is in the chat).
With Redis runs, Redis keeps the runs and owners finish each other's (decision 44): no journal.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import time
from typing import Any

from service.events import AnyEvent, RunFailed
from service.runs.base import RunRecord
from service.runs.memory import terminal_status
from service.runs.transcript import Transcript
from service.store.base import ChatStore, StoredRun, StoreUnavailableError

log = logging.getLogger("service.runs")

INTERRUPTED = "interrupted"
"""The error code (and the message's ``finish_reason``) of a run whose process died under it."""


class RunJournal:
    """Keeps the records of this process's runs in the chat store. See the module docstring."""

    def __init__(self, store: ChatStore, *, interval_s: float = 2.0) -> None:
        self.store = store
        self.interval_s = interval_s
        self._live: dict[str, tuple[RunRecord, Transcript]] = {}
        self._checkpointed: dict[str, int] = {}  # run id -> seq of its last checkpoint
        self._ticker: asyncio.Task[None] | None = None

    async def start(self) -> list[StoredRun]:
        """Fail the runs a dead process left ``running``, then start checkpointing; returns those runs."""
        interrupted = await self.store.interrupt_runs(now=time.time())
        for run in interrupted:
            log.warning(
                "run %s (chat %s) was left running by a process that died: failed %s", run.id, run.chat_id, INTERRUPTED
            )
        self._ticker = asyncio.create_task(self._checkpoint_every_interval(), name="run-checkpoints")
        return interrupted

    async def close(self) -> None:
        """Stop checkpointing (the runs have ended by now: their records were written with their answers)."""
        if self._ticker is not None:
            self._ticker.cancel()
            with contextlib.suppress(asyncio.CancelledError):
                await self._ticker

    def first_record(self, record: RunRecord, transcript: Transcript) -> StoredRun:
        """The record to write with the run's user message."""
        return self._running(record, transcript)

    def track(self, record: RunRecord, transcript: Transcript) -> None:
        """Checkpoint the run from now on (its first record is written)."""
        self._live[record.id] = (record, transcript)
        self._checkpointed[record.id] = 0

    def ended(self, run_id: str, terminal: AnyEvent) -> StoredRun | None:
        """The record to write with the run's answer (None for a run this journal does not keep)."""
        self._checkpointed.pop(run_id, None)
        live = self._live.pop(run_id, None)
        if live is None:
            return None
        record, transcript = live
        return _stored(
            record,
            transcript,
            status=terminal_status(terminal),
            error_code=terminal.error.code if isinstance(terminal, RunFailed) else None,
            last_seq=transcript.seq + 1,  # the terminal event's
            finished_at=time.time(),
        )

    def forget(self, run_id: str) -> None:
        """Stop checkpointing a run whose end was not stored (its record stays ``running`` until a restart)."""
        self._live.pop(run_id, None)
        self._checkpointed.pop(run_id, None)

    async def get(self, run_id: str) -> RunRecord | None:
        """The run as its stored record has it, or None."""
        run = await self.store.get_run(run_id)
        if run is None:
            return None
        return RunRecord(
            id=run.id,
            chat_id=run.chat_id,
            model=run.model,
            status=run.status,
            subject=run.subject,
            created_at=run.created_at,
            finished_at=run.finished_at,
            last_seq=run.last_seq,
            message_id=run.message_id,
        )

    async def checkpoint(self) -> int:
        """Write the partial answers of the runs that moved since their last checkpoint; returns how many."""
        moved = [
            self._running(record, transcript)
            for run_id, (record, transcript) in self._live.items()
            if transcript.seq != self._checkpointed.get(run_id)
        ]
        if not moved:
            return 0
        await self.store.checkpoint_runs(moved)
        for run in moved:
            if run.id in self._checkpointed:
                self._checkpointed[run.id] = run.last_seq
        return len(moved)

    async def _checkpoint_every_interval(self) -> None:
        while True:
            await asyncio.sleep(self.interval_s)
            try:
                await self.checkpoint()
            except StoreUnavailableError as exc:
                log.warning("could not checkpoint the running runs (retrying in %g s): %s", self.interval_s, exc)
            except Exception:
                log.exception("could not checkpoint the running runs")

    @staticmethod
    def _running(record: RunRecord, transcript: Transcript) -> StoredRun:
        return _stored(record, transcript, last_seq=transcript.seq, partial=transcript.messages("failed", INTERRUPTED))


def _stored(record: RunRecord, transcript: Transcript, **state: Any) -> StoredRun:
    """The run's stored record: who and what it is, and ``state`` (status, seq, partial answer, end)."""
    return StoredRun(
        id=record.id,
        chat_id=record.chat_id,
        model=record.model,
        message_id=transcript.message_id,
        subject=record.subject,
        created_at=record.created_at,
        **state,
    )
