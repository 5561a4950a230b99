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
2. A non-terminal append is one Lua script: ``XADD … MAXLEN ~ max_events_per_run``
   if the record exists and the run is running; the record's ``last_seq`` is
   only written at the end and otherwise derived from the stream's top entry.
   A terminal append is one Lua script: ``XADD``, finish the record, release
   the chat (if it still names this run), start the retention clock
   (``PEXPIRE``) and write the tombstone. Both recognise their own earlier
   write (the top entry holds this very event), so repeating an append whose
   reply was lost never writes the event twice.
3. ``read`` replays with ``XRANGE`` (batches of 1000) and then tails with
   ``XREAD BLOCK 1000``. Each tailing reader borrows one connection from a
   separate pool (``max_tail_connections``, default 2048) for the length of
   one ``XREAD``; readers beyond it wait on a semaphore for a free one.
4. Whenever a tailing ``XREAD`` times out the reader checks the run, and so
   does every ``get_run`` of a running run: if its owner's ``instance`` key is
   gone, it appends ``run.failed`` (``owner_lost``) at seq = last + 1 through
   the same finish script, which re-checks both conditions atomically.
   ``create_run`` does the same for a chat held by a lost run, so a crashed
   instance never keeps a chat busy. An instance only judges others dead once
   its own heartbeats have gone through for a TTL (see ``_may_reap``).
5. An owner that finds its seq already taken by such a ``run.failed`` drops
   the event and calls ``on_cancel(run_id, "owner_lost")`` so the run stops.
6. Cancel goes out on pub/sub (at most once) and into the run's ``cancel``
   key; the owner's heartbeat also reads those keys, so a cancel survives a
   pub/sub reconnect.
7. Deviations from the memory backend: ``create_run`` needs ``start()`` first
   (without the heartbeat, readers would declare the run lost), and an append
   to a run that has already finished is dropped (memory appends it after the
   terminal event, where no reader ever sees it).

8. Outages (decision 44): every call is bounded by ``asyncio.timeout``
   (_CALL_TIMEOUT_S) instead of a socket timeout, because redis-py's socket
   timeout path (``asyncio.wait_for``) can swallow cancellation on Python
   3.11; a Redis that is down, restarting or paused raises
   ``BackendUnavailableError``. redis-py reconnects (``Retry`` with backoff,
   health checks of idle connections). Readers keep their cursor and retry for
   ``outage_s``. A terminal event Redis did not take is kept and written by the
   heartbeat before it refreshes the instance key; a run Redis lost (restart
   without its data) stops its owner (``on_cancel(run_id, "runs_unavailable")``)
   and ends its readers with a ``run.failed`` of their own.

Not for Redis Cluster: the scripts touch keys of one run and its chat, which
may live in different slots.
"""

from __future__ import annotations

import asyncio
import contextlib
import functools
import logging
import math
import time
import uuid
from collections.abc import AsyncGenerator, Awaitable, Callable, Mapping, Sequence
from types import CoroutineType
from typing import Any, Final, ParamSpec, TypeVar, cast

import msgspec
import redis.asyncio as aioredis
from redis.asyncio.client import PubSub
from redis.asyncio.retry import Retry
from redis.backoff import ExponentialWithJitterBackoff
from redis.exceptions import ConnectionError as RedisConnectionError
from redis.exceptions import RedisError
from redis.exceptions import TimeoutError as RedisTimeoutError

from service.events import AnyEvent, ErrorInfo, RunFailed, RunSnapshot, decode_event, encode_json, is_terminal
from service.runs.base import (
    MAX_BATCH,
    BackendUnavailableError,
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

_BLOCK_MS: Final = 1000
_CALL_TIMEOUT_S: Final = 5.0  # bounds every Redis round trip (above _BLOCK_MS: a blocked XREAD is not cut short)
_CONNECT_TIMEOUT_S: Final = 2.0
_COMMAND_CONNECTIONS: Final = 256  # non-blocking commands
_TOMBSTONE_EXTRA_S: Final = 86_400.0
_READERS_TTL_S: Final = 86_400.0
_CANCEL_TTL_S: Final = 3_600.0
_IDEM_FIELD: Final = "idempotency_key"
_HASH_FIELD: Final = "request_hash"
_HEALTH_CHECK_S: Final = 10.0  # redis-py PINGs a connection idle this long before using it
_RETRY_DELAY_S: Final = 0.2  # between attempts of the heartbeat and of a reader while Redis is down
_LOST: Final = "the run backend lost this run (Redis restarted without its data)"
_UNAVAILABLE: Final = (RedisConnectionError, RedisTimeoutError, OSError, TimeoutError)
"""What a Redis that is down, restarting (``BusyLoadingError`` is a ``ConnectionError``) or paused raises."""

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
if redis.call('EXISTS', KEYS[2]) == 1 then return {'created', ARGV[1]} end  -- a retry of this create
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
if redis.call('HGET', KEYS[1], 'status') ~= 'running' then
  local top = redis.call('XREVRANGE', KEYS[2], '+', '-', 'COUNT', 1)[1]
  if top and top[1] == ARGV[2] and top[2][2] == ARGV[3] then return 1 end  -- a retry of this very append
  return 0
end
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

# KEYS: record, log. ARGV: stream id, event JSON, maxlen.
# Returns 1 written (also when a retry finds this very entry written), 0 the run has finished, -1 seq taken,
# -2 no record (Redis lost it: nothing is written, so no stream without a record and a TTL is left behind).
_APPEND_LUA = """
if redis.call('EXISTS', KEYS[1]) == 0 then return -2 end
local top = redis.call('XREVRANGE', KEYS[2], '+', '-', 'COUNT', 1)[1]
if top and top[1] == ARGV[1] then
  if top[2][2] == ARGV[2] then return 1 end
  return -1
end
if redis.call('HGET', KEYS[1], 'status') ~= 'running' then return 0 end
local added = redis.pcall('XADD', KEYS[2], 'MAXLEN', '~', ARGV[3], ARGV[1], 'e', ARGV[2])
if type(added) == 'table' and added.err then return -1 end
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


class _Unwritten(msgspec.Struct, frozen=True):
    """A terminal event the owner could not write yet; a missing record is waited for until ``keep_until``."""

    event: AnyEvent
    keep_until: float = 0.0
    """Monotonic time; a create whose reply was lost may still be applied (it was sent before a pause)."""


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
    """Give up on a Redis call after _CALL_TIMEOUT_S rather than hang; an outage is ``BackendUnavailableError``."""

    @functools.wraps(method)
    async def bounded(*args: _P.args, **kwargs: _P.kwargs) -> _T:
        try:
            async with asyncio.timeout(_CALL_TIMEOUT_S):
                return await method(*args, **kwargs)
        except _UNAVAILABLE as exc:
            raise BackendUnavailableError(f"Redis does not answer: {exc!r}") from exc

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
        outage_s: float = 30.0,
    ) -> None:
        self.instance_id = uuid.uuid4().hex[:12]
        self._keys = _Keys(prefix)
        self._retention_s = retention_s
        self._max_events = max_events_per_run
        self._owner_ttl_s = owner_ttl_s
        self._outage_s = outage_s
        # No socket_timeout: with one, redis-py sends through asyncio.wait_for, which on Python 3.11
        # can swallow a task's cancellation (a cancelled reader then hangs). @_bounded bounds calls instead.
        # redis-py reconnects by itself: a connection that breaks (Redis restarted) is retried on a new one
        # with backoff, and one idle for _HEALTH_CHECK_S is PINGed first. The scripts are safe to repeat.
        options: dict[str, Any] = {
            "socket_timeout": None,
            "socket_connect_timeout": _CONNECT_TIMEOUT_S,
            "retry": Retry(ExponentialWithJitterBackoff(base=0.05, cap=0.5), retries=3),
            "health_check_interval": _HEALTH_CHECK_S,
        }
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
        self._append_script = self._redis.register_script(_APPEND_LUA)
        self._attach_script = self._redis.register_script(_ATTACH_LUA)
        self._detach_script = self._redis.register_script(_DETACH_LUA)
        self._seqs: dict[str, int] = {}  # run id -> last seq this instance wrote (runs it owns)
        self._folds: dict[str, SnapshotFold] = {}  # run id -> its events folded (runs it owns, from seq 1)
        # With MAXLEN ~ the log keeps at least max_events entries, so a snapshot this often is always
        # at or after the seq before the first kept entry.
        self._snapshot_every = max(1, max_events_per_run // 2)
        self._cancel_seen: set[str] = set()
        # Terminal events of runs this instance owns but could not write (Redis down): the heartbeat
        # writes them before it refreshes the instance's liveness, so no run stays running without an owner.
        self._unwritten: dict[str, _Unwritten] = {}
        self._snapshots_due: dict[str, bytes] = {}  # written by append() once the event itself is written
        self._beat_at = -math.inf  # monotonic time of the last heartbeat that went through
        self._steady_since: float | None = -math.inf  # since when every heartbeat went through (None: failing)
        self._on_cancel: CancelCallback | None = None
        self._pubsub: PubSub | None = None
        self._tasks: list[asyncio.Task[None]] = []
        self._closed = False

    # -- lifecycle -----------------------------------------------------------------

    async def start(self, on_cancel: CancelCallback) -> None:
        """Beat and subscribe to cancels; with Redis unreachable, start anyway and keep trying in the background.

        Until the first heartbeat goes through, ``create_run`` answers ``BackendUnavailableError`` (and
        ``ping``, so ``/readyz``, says not ready).
        """
        self._on_cancel = on_cancel
        try:
            await self._heartbeat_once()
            self._pubsub = await self._subscribe()
        except (BackendUnavailableError, *_UNAVAILABLE) as exc:
            log.warning("run backend: Redis does not answer (%r); starting anyway, retrying in the background", exc)
        self._tasks = [
            asyncio.create_task(self._heartbeat_forever(), name=f"runs-heartbeat-{self.instance_id}"),
            asyncio.create_task(self._listen_forever(), name=f"runs-cancel-{self.instance_id}"),
        ]

    async def _subscribe(self) -> PubSub:
        """A pub/sub connection subscribed to cancels (live once Redis confirmed it)."""
        pubsub = self._redis.pubsub()  # pyright: ignore[reportUnknownMemberType]
        try:
            async with asyncio.timeout(_CALL_TIMEOUT_S):
                await pubsub.subscribe(self._keys.cancel_channel)
                while await pubsub.get_message(timeout=1.0) is None:
                    pass
        except BaseException:
            await pubsub.aclose()
            raise
        return pubsub

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
        with contextlib.suppress(BackendUnavailableError):
            await self._write_unwritten()
        with contextlib.suppress(RedisError, OSError, TimeoutError):
            async with asyncio.timeout(_CONNECT_TIMEOUT_S):
                await self._redis.delete(self._keys.instance(self.instance_id))
        for client in (self._redis, self._tail):
            await client.aclose()
            await client.connection_pool.disconnect()

    async def ping(self) -> bool:
        """Whether Redis answers and this instance's liveness is written (so it can own runs)."""
        if time.monotonic() - self._beat_at >= self._owner_ttl_s:
            return False
        try:
            async with asyncio.timeout(_CONNECT_TIMEOUT_S):
                return bool(await self._redis.ping())  # pyright: ignore[reportUnknownMemberType]
        except (RedisError, OSError, TimeoutError):
            return False

    # -- runs ----------------------------------------------------------------------

    async def create_run(  # noqa: D102
        self, record: RunRecord, *, idempotency_key: str | None = None, request_hash: str = "", max_active: int = 0
    ) -> tuple[RunRecord, bool]:
        if not self._tasks:
            raise RuntimeError("RedisRunBackend.start() must run before create_run (owner liveness)")
        if time.monotonic() - self._beat_at >= self._owner_ttl_s:
            raise BackendUnavailableError("this instance's liveness is not in Redis (Redis is down or slow)")
        record = msgspec.structs.replace(record, owner=self.instance_id)
        try:
            outcome, run_id = await self._create(record, idempotency_key, request_hash, max_active)
        except BackendUnavailableError:
            # The script may still run (sent before a pause): the heartbeat fails the run if it finds it.
            self._seqs[record.id] = 0
            failed = RunFailed(run_id=record.id, error=ErrorInfo("runs_unavailable", "the run backend did not answer"))
            self._unwritten[record.id] = _Unwritten(failed, time.monotonic() + 2 * self._owner_ttl_s)
            raise
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
                raise ValueError(f"create_run: unexpected outcome {outcome!r}")

    @_bounded
    async def _create(
        self, record: RunRecord, idempotency_key: str | None, request_hash: str, max_active: int
    ) -> tuple[str, str]:
        outcome, run_id = await self._try_create(record, idempotency_key, request_hash, max_active)
        if outcome == "busy" and await self._fail_if_owner_lost(run_id):
            outcome, run_id = await self._try_create(record, idempotency_key, request_hash, max_active)
        return outcome, run_id

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

    async def get_run(self, run_id: str) -> RunRecord:
        """The run's record; a running run whose owner is gone is finished with ``owner_lost`` first."""
        record = await self._record(run_id)
        if record.status == "running" and await self._reap(record):
            record = await self._record(run_id)
        return record

    @_bounded
    async def _record(self, run_id: str) -> RunRecord:
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

    async def append(self, run_id: str, event: AnyEvent) -> AnyEvent:
        """Append (see ``RunBackend``); a terminal event that Redis did not take is kept and written later.

        Raises ``BackendUnavailableError`` when Redis does not answer; repeating the call is safe (a retry
        that finds its own event already written returns it).
        """
        try:
            stamped = await self._append(run_id, event)
        except BackendUnavailableError:
            if is_terminal(event) and run_id in self._seqs:
                self._unwritten[run_id] = _Unwritten(event)
            raise
        snapshot = self._snapshots_due.pop(run_id, None)
        if snapshot is not None:
            await self._keep_snapshot(run_id, snapshot)
        return stamped

    @_bounded
    async def _append(self, run_id: str, event: AnyEvent) -> AnyEvent:
        last = self._seqs.get(run_id)
        if last is None:  # not created here (or already finished): raises for unknown runs
            record = await self._record(run_id)
            if record.status != "running":
                return self._lost(run_id, msgspec.structs.replace(event, seq=record.last_seq + 1))
            last = record.last_seq
        for _ in range(3):
            stamped = msgspec.structs.replace(event, seq=last + 1)
            written = await self._write(run_id, stamped)
            if written == 1:
                self._remember(run_id, stamped)
                snapshot = self._fold(run_id, stamped)
                if snapshot is not None:
                    self._snapshots_due[run_id] = snapshot
                return stamped
            if written == -2:  # Redis came back without the run (restarted without its data)
                return self._lost(run_id, stamped, "runs_unavailable")
            record = await self._record(run_id)  # someone else took the seq: who?
            if record.status != "running":
                return self._lost(run_id, stamped)
            last = record.last_seq
        raise RuntimeError(f"run {run_id}: could not append, the seq keeps being taken")

    def _remember(self, run_id: str, event: AnyEvent) -> None:
        if is_terminal(event):
            self._seqs.pop(run_id, None)
            self._cancel_seen.discard(run_id)
            self._unwritten.pop(run_id, None)
        else:
            self._seqs[run_id] = event.seq

    def _lost(self, run_id: str, event: AnyEvent, reason: str = "owner_lost") -> AnyEvent:
        """The run has already finished (owner_lost, or a late append) or is gone: drop the event, stop the run."""
        log.warning("run %s has already finished or is gone; dropping %s", run_id, type(event).__name__)
        self._folds.pop(run_id, None)
        self._unwritten.pop(run_id, None)
        if self._seqs.pop(run_id, None) is not None and self._on_cancel is not None:
            self._on_cancel(run_id, reason)
        return event

    def _fold(self, run_id: str, event: AnyEvent) -> bytes | None:
        """Fold an appended event; every ``_snapshot_every`` events, the snapshot to store (decision 47)."""
        fold = self._folds.get(run_id)
        if is_terminal(event) or (fold is None and event.seq != 1):  # ended, or not followed from seq 1
            self._folds.pop(run_id, None)
            return None
        if fold is None:
            fold = self._folds[run_id] = SnapshotFold()
        fold.add(event)
        if event.seq % self._snapshot_every == 0:
            return encode_json(fold.event(run_id, event.seq))
        return None

    async def _keep_snapshot(self, run_id: str, snapshot: bytes) -> None:
        """Store a snapshot; an outage only costs this one (the event itself is written: never fail the append)."""
        try:
            await self._store_snapshot(run_id, snapshot)
        except BackendUnavailableError as exc:
            log.warning("run %s: snapshot not stored: %s", run_id, exc)

    @_bounded
    async def _store_snapshot(self, run_id: str, snapshot: bytes) -> None:
        await self._redis.set(self._keys.snapshot(run_id), snapshot, px=_ms(self._retention_s + _TOMBSTONE_EXTRA_S))

    @_bounded
    async def snapshot(self, run_id: str) -> RunSnapshot:  # noqa: D102
        raw = await self._redis.get(self._keys.snapshot(run_id))
        if raw is None:
            await self._record(run_id)  # raises for unknown and expired runs
            return RunSnapshot(run_id=run_id)
        snapshot = decode_event(raw)
        return snapshot if isinstance(snapshot, RunSnapshot) else RunSnapshot(run_id=run_id)

    async def _write(self, run_id: str, event: AnyEvent) -> int:
        """Add ``event`` at its seq: 1 written, 0 run finished, -1 seq taken, -2 no such run."""
        if is_terminal(event):
            try:
                return await self._finish(run_id, event, only_if_owner_lost=None)
            except RunNotFoundError:
                return -2
        keys = [self._keys.record(run_id), self._keys.log(run_id)]
        args = [f"{event.seq}-0", encode_json(event), self._max_events]
        return int(await self._append_script(keys=keys, args=args))

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
            await self._record(run_id)  # raises RunExpiredError or RunNotFoundError
            raise RunNotFoundError(run_id)
        return written

    def _may_reap(self) -> bool:
        """Whether this instance may judge other owners dead: its own heartbeats went through for a TTL.

        Right after Redis comes back (restarted, or resumed after a pause longer than a TTL) every
        owner's liveness key may be gone; live owners write theirs again within a heartbeat or two, so
        readers wait until their own instance has been beating for ``owner_ttl_s`` before reaping.
        """
        return self._steady_since is not None and time.monotonic() - self._steady_since >= self._owner_ttl_s

    async def _fail_if_owner_lost(self, run_id: str) -> bool:
        """Finish a running run whose owner is gone with ``run.failed``/``owner_lost``; True if done here."""
        record = await self._record(run_id)
        return record.status == "running" and await self._reap(record)

    @_bounded
    async def _reap(self, record: RunRecord) -> bool:
        """Finish ``record`` (running) with ``owner_lost`` if its owner's liveness key is gone; True if done here."""
        owner = record.owner
        if owner == self.instance_id or not self._may_reap():
            return False
        if await self._redis.exists(self._keys.instance(owner)):
            return False
        failed = RunFailed(
            run_id=record.id,
            seq=record.last_seq + 1,
            error=ErrorInfo(code="owner_lost", message="the instance running this run stopped"),
        )
        written = await self._finish(record.id, failed, only_if_owner_lost=owner)
        if written == 1:
            log.warning(
                "run %s: owner %s is gone; finished it as owner_lost", record.id, owner, extra=record.log_fields
            )
        return written == 1

    async def read_batches(self, run_id: str, after: int) -> AsyncGenerator[list[AnyEvent]]:
        """Replay, then tail (see ``RunBackend``); waits out a Redis outage of up to ``outage_s``.

        Past that it raises ``BackendUnavailableError``. A run that Redis no longer knows when it comes
        back (restarted without its data) ends the read with a ``run.failed`` (``runs_unavailable``) of
        this reader's own, at the seq after its cursor: nothing else will ever end it.
        """
        await self._check_cursor(run_id, after)
        cursor = after
        replaying = True
        down_since: float | None = None
        while True:
            attempt = time.monotonic()
            try:
                batch = await (self._range(run_id, cursor) if replaying else self._tail_once(run_id, cursor))
                if not batch and await self._ended_or_reaped(run_id, cursor):
                    return
            except BackendUnavailableError:
                down_since = attempt if down_since is None else down_since
                if time.monotonic() - down_since >= self._outage_s:
                    raise
                await asyncio.sleep(_RETRY_DELAY_S)
                continue
            except RunNotFoundError:
                yield [RunFailed(run_id=run_id, seq=cursor + 1, error=ErrorInfo("runs_unavailable", _LOST))]
                return
            down_since = None
            if replaying:
                replaying = len(batch) == MAX_BATCH
            if not batch:
                continue
            if batch[0].seq != cursor + 1:
                raise CursorError(f"events {cursor + 1}..{batch[0].seq - 1} are no longer kept (reader too slow)")
            yield batch
            if is_terminal(batch[-1]):  # nothing follows a terminal event in the log
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
        entries = await self._redis.xrange(self._keys.log(run_id), min=f"({cursor}-0", count=MAX_BATCH)
        return _decode_entries(entries or [])

    async def _tail_once(self, run_id: str, cursor: int) -> list[AnyEvent]:
        """Block up to _BLOCK_MS for events after ``cursor``; [] on timeout."""
        key = self._keys.log(run_id)
        async with self._tail_slots:  # waiting for a connection is not part of the call's bound
            try:
                async with asyncio.timeout(_CALL_TIMEOUT_S):
                    reply = await self._tail.xread({key: f"{cursor}-0"}, count=MAX_BATCH, block=_BLOCK_MS)
            except _UNAVAILABLE as exc:
                raise BackendUnavailableError(f"Redis does not answer: {exc!r}") from exc
        streams = cast("list[list[Any]]", reply)
        return _decode_entries(streams[0][1]) if streams else []

    @_bounded
    async def _ended_or_reaped(self, run_id: str, cursor: int) -> bool:
        """After a quiet tail: True when the run ended before ``cursor``; reaps a lost owner's run."""
        record = await self._record(run_id)  # raises RunExpiredError once retention has passed
        if record.status != "running":
            return cursor >= record.last_seq
        await self._reap(record)  # the next tail picks up whoever's run.failed
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

    async def _listen_forever(self) -> None:
        while True:
            try:
                if self._pubsub is None:
                    self._pubsub = await self._subscribe()
                message = cast(
                    "dict[str, Any] | None",
                    await self._pubsub.get_message(ignore_subscribe_messages=True, timeout=1.0),
                )
            except (RedisError, *_UNAVAILABLE) as exc:  # redis-py re-subscribes when it reconnects
                log.warning("cancel listener: %r; retrying", exc)
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
        """Beat every ``owner_ttl_s / 3``; while Redis does not answer, every _RETRY_DELAY_S."""
        failing = False
        while True:
            await asyncio.sleep(_RETRY_DELAY_S if failing else self._owner_ttl_s / 3)
            try:
                await self._heartbeat_once()
            except (BackendUnavailableError, RedisError) as exc:
                self._steady_since = None
                if not failing:
                    log.warning("run heartbeat: %r; retrying every %s s", exc, _RETRY_DELAY_S)
                failing = True
            else:
                if failing:
                    log.warning("run heartbeat: Redis answers again")
                failing = False

    async def _heartbeat_once(self) -> None:
        """Write the terminal events Redis did not take, then this instance's liveness, then poll cancels.

        In that order: while a run this instance gave up on is still ``running`` in Redis, the instance
        does not say it is alive, so after a TTL other instances finish the run as ``owner_lost``.
        """
        started = time.monotonic()
        await self._write_unwritten()
        existed = await self._beat()
        now = time.monotonic()
        # The liveness key vanished although the last beat is younger than its TTL (Redis lost it), or this
        # beat took long (Redis paused): other owners' keys may be gone too, so reaping waits a TTL.
        if (
            self._steady_since is None
            or (now - self._beat_at < self._owner_ttl_s and not existed)
            or now - started > self._owner_ttl_s / 2  # a pause long enough for keys to lapse, not loop lag
        ):
            self._steady_since = now
        self._beat_at = now
        await self._poll_cancels()

    async def _write_unwritten(self) -> None:
        for run_id, unwritten in list(self._unwritten.items()):
            if time.monotonic() < unwritten.keep_until and not await self._exists(run_id):
                continue  # the create may not have been applied yet
            try:
                await self._append(run_id, unwritten.event)
            except BackendUnavailableError:
                raise
            except Exception as exc:  # the run is gone (restart without data), or a bug: never block the beat
                if not isinstance(exc, RunNotFoundError | RunExpiredError):
                    log.exception("run %s: dropping its unwritten terminal event", run_id)
                self._unwritten.pop(run_id, None)
                self._seqs.pop(run_id, None)

    @_bounded
    async def _exists(self, run_id: str) -> bool:
        return bool(await self._redis.exists(self._keys.record(run_id)))

    @_bounded
    async def _beat(self) -> bool:
        """Refresh this instance's liveness key; whether it still existed."""
        key = self._keys.instance(self.instance_id)
        previous = await self._redis.set(key, "1", px=_ms(self._owner_ttl_s), get=True)
        return previous is not None

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
            await self._record(run_id)  # raises RunExpiredError or RunNotFoundError
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
