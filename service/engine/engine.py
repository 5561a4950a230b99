"""``ChatEngine.run``: the single source of events for both transports.

One run is a loop of model turns: stream a completion from the upstream
(through the openai SDK's raw streaming response, decoded with msgspec),
turn its chunks into events, and when the model asks for tools, run them,
emit their results, send them back and stream the next turn. The run ends
with exactly one terminal event: ``run.completed`` or ``run.failed``.
Cancellation (``asyncio.CancelledError``) propagates: leaving the
``async with`` closes the upstream HTTP response, which the upstream sees as
a disconnect; the run manager emits ``run.cancelled``.
"""

from __future__ import annotations

import asyncio
import time
from collections.abc import AsyncIterator, Callable, Sequence
from contextlib import AbstractAsyncContextManager
from dataclasses import dataclass, field
from typing import Any, Protocol, cast

import msgspec
import openai

from service.engine.chunks import DONE, Chunk, decode_chunk, iter_sse_data
from service.engine.providers import ProviderRegistry
from service.engine.state import TurnState, UpstreamStreamEndedError, output_schema, usage_sum
from service.engine.upstream_errors import UPSTREAM_ERRORS, error_info
from service.events import (
    AnyEvent,
    ErrorInfo,
    RunCompleted,
    RunFailed,
    RunStarted,
    ToolCallDone,
    ToolResult,
    Usage,
)


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
    extra: dict[str, Any] = field(default_factory=dict[str, Any])


class ChatEngine:
    """Runs chats against the configured upstreams."""

    def __init__(self, providers: ProviderRegistry, *, max_tool_rounds: int) -> None:
        self.providers = providers
        self.max_tool_rounds = max_tool_rounds

    async def run(self, request: RunRequest) -> AsyncIterator[AnyEvent]:
        """Stream the events of one run, ending with ``run.completed`` or ``run.failed``."""
        run_id = request.run_id
        model_id, client, upstream_model = self.providers.resolve(request.model)
        yield RunStarted(run_id=run_id, chat_id=request.chat_id, model=model_id, created_at=time.time())
        messages = list(request.messages)
        usage = None
        for turn in range(self.max_tool_rounds + 1):
            state = TurnState(run_id, output_schema=output_schema(request.response_format), turn=turn)
            try:
                async for event in self._stream_turn(client, upstream_model, messages, request, state):
                    yield event
                closing = state.finish()
            except UPSTREAM_ERRORS as exc:
                yield RunFailed(run_id=run_id, error=error_info(exc), message_id=request.message_id)
                return
            for event in closing:
                yield event
            usage = usage_sum(usage, state.usage)
            failure = _finish_failure(state.finish_reason)
            if failure is not None or not state.tool_calls:
                if usage is not None:
                    yield Usage(run_id=run_id, **msgspec.structs.asdict(usage))
                if failure is not None:
                    yield RunFailed(run_id=run_id, error=failure, message_id=request.message_id)
                else:
                    yield RunCompleted(
                        run_id=run_id, finish_reason=state.finish_reason or "stop", message_id=request.message_id
                    )
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

    async def _stream_turn(
        self,
        client: openai.AsyncOpenAI,
        model: str,
        messages: list[dict[str, Any]],
        request: RunRequest,
        state: TurnState,
    ) -> AsyncIterator[AnyEvent]:
        options: dict[str, Any] = {"stream_options": {"include_usage": True}, **request.extra}
        if request.response_format:
            options["response_format"] = request.response_format
        if request.toolbox is not None and (tools := request.toolbox.openai_tools()):
            options["tools"] = tools
        create = cast(
            "Callable[..., AbstractAsyncContextManager[openai.AsyncAPIResponse[Any]]]",
            client.chat.completions.with_streaming_response.create,
        )
        async with create(model=model, messages=messages, stream=True, **options) as response:
            async for data in iter_sse_data(_body(response)):
                chunk = decode_chunk(data)
                if chunk is DONE:
                    return
                assert isinstance(chunk, Chunk)  # noqa: S101 - decode_chunk returns a Chunk or DONE
                for event in state.handle(chunk):
                    yield event
        if state.finish_reason is None:
            raise UpstreamStreamEndedError("the upstream stream ended before the completion finished")

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


def _body(response: openai.AsyncAPIResponse[Any]) -> AsyncIterator[bytes]:
    """The streamed body as it arrives.

    Raw bytes unless the upstream compressed them: ``iter_bytes()`` adds two generator layers,
    a decoder and a re-chunker to every network read, for nothing when there is no encoding.
    """
    http = response.http_response
    if http.headers.get("content-encoding", "identity") != "identity":
        return response.iter_bytes()
    return http.aiter_raw()


def _finish_failure(finish_reason: str | None) -> ErrorInfo | None:
    if finish_reason == "length":
        return ErrorInfo("length_exceeded", "the answer was cut off at the model's token limit")
    if finish_reason == "content_filter":
        return ErrorInfo("content_filter", "the upstream's content filter stopped the answer")
    return None
