"""The service's events as the Vercel AI SDK's UI message stream (protocol ``v1``).

The AI SDK's ``DefaultChatTransport`` reads a response with the header
``x-vercel-ai-ui-message-stream: v1``: Server-Sent Events whose ``data`` is one JSON *part*
each (``{"type": "text-delta", "id": ..., "delta": ...}``), ending with ``data: [DONE]``.
:class:`UiStreamTranslator` turns a run's events, in order, into those parts; it is pure (no I/O)
and keeps only what the protocol needs between events (the open text or reasoning block, the
refusal so far), so a replay of a run from its first event gives the same parts again.

The mapping (every part's shape as the ``ai`` package's own schema, ``uiMessageChunkSchema``,
of ``ai`` 6.0, checks it):

====================================  ==============================================================
service event                         UI message stream parts
====================================  ==============================================================
``run.started``                       ``start`` (``messageId``: the run's message id; metadata
                                      ``{run_id, chat_id, model}``)
``step.started`` / ``step.done``      ``start-step`` / ``finish-step`` (open blocks end first)
``text.delta`` / ``text.done``        ``text-start`` (once per block), ``text-delta``, ``text-end``
``reasoning.delta`` / ``.done``       ``reasoning-start``, ``reasoning-delta``, ``reasoning-end``
``tool_call.started`` / ``.delta``    ``tool-input-start``, ``tool-input-delta``
``tool_call.done``                    ``tool-input-available`` (``input``: the parsed arguments), or
                                      ``tool-input-error`` when they are not a JSON object
``tool.result``                       ``tool-output-available`` (``output``: the tool's text) or
                                      ``tool-output-error``
``output.partial`` / ``output.done``  ``data-output`` with the fixed id ``output`` (replaced in place)
``refusal.delta`` / ``.done``         ``data-refusal`` with the fixed id ``refusal`` (the text so far)
``usage``                             ``message-metadata`` ``{usage: {prompt_tokens, ...}}``
``run.snapshot``                      what the events it stands for would have given, as one block each
``run.completed``                     ``finish`` (``finishReason`` in the SDK's words)
``run.failed``                        ``error`` (``errorText``: ``code: message``), then ``finish``
                                      (``error``, metadata ``{error: {code, message}}``)
``run.cancelled``                     ``abort``
====================================  ==============================================================

A text or reasoning block is open until its ``*.done``, the end of the step, or a block of the
other kind begins (reasoning that resumes after text is a new reasoning part, as the model said it).
"""

from __future__ import annotations

from typing import Any, Literal

import msgspec

from service.events import (
    AnyEvent,
    OutputDone,
    OutputPartial,
    ReasoningDelta,
    ReasoningDone,
    RefusalDelta,
    RefusalDone,
    RunCancelled,
    RunCompleted,
    RunFailed,
    RunSnapshot,
    RunStarted,
    StepDone,
    StepStarted,
    TextDelta,
    TextDone,
    ToolCallDelta,
    ToolCallDone,
    ToolCallStarted,
    ToolResult,
    Usage,
)

UI_STREAM_HEADERS = {"x-vercel-ai-ui-message-stream": "v1"}
DONE_FRAME = b"data: [DONE]\n\n"
OUTPUT_PART_ID = "output"
REFUSAL_PART_ID = "refusal"

FinishReason = Literal["stop", "length", "content-filter", "tool-calls", "error", "other"]
_FINISH_REASONS: dict[str, FinishReason] = {
    "stop": "stop",
    "length": "length",
    "content_filter": "content-filter",
    "tool_calls": "tool-calls",
}


class UiPart(msgspec.Struct, tag_field="type", rename="camel", omit_defaults=True, frozen=True, gc=False):
    """One part of the UI message stream; field names are the protocol's (camelCase)."""


class UiStart(UiPart, tag="start", frozen=True):
    """The assistant message begins: ``messageId`` is the id the service stores the answer under."""

    message_id: str | None = None
    message_metadata: dict[str, Any] | None = None


class UiStartStep(UiPart, tag="start-step", frozen=True):
    """A step (one request to the model) begins."""


class UiFinishStep(UiPart, tag="finish-step", frozen=True):
    """The step's model turn ended."""


class UiTextStart(UiPart, tag="text-start", frozen=True):
    """A text part begins."""

    id: str


class UiTextDelta(UiPart, tag="text-delta", frozen=True):
    """More text of the part ``id``."""

    id: str
    delta: str


class UiTextEnd(UiPart, tag="text-end", frozen=True):
    """The text part ``id`` is complete."""

    id: str


class UiReasoningStart(UiPart, tag="reasoning-start", frozen=True):
    """A reasoning part begins."""

    id: str


class UiReasoningDelta(UiPart, tag="reasoning-delta", frozen=True):
    """More reasoning of the part ``id``."""

    id: str
    delta: str


class UiReasoningEnd(UiPart, tag="reasoning-end", frozen=True):
    """The reasoning part ``id`` is complete."""

    id: str


class UiToolInputStart(UiPart, tag="tool-input-start", frozen=True):
    """The model began a call of ``toolName`` (the service runs it)."""

    tool_call_id: str
    tool_name: str


class UiToolInputDelta(UiPart, tag="tool-input-delta", frozen=True):
    """More of the call's argument text."""

    tool_call_id: str
    input_text_delta: str


class UiToolInputAvailable(UiPart, tag="tool-input-available", frozen=True):
    """The call's complete arguments."""

    tool_call_id: str
    tool_name: str
    input: Any


class UiToolInputError(UiPart, tag="tool-input-error", frozen=True):
    """The call's arguments are not a JSON object (``input`` is their text); the call is not run."""

    tool_call_id: str
    tool_name: str
    input: Any
    error_text: str


class UiToolOutputAvailable(UiPart, tag="tool-output-available", frozen=True):
    """What the tool returned."""

    tool_call_id: str
    output: Any


class UiToolOutputError(UiPart, tag="tool-output-error", frozen=True):
    """Why the tool failed."""

    tool_call_id: str
    error_text: str


class UiDataOutput(UiPart, tag="data-output", frozen=True):
    """Structured output so far (final once the run completes); the same ``id`` replaces the part in place."""

    id: str
    data: Any


class UiDataRefusal(UiPart, tag="data-refusal", frozen=True):
    """The model's refusal so far; the same ``id`` replaces the part in place."""

    id: str
    data: str


class UiMessageMetadata(UiPart, tag="message-metadata", frozen=True):
    """Metadata merged into the message's (``usage`` here)."""

    message_metadata: dict[str, Any]


class UiError(UiPart, tag="error", frozen=True):
    """The run failed (the SDK calls ``onError``)."""

    error_text: str


class UiAbort(UiPart, tag="abort", frozen=True):
    """The run was cancelled (a stop)."""

    reason: str | None = None


class UiFinish(UiPart, tag="finish", frozen=True):
    """The message is complete."""

    finish_reason: FinishReason | None = None
    message_metadata: dict[str, Any] | None = None


AnyUiPart = (
    UiStart
    | UiStartStep
    | UiFinishStep
    | UiTextStart
    | UiTextDelta
    | UiTextEnd
    | UiReasoningStart
    | UiReasoningDelta
    | UiReasoningEnd
    | UiToolInputStart
    | UiToolInputDelta
    | UiToolInputAvailable
    | UiToolInputError
    | UiToolOutputAvailable
    | UiToolOutputError
    | UiDataOutput
    | UiDataRefusal
    | UiMessageMetadata
    | UiError
    | UiAbort
    | UiFinish
)

_encoder = msgspec.json.Encoder()


def ui_frame(part: UiPart) -> bytes:
    """One part as an SSE ``data`` line (msgspec writes no raw newline inside JSON)."""
    return b"data: %s\n\n" % _encoder.encode(part)


class UiStreamTranslator:
    """Turns one run's events, in order, into UI message stream parts; see the module docstring."""

    def __init__(self) -> None:
        self._open: tuple[Literal["text", "reasoning"], str] | None = None
        """The open text or reasoning block: its kind and part id."""
        self._blocks = 0
        self._refusal: list[str] = []
        self._started = False

    def parts(self, event: AnyEvent) -> list[AnyUiPart]:  # noqa: C901 - one case per event type
        """The parts ``event`` gives (none for events the protocol has no part for)."""
        match event:
            case TextDelta(delta=delta):
                return [*self._block("text"), UiTextDelta(self._block_id(), delta)]
            case ReasoningDelta(delta=delta):
                return [*self._block("reasoning"), UiReasoningDelta(self._block_id(), delta)]
            case TextDone() | ReasoningDone():
                return self._close("text" if isinstance(event, TextDone) else "reasoning")
            case ToolCallDelta():
                return [UiToolInputDelta(event.call_id, event.arguments_delta)]
            case ToolCallStarted():
                return [UiToolInputStart(event.call_id, event.name)]
            case ToolCallDone():
                return [_tool_input(event)]
            case ToolResult():
                return [_tool_output(event.call_id, event.output, event.is_error)]
            case OutputPartial(partial=value) | OutputDone(output=value):
                return [UiDataOutput(OUTPUT_PART_ID, value)]
            case RefusalDelta(delta=delta):
                self._refusal.append(delta)
                return [UiDataRefusal(REFUSAL_PART_ID, "".join(self._refusal))]
            case RefusalDone(refusal=refusal):
                self._refusal = [refusal]
                return [UiDataRefusal(REFUSAL_PART_ID, refusal)]
            case Usage():
                return [UiMessageMetadata({"usage": _usage(event)})]
            case StepStarted():
                return [*self._close(), UiStartStep()]
            case StepDone():
                return [*self._close(), UiFinishStep()]
            case RunStarted():
                return self._start(event.message_id, _metadata(event.run_id, event.chat_id, event.model))
            case RunSnapshot():
                return self._snapshot(event)
            case RunCompleted(finish_reason=reason):
                return [*self._close(), UiFinish(_FINISH_REASONS.get(reason, "other"))]
            case RunFailed(error=error):
                failure = {"error": {"code": error.code, "message": error.message}}
                return [*self._close(), UiError(f"{error.code}: {error.message}"), UiFinish("error", failure)]
            case RunCancelled(reason=reason):
                return [*self._close(), UiAbort(reason)]
            case _:
                return []

    def _start(self, message_id: str | None, metadata: dict[str, Any]) -> list[AnyUiPart]:
        if self._started:
            return []
        self._started = True
        return [UiStart(message_id, metadata)]

    def _block_id(self) -> str:
        assert self._open is not None  # noqa: S101 - _block opened it
        return self._open[1]

    def _block(self, kind: Literal["text", "reasoning"]) -> list[AnyUiPart]:
        """The parts that make ``kind`` the open block (none when it is already)."""
        if self._open is not None and self._open[0] == kind:
            return []
        closed = self._close()
        self._blocks += 1
        self._open = (kind, f"{kind}-{self._blocks}")
        return [*closed, UiTextStart(self._open[1]) if kind == "text" else UiReasoningStart(self._open[1])]

    def _close(self, kind: Literal["text", "reasoning"] | None = None) -> list[AnyUiPart]:
        """End the open block (only if it is of ``kind``, when given)."""
        if self._open is None or (kind is not None and self._open[0] != kind):
            return []
        open_kind, part_id = self._open
        self._open = None
        return [UiTextEnd(part_id) if open_kind == "text" else UiReasoningEnd(part_id)]

    def _snapshot(self, snapshot: RunSnapshot) -> list[AnyUiPart]:
        """The run so far, as the parts of its events would have built it (one block per kind)."""
        metadata = _metadata(snapshot.run_id, snapshot.chat_id, snapshot.model)
        parts: list[AnyUiPart] = [*self._start(snapshot.message_id, metadata), UiStartStep()]
        if snapshot.reasoning:
            parts += [*self._block("reasoning"), UiReasoningDelta(self._block_id(), snapshot.reasoning), *self._close()]
        for call in snapshot.tool_calls:
            parts += [UiToolInputStart(call.call_id, call.name), UiToolInputDelta(call.call_id, call.arguments)]
            if call.done:
                done = ToolCallDone(
                    run_id=snapshot.run_id,
                    call_id=call.call_id,
                    name=call.name,
                    arguments=call.arguments,
                    parsed=call.parsed,
                )
                parts.append(_tool_input(done))
        parts += [_tool_output(r.call_id, r.output, r.is_error) for r in snapshot.tool_results]
        if snapshot.output is not None:
            parts.append(UiDataOutput(OUTPUT_PART_ID, snapshot.output))
        if snapshot.refusal:
            self._refusal = [snapshot.refusal]
            parts.append(UiDataRefusal(REFUSAL_PART_ID, snapshot.refusal))
        if snapshot.usage is not None:
            parts.append(UiMessageMetadata({"usage": msgspec.structs.asdict(snapshot.usage)}))
        if snapshot.text:  # left open: the run's next text deltas continue it
            parts += [*self._block("text"), UiTextDelta(self._block_id(), snapshot.text)]
        return parts


def _tool_input(call: ToolCallDone) -> AnyUiPart:
    if call.parsed is None:
        error = "the arguments are not a valid JSON object; the tool was not run"
        return UiToolInputError(call.call_id, call.name, call.arguments, error)
    return UiToolInputAvailable(call.call_id, call.name, call.parsed)


def _tool_output(call_id: str, output: str, is_error: bool) -> AnyUiPart:
    return UiToolOutputError(call_id, output) if is_error else UiToolOutputAvailable(call_id, output)


def _metadata(run_id: str, chat_id: str | None, model: str | None) -> dict[str, Any]:
    return {"run_id": run_id, "chat_id": chat_id, "model": model}


def _usage(event: Usage) -> dict[str, int]:
    return {
        "prompt_tokens": event.prompt_tokens,
        "completion_tokens": event.completion_tokens,
        "total_tokens": event.total_tokens,
    }
