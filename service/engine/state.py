"""The pure state machine of one model turn: chunks in, events out, no I/O.

``TurnState.handle(chunk)`` returns the events a chunk produces;
``TurnState.finish()`` returns the closing events of the turn (``reasoning.done``, ``text.done``,
``refusal.done``, ``output.done``, ``tool_call.done``) once the stream ended.
"""

from __future__ import annotations

from typing import Any, cast

import msgspec

from service.engine.chunks import DONE, Chunk, ChunkUsage, ToolCallChunk, decode_chunk
from service.engine.json_schema import output_errors
from service.engine.partial_json import PartialJson
from service.events import (
    AnyEvent,
    OutputDone,
    OutputPartial,
    ReasoningDelta,
    ReasoningDone,
    RefusalDelta,
    RefusalDone,
    TextDelta,
    TextDone,
    ToolCallDelta,
    ToolCallDone,
    ToolCallStarted,
)


class InvalidOutputError(Exception):
    """Structured output that is not valid JSON or does not match its schema."""


class UpstreamChunkError(Exception):
    """The upstream sent an error object inside the stream."""


class UpstreamStreamEndedError(Exception):
    """The upstream closed the stream without finishing the completion."""


class PendingToolCall:
    """A tool call being streamed: its id, name and argument text so far."""

    __slots__ = ("arguments", "call_id", "name")

    def __init__(self, call_id: str, name: str) -> None:
        self.call_id = call_id
        self.name = name
        self.arguments = PartialJson()

    def done_event(self, run_id: str) -> ToolCallDone:
        """The ``tool_call.done`` event; ``parsed`` is None for arguments that are not a JSON object."""
        try:
            value: Any = self.arguments.final() if self.arguments.text.strip() else {}
        except ValueError:
            value = None
        parsed = cast("dict[str, Any]", value) if isinstance(value, dict) else None
        return ToolCallDone(
            run_id=run_id, call_id=self.call_id, name=self.name, arguments=self.arguments.text, parsed=parsed
        )


class TurnState:
    """Folds the chunks of one streamed completion into events."""

    def __init__(self, run_id: str, *, output_schema: dict[str, Any] | None = None, turn: int = 0) -> None:
        self.run_id = run_id
        self.output_schema = output_schema
        self.turn = turn
        self.text: list[str] = []
        self.refusal: list[str] = []
        self.reasoning: list[str] = []
        self.output = PartialJson() if output_schema is not None else None
        self.tool_calls: dict[int, PendingToolCall] = {}
        self.finish_reason: str | None = None
        self.usage: ChunkUsage | None = None
        self.done = False
        """The upstream sent ``[DONE]``."""

    def handle_data(self, data: bytes) -> list[AnyEvent]:
        """The events of one SSE ``data`` payload; ``[DONE]`` sets ``done`` (later data is ignored)."""
        if self.done:
            return []
        chunk = decode_chunk(data)
        if chunk is DONE:
            self.done = True
            return []
        return self.handle(cast("Chunk", chunk))

    def handle(self, chunk: Chunk) -> list[AnyEvent]:
        """The events one chunk produces."""
        if chunk.error is not None:
            raise UpstreamChunkError(str(chunk.error.get("message") or chunk.error))
        if chunk.usage is not None:
            self.usage = chunk.usage
        events: list[AnyEvent] = []
        for choice in chunk.choices:
            if choice.index != 0:
                continue
            if choice.finish_reason is not None:
                self.finish_reason = choice.finish_reason
            delta = choice.delta
            if delta is None:
                continue
            reasoning = delta.reasoning_content or delta.reasoning
            if reasoning:
                self.reasoning.append(reasoning)
                events.append(ReasoningDelta(run_id=self.run_id, delta=reasoning))
            if delta.content:
                self._content(delta.content, events)
            if delta.refusal:
                self.refusal.append(delta.refusal)
                events.append(RefusalDelta(run_id=self.run_id, delta=delta.refusal))
            if delta.tool_calls:
                for fragment in delta.tool_calls:
                    self._tool_fragment(fragment, events)
        return events

    def _content(self, content: str, events: list[AnyEvent]) -> None:
        self.text.append(content)
        events.append(TextDelta(run_id=self.run_id, delta=content))
        if self.output is not None and self.output.feed(content):
            events.append(OutputPartial(run_id=self.run_id, partial=self.output.value))

    def _tool_fragment(self, fragment: ToolCallChunk, events: list[AnyEvent]) -> None:
        call = self.tool_calls.get(fragment.index)
        function = fragment.function
        if call is None:
            call_id = fragment.id or f"call_{self.run_id}_{self.turn}_{fragment.index}"
            call = PendingToolCall(call_id, (function.name if function else None) or "")
            self.tool_calls[fragment.index] = call
            events.append(ToolCallStarted(run_id=self.run_id, call_id=call.call_id, name=call.name))
        elif function is not None and function.name and not call.name:
            call.name = function.name
        if function is not None and function.arguments:
            call.arguments.feed(function.arguments)
            value: Any = call.arguments.value  # the latest partial object (re-parsed only when worth it)
            parsed = cast("dict[str, Any]", value) if isinstance(value, dict) else None
            events.append(
                ToolCallDelta(
                    run_id=self.run_id, call_id=call.call_id, arguments_delta=function.arguments, parsed=parsed
                )
            )

    def finish(self) -> list[AnyEvent]:
        """The closing events of the turn.

        Raises ``UpstreamStreamEndedError`` when the stream ended without a finish reason and
        ``InvalidOutputError`` for bad structured output.
        """
        if self.finish_reason is None:
            raise UpstreamStreamEndedError("the upstream stream ended before the completion finished")
        events: list[AnyEvent] = []
        if self.reasoning:
            events.append(ReasoningDone(run_id=self.run_id, text="".join(self.reasoning)))
        if self.text:
            events.append(TextDone(run_id=self.run_id, text="".join(self.text)))
        if self.refusal:
            events.append(RefusalDone(run_id=self.run_id, refusal="".join(self.refusal)))
        if self.output is not None and self.text and not self.refusal and self.finish_reason == "stop":
            events.append(OutputDone(run_id=self.run_id, output=self.validated_output()))
        events.extend(call.done_event(self.run_id) for call in self.tool_calls.values())
        return events

    def validated_output(self) -> Any:
        """The structured output, parsed and checked against the schema."""
        assert self.output is not None  # noqa: S101 - only called in structured mode
        try:
            value = self.output.final()
        except ValueError as exc:
            raise InvalidOutputError(f"structured output is not valid JSON: {exc}") from exc
        problem = output_errors(value, self.output_schema or {})
        if problem is not None:
            raise InvalidOutputError(f"structured output does not match the schema: {problem}")
        return value

    def assistant_message(self) -> dict[str, Any]:
        """This turn as an OpenAI ``assistant`` message, to send back with tool results."""
        message: dict[str, Any] = {"role": "assistant", "content": "".join(self.text) or None}
        if self.tool_calls:
            message["tool_calls"] = [
                openai_tool_call(c.call_id, c.name, c.arguments.text) for c in self.tool_calls.values()
            ]
        return message


def openai_tool_call(call_id: str, name: str, arguments: str) -> dict[str, Any]:
    """A tool call as an OpenAI ``assistant`` message carries it."""
    return {"id": call_id, "type": "function", "function": {"name": name, "arguments": arguments}}


def output_schema(response_format: dict[str, Any] | None) -> dict[str, Any] | None:
    """The JSON schema structured output must match, or None when free text is asked for."""
    kind = (response_format or {}).get("type")
    if kind == "json_object":
        return {"type": "object"}
    if kind != "json_schema":
        return None
    spec: Any = (response_format or {}).get("json_schema")
    schema: Any = cast("dict[str, Any]", spec).get("schema") if isinstance(spec, dict) else None
    return cast("dict[str, Any]", schema) if isinstance(schema, dict) else {}


def usage_sum(a: ChunkUsage | None, b: ChunkUsage | None) -> ChunkUsage | None:
    """Add two usages (either may be missing)."""
    if a is None or b is None:
        return a or b
    return msgspec.structs.replace(
        a,
        prompt_tokens=a.prompt_tokens + b.prompt_tokens,
        completion_tokens=a.completion_tokens + b.completion_tokens,
        total_tokens=a.total_tokens + b.total_tokens,
    )
