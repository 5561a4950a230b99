"""A scripted OpenAI-compatible upstream over real HTTP, for tests (never a mock of the SDK).

Usage::

    async with scripted_upstream() as upstream:
        release = asyncio.Event()
        upstream.enqueue(text("Hello, world", pieces=4), gate(release), finish("stop"), usage(10, 20))
        client = AsyncOpenAI(base_url=upstream.base_url, api_key="test", max_retries=0)
        stream = await client.chat.completions.create(model="m", messages=[...], stream=True)
        ...
        (request,) = await upstream.wait_for_requests(1)
        assert request.body["stream"] is True

Each ``POST /v1/chat/completions`` plays the next enqueued script (a default that answers "ok"
when the queue is empty). A script is a list of steps, built with the functions below: ``chunk``,
``text``, ``reasoning``, ``refusal``, ``tool_call``, ``interleave``, ``finish``, ``usage`` (output);
``gate``, ``sleep``, ``stall``, ``ttft`` (timing); ``status``, ``cut``, ``raw``, ``done``,
``no_done`` (failures and wire details). Streaming requests get ``text/event-stream`` frames
(``data: {chunk}``), then ``data: [DONE]``; other requests get one ``chat.completion`` built from
the same script. Response headers go out before the first step that is not ``ttft``/``status``.

``GET /v1/models`` lists ``upstream.models``; each such request is recorded in
``upstream.model_requests``. While ``upstream.model_list_gate`` is set (an ``asyncio.Event``) the
answer waits for it; ``upstream.model_list_error = status(503)`` answers with that error instead.

Every chat request is recorded in ``upstream.requests`` (:class:`RecordedRequest`): body,
headers, times, and whether the client went away before the script ended. A task waits on ASGI
``receive()`` for ``http.disconnect`` while the script plays, so a script blocked on a gate still
notices a disconnect within milliseconds.
"""

from __future__ import annotations

import asyncio
import contextlib
import itertools
import logging
import re
import time
from collections import deque
from collections.abc import AsyncIterator, Awaitable, Callable, Iterable, Mapping, Sequence
from dataclasses import dataclass, field
from typing import Any

import msgspec

from tests.support.live_server import serve

Send = Callable[[dict[str, Any]], Awaitable[None]]
Receive = Callable[[], Awaitable[dict[str, Any]]]


# --- steps (build them with the functions below) -------------------------------------------------
@dataclass(frozen=True)
class Chunk:  # one chat.completion.chunk; the response's first gets delta.role = "assistant"
    delta: Mapping[str, Any]
    finish_reason: str | None = None


@dataclass(frozen=True)
class UsageChunk:  # choices: [], usage: {...}
    prompt_tokens: int
    completion_tokens: int


@dataclass(frozen=True)
class Gate:  # wait until the test sets the event
    event: asyncio.Event


@dataclass(frozen=True)
class Sleep:  # send nothing for a while; the connection stays open
    seconds: float


@dataclass(frozen=True)
class TimeToFirstByte:  # wait before the response headers
    seconds: float


@dataclass(frozen=True)
class Status:  # an HTTP error response instead of a stream
    code: int
    headers: Mapping[str, str]
    body: Any


@dataclass(frozen=True)
class Raw:  # body bytes as they are
    data: bytes


@dataclass(frozen=True)
class Cut:  # drop the connection without the terminating chunk
    pass


@dataclass(frozen=True)
class Done:  # data: [DONE] now (otherwise it follows the last step)
    pass


@dataclass(frozen=True)
class NoDone:  # end cleanly without data: [DONE]
    pass


Step = Chunk | UsageChunk | Gate | Sleep | TimeToFirstByte | Status | Cut | Raw | Done | NoDone


class UpstreamCut(Exception):
    """Raised inside the app to make uvicorn drop the connection; its log record is filtered out."""


# --- builders ------------------------------------------------------------------------------------
def _split(content: str, pieces: int | None) -> list[str]:
    """``pieces`` near-equal parts (cuts land inside keys and strings), or per word when None."""
    if pieces is None:
        return re.findall(r"\s*\S+\s*$|\s*\S+|\s+$", content) or [content]
    n = max(1, min(pieces, len(content)))
    bounds = [round(i * len(content) / n) for i in range(n + 1)]
    return [content[a:b] for a, b in itertools.pairwise(bounds)]


def chunk(delta: Mapping[str, Any], finish_reason: str | None = None) -> Chunk:
    """One chunk with any ``delta`` (and optionally a ``finish_reason``)."""
    return Chunk(dict(delta), finish_reason)


def text(content: str, pieces: int | None = None) -> list[Step]:
    """Content deltas: ``content`` split into ``pieces`` parts, or one per word when None."""
    return [Chunk({"content": part}) for part in _split(content, pieces)]


def reasoning(content: str, pieces: int | None = None, *, key: str = "reasoning_content") -> list[Step]:
    """Reasoning deltas under ``key`` (``reasoning_content``, or ``reasoning`` as some servers send)."""
    return [Chunk({key: part}) for part in _split(content, pieces)]


def refusal(content: str, pieces: int | None = None) -> list[Step]:
    """Refusal deltas."""
    return [Chunk({"refusal": part}) for part in _split(content, pieces)]


def tool_call(
    index: int = 0,
    call_id: str = "call_1",
    name: str = "clock",
    arguments: str | Sequence[str] = '{"tz": "UTC"}',
    pieces: int = 5,
) -> list[Step]:
    """A streamed tool call: id + name + empty arguments first, then the argument fragments.

    ``arguments`` as a string is cut into ``pieces`` near-equal fragments; as a sequence, its
    items are the fragments.
    """
    fragments = _split(arguments, pieces) if isinstance(arguments, str) else list(arguments)
    head = {"index": index, "id": call_id, "type": "function", "function": {"name": name, "arguments": ""}}
    tail = [{"index": index, "function": {"arguments": fragment}} for fragment in fragments]
    return [Chunk({"tool_calls": [call]}) for call in [head, *tail]]


def interleave(*scripts: Sequence[Step]) -> list[Step]:
    """Round-robin the steps of several lists (e.g. two tool calls' fragments)."""
    mixed = itertools.chain.from_iterable(itertools.zip_longest(*scripts))
    return [step for step in mixed if step is not None]


def finish(reason: str = "stop") -> Chunk:
    """A chunk with ``finish_reason`` (``stop``, ``length``, ``content_filter``, ``tool_calls``)."""
    return Chunk({}, reason)


def usage(prompt: int = 10, completion: int = 20) -> UsageChunk:
    """The usage chunk (``choices: []``)."""
    return UsageChunk(prompt, completion)


def gate(event: asyncio.Event) -> Gate:
    """Block the script until the test sets ``event``."""
    return Gate(event)


def sleep(seconds: float) -> Sleep:
    """Pause the script."""
    return Sleep(seconds)


def stall(seconds: float) -> Sleep:
    """Send nothing for ``seconds`` with the connection open (same as ``sleep``, reads as intent)."""
    return Sleep(seconds)


def ttft(seconds: float) -> TimeToFirstByte:
    """Delay the response headers (time to first byte); put it first."""
    return TimeToFirstByte(seconds)


def status(code: int, headers: Mapping[str, str] | None = None, body: Any = None) -> Status:
    """Answer with HTTP ``code`` and an OpenAI error body (default one made up); must come first."""
    error = {"message": f"scripted error {code}", "type": "scripted_error", "param": None, "code": None}
    return Status(code, dict(headers or {}), {"error": error} if body is None else body)


def cut() -> Cut:
    """Abort the connection here (the client sees an incomplete chunked body)."""
    return Cut()


def raw(data: bytes | str) -> Raw:
    """Write ``data`` to the body unchanged (e.g. ``b"data: {not json\\n\\n"``)."""
    return Raw(data.encode() if isinstance(data, str) else data)


def done() -> Done:
    """Send ``data: [DONE]`` at this point."""
    return Done()


def no_done() -> NoDone:
    """End the stream without ``data: [DONE]``."""
    return NoDone()


def default_script() -> list[Step]:
    """What a request gets when nothing is queued: the text "ok", ``stop``, usage."""
    return [*text("ok"), finish("stop"), usage(1, 1)]


# --- recording -----------------------------------------------------------------------------------
@dataclass
class RecordedRequest:
    """One chat request as the upstream saw it."""

    headers: dict[str, str]
    body: dict[str, Any]
    received_at: float = field(default_factory=time.monotonic)
    finished_at: float | None = None
    """``time.monotonic()`` when the response ended or the client went away."""
    client_disconnected: bool = False
    """The client went away before the script finished."""
    disconnected_event: asyncio.Event = field(default_factory=asyncio.Event)
    finished_event: asyncio.Event = field(default_factory=asyncio.Event)


# --- the app -------------------------------------------------------------------------------------
_SSE_HEADERS = {"content-type": "text/event-stream; charset=utf-8", "cache-control": "no-cache"}


class _Player:
    """Plays one script onto one ASGI response."""

    def __init__(self, send: Send, model: str) -> None:
        self.send, self.model = send, model
        self.id, self.created = f"chatcmpl-{time.monotonic_ns()}", int(time.time())
        self.started = self.role_sent = self.done_sent = False

    async def stream(self, steps: Iterable[Step]) -> None:
        for step in steps:
            if not isinstance(step, TimeToFirstByte | Status):
                await self._start(200, _SSE_HEADERS)
            match step:
                case TimeToFirstByte(seconds) | Sleep(seconds):
                    await asyncio.sleep(seconds)
                case Gate(event):
                    await event.wait()
                case Status():
                    return await self._status(step)
                case Chunk() | UsageChunk():
                    await self._body(b"data: " + msgspec.json.encode(self._chunk(step)) + b"\n\n")
                case Raw(data):
                    await self._body(data)
                case Cut():
                    raise UpstreamCut
                case Done():
                    await self._body(b"" if self.done_sent else b"data: [DONE]\n\n")
                    self.done_sent = True
                case NoDone():
                    self.done_sent = True
        await self._body(b"" if self.done_sent else b"data: [DONE]\n\n", more=False)

    async def complete(self, steps: Iterable[Step]) -> None:
        """Non-streaming: wait as scripted, then send one ``chat.completion``."""
        chunks: list[Chunk | UsageChunk] = []
        for step in steps:
            match step:
                case TimeToFirstByte(seconds) | Sleep(seconds):
                    await asyncio.sleep(seconds)
                case Gate(event):
                    await event.wait()
                case Status():
                    return await self._status(step)
                case Cut():  # promise a body, then drop the connection
                    await self._start(200, {"content-type": "application/json", "content-length": "1000"})
                    raise UpstreamCut
                case Chunk() | UsageChunk():
                    chunks.append(step)
        await self._json(200, self._completion(chunks))

    def _chunk(self, step: Chunk | UsageChunk) -> dict[str, Any]:
        out: dict[str, Any] = {"id": self.id, "object": "chat.completion.chunk", "created": self.created}
        out["model"] = self.model
        if isinstance(step, UsageChunk):
            return out | {"choices": [], "usage": _usage(step)}
        delta = dict(step.delta) if self.role_sent else {"role": "assistant", **step.delta}
        self.role_sent = True
        return out | {"choices": [{"index": 0, "delta": delta, "logprobs": None, "finish_reason": step.finish_reason}]}

    def _completion(self, chunks: list[Chunk | UsageChunk]) -> dict[str, Any]:
        message: dict[str, Any] = {"role": "assistant", "content": None, "refusal": None}
        calls: dict[int, dict[str, Any]] = {}
        finish_reason, used = "stop", None
        for step in chunks:
            if isinstance(step, UsageChunk):
                used = _usage(step)
                continue
            finish_reason = step.finish_reason or finish_reason
            for key, value in step.delta.items():
                if key == "tool_calls":
                    for call in value:
                        slot = calls.setdefault(call["index"], {"type": "function", "function": {"arguments": ""}})
                        slot["id"] = call.get("id", slot.get("id"))
                        slot["function"]["name"] = call.get("function", {}).get("name") or slot["function"].get("name")
                        slot["function"]["arguments"] += call.get("function", {}).get("arguments", "")
                elif isinstance(value, str):
                    message[key] = (message.get(key) or "") + value
        if calls:
            message["tool_calls"] = [calls[i] for i in sorted(calls)]
        choice = {"index": 0, "message": message, "logprobs": None, "finish_reason": finish_reason}
        return {"id": self.id, "object": "chat.completion", "created": self.created, "model": self.model} | {
            "choices": [choice],
            "usage": used,
        }

    async def _status(self, step: Status) -> None:
        if self.started:
            raise RuntimeError("status() must be the first step of a script")
        await self._json(step.code, step.body, step.headers)

    async def _json(self, code: int, body: Any, headers: Mapping[str, str] | None = None) -> None:
        self.started = True
        await _respond(self.send, code, body, headers)

    async def _start(self, code: int, headers: Mapping[str, str]) -> None:
        if not self.started:
            self.started = True
            pairs = [(k.lower().encode(), v.encode()) for k, v in headers.items()]
            await self.send({"type": "http.response.start", "status": code, "headers": pairs})

    async def _body(self, data: bytes, *, more: bool = True) -> None:
        await self.send({"type": "http.response.body", "body": data, "more_body": more})


async def _respond(send: Send, code: int, body: Any, headers: Mapping[str, str] | None = None) -> None:
    headers = {"content-type": "application/json", **(headers or {})}
    pairs = [(k.lower().encode(), v.encode()) for k, v in headers.items()]
    await send({"type": "http.response.start", "status": code, "headers": pairs})
    data = body if isinstance(body, bytes) else msgspec.json.encode(body)  # bytes: sent as they are
    await send({"type": "http.response.body", "body": data})


def _usage(step: UsageChunk) -> dict[str, int]:
    total = step.prompt_tokens + step.completion_tokens
    return {"prompt_tokens": step.prompt_tokens, "completion_tokens": step.completion_tokens, "total_tokens": total}


async def _read_body(receive: Receive) -> bytes:
    body, more = b"", True
    while more:
        message = await receive()
        if message["type"] == "http.disconnect":
            raise UpstreamCut
        body, more = body + message.get("body", b""), message.get("more_body", False)
    return body


def _headers(scope: dict[str, Any]) -> dict[str, str]:
    return {k.decode("latin-1"): v.decode("latin-1") for k, v in scope["headers"]}


async def _wait_for_disconnect(receive: Receive) -> None:
    while (await receive())["type"] != "http.disconnect":
        pass


def _flatten(parts: Sequence[Step | Sequence[Step]]) -> list[Step]:
    return [step for part in parts for step in (part if isinstance(part, Sequence) else [part])]


class ScriptedUpstream:
    """The ASGI app: ``POST /v1/chat/completions`` plays scripts, ``GET /v1/models`` lists ``models``."""

    def __init__(self, models: Sequence[str] = ("scripted",)) -> None:
        self.models = list(models)
        self.model_requests: list[RecordedRequest] = []
        self.model_list_gate: asyncio.Event | None = None
        self.model_list_error: Status | None = None
        self.requests: list[RecordedRequest] = []
        self.url = self.base_url = ""  # set by scripted_upstream(): "http://127.0.0.1:PORT[/v1]"
        self._scripts: deque[list[Step]] = deque()
        self._scripts_for: dict[str, list[Step]] = {}
        self._arrived = asyncio.Condition()
        self._playing: set[asyncio.Task[None]] = set()

    def enqueue(self, *parts: Step | Sequence[Step]) -> None:
        """Queue ONE script for the next chat request; ``parts`` (steps or lists of steps) are flattened."""
        self._scripts.append(_flatten(parts))

    def enqueue_for(self, message: str, *parts: Step | Sequence[Step]) -> None:
        """Keep ONE script for the next chat request whose last message says ``message`` (before the queue).

        For a module-wide upstream, where a request still on its way from an earlier test would take
        the next queued script.
        """
        self._scripts_for[message] = _flatten(parts)

    async def wait_for_requests(self, n: int, timeout: float = 5.0) -> list[RecordedRequest]:
        """Wait until at least ``n`` chat requests arrived; return all recorded so far."""
        return await self._wait_for(self.requests, n, timeout)

    def abort_all(self) -> None:
        """Stop every script still playing (their connections are dropped)."""
        for task in self._playing:
            task.cancel()

    async def __call__(self, scope: dict[str, Any], receive: Receive, send: Send) -> None:
        if scope["type"] == "lifespan":
            while (await receive())["type"] != "lifespan.shutdown":
                await send({"type": "lifespan.startup.complete"})
            return await send({"type": "lifespan.shutdown.complete"})
        route = (scope["method"], scope["path"].removesuffix("/"))
        if route == ("GET", "/v1/models"):
            return await self._list_models(scope, send)
        if route == ("POST", "/v1/chat/completions"):
            return await self._chat(scope, receive, send)
        error = {"message": f"no route {route}", "type": "invalid_request_error", "param": None, "code": None}
        return await _respond(send, 404, {"error": error})

    async def _list_models(self, scope: dict[str, Any], send: Send) -> None:
        async with self._arrived:
            self.model_requests.append(RecordedRequest(_headers(scope), {}))
            self._arrived.notify_all()
        if self.model_list_gate is not None:
            await self.model_list_gate.wait()
        if self.model_list_error is not None:
            error = self.model_list_error
            return await _respond(send, error.code, error.body, error.headers)
        data = [{"id": name, "object": "model", "created": 0, "owned_by": "scripted"} for name in self.models]
        return await _respond(send, 200, {"object": "list", "data": data})

    async def wait_for_model_requests(self, n: int, timeout: float = 5.0) -> list[RecordedRequest]:
        """Wait until at least ``n`` model list requests arrived; return all recorded so far."""
        return await self._wait_for(self.model_requests, n, timeout)

    async def _wait_for(self, recorded: list[RecordedRequest], n: int, timeout: float) -> list[RecordedRequest]:
        async with asyncio.timeout(timeout), self._arrived:
            await self._arrived.wait_for(lambda: len(recorded) >= n)
        return list(recorded)

    async def _chat(self, scope: dict[str, Any], receive: Receive, send: Send) -> None:
        raw_body = await _read_body(receive)
        record = RecordedRequest(_headers(scope), msgspec.json.decode(raw_body) if raw_body else {})
        async with self._arrived:
            self.requests.append(record)
            self._arrived.notify_all()
        messages = record.body.get("messages") or [{}]
        script = self._scripts_for.pop(str(messages[-1].get("content")), None)
        if script is None:
            script = self._scripts.popleft() if self._scripts else default_script()
        player = _Player(send, str(record.body.get("model", "scripted")))
        play = asyncio.create_task((player.stream if record.body.get("stream") else player.complete)(script))
        watch = asyncio.create_task(_wait_for_disconnect(receive))
        self._playing.add(play)
        try:
            await asyncio.wait({play, watch}, return_when=asyncio.FIRST_COMPLETED)
            if not play.done():  # the client went away mid-script
                record.client_disconnected = True
            elif play.cancelled():  # abort_all(): drop the connection
                raise UpstreamCut
            else:
                play.result()  # re-raises UpstreamCut from cut()
        finally:
            play.cancel()
            watch.cancel()
            self._playing.discard(play)
            record.finished_at = time.monotonic()
            if record.client_disconnected:
                record.disconnected_event.set()
            record.finished_event.set()


class _DropCutRecords(logging.Filter):
    """Hide uvicorn's "Exception in ASGI application" record for a deliberate cut()."""

    def filter(self, record: logging.LogRecord) -> bool:
        return not (record.exc_info and isinstance(record.exc_info[1], UpstreamCut))


@contextlib.asynccontextmanager
async def scripted_upstream(
    models: Sequence[str] = ("scripted",), **uvicorn_config: Any
) -> AsyncIterator[ScriptedUpstream]:
    """Serve a :class:`ScriptedUpstream` on a free port; ``upstream.base_url`` ends in ``/v1``."""
    upstream, log_filter = ScriptedUpstream(models), _DropCutRecords()
    logger = logging.getLogger("uvicorn.error")
    logger.addFilter(log_filter)
    try:
        async with serve(upstream, **{"ws": "none", **uvicorn_config}) as url:
            upstream.url, upstream.base_url = url, f"{url}/v1"
            try:
                yield upstream
            finally:
                upstream.abort_all()
    finally:
        logger.removeFilter(log_filter)
