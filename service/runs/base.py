"""The run backend contract: run records, the per-run event log, cancel signals.

A backend keeps, for each run: its record (status, chat, owner), its event log
(events stamped with ``seq`` = 1, 2, 3 … in append order), the chat's
active-run claim, idempotency keys, and a count of attached readers. The
memory backend serves one process; the Redis backend lets several instances
serve each other's runs.

Lifecycle of a run in a backend::

    create_run ──> append(seq 1) … append(terminal) ──(retention)──> expired
        │                                   │
        └─ chat claimed                     └─ chat released, finished_at set

Reads never block the writer: a reader keeps its own cursor into the log.
A backend whose server does not answer (Redis down, restarting or paused) raises
``BackendUnavailableError`` from any call; repeating an ``append`` is safe.
"""

from __future__ import annotations

import contextlib
from abc import ABC, abstractmethod
from collections.abc import AsyncGenerator, AsyncIterator, Callable
from typing import Final, Literal

import msgspec

from service.events import AnyEvent, RunSnapshot
from service.logs import run_fields

RunStatus = Literal["running", "completed", "cancelled", "failed"]
OnDisconnect = Literal["continue", "cancel"]
CancelCallback = Callable[[str, str], None]
"""Called on the instance that owns a run with ``(run_id, reason)`` when anyone asks to cancel it."""
MAX_BATCH: Final = 1000
"""Events in one batch of ``read_batches`` at most: a reader that starts far back (a resume at 0 of a long
run) gets its backlog in pieces of this size, each one write, not the whole log in one."""


class RunRecord(msgspec.Struct, frozen=True, kw_only=True):
    """What a backend knows about a run."""

    id: str
    chat_id: str
    model: str
    status: RunStatus = "running"
    on_disconnect: OnDisconnect = "continue"
    disconnect_grace_s: float = 0.0
    """With ``on_disconnect="cancel"``: how long the run outlives its last reader (a reader back within it keeps it)."""
    owner: str = ""
    """The instance running it."""
    subject: str | None = None
    """Who started it (``Principal.owner``); None with auth off."""
    created_at: float = 0.0
    finished_at: float | None = None
    last_seq: int = 0
    message_id: str | None = None

    @property
    def log_fields(self) -> dict[str, str]:
        """The fields of a log line about this run (:func:`service.logs.run_fields`)."""
        return run_fields(self.id, self.chat_id, self.model, self.subject)


class RunNotFoundError(Exception):
    """No run with this id was ever known (or its tombstone is gone too)."""


class RunExpiredError(Exception):
    """The run existed but its log is past retention; ``subject`` is who started it."""

    def __init__(self, run_id: str, subject: str | None = None) -> None:
        super().__init__(run_id)
        self.subject = subject


class ChatBusyError(Exception):
    """The chat already has an active run."""

    def __init__(self, active_run_id: str) -> None:
        super().__init__(active_run_id)
        self.active_run_id = active_run_id


class IdempotencyKeyReusedError(Exception):
    """The idempotency key already started a run for a different request."""

    def __init__(self, run_id: str) -> None:
        super().__init__(run_id)
        self.run_id = run_id


class TooManyRunsError(Exception):
    """The run's subject already has its maximum of running runs."""


class BackendUnavailableError(Exception):
    """The backend's server does not answer (Redis down, restarting or paused) within the call's bound."""


class CursorError(Exception):
    """A resume cursor that does not name a position in the run's log."""


class RunBackend(ABC):
    """Storage and signalling for runs. See the module docstring."""

    instance_id: str

    @abstractmethod
    async def start(self, on_cancel: CancelCallback) -> None:
        """Start background work; ``on_cancel`` is called for cancel requests of runs this instance owns."""

    @abstractmethod
    async def close(self) -> None:
        """Stop background work and release connections."""

    @abstractmethod
    async def ping(self) -> bool:
        """Whether the backend answers (for ``/readyz``)."""

    @abstractmethod
    async def create_run(
        self, record: RunRecord, *, idempotency_key: str | None = None, request_hash: str = "", max_active: int = 0
    ) -> tuple[RunRecord, bool]:
        """Register a run and claim its chat, atomically.

        Returns ``(record, True)`` for a new run. When ``idempotency_key`` was
        already used with the same ``request_hash`` (a digest of what was asked),
        returns ``(that run's record, False)`` and creates nothing; with another
        hash raises ``IdempotencyKeyReusedError``. Raises ``ChatBusyError`` when the chat has an active run, and
        ``TooManyRunsError`` when ``max_active`` > 0 and the record's subject
        already has that many running runs.
        """

    @abstractmethod
    async def get_run(self, run_id: str) -> RunRecord:
        """The run's record. Raises ``RunNotFoundError`` or ``RunExpiredError``."""

    @abstractmethod
    async def active_run(self, chat_id: str) -> str | None:
        """The id of the chat's active run, if any."""

    @abstractmethod
    async def append(self, run_id: str, event: AnyEvent) -> AnyEvent:
        """Stamp ``event`` with the next seq, add it to the log and wake readers.

        A terminal event also finishes the record (status, ``finished_at``,
        ``message_id``), releases the chat and starts the retention clock.
        Returns the stamped event. An event for a run that has already ended
        is dropped: nothing follows a terminal event in the log.
        """

    @abstractmethod
    def read_batches(self, run_id: str, after: int) -> AsyncGenerator[list[AnyEvent]]:
        """Events with seq > ``after``: the log first, then live ones, ending after the terminal event.

        They come in batches, each the events the log held past the previous batch when the reader
        looked (never empty, at most ``MAX_BATCH``), so a reader that fell behind catches up in few
        steps (decision 73).
        Raises (on first iteration) ``RunNotFoundError``, ``RunExpiredError``,
        or ``CursorError`` when ``after`` is negative, beyond the log's end, or
        before its first kept event (and mid-read for a reader that falls
        behind the per-run cap).
        """

    async def read(self, run_id: str, after: int) -> AsyncIterator[AnyEvent]:
        """``read_batches``, one event at a time."""
        async with contextlib.aclosing(self.read_batches(run_id, after)) as batches:
            async for batch in batches:
                for event in batch:
                    yield event

    @abstractmethod
    async def snapshot(self, run_id: str) -> RunSnapshot:
        """The run's state at a seq from which every later event is still in the log (decision 47).

        ``read(run_id, snapshot.seq)`` then gives the rest. A run whose log still has all its events
        answers the empty snapshot at seq 0. Raises ``RunNotFoundError`` or ``RunExpiredError``.
        """

    @abstractmethod
    async def request_cancel(self, run_id: str, reason: str) -> None:
        """Ask the owner of ``run_id`` (on whichever instance) to cancel it."""

    @abstractmethod
    async def attach(self, run_id: str) -> None:
        """Count one more reader of the run."""

    @abstractmethod
    async def detach(self, run_id: str) -> int:
        """Count one reader less; returns how many remain (across instances)."""

    @abstractmethod
    async def add_usage(self, subject: str, tokens: int, window_s: float) -> None:
        """Count ``tokens`` against ``subject`` in the current window of ``window_s`` seconds."""

    @abstractmethod
    async def usage(self, subject: str, window_s: float) -> tuple[int, float]:
        """Tokens ``subject`` used in the current window, and the seconds until the window ends."""
