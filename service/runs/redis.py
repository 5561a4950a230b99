"""The shared run backend: Redis Streams, so several instances serve each other's runs.

Key layout (``P`` is the configured prefix)::

    P:run:{id}            hash    the RunRecord fields (+ ``idempotency_key``: the idem key's name, and
                                  ``request_hash``: the digest of the request that key started)
    P:run:{id}:log        stream  one entry per event: id ``{seq}-0``, field ``e`` = event JSON
    P:run:{id}:expired    string  tombstone, written at the end (TTL retention + 1 day): 410, not 404;
                                  holds the run's subject, so only its owner learns the run existed
    P:run:{id}:readers    string  attached readers, across instances
    P:run:{id}:cancel     string  the last cancel reason (read by the owner's heartbeat)
    P:run:{id}:snapshot   string  the run's ``run.snapshot`` every max_events_per_run / 2 events, written
                                  by its owner (TTL retention + 1 day, renewed on each write)
    P:chat:{chat_id}:active string the chat's active run id
    P:idem:{key}          string  run id created for an idempotency key
    P:subject:{s}:running set     ids of the subject's runs, for its limit of running runs (pruned on create)
    P:usage:{s}:{window}  string  tokens the subject used in one budget window
    P:instance:{id}       string  owner liveness, refreshed every owner_ttl_s / 3
    P:cancel              pub/sub channel, JSON ``{"run_id", "reason"}``

How it works:

1. The stream id is the seq (``XADD … {seq}-0``). Redis refuses an id not
   above the stream's top, so two writers can never both write a seq: the
   loser sees the conflict and re-checks.
2. A non-terminal append is one ``XADD … MAXLEN ~ max_events_per_run``; the
   record's ``last_seq`` is only written at the end and otherwise derived from
   the stream's top entry. A terminal append is one Lua script: ``XADD``,
   finish the record, release the chat (if it still names this run), start
   the retention clock (``PEXPIRE``) and write the tombstone.
3. ``read`` replays with ``XRANGE`` (batches of 1000) and then tails with
   ``XREAD BLOCK 1000``. Each tailing reader borrows one connection from a
   separate pool (``max_tail_connections``, default 2048) for the length of
   one ``XREAD``; readers beyond it wait on a semaphore for a free one.
4. Whenever a tailing ``XREAD`` times out the reader checks the run: if it is
   still running but its owner's ``instance`` key is gone, it appends
   ``run.failed`` (``owner_lost``) at seq = cursor + 1 through the same finish
   script, which re-checks both conditions atomically. ``create_run`` does the
   same for a chat held by a lost run, so a crashed instance never keeps a
   chat busy.
5. An owner that finds its seq already taken by such a ``run.failed`` drops
   the event and calls ``on_cancel(run_id, "owner_lost")`` so the run stops.
6. Cancel goes out on pub/sub (at most once) and into the run's ``cancel``
   key; the owner's heartbeat also reads those keys, so a cancel survives a
   pub/sub reconnect.
7. Deviations from the memory backend: ``create_run`` needs ``start()`` first
   (without the heartbeat, readers would declare the run lost), and an append
   to a run that has already finished is dropped (memory appends it after the
   terminal event, where no reader ever sees it).

Not for Redis Cluster: the scripts touch keys of one run and its chat, which
may live in different slots. Redis errors (``redis.exceptions.ConnectionError``
…) propagate; every call is bounded by ``asyncio.timeout`` (builtin
``TimeoutError``) instead of a socket timeout, because redis-py's socket
timeout path (``asyncio.wait_for``) can swallow cancellation on Python 3.11.
"""

from __future__ import annotations

import asyncio
import contextlib
import functools
import logging
import time
import uuid
from collections.abc import AsyncIterator, Awaitable, Callable, Mapping, Sequence
from types import CoroutineType
from typing import Any, Final, ParamSpec, TypeVar, cast

import msgspec
import redis.asyncio as aioredis
from redis.asyncio.client import PubSub
from redis.exceptions import RedisError, ResponseError

from service.events import AnyEvent, ErrorInfo, RunFailed, RunSnapshot, decode_event, encode_json, is_terminal
from service.runs.base import (
    CancelCallback,
    ChatBusyError,
    CursorError,
    IdempotencyKeyReusedError,
    RunBackend,
    RunExpiredError,
    RunNotFoundError,
    RunRecord,
    TooManyRunsError,
)
from service.runs.memory import terminal_message_id, terminal_status
from service.runs.snapshot import SnapshotFold

log = logging.getLogger(__name__)
_P = ParamSpec("_P")
_T = TypeVar("_T")

_BATCH: Final = 1000
_BLOCK_MS: Final = 1000
_CALL_TIMEOUT_S: Final = 5.0  # bounds every Redis round trip (above _BLOCK_MS: a blocked XREAD is not cut short)
_CONNECT_TIMEOUT_S: Final = 2.0
_COMMAND_CONNECTIONS: Final = 256  # non-blocking commands
_TOMBSTONE_EXTRA_S: Final = 86_400.0
_READERS_TTL_S: Final = 86_400.0
_CANCEL_TTL_S: Final = 3_600.0
_IDEM_FIELD: Final = "idempotency_key"
_HASH_FIELD: Final = "request_hash"

# KEYS: chat, record, idem, the subject's running set. ARGV: run id, use idem ("1"/"0"), the most running
# runs of the subject ("0": no limit, or no subject), prefix of record keys, the request's hash (kept in the
# record as ``request_hash``: an idem key reused with another hash is refused), record field/value pairs...
_CREATE_LUA = """
if ARGV[2] == '1' then
  local existing = redis.call('GET', KEYS[3])
  if existing then
    local first = redis.call('HGET', ARGV[4] .. existing, 'request_hash')
    if first and first ~= ARGV[5] then return {'reused', existing} end
    return {'existing', existing}
  end
end
local active = redis.call('GET', KEYS[1])
if active then return {'busy', active} end
if redis.call('EXISTS', KEYS[2]) == 1 then return {'duplicate', ARGV[1]} end
local limit = tonumber(ARGV[3])
if limit > 0 then
  local running = 0
  for _, id in ipairs(redis.call('SMEMBERS', KEYS[4])) do
    if redis.call('HGET', ARGV[4] .. id, 'status') == 'running' then
      running = running + 1
    else
      redis.call('SREM', KEYS[4], id)
    end
  end
  if running >= limit then return {'too_many', tostring(running)} end
  redis.call('SADD', KEYS[4], ARGV[1])
  redis.call('PEXPIRE', KEYS[4], 86400000)
end
redis.call('SET', KEYS[1], ARGV[1])
if ARGV[2] == '1' then redis.call('SET', KEYS[3], ARGV[1]) end
redis.call('HSET', KEYS[2], 'request_hash', ARGV[5], unpack(ARGV, 6))
return {'created', ARGV[1]}
"""

# KEYS: record, log, tombstone, readers, cancel, owner instance.
# ARGV: run id, stream id, event JSON, maxlen, status, finished_at, last_seq, message_id ('' = none),
#       retention ms, tombstone ms, only-if-owner-lost ('1'/'0'), key prefix (for the chat key).
# Returns 1 written, 0 not written (run already finished, or its owner is alive), -1 seq taken, -2 no record.
_FINISH_LUA = """
if redis.call('EXISTS', KEYS[1]) == 0 then return -2 end
if redis.call('HGET', KEYS[1], 'status') ~= 'running' then return 0 end
if ARGV[11] == '1' and redis.call('EXISTS', KEYS[6]) == 1 then return 0 end
local added = redis.pcall('XADD', KEYS[2], 'MAXLEN', '~', ARGV[4], ARGV[2], 'e', ARGV[3])
if type(added) == 'table' and added.err then return -1 end
redis.call('HSET', KEYS[1], 'status', ARGV[5], 'finished_at', ARGV[6], 'last_seq', ARGV[7])
if ARGV[8] ~= '' then redis.call('HSET', KEYS[1], 'message_id', ARGV[8]) end
local chat = ARGV[12] .. ':chat:' .. redis.call('HGET', KEYS[1], 'chat_id') .. ':active'
if redis.call('GET', chat) == ARGV[1] then redis.call('DEL', chat) end
local idem = redis.call('HGET', KEYS[1], 'idempotency_key')
if idem then redis.call('PEXPIRE', idem, ARGV[9]) end
local subject = redis.call('HGET', KEYS[1], 'subject')
if subject then redis.call('SREM', ARGV[12] .. ':subject:' .. subject .. ':running', ARGV[1]) end
for _, key in ipairs({KEYS[1], KEYS[2], KEYS[4], KEYS[5]}) do redis.call('PEXPIRE', key, ARGV[9]) end
redis.call('SET', KEYS[3], subject or '', 'PX', ARGV[10])
return 1
"""

# KEYS: record, readers. ARGV: ttl ms. Returns -1 when the run is unknown.
_ATTACH_LUA = """
if redis.call('EXISTS', KEYS[1]) == 0 then return -1 end
local n = redis.call('INCR', KEYS[2])
redis.call('PEXPIRE', KEYS[2], ARGV[1])
return n
"""

# KEYS: readers. Never goes below 0.
_DETACH_LUA = """
local n = tonumber(redis.call('GET', KEYS[1]) or '0')
if n > 0 then return redis.call('DECR', KEYS[1]) end
return 0
"""


class _CancelMessage(msgspec.Struct, frozen=True):
    run_id: str
    reason: str


_cancel_decoder = msgspec.json.Decoder(_CancelMessage)


class _Keys:
    """Key names under one prefix."""

    def __init__(self, prefix: str) -> None:
        self.prefix = prefix
        self.cancel_channel = f"{prefix}:cancel"

    def record(self, run_id: str) -> str:
        return f"{self.prefix}:run:{run_id}"

    def log(self, run_id: str) -> str:
        return f"{self.prefix}:run:{run_id}:log"

    def tombstone(self, run_id: str) -> str:
        return f"{self.prefix}:run:{run_id}:expired"

    def readers(self, run_id: str) -> str:
        return f"{self.prefix}:run:{run_id}:readers"

    def snapshot(self, run_id: str) -> str:
        return f"{self.prefix}:run:{run_id}:snapshot"

    def cancel(self, run_id: str) -> str:
        return f"{self.prefix}:run:{run_id}:cancel"

    def chat(self, chat_id: str) -> str:
        return f"{self.prefix}:chat:{chat_id}:active"

    def idem(self, key: str) -> str:
        return f"{self.prefix}:idem:{key}"

    def running(self, subject: str) -> str:
        return f"{self.prefix}:subject:{subject}:running"

    def usage(self, subject: str, window: int) -> str:
        return f"{self.prefix}:usage:{subject}:{window}"

    def instance(self, instance_id: str) -> str:
        return f"{self.prefix}:instance:{instance_id}"


def _text(value: object) -> str:
    return value.decode() if isinstance(value, bytes) else str(value)


def _seq_of(entry_id: object) -> int:
    return int(_text(entry_id).partition("-")[0])


def _decode_entries(entries: Sequence[Any]) -> list[AnyEvent]:
    return [decode_event(fields[b"e"]) for _, fields in entries]


def _record_fields(record: RunRecord, idem_key: str | None) -> list[str]:
    pairs: list[str] = []
    for name, value in msgspec.structs.asdict(record).items():
        if value is not None:
            pairs += [name, str(value)]
    if idem_key is not None:
        pairs += [_IDEM_FIELD, idem_key]
    return pairs


def _decode_record(raw: Mapping[Any, Any]) -> RunRecord:
    fields = {_text(k): _text(v) for k, v in raw.items()}
    fields.pop(_IDEM_FIELD, None)
    fields.pop(_HASH_FIELD, None)
    return msgspec.convert(fields, RunRecord, strict=False)


def _bounded(method: Callable[_P, Awaitable[_T]]) -> Callable[_P, CoroutineType[Any, Any, _T]]:
    """Give up on a Redis call after _CALL_TIMEOUT_S (raises TimeoutError) rather than hang."""

    @functools.wraps(method)
    async def bounded(*args: _P.args, **kwargs: _P.kwargs) -> _T:
        async with asyncio.timeout(_CALL_TIMEOUT_S):
            return await method(*args, **kwargs)

    return bounded


def _ms(seconds: float) -> int:
    return max(1, round(seconds * 1000))


class RedisRunBackend(RunBackend):
    """Runs shared by every instance behind one Redis. See the module docstring."""

    def __init__(
        self,
        url: str,
        *,
        prefix: str,
        retention_s: float,
        max_events_per_run: int,
        owner_ttl_s: float = 5.0,
        max_tail_connections: int = 2048,
    ) -> None:
        self.instance_id = uuid.uuid4().hex[:12]
        self._keys = _Keys(prefix)
        self._retention_s = retention_s
        self._max_events = max_events_per_run
        self._owner_ttl_s = owner_ttl_s
        # No socket_timeout: with one, redis-py sends through asyncio.wait_for, which on Python 3.11
        # can swallow a task's cancellation (a cancelled reader then hangs). @_bounded bounds calls instead.
        options: dict[str, Any] = {"socket_timeout": None, "socket_connect_timeout": _CONNECT_TIMEOUT_S}
        # Commands wait for one of _COMMAND_CONNECTIONS (within @_bounded); tailing readers queue on a
        # semaphore (outside the call timeout) for one of max_tail_connections.
        pool = aioredis.BlockingConnectionPool.from_url(  # pyright: ignore[reportUnknownMemberType]
            url, max_connections=_COMMAND_CONNECTIONS, timeout=None, **options
        )
        tail_pool = aioredis.ConnectionPool.from_url(  # pyright: ignore[reportUnknownMemberType]
            url, max_connections=max_tail_connections, **options
        )
        self._tail_slots = asyncio.Semaphore(max_tail_connections)
        self._redis = aioredis.Redis(connection_pool=pool)
        self._tail = aioredis.Redis(connection_pool=tail_pool)
        self._create_script = self._redis.register_script(_CREATE_LUA)
        self._finish_script = self._redis.register_script(_FINISH_LUA)
        self._attach_script = self._redis.register_script(_ATTACH_LUA)
        self._detach_script = self._redis.register_script(_DETACH_LUA)
        self._seqs: dict[str, int] = {}  # run id -> last seq this instance wrote (runs it owns)
        self._folds: dict[str, SnapshotFold] = {}  # run id -> its events folded (runs it owns, from seq 1)
        # With MAXLEN ~ the log keeps at least max_events entries, so a snapshot this often is always
        # at or after the seq before the first kept entry.
        self._snapshot_every = max(1, max_events_per_run // 2)
        self._cancel_seen: set[str] = set()
        self._on_cancel: CancelCallback | None = None
        self._pubsub: PubSub | None = None
        self._tasks: list[asyncio.Task[None]] = []
        self._closed = False

    # -- lifecycle -----------------------------------------------------------------

    async def start(self, on_cancel: CancelCallback) -> None:  # noqa: D102
        self._on_cancel = on_cancel
        await self._beat()
        pubsub = self._redis.pubsub()  # pyright: ignore[reportUnknownMemberType]
        await pubsub.subscribe(self._keys.cancel_channel)
        async with asyncio.timeout(_CALL_TIMEOUT_S):  # the subscription is live once confirmed
            while await pubsub.get_message(timeout=1.0) is None:
                pass
        self._pubsub = pubsub
        self._tasks = [
            asyncio.create_task(self._heartbeat_forever(), name=f"runs-heartbeat-{self.instance_id}"),
            asyncio.create_task(self._listen_forever(pubsub), name=f"runs-cancel-{self.instance_id}"),
        ]

    async def close(self) -> None:  # noqa: D102
        if self._closed:
            return
        self._closed = True
        for task in self._tasks:
            task.cancel()
        await asyncio.gather(*self._tasks, return_exceptions=True)
        self._tasks = []
        if self._pubsub is not None:
            await self._pubsub.aclose()
            self._pubsub = None
        with contextlib.suppress(RedisError, OSError, TimeoutError):
            async with asyncio.timeout(_CONNECT_TIMEOUT_S):
                await self._redis.delete(self._keys.instance(self.instance_id))
        for client in (self._redis, self._tail):
            await client.aclose()
            await client.connection_pool.disconnect()

    async def ping(self) -> bool:  # noqa: D102
        try:
            async with asyncio.timeout(_CONNECT_TIMEOUT_S):
                return bool(await self._redis.ping())  # pyright: ignore[reportUnknownMemberType]
        except (RedisError, OSError, TimeoutError):
            return False

    # -- runs ----------------------------------------------------------------------

    @_bounded
    async def create_run(  # noqa: D102
        self, record: RunRecord, *, idempotency_key: str | None = None, request_hash: str = "", max_active: int = 0
    ) -> tuple[RunRecord, bool]:
        if not self._tasks:
            raise RuntimeError("RedisRunBackend.start() must run before create_run (owner liveness)")
        record = msgspec.structs.replace(record, owner=self.instance_id)
        outcome, run_id = await self._try_create(record, idempotency_key, request_hash, max_active)
        if outcome == "busy" and await self._fail_if_owner_lost(run_id):
            outcome, run_id = await self._try_create(record, idempotency_key, request_hash, max_active)
        match outcome:
            case "created":
                self._seqs[record.id] = 0
                return record, True
            case "existing":
                return await self.get_run(run_id), False
            case "reused":
                raise IdempotencyKeyReusedError(run_id)
            case "busy":
                raise ChatBusyError(run_id)
            case "too_many":
                raise TooManyRunsError(record.subject)
            case _:
                raise ValueError(f"run {run_id} already exists")

    async def _try_create(
        self, record: RunRecord, idempotency_key: str | None, request_hash: str, max_active: int
    ) -> tuple[str, str]:
        idem = self._keys.idem(idempotency_key) if idempotency_key is not None else ""
        subject = record.subject
        keys = [
            self._keys.chat(record.chat_id),
            self._keys.record(record.id),
            idem or self._keys.idem(""),
            self._keys.running(subject or ""),
        ]
        limit = max_active if subject is not None else 0
        args = [
            record.id,
            "1" if idem else "0",
            limit,
            self._keys.record(""),
            request_hash,
            *_record_fields(record, idem or None),
        ]
        outcome, run_id = cast("list[bytes]", await self._create_script(keys=keys, args=args))
        return outcome.decode(), run_id.decode()

    @_bounded
    async def get_run(self, run_id: str) -> RunRecord:  # noqa: D102
        async with self._redis.pipeline(transaction=False) as pipe:
            pipe.hgetall(self._keys.record(run_id))  # pyright: ignore[reportUnusedCallResult]
            pipe.get(self._keys.tombstone(run_id))  # pyright: ignore[reportUnusedCallResult]
            pipe.xrevrange(self._keys.log(run_id), count=1)  # pyright: ignore[reportUnusedCallResult]
            raw, tombstone, top = cast("tuple[dict[bytes, bytes], bytes | None, list[Any]]", await pipe.execute())
        if not raw:
            if tombstone is None:
                raise RunNotFoundError(run_id)
            raise RunExpiredError(run_id, _text(tombstone) or None)
        record = _decode_record(raw)
        if record.finished_at is None and top:
            record = msgspec.structs.replace(record, last_seq=_seq_of(top[0][0]))
        return record

    @_bounded
    async def active_run(self, chat_id: str) -> str | None:  # noqa: D102
        value = await self._redis.get(self._keys.chat(chat_id))
        return None if value is None else _text(value)

    # -- the log -------------------------------------------------------------------

    @_bounded
    async def append(self, run_id: str, event: AnyEvent) -> AnyEvent:  # noqa: D102
        last = self._seqs.get(run_id)
        if last is None:  # not created here (or already finished): raises for unknown runs
            record = await self.get_run(run_id)
            if record.status != "running":
                return self._lost(run_id, msgspec.structs.replace(event, seq=record.last_seq + 1))
            last = record.last_seq
        for _ in range(3):
            stamped = msgspec.structs.replace(event, seq=last + 1)
            if await self._write(run_id, stamped):
                self._remember(run_id, stamped)
                await self._keep_snapshot(run_id, stamped)
                return stamped
            record = await self.get_run(run_id)  # someone else took the seq: who?
            if record.status != "running":
                return self._lost(run_id, stamped)
            last = record.last_seq
        raise RuntimeError(f"run {run_id}: could not append, the seq keeps being taken")

    def _remember(self, run_id: str, event: AnyEvent) -> None:
        if is_terminal(event):
            self._seqs.pop(run_id, None)
            self._cancel_seen.discard(run_id)
        else:
            self._seqs[run_id] = event.seq

    def _lost(self, run_id: str, event: AnyEvent) -> AnyEvent:
        """The run has already finished (owner_lost, or a late append): drop the event, stop the run here."""
        log.warning("run %s has already finished; dropping %s", run_id, type(event).__name__)
        self._folds.pop(run_id, None)
        if self._seqs.pop(run_id, None) is not None and self._on_cancel is not None:
            self._on_cancel(run_id, "owner_lost")
        return event

    async def _keep_snapshot(self, run_id: str, event: AnyEvent) -> None:
        """Fold an appended event; every ``_snapshot_every`` events store the snapshot (decision 47)."""
        fold = self._folds.get(run_id)
        if is_terminal(event) or (fold is None and event.seq != 1):  # ended, or not followed from seq 1
            self._folds.pop(run_id, None)
            return
        if fold is None:
            fold = self._folds[run_id] = SnapshotFold()
        fold.add(event)
        if event.seq % self._snapshot_every == 0:
            snapshot = encode_json(fold.event(run_id, event.seq))
            await self._redis.set(self._keys.snapshot(run_id), snapshot, px=_ms(self._retention_s + _TOMBSTONE_EXTRA_S))

    @_bounded
    async def snapshot(self, run_id: str) -> RunSnapshot:  # noqa: D102
        raw = await self._redis.get(self._keys.snapshot(run_id))
        if raw is None:
            await self.get_run(run_id)  # raises for unknown and expired runs
            return RunSnapshot(run_id=run_id)
        snapshot = decode_event(raw)
        return snapshot if isinstance(snapshot, RunSnapshot) else RunSnapshot(run_id=run_id)

    async def _write(self, run_id: str, event: AnyEvent) -> bool:
        """Add ``event`` at its seq; False when that seq is already taken."""
        if is_terminal(event):
            return await self._finish(run_id, event, only_if_owner_lost=None) == 1
        try:
            await self._redis.xadd(
                self._keys.log(run_id),
                {"e": encode_json(event)},
                id=f"{event.seq}-0",
                maxlen=self._max_events,
                approximate=True,
            )
        except ResponseError as exc:
            if "equal or smaller" in str(exc):
                return False
            raise
        return True

    async def _finish(self, run_id: str, event: AnyEvent, *, only_if_owner_lost: str | None) -> int:
        """Run the finish script; ``only_if_owner_lost`` names the owner that must be gone."""
        k = self._keys
        keys = [
            k.record(run_id),
            k.log(run_id),
            k.tombstone(run_id),
            k.readers(run_id),
            k.cancel(run_id),
            k.instance(only_if_owner_lost or ""),
        ]
        args = [
            run_id,
            f"{event.seq}-0",
            encode_json(event),
            self._max_events,
            terminal_status(event),
            repr(time.time()),
            event.seq,
            terminal_message_id(event) or "",
            _ms(self._retention_s),
            _ms(self._retention_s + _TOMBSTONE_EXTRA_S),
            "0" if only_if_owner_lost is None else "1",
            k.prefix,
        ]
        written = int(await self._finish_script(keys=keys, args=args))
        if written == -2:
            await self.get_run(run_id)  # raises RunExpiredError or RunNotFoundError
            raise RunNotFoundError(run_id)
        return written

    async def _fail_if_owner_lost(self, run_id: str, after: int | None = None) -> bool:
        """Finish a running run whose owner is gone with ``run.failed``/``owner_lost``; True if done here."""
        raw = await self._redis.hmget(self._keys.record(run_id), ["status", "owner"])  # pyright: ignore[reportUnknownMemberType]
        status, owner = cast("list[bytes | None]", raw)
        if status != b"running" or owner is None or await self._redis.exists(self._keys.instance(owner.decode())):
            return False
        if after is None:
            after = (await self.get_run(run_id)).last_seq
        failed = RunFailed(
            run_id=run_id,
            seq=after + 1,
            error=ErrorInfo(code="owner_lost", message="the instance running this run stopped"),
        )
        written = await self._finish(run_id, failed, only_if_owner_lost=owner.decode())
        if written == 1:
            log.warning("run %s: owner %s is gone; finished it as owner_lost", run_id, owner.decode())
        return written == 1

    async def read(self, run_id: str, after: int) -> AsyncIterator[AnyEvent]:  # noqa: D102
        await self._check_cursor(run_id, after)
        cursor = after
        replaying = True
        while True:
            if replaying:
                batch = await self._range(run_id, cursor)
                replaying = len(batch) == _BATCH
            else:
                batch = await self._tail_once(run_id, cursor)
            if not batch:
                if await self._ended_or_reaped(run_id, cursor):
                    return
                continue
            if batch[0].seq != cursor + 1:
                raise CursorError(f"events {cursor + 1}..{batch[0].seq - 1} are no longer kept (reader too slow)")
            for event in batch:
                yield event
                if is_terminal(event):
                    return
            cursor = batch[-1].seq

    @_bounded
    async def _check_cursor(self, run_id: str, after: int) -> None:
        async with self._redis.pipeline(transaction=False) as pipe:
            pipe.exists(self._keys.record(run_id))  # pyright: ignore[reportUnusedCallResult]
            pipe.exists(self._keys.tombstone(run_id))  # pyright: ignore[reportUnusedCallResult]
            pipe.xrevrange(self._keys.log(run_id), count=1)  # pyright: ignore[reportUnusedCallResult]
            pipe.xrange(self._keys.log(run_id), count=1)  # pyright: ignore[reportUnusedCallResult]
            exists, expired, top, bottom = cast("tuple[int, int, list[Any], list[Any]]", await pipe.execute())
        if not exists:
            raise RunExpiredError(run_id) if expired else RunNotFoundError(run_id)
        last = _seq_of(top[0][0]) if top else 0
        if after < 0 or after > last:
            raise CursorError(f"cursor {after} is outside the run's log (0..{last})")
        first = _seq_of(bottom[0][0]) if bottom else 1
        if after < first - 1:
            raise CursorError(f"events up to {first - 1} are no longer kept")

    @_bounded
    async def _range(self, run_id: str, cursor: int) -> list[AnyEvent]:
        entries = await self._redis.xrange(self._keys.log(run_id), min=f"({cursor}-0", count=_BATCH)
        return _decode_entries(entries or [])

    async def _tail_once(self, run_id: str, cursor: int) -> list[AnyEvent]:
        """Block up to _BLOCK_MS for events after ``cursor``; [] on timeout."""
        key = self._keys.log(run_id)
        async with self._tail_slots, asyncio.timeout(_CALL_TIMEOUT_S):
            reply = await self._tail.xread({key: f"{cursor}-0"}, count=_BATCH, block=_BLOCK_MS)
        streams = cast("list[list[Any]]", reply)
        return _decode_entries(streams[0][1]) if streams else []

    @_bounded
    async def _ended_or_reaped(self, run_id: str, cursor: int) -> bool:
        """After a quiet tail: True when the run ended before ``cursor``; reaps a lost owner's run."""
        record = await self.get_run(run_id)  # raises RunExpiredError once retention has passed
        if record.status != "running":
            return cursor >= record.last_seq
        await self._fail_if_owner_lost(run_id, cursor)  # the next tail picks up whoever's run.failed
        return False

    # -- cancel ----------------------------------------------------------------------

    @_bounded
    async def request_cancel(self, run_id: str, reason: str) -> None:  # noqa: D102
        record = await self.get_run(run_id)
        if record.finished_at is not None:
            return
        async with self._redis.pipeline(transaction=False) as pipe:
            pipe.set(self._keys.cancel(run_id), reason, px=_ms(_CANCEL_TTL_S))  # pyright: ignore[reportUnusedCallResult]
            pipe.publish(self._keys.cancel_channel, encode_json(_CancelMessage(run_id, reason)))  # pyright: ignore[reportUnusedCallResult, reportUnknownMemberType]
            await pipe.execute()

    def _deliver_cancel(self, run_id: str, reason: str) -> None:
        if run_id in self._seqs and self._on_cancel is not None:
            self._cancel_seen.add(run_id)
            self._on_cancel(run_id, reason)

    async def _listen_forever(self, pubsub: PubSub) -> None:
        while True:
            try:
                message = cast(
                    "dict[str, Any] | None", await pubsub.get_message(ignore_subscribe_messages=True, timeout=1.0)
                )
            except (RedisError, OSError) as exc:
                log.warning("cancel listener: %s; retrying", exc)
                await asyncio.sleep(0.5)
                continue
            if message is None or message.get("type") != "message":
                continue
            try:
                cancel = _cancel_decoder.decode(cast("bytes", message["data"]))
            except msgspec.DecodeError:
                log.warning("ignoring a malformed cancel message")
                continue
            self._deliver_cancel(cancel.run_id, cancel.reason)

    async def _heartbeat_forever(self) -> None:
        while True:
            await asyncio.sleep(self._owner_ttl_s / 3)
            try:
                await self._beat()
                await self._poll_cancels()
            except (RedisError, OSError, TimeoutError) as exc:
                log.warning("run heartbeat: %s; retrying", exc)

    @_bounded
    async def _beat(self) -> None:
        await self._redis.set(self._keys.instance(self.instance_id), "1", px=_ms(self._owner_ttl_s))

    @_bounded
    async def _poll_cancels(self) -> None:
        """Deliver cancels whose pub/sub message this instance missed."""
        pending = [run_id for run_id in self._seqs if run_id not in self._cancel_seen]
        if not pending:
            return
        reasons = await self._redis.mget([self._keys.cancel(run_id) for run_id in pending])
        for run_id, reason in zip(pending, reasons, strict=True):
            if reason is not None:
                self._deliver_cancel(run_id, _text(reason))

    # -- readers ---------------------------------------------------------------------

    @_bounded
    async def attach(self, run_id: str) -> None:  # noqa: D102
        keys = [self._keys.record(run_id), self._keys.readers(run_id)]
        if int(await self._attach_script(keys=keys, args=[_ms(_READERS_TTL_S)])) < 0:
            await self.get_run(run_id)  # raises RunExpiredError or RunNotFoundError
            raise RunNotFoundError(run_id)

    @_bounded
    async def detach(self, run_id: str) -> int:  # noqa: D102
        return int(await self._detach_script(keys=[self._keys.readers(run_id)]))

    # -- token budgets -----------------------------------------------------------------

    @_bounded
    async def add_usage(self, subject: str, tokens: int, window_s: float) -> None:  # noqa: D102
        key = self._keys.usage(subject, int(time.time() // window_s))
        async with self._redis.pipeline(transaction=True) as pipe:
            pipe.incrby(key, tokens)  # pyright: ignore[reportUnusedCallResult]
            pipe.pexpire(key, _ms(2 * window_s))  # pyright: ignore[reportUnusedCallResult]
            await pipe.execute()

    @_bounded
    async def usage(self, subject: str, window_s: float) -> tuple[int, float]:  # noqa: D102
        now = time.time()
        window = int(now // window_s)
        used = await self._redis.get(self._keys.usage(subject, window))
        return int(used or 0), (window + 1) * window_s - now
