"""The RunManager: owns each run as a background task, independent of any connection.

Every event the engine yields is appended to the run's log (which stamps its
seq) and so reaches every subscriber; ``open_events(run_id, after)`` replays
the log from ``after + 1`` and then follows it live. When a run ends, its
messages are written to the store once, before the terminal event is
appended, so a client that sees ``run.completed`` can read the message.

A run starts from its chat's settings (model, system prompt, tools). Chats never
change once created, so this instance keeps the settings of recent chats
(``remember_chat``, ``forget_chat`` on delete; at most 10,000 chats and 64 MB of
their text) and skips a store read per run. A chat deleted through another
instance is still caught: the user message's append finds no chat, and the
start answers 404. A chat's messages are only ever appended, so it also keeps the
newest messages a run of a recent chat sends (``transcript.recent``: they start no
earlier for the next run) with the chat's message count, and the next run's append
returns only the messages after those (the answer, what other instances added, the
new question) instead of the whole history (at most 10,000 chats and 16 M characters).

Every call names the caller's ``owner`` (``Principal.owner``: None with auth
off). A chat or run of another owner answers exactly as an unknown one does (404,
the same body), and an expired run's tombstone remembers its owner for the same
reason. The owner's limits (running runs, tokens per window) are checked before
the run starts, so a refused start reaches no upstream.

Shutdown drains (decision 46): ``begin_drain`` (the server's graceful shutdown began)
refuses new runs with 503 ``shutting_down`` and tells the listeners (WebSocket
sessions); the runs of this instance may finish within the grace period, the rest
are cancelled with reason ``shutdown``, so every reader gets a terminal event and
its stream ends by itself. Readers of runs that go on elsewhere (another instance
owns them) are then stopped, ending their streams cleanly, and resume elsewhere.

Errors of the modules below (an unknown model, a tool selection, the store down) propagate as
they are: :mod:`service.api.error_map` is the one place that turns them into API errors.
"""

from __future__ import annotations

import asyncio
import contextlib
import functools
import hashlib
import logging
import math
import time
from collections import OrderedDict
from collections.abc import AsyncIterator, Callable, Coroutine, Generator, Sequence
from dataclasses import dataclass, field
from typing import Any, Protocol

import msgspec
from prometheus_client import Counter, Histogram

from service import errors, metrics
from service.engine.engine import ChatEngine, RunRequest, ToolRunner
from service.engine.providers import DEMO_MODEL
from service.events import AnyEvent, ErrorCode, ErrorInfo, RunCancelled, RunCompleted, RunFailed, is_terminal
from service.ids import new_id
from service.logs import bind_run
from service.runs import base
from service.runs.base import OnDisconnect, RunBackend, RunRecord
from service.runs.journal import RunJournal
from service.runs.memory import terminal_status
from service.runs.readers import Reader
from service.runs.snapshot import SnapshotFold
from service.runs.transcript import RecentHistories, Transcript, openai_history
from service.store.base import Chat, ChatStore, Message, StoredRun, StoreUnavailableError, UsageRecord

log = logging.getLogger("service.runs")

_SNAPSHOT_RETRIES = 3
"""How often one reader falls back to a snapshot (its cursor older than the kept events) before it stops."""
CANCEL_WAIT_S = 10.0
"""How long a cancel waits for the run to end before it answers with the run as it is."""
_FIRST_RETRY_S = 0.1
_LAST_RETRY_S = 2.0
"""The final store write's backoff: 0.1 s, doubling, at most 2 s between tries."""
_BACKEND_STOPS: dict[str, tuple[ErrorCode, str]] = {
    "owner_lost": ("owner_lost", "another instance took this one for dead and finished the run"),
    "runs_unavailable": ("runs_unavailable", "the run backend lost the run"),
}
"""Cancel reasons of the run backend's own; such a run ends (and is stored) as failed with that code."""
_REMEMBERED_CHATS = 10_000
_REMEMBERED_CHAT_CHARS = 64_000_000
_REMEMBERED_HISTORY_CHARS = 16_000_000


@dataclass
class RunClock:
    """When a run started and when its first output came (event loop time), and its events so far.

    For the line its end logs and the metrics its end counts (``metrics``: its model's labelled ones).
    """

    started: float
    metrics: _RunMetrics
    first_output: float | None = None
    events: int = 0


class ToolSource(Protocol):
    """Builds the toolbox of one run (``service.engine.tools.ToolCatalog``)."""

    async def toolbox(self, tools: Sequence[str] | None, mcp_servers: Sequence[str] | None) -> ToolRunner: ...  # noqa: D102


@dataclass(frozen=True, kw_only=True)
class RunOptions:
    """What a client asks of a run (the HTTP body or the WebSocket ``run.create`` frame)."""

    message: str | list[dict[str, Any]]
    model: str | None = None
    response_format: dict[str, Any] | None = None
    tools: list[str] | None = None
    mcp_servers: list[str] | None = None
    on_disconnect: OnDisconnect = "continue"
    sampling: dict[str, Any] = field(default_factory=dict[str, Any])
    """Sampling parameters set for this run (``temperature``, ...): each overrides the chat's."""
    disconnect_grace_s: float = 0.0
    """With ``on_disconnect="cancel"``: how long the run outlives its last reader; one back within it keeps the run."""


@dataclass(frozen=True, kw_only=True)
class RunLimits:
    """Per-owner limits (they apply when auth is on, i.e. to owners other than None)."""

    max_active_runs: int = 0
    """Running runs per owner; 0: no limit."""
    token_budget: int = 0
    """Tokens per owner per ``budget_window_s``; 0: no budget."""
    budget_window_s: float = 3600.0
    max_history_chars: int = 1_000_000
    """The newest turns of a chat that fit are sent to the model; older ones are left out."""


def request_hash(options: RunOptions) -> str:
    """A digest of what a run was asked (message and options, keys sorted): an idempotent retry must match it."""
    return hashlib.sha256(msgspec.json.encode(options, order="sorted")).hexdigest()


def _not_found(kind: str, ident: str) -> errors.NotFoundError:
    """What an unknown id answers (and, word for word, another owner's id)."""
    return errors.NotFoundError(f"no {kind} {ident!r}", detail={f"{kind}_id": ident})


def _chat_chars(chat: Chat) -> int:
    return (
        256 + len(chat.system or "") + (len(msgspec.json.encode(chat.response_format)) if chat.response_format else 0)
    )


class RunManager:
    """Starts, follows and cancels runs. See the module docstring."""

    def __init__(
        self,
        *,
        engine: ChatEngine,
        backend: RunBackend,
        store: ChatStore,
        tools: ToolSource | None,
        shutdown_grace_s: float,
        final_write_retry_s: float = 30.0,
        limits: RunLimits | None = None,
        outage_s: float = 30.0,
        journal: RunJournal | None = None,
    ) -> None:
        self.engine = engine
        self._journal = journal
        self._outage_s = outage_s
        self.limits = limits or RunLimits()
        self.backend = backend
        self.store = store
        self.tools = tools
        self._grace = shutdown_grace_s
        self._final_write_retry_s = final_write_retry_s
        self._ending: set[str] = set()
        """Runs writing their end: a cancel has nothing left to stop."""
        self._tasks: dict[str, asyncio.Task[None]] = {}
        self._chats: OrderedDict[str, Chat] = OrderedDict()  # recent chats' settings, least recent first
        self._chat_chars = 0
        self._histories = RecentHistories(
            self.limits.max_history_chars, max_chats=_REMEMBERED_CHATS, max_kept_chars=_REMEMBERED_HISTORY_CHARS
        )
        self._cancel_reasons: dict[str, str] = {}
        self._background: set[asyncio.Task[None]] = set()
        self._readers: set[Reader] = set()
        self.draining = False
        """The server is shutting down: no new runs, ``/readyz`` answers 503."""
        self._drain_begun = asyncio.Event()
        self._drain_listeners: list[Callable[[], None]] = []
        self._drained: asyncio.Task[None] | None = None

    async def start(self) -> None:
        """Start the backend and listen for cancel requests; fail the runs a dead process left running."""
        await self.backend.start(self._on_cancel)
        if self._journal is not None:
            await self._journal.start()

    async def close(self) -> None:
        """Drain (if the server's shutdown did not begin it already), then stop the backend."""
        self.begin_drain()
        assert self._drained is not None  # noqa: S101 - begin_drain made it
        await self._drained
        if self._journal is not None:
            await self._journal.close()
        await self.backend.close()

    def begin_drain(self) -> None:
        """The server is shutting down: refuse new runs, end the rest within the grace period (idempotent)."""
        if self.draining:
            return
        self.draining = True
        self._drain_begun.set()
        log.info("draining: %d runs running, %d readers", len(self._tasks), len(self._readers))
        self._drained = asyncio.get_running_loop().create_task(self._drain(), name="drain")
        for listener in list(self._drain_listeners):
            listener()

    def on_drain(self, listener: Callable[[], None]) -> Callable[[], None]:
        """Call ``listener`` when the drain begins; returns the call that unsubscribes it."""
        self._drain_listeners.append(listener)
        return lambda: self._drain_listeners.remove(listener)

    async def _drain(self) -> None:
        loop = asyncio.get_running_loop()
        deadline = loop.time() + self._grace
        while self._tasks and (left := deadline - loop.time()) > 0:  # a start under way may add one
            await asyncio.wait(list(self._tasks.values()), timeout=left)
        pending = list(self._tasks.items())
        for run_id, task in pending:
            if run_id not in self._ending:  # a run writing its end finishes it
                self._cancel_reasons[run_id] = "shutdown"
                task.cancel()
        await asyncio.gather(*(task for _, task in pending), return_exceptions=True)
        for reader in list(self._readers):
            if await self._goes_on(reader.run_id):
                reader.stop()

    async def _goes_on(self, run_id: str) -> bool:
        """Whether a run is still running (on another instance, once this one's runs have ended)."""
        try:
            return (await self.backend.get_run(run_id)).finished_at is None
        except Exception:  # an unknown, expired or unreadable run: its reader has nothing to wait for
            return True

    async def start_run(
        self, chat_id: str, options: RunOptions, idempotency_key: str | None = None, *, owner: str | None = None
    ) -> tuple[RunRecord, bool]:
        """Start a run on a chat; returns ``(run, created)`` (an idempotent retry gives ``created=False``)."""
        if self.draining:
            raise errors.UnavailableError(
                "the service is shutting down; start the run again (on another instance)", code="shutting_down"
            )
        with _backend_errors():
            return await self._start_run(chat_id, options, idempotency_key, owner)

    async def _start_run(
        self, chat_id: str, options: RunOptions, idempotency_key: str | None, owner: str | None
    ) -> tuple[RunRecord, bool]:
        chat = self._chats.get(chat_id) or await self._chat(chat_id, owner)
        if chat.owner != owner:
            raise _not_found("chat", chat_id)
        self.remember_chat(chat)
        model, _, _ = self.engine.providers.resolve(options.model or chat.model)
        toolbox = await self._toolbox(chat, options)
        record = RunRecord(
            id=new_id(),
            chat_id=chat.id,
            model=model,
            on_disconnect=options.on_disconnect,
            disconnect_grace_s=options.disconnect_grace_s,
            subject=owner,
            created_at=time.time(),
        )
        key = f"{chat.id}:{idempotency_key}" if idempotency_key else None
        if owner is not None and self.limits.token_budget:
            await self._check_budget(owner)
        limit = self.limits.max_active_runs if owner is not None else 0
        try:
            with _RUN_LOG_CREATE.time():
                record, created = await self.backend.create_run(
                    record, idempotency_key=key, request_hash=request_hash(options) if key else "", max_active=limit
                )
        except base.IdempotencyKeyReusedError as exc:
            raise errors.IdempotencyKeyReusedError(
                "this Idempotency-Key was already used for a different request; use a new key for a new request",
                detail={"field": "Idempotency-Key", "run_id": exc.run_id},
            ) from exc
        except base.ChatBusyError as exc:
            raise errors.ChatBusyError(
                "the chat already has an active run", detail={"active_run_id": exc.active_run_id}
            ) from exc
        except base.TooManyRunsError as exc:
            raise errors.TooManyRequestsError(
                f"you already have {limit} runs running; wait for one to end",
                code="too_many_runs",
                retry_after=1,
                detail={"max_active_runs": limit},
            ) from exc
        if not created:
            return record, False
        message_id = new_id()
        transcript = Transcript(chat_id=chat.id, run_id=record.id, message_id=message_id, owner=owner)
        stored_run = self._journal.first_record(record, transcript) if self._journal is not None else None
        try:
            user = Message(
                id=new_id(),
                chat_id=chat.id,
                role="user",
                content=options.message,
                run_id=record.id,
                created_at=time.time(),
            )
            known = self._histories.get(chat.id)
            added = await self.store.append_and_list(chat.id, [user], run=stored_run, skip=known.count if known else 0)
            history = openai_history(chat.system, self._histories.extend(chat.id, known, added))
        except StoreUnavailableError:
            failed = RunFailed(run_id=record.id, error=ErrorInfo("store_unavailable", "the chat store is down"))
            await self.backend.append(record.id, failed)
            raise
        except LookupError as exc:  # the chat was deleted since it was read (here or on another instance)
            self.forget_chat(chat.id)
            failed = RunFailed(run_id=record.id, error=ErrorInfo("not_found", "the chat was deleted"))
            await self.backend.append(record.id, failed)
            raise _not_found("chat", chat.id) from exc
        request = RunRequest(
            run_id=record.id,
            chat_id=chat.id,
            model=model,
            messages=history,
            message_id=message_id,
            response_format=options.response_format or chat.response_format,
            toolbox=toolbox,
            sampling={**chat.sampling, **options.sampling} if chat.sampling else options.sampling,
        )
        if self._journal is not None:
            self._journal.track(record, transcript)
        self._tasks[record.id] = asyncio.create_task(self._drive(request, transcript), name=f"run-{record.id}")
        return record, True

    async def _check_budget(self, owner: str) -> None:
        used, reset_in = await self.backend.usage(owner, self.limits.budget_window_s)
        if used >= self.limits.token_budget:
            raise errors.TooManyRequestsError(
                f"your token budget of {self.limits.token_budget} per {self.limits.budget_window_s:g} s is used up",
                code="budget_exhausted",
                retry_after=math.ceil(reset_in),
                detail={"token_budget": self.limits.token_budget, "used": used},
            )

    def remember_chat(self, chat: Chat) -> None:
        """Keep a chat's settings for the start of its runs (see the module docstring)."""
        if chat.id not in self._chats:
            self._chat_chars += _chat_chars(chat)
        self._chats[chat.id] = chat
        self._chats.move_to_end(chat.id)
        while len(self._chats) > _REMEMBERED_CHATS or self._chat_chars > _REMEMBERED_CHAT_CHARS:
            _, oldest = self._chats.popitem(last=False)
            self._chat_chars -= _chat_chars(oldest)

    def forget_chat(self, chat_id: str) -> None:
        """Drop a deleted chat's settings and messages."""
        chat = self._chats.pop(chat_id, None)
        if chat is not None:
            self._chat_chars -= _chat_chars(chat)
        self._histories.forget(chat_id)

    async def chat(self, chat_id: str, owner: str | None) -> Chat:
        """The owner's chat (404 for an unknown chat and for another owner's)."""
        return await self._chat(chat_id, owner)

    async def _chat(self, chat_id: str, owner: str | None) -> Chat:
        chat = await self.store.get_chat(chat_id)
        if chat is None or chat.owner != owner:
            raise _not_found("chat", chat_id)
        return chat

    async def _toolbox(self, chat: Chat, options: RunOptions) -> ToolRunner | None:
        if self.tools is None:
            return None
        tools = options.tools if options.tools is not None else chat.tools
        if tools is None and (options.model or chat.model) != DEMO_MODEL:
            tools = []  # the local tools are the demo's: a real model gets only the tools it is given
        servers = options.mcp_servers if options.mcp_servers is not None else chat.mcp_servers
        return await self.tools.toolbox(tools, servers)

    async def _drive(self, request: RunRequest, transcript: Transcript) -> None:
        run_id = request.run_id
        bind_run(run_id, request.chat_id, request.model, transcript.owner)
        loop = asyncio.get_running_loop()
        clock = RunClock(loop.time(), _run_metrics(self.engine.providers.metric_labels(request.model)))
        terminal: AnyEvent | None = None
        first_output = clock.metrics.first_output
        metrics.ACTIVE_RUNS.inc()
        try:
            try:
                async with contextlib.aclosing(self.engine.run(request)) as stream:  # closes the upstream on any exit
                    async for event in stream:
                        clock.events += 1
                        if is_terminal(event):
                            terminal = event  # written by _end, once the engine has closed its upstream
                            continue
                        if clock.events == 3:  # after run.started and step.started: the model's first output
                            clock.first_output = loop.time()
                            first_output.observe(clock.first_output - clock.started)
                        transcript.add(event)
                        await self._append(run_id, event)
            except asyncio.CancelledError:
                reason = self._cancel_reasons.pop(run_id, "cancelled")
                stopped: AnyEvent = RunCancelled(run_id=run_id, reason=reason, message_id=request.message_id)
                if reason in _BACKEND_STOPS:  # the backend stopped the run: its answer is stored as failed
                    stopped = RunFailed(run_id=run_id, error=ErrorInfo(*_BACKEND_STOPS[reason]))
                await self._end(transcript, terminal or stopped, clock)
                raise
            except base.BackendUnavailableError:
                log.warning("run %s: the run backend did not answer for %g s; the run fails", run_id, self._outage_s)
                terminal = RunFailed(
                    run_id=run_id, error=ErrorInfo("runs_unavailable", "the run backend did not answer")
                )
            except Exception:
                log.exception("run %s crashed", run_id)
            await self._end(
                transcript,
                terminal
                or RunFailed(
                    run_id=run_id, error=ErrorInfo("internal", "an internal error stopped the run"), message_id=None
                ),
                clock,
            )
        finally:
            self._tasks.pop(run_id, None)
            self._cancel_reasons.pop(run_id, None)
            self._ending.discard(run_id)
            if self._journal is not None:
                self._journal.forget(run_id)

    async def _end(self, transcript: Transcript, terminal: AnyEvent, clock: RunClock) -> None:
        """Store the answer, then append the terminal event: in a task of its own, which no cancel reaches.

        From here on a cancel of the run finds nothing to stop (``_on_cancel``, the drain), and one that
        was already on its way waits for the end being written: whatever the interleaving, the run
        gets exactly one terminal event. (Before, a cancel landing during the store write wrote the
        answer a second time, hit the message's unique id and wrote no terminal event at all.)
        """
        self._ending.add(transcript.run_id)
        ending = asyncio.create_task(self._write_end(transcript, terminal, clock), name=f"end-{transcript.run_id}")
        try:
            await asyncio.shield(ending)
        except asyncio.CancelledError:
            await ending
            raise

    async def _write_end(self, transcript: Transcript, terminal: AnyEvent, clock: RunClock) -> None:
        # The run's metrics first: a client that has the terminal event finds the run counted.
        metrics.ACTIVE_RUNS.dec()
        metrics.RUN_EVENTS.inc(clock.events)
        clock.metrics.count(asyncio.get_running_loop().time() - clock.started, transcript.usage)
        try:
            terminal = await self._persist(transcript, terminal)
            _log_end(transcript, terminal, clock)
            with _RUN_LOG_APPEND.time():
                await self._append(transcript.run_id, terminal)
        except base.BackendUnavailableError:  # the backend keeps it and writes it once Redis is back
            log.warning("run %s: its terminal event waits for the run backend", transcript.run_id)
        except base.RunNotFoundError:
            log.warning("run %s: the run backend no longer knows the run", transcript.run_id)
        except Exception:
            log.exception("run %s: could not write its end", transcript.run_id)

    async def _append(self, run_id: str, event: AnyEvent) -> None:
        """Append ``event``, waiting out a run backend outage of up to ``outage_s`` (the run holds still meanwhile).

        The upstream is not read while the run waits, so nothing is lost; past the bound
        ``BackendUnavailableError`` propagates and the run fails with ``runs_unavailable``.
        """
        # time.monotonic, not loop.time(): per event, asyncio.get_running_loop() is a getpid() system call.
        deadline, delay = time.monotonic() + self._outage_s, 0.05
        while True:
            try:
                await self.backend.append(run_id, event)
                return
            except base.BackendUnavailableError:
                if time.monotonic() + delay > deadline:
                    raise
                await asyncio.sleep(delay)
                delay = min(2 * delay, 1.0)

    def _spawn(self, work: Coroutine[Any, Any, None]) -> None:
        """Run ``work`` in a task of its own (a cancelled caller cannot await), keeping a reference."""
        task = asyncio.create_task(work)
        self._background.add(task)
        task.add_done_callback(self._background.discard)

    async def _persist(self, transcript: Transcript, terminal: AnyEvent) -> AnyEvent:
        """Store the run's messages and count its tokens (before the terminal event, which readers wait on).

        A store failure turns the terminal event into ``store_unavailable``.
        """
        await self._count_usage(transcript)
        match terminal:
            case RunCompleted(finish_reason=reason):
                messages = transcript.messages("completed", reason)
            case RunCancelled():
                messages = transcript.messages("cancelled", None)
            case RunFailed(error=error):
                messages = transcript.messages("failed", error.code)
            case _:
                return terminal
        run = self._journal.ended(transcript.run_id, terminal) if self._journal is not None else None
        if await self._store_answer(transcript, messages, run):
            terminal = msgspec.structs.replace(terminal, message_id=transcript.message_id)
        else:
            error = ErrorInfo("store_unavailable", "the answer could not be stored")
            terminal = RunFailed(run_id=transcript.run_id, error=error, message_id=None)
        metrics.RUNS_FINISHED.labels(terminal_status(terminal)).inc()
        if isinstance(terminal, RunFailed):
            metrics.RUN_ERRORS.labels(terminal.error.code).inc()
        return terminal

    async def _store_answer(self, transcript: Transcript, messages: list[Message], run: StoredRun | None) -> bool:
        """Append the run's messages, retrying while the store is down, for up to ``final_write_retry_s``.

        The append is idempotent, so a retry after a write whose answer was lost does not write twice.
        ``run`` (the run's final record, with in-memory runs) goes in the same transaction. False when the
        store stayed down (or the chat was deleted meanwhile).
        """
        loop = asyncio.get_running_loop()
        deadline, delay = loop.time() + self._final_write_retry_s, _FIRST_RETRY_S
        while True:
            try:
                await self.store.append_messages(transcript.chat_id, messages, idempotent=True, run=run)
                return True
            except LookupError:
                log.warning("run %s: its chat was deleted before the answer was stored", transcript.run_id)
                return False
            except StoreUnavailableError as exc:
                if loop.time() + delay > deadline:
                    log.warning("run %s: could not store its messages: %s", transcript.run_id, exc)
                    return False
                log.warning(
                    "run %s: the store is down, retrying the answer in %.2f s: %s", transcript.run_id, delay, exc
                )
                await asyncio.sleep(delay)
                delay = min(delay * 2, _LAST_RETRY_S)

    async def _count_usage(self, transcript: Transcript) -> None:
        usage, owner = transcript.usage, transcript.owner
        if usage is None or owner is None or not self.limits.token_budget:
            return
        try:
            await self.backend.add_usage(owner, usage.total_tokens, self.limits.budget_window_s)
        except Exception:
            log.exception("run %s: could not count its tokens against the budget", transcript.run_id)

    def _on_cancel(self, run_id: str, reason: str) -> None:
        task = self._tasks.get(run_id)
        if task is not None and not task.done() and run_id not in self._ending:
            self._cancel_reasons.setdefault(run_id, reason)
            task.cancel()

    async def get_run(self, run_id: str, owner: str | None, *, live: bool = False) -> RunRecord:
        """The owner's run; 404 if unknown or another owner's, 410 once expired.

        A run the backend does not know is answered from its stored record (in-memory runs: its process
        died); with ``live`` (the caller wants its events) such a run answers 410.
        """
        try:
            with _backend_errors(), _RUN_LOG_READ.time():
                record = await self.backend.get_run(run_id)
        except base.RunNotFoundError as exc:
            stored = await self._journal.get(run_id) if self._journal is not None else None
            if stored is None or stored.subject != owner:
                raise _not_found("run", run_id) from exc
            if live:
                raise _expired(run_id) from exc
            return stored
        except base.RunExpiredError as exc:
            if exc.subject != owner:
                raise _not_found("run", run_id) from exc
            raise _expired(run_id) from exc
        if record.subject != owner:
            raise _not_found("run", run_id)
        return record

    async def active_run(self, chat_id: str, owner: str | None) -> RunRecord | None:
        """The chat's running run, if any."""
        await self._chat(chat_id, owner)
        with _backend_errors():
            run_id = await self.backend.active_run(chat_id)
        if run_id is None:
            return None
        try:
            record = await self.get_run(run_id, owner)  # a run whose owner is gone is finished here
        except (errors.NotFoundError, errors.RunExpiredError):
            return None
        return record if record.status == "running" else None

    async def cancel(self, run_id: str, owner: str | None, reason: str = "cancelled by the client") -> RunRecord:
        """Stop the run and return the record it ends with (idempotent: a finished run is returned as it is).

        The answer is the state the cancel leads to: ``cancelled`` once the owner (on whichever instance) has
        stopped the run and stored its partial answer, or the state a run that finished first ended in. It is
        the run's log that tells: the terminal event is awaited there, for at most ``CANCEL_WAIT_S``.
        """
        record = await self.get_run(run_id, owner)
        if record.finished_at is not None:
            return record
        with _backend_errors():
            await self.backend.request_cancel(run_id, reason)
        with contextlib.suppress(TimeoutError, base.CursorError):
            async with asyncio.timeout(CANCEL_WAIT_S):
                await self._terminal(record)
        return await self.get_run(run_id, owner)

    async def _terminal(self, record: RunRecord) -> None:
        """Return once the run's terminal event is in its log."""
        async with contextlib.aclosing(self.backend.read_batches(record.id, record.last_seq)) as batches:
            async for batch in batches:
                if is_terminal(batch[-1]):
                    return

    async def open_events(
        self, run_id: str, after: int, owner: str | None, *, snapshot: bool = False
    ) -> AsyncIterator[list[AnyEvent]] | None:
        """Events after ``after``, then live ones; None when a finished run has nothing left to send.

        They come in batches, as the run backend's ``read_batches`` gives them: a transport sends a
        batch together (decision 73).

        With ``snapshot``, or when ``after`` is older than the events still kept, a ``run.snapshot`` of
        the run so far comes first and then the events after it (decision 47). Raises 404/410 for
        unknown/expired runs and 400 ``invalid_cursor`` for a cursor past the log.
        """
        record = await self.get_run(run_id, owner, live=True)
        if after < 0 or after > record.last_seq:
            raise errors.InvalidCursorError(
                f"cursor {after} is not a position in this run (0..{record.last_seq})",
                detail={"run_id": run_id, "last_seq": record.last_seq},
            )
        if record.finished_at is not None and after == record.last_seq:
            return None
        return self._follow(record, after, snapshot)

    async def _follow(self, record: RunRecord, after: int, snapshot: bool) -> AsyncIterator[list[AnyEvent]]:
        """The run's events in batches; raises ``errors.RunsUnavailableError`` once the backend is down too long."""
        with _backend_errors():
            await self.backend.attach(record.id)
        reader = Reader(record.id, asyncio.current_task())
        self._readers.add(reader)
        retries, ended = _SNAPSHOT_RETRIES, False
        try:
            while True:
                batches = (
                    self._snapshot_then_tail(record.id) if snapshot else self.backend.read_batches(record.id, after)
                )
                reader.waiting = True
                try:
                    async for batch in batches:
                        reader.waiting = False
                        yield batch
                        after = batch[-1].seq
                        if reader.stopping:
                            return
                        reader.waiting = True
                    ended = True  # the log ended: the reader saw the terminal event
                    return
                except base.CursorError as exc:  # older than the kept events: the state instead of them
                    if not retries:
                        raise
                    retries, snapshot = retries - 1, True
                    log.info("reader of run %s gets a snapshot: %s", record.id, exc, extra=record.log_fields)
        except (base.CursorError, base.RunExpiredError) as exc:
            log.info("reader of run %s stopped: %s", record.id, exc, extra=record.log_fields)
        except asyncio.CancelledError:
            if not reader.stopped_by_cancel():
                raise
        except base.BackendUnavailableError as exc:
            log.warning(
                "reader of run %s stopped: the run backend did not answer for %g s",
                record.id,
                self._outage_s,
                extra=record.log_fields,
            )
            raise _unavailable() from exc
        finally:
            self._readers.discard(reader)
            # A task of its own: the reader may be inside a cancelled scope, where any await fails.
            self._spawn(self._release(record, ended))

    async def _snapshot_then_tail(self, run_id: str) -> AsyncIterator[list[AnyEvent]]:
        """A ``run.snapshot`` through the last event logged now (never a terminal one), then the rest."""
        start = await self.backend.snapshot(run_id)
        upto = (await self.backend.get_run(run_id)).last_seq
        fold: SnapshotFold | None = SnapshotFold(start)
        if start.seq >= upto:
            fold = None
            yield [start]
        async with contextlib.aclosing(self.backend.read_batches(run_id, start.seq)) as batches:
            async for batch in batches:
                if fold is None:
                    yield batch
                    continue
                folded = 0
                for event in batch:
                    if event.seq > upto or is_terminal(event):
                        break
                    fold.add(event)
                    folded += 1
                if folded == len(batch) and batch[-1].seq < upto:
                    continue  # more to fold
                yield [fold.event(run_id, batch[0].seq + folded - 1), *batch[folded:]]
                fold = None

    async def _release(self, record: RunRecord, ended: bool) -> None:
        """Count a reader less; the last reader of an ``on_disconnect="cancel"`` run that goes on cancels it.

        With a grace (``disconnect_grace_s``), the reader is counted for that long after it left (or until
        the drain begins), so one that comes back within it (a reload resuming the stream) keeps the run.
        """
        cancels = record.on_disconnect == "cancel" and not ended
        try:
            if cancels and record.disconnect_grace_s > 0:
                with contextlib.suppress(TimeoutError):
                    await asyncio.wait_for(self._drain_begun.wait(), record.disconnect_grace_s)
            remaining = await self.backend.detach(record.id)
            if remaining == 0 and cancels:
                await self.backend.request_cancel(record.id, "the last reader disconnected")
        except Exception:
            log.exception("run %s: could not release a reader", record.id, extra=record.log_fields)


def _log_end(transcript: Transcript, terminal: AnyEvent, clock: RunClock) -> None:
    """The one line a run's end logs (at INFO): how it ended, how long it took, its tokens."""
    usage = transcript.usage
    fields: dict[str, object] = {
        "status": terminal_status(terminal),
        "error_code": terminal.error.code if isinstance(terminal, RunFailed) else None,
        "duration_s": round(asyncio.get_running_loop().time() - clock.started, 4),
        "ttft_s": None if clock.first_output is None else round(clock.first_output - clock.started, 4),
        "prompt_tokens": None if usage is None else usage.prompt_tokens,
        "completion_tokens": None if usage is None else usage.completion_tokens,
    }
    summary = " ".join(f"{name}={value}" for name, value in fields.items() if value is not None)
    log.info("run %s ended: %s", transcript.run_id, summary, extra=fields)


_RUN_LOG_CREATE = metrics.RUN_LOG_SECONDS.labels("create")
_RUN_LOG_APPEND = metrics.RUN_LOG_SECONDS.labels("append")
_RUN_LOG_READ = metrics.RUN_LOG_SECONDS.labels("read")


@dataclass(frozen=True)
class _RunMetrics:
    """The labelled metrics of one ``(provider, model)``: ``labels()`` takes a lock and hashes, ~2 µs a call."""

    first_output: Histogram
    seconds: Histogram
    prompt_tokens: Counter
    completion_tokens: Counter

    def count(self, seconds: float, usage: UsageRecord | None) -> None:
        """A run's duration and tokens (once per run: see ``service.metrics``)."""
        self.seconds.observe(seconds)
        if usage is not None:
            self.prompt_tokens.inc(usage.prompt_tokens)
            self.completion_tokens.inc(usage.completion_tokens)


@functools.cache  # labels are configured names or "other" (ProviderRegistry.metric_labels): a bounded set
def _run_metrics(labels: tuple[str, str]) -> _RunMetrics:
    return _RunMetrics(
        metrics.TIME_TO_FIRST_EVENT.labels(*labels),
        metrics.RUN_SECONDS.labels(*labels),
        metrics.TOKENS.labels(*labels, "prompt"),
        metrics.TOKENS.labels(*labels, "completion"),
    )


def _expired(run_id: str) -> errors.RunExpiredError:
    return errors.RunExpiredError(
        "the run's events are past retention; its answer is in the chat", detail={"run_id": run_id}
    )


def _unavailable() -> errors.RunsUnavailableError:
    return errors.RunsUnavailableError("the run backend (Redis) does not answer; retry shortly")


@contextlib.contextmanager
def _backend_errors() -> Generator[None]:
    """Turn a run backend outage into 503 ``runs_unavailable``."""
    try:
        yield
    except base.BackendUnavailableError as exc:
        raise _unavailable() from exc
