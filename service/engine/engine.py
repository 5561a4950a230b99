"""``ChatEngine.run``: the single source of events for both transports.

One run is a loop of model turns (steps): stream a completion from the upstream
(through the openai SDK's raw streaming response, decoded with msgspec),
turn its chunks into events, and when the model asks for tools, run them,
emit their results, send them back and stream the next turn. Each turn is
framed by ``step.started`` and ``step.done``; the tool results of a turn
follow its ``step.done``. The run ends
with exactly one terminal event: ``run.completed`` or ``run.failed``.
Cancellation (``asyncio.CancelledError``) propagates: leaving the
``async with`` closes the upstream HTTP response, which the upstream sees as
a disconnect; the run manager emits ``run.cancelled``.
"""

from __future__ import annotations

import asyncio
import logging
import time
from collections.abc import AsyncGenerator, Awaitable, Callable, Sequence
from contextlib import asynccontextmanager
from dataclasses import dataclass, field
from typing import Any, Protocol, cast

import httpx2
import msgspec

from service import metrics
from service.engine.chunks import ChunkUsage, SseDataDecoder
from service.engine.providers import ProviderRegistry, UpstreamClient
from service.engine.state import TurnState, output_schema, usage_sum
from service.engine.transport import READ_BODY
from service.engine.upstream_errors import UPSTREAM_ERRORS, error_info, upstream_detail
from service.events import (
    AnyEvent,
    ErrorInfo,
    RunCompleted,
    RunFailed,
    RunStarted,
    StepDone,
    StepStarted,
    ToolCallDone,
    ToolResult,
    Usage,
)

_JSON = msgspec.json.Encoder()

log = logging.getLogger("service.engine")


class ToolOutcomeLike(Protocol):
    """What a tool call returns."""

    @property
    def output(self) -> str: ...  # noqa: D102

    @property
    def is_error(self) -> bool: ...  # noqa: D102


class ToolRunner(Protocol):
    """The tools one run may use (``service.engine.tools.Toolbox``)."""

    def openai_tools(self) -> list[dict[str, Any]]: ...  # noqa: D102

    def validate(self, name: str, arguments: dict[str, Any]) -> str | None: ...  # noqa: D102

    async def call(self, name: str, arguments: dict[str, Any]) -> ToolOutcomeLike: ...  # noqa: D102


@dataclass(frozen=True, kw_only=True)
class RunRequest:
    """Everything the engine needs for one run."""

    run_id: str
    chat_id: str
    model: str
    """Model id as the client named it (``demo`` or ``provider/model``)."""
    messages: list[dict[str, Any]]
    """OpenAI-format history, ending with the new user message."""
    message_id: str
    """Id the final assistant message will be stored under."""
    response_format: dict[str, Any] | None = None
    toolbox: ToolRunner | None = None
    sampling: dict[str, Any] = field(default_factory=dict[str, Any])
    """Sampling parameters (``temperature``, ``max_tokens``, ...), sent in the request body as they are."""


class ChatEngine:
    """Runs chats against the configured upstreams."""

    def __init__(self, providers: ProviderRegistry, *, max_tool_rounds: int) -> None:
        self.providers = providers
        self.max_tool_rounds = max_tool_rounds

    async def run(self, request: RunRequest) -> AsyncGenerator[AnyEvent]:
        """Stream the events of one run, ending with ``run.completed`` or ``run.failed``."""
        run_id = request.run_id
        model_id, client, upstream_model = self.providers.resolve(request.model)
        yield RunStarted(
            run_id=run_id,
            chat_id=request.chat_id,
            model=model_id,
            created_at=time.time(),
            message_id=request.message_id,
        )
        messages = list(request.messages)
        usage = None
        for turn in range(self.max_tool_rounds + 1):
            yield StepStarted(run_id=run_id, step=turn + 1)
            state = TurnState(run_id, output_schema=output_schema(request.response_format), turn=turn)
            try:
                # The turn's stream is read here, not in a helper generator: a layer fewer per token.
                async with self._completion(client, upstream_model, messages, request, turn) as response:
                    read, sse = _body_reader(response), SseDataDecoder()
                    while not state.done and (piece := await read()) is not None:
                        for data in sse.feed(piece):
                            for event in state.handle_data(data):
                                yield event
                    for data in sse.close():
                        for event in state.handle_data(data):
                            yield event
                closing = state.finish()
            except UPSTREAM_ERRORS as exc:
                error = error_info(exc)
                log.warning("run %s (%s): %s: %s", run_id, model_id, error.code, upstream_detail(exc))
                metrics.UPSTREAM_ERRORS.labels(self.providers.metric_labels(model_id)[0], error.code).inc()
                yield RunFailed(run_id=run_id, error=error, message_id=request.message_id)
                return
            usage = usage_sum(usage, state.usage)
            ending = _ending(request, state, usage)
            closing.append(StepDone(run_id=run_id, step=turn + 1, finish_reason=state.finish_reason or "stop"))
            for event in closing if ending is None else [*closing, *ending]:
                yield event
            if ending is not None:
                return
            if turn == self.max_tool_rounds:
                break
            dones = [e for e in closing if isinstance(e, ToolCallDone)]
            results = await self._run_tools(request, dones)
            for result in results:
                yield result
            messages.append(state.assistant_message())
            messages += [{"role": "tool", "tool_call_id": r.call_id, "content": r.output} for r in results]
        error = ErrorInfo("tool_rounds_exceeded", f"the model kept calling tools after {self.max_tool_rounds} rounds")
        yield RunFailed(run_id=run_id, error=error, message_id=request.message_id)

    @staticmethod
    @asynccontextmanager
    async def _completion(
        client: UpstreamClient, model: str, messages: list[dict[str, Any]], request: RunRequest, turn: int
    ) -> AsyncGenerator[httpx2.Response]:
        """The turn's streamed chat completion, as the SDK's raw, unread HTTP response."""
        body: dict[str, Any] = {
            "model": model,
            "messages": messages,
            "stream": True,
            "stream_options": {"include_usage": True},
            **request.sampling,
        }
        if request.response_format:
            body["response_format"] = request.response_format
        if request.toolbox is not None and (tools := request.toolbox.openai_tools()):
            body["tools"] = tools
        # ``client.post`` is the SDK's documented way to send a request body of one's own (here as
        # ``stream_post``, the same call with its options copied from a template): it builds,
        # authenticates, retries and maps errors exactly as ``chat.completions.create`` does, without
        # the typed wrapper's per-field transform of the params (``messages`` cost about 120 µs per
        # message of history, every turn) for a body that is plain JSON already. The body goes as
        # msgspec-encoded ``content`` (the SDK's default ``Content-Type`` is JSON): the SDK's own
        # encoding of a ``body`` is the standard library's, some 10x slower on a history and tool
        # schemas. The request's idempotency key (kept across the SDK's retries) is named after the
        # run and turn; left to the SDK, it would cost a ``uuid4()``, one ``getrandom`` system call,
        # per request.
        response = await client.stream_post("/chat/completions", _JSON.encode(body), f"{request.run_id}-{turn}")
        try:
            yield response
        finally:
            await response.aclose()

    async def _run_tools(self, request: RunRequest, calls: Sequence[ToolCallDone]) -> list[ToolResult]:
        """Run the turn's tool calls concurrently; results come back in call order."""
        toolbox = request.toolbox

        async def one(call: ToolCallDone) -> ToolResult:
            def result(output: str, *, is_error: bool) -> ToolResult:
                return ToolResult(
                    run_id=request.run_id, call_id=call.call_id, name=call.name, output=output, is_error=is_error
                )

            if toolbox is None:
                return result(f"tool {call.name!r} is not available in this chat", is_error=True)
            if call.parsed is None:
                return result(f"the arguments of {call.name!r} are not a valid JSON object", is_error=True)
            problem = toolbox.validate(call.name, call.parsed)
            if problem is not None:
                return result(problem, is_error=True)
            outcome = await toolbox.call(call.name, call.parsed)
            return result(outcome.output, is_error=outcome.is_error)

        return list(await asyncio.gather(*(one(call) for call in calls)))


def _body_reader(response: httpx2.Response) -> Callable[[], Awaitable[bytes | None]]:
    """A function returning the body bytes that arrived since its last call, or None at the end.

    ``UpstreamTransport`` hands out its connection's own reader: httpx2's ``aiter_raw()`` adds two
    generator layers to every network read (and ``aiter_bytes()`` a decoder and a re-chunker), for
    nothing when the body is not compressed. Otherwise (httpx2's transport, a compressed body),
    httpx2's decoded byte iterator.
    """
    read = response.extensions.get(READ_BODY)
    if read is not None and response.headers.get("content-encoding", "identity") == "identity":
        return cast("Callable[[], Awaitable[bytes | None]]", read)
    chunks = response.aiter_bytes().__aiter__()

    async def read_next() -> bytes | None:
        return await anext(chunks, None)

    return read_next


def _ending(request: RunRequest, state: TurnState, usage: ChunkUsage | None) -> list[AnyEvent] | None:
    """The run's last events when it ends after this turn (no tool calls, or a failure), else None."""
    failure = _finish_failure(state.finish_reason)
    if failure is None and state.tool_calls:
        return None
    run_id, message_id = request.run_id, request.message_id
    events: list[AnyEvent] = []
    if usage is not None:
        events.append(Usage(run_id=run_id, **msgspec.structs.asdict(usage)))
    if failure is not None:
        events.append(RunFailed(run_id=run_id, error=failure, message_id=message_id))
    else:
        events.append(RunCompleted(run_id=run_id, finish_reason=state.finish_reason or "stop", message_id=message_id))
    return events


def _finish_failure(finish_reason: str | None) -> ErrorInfo | None:
    if finish_reason == "length":
        return ErrorInfo("length_exceeded", "the answer was cut off at the model's token limit")
    if finish_reason == "content_filter":
        return ErrorInfo("content_filter", "the upstream's content filter stopped the answer")
    return None
