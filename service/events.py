"""The event contract: one tagged union, encoded once.

Every event carries ``run_id`` and ``seq``. ``seq`` is stamped by the run log
when the event is appended (``msgspec.structs.replace``); the engine yields
events with ``seq=0``. Event type names are API: add, never rename.

Clients must ignore event types they do not know.
"""

from __future__ import annotations

from typing import Any, Literal

import msgspec

ErrorCode = Literal[
    "upstream_error",
    "rate_limited",
    "length_exceeded",
    "content_filter",
    "timeout",
    "invalid_output",
    "tool_rounds_exceeded",
    "owner_lost",
    "interrupted",
    "store_unavailable",
    "runs_unavailable",
    "not_found",
    "internal",
]


class Event(msgspec.Struct, tag_field="type", kw_only=True, frozen=True, gc=False):
    """Base of every event: the run it belongs to and its position in the run's log.

    ``gc=False``: events hold only JSON-like values, so they can never be part of a reference
    cycle; untracked, the thousands kept in run logs cost the cyclic GC nothing.
    """

    run_id: str
    seq: int = 0


class RunStarted(Event, tag="run.started", frozen=True):
    """The run began; ``model`` is the resolved model id, ``message_id`` the id its answer will be stored under."""

    chat_id: str
    model: str
    created_at: float
    message_id: str | None = None


class StepStarted(Event, tag="step.started", frozen=True):
    """A step of the tool loop began: one request to the model (``step`` counts them from 1).

    A run has one step per model turn: the first answers the user; each later one answers the
    results of the tools the step before it called.
    """

    step: int


class StepDone(Event, tag="step.done", frozen=True):
    """The model's turn of this step ended, with its ``finish_reason`` (``tool_calls``: results follow).

    It follows the step's closing events (``text.done``, ``tool_call.done`` …); the ``tool.result``
    events of the step's calls come after it, before the next ``step.started``. A step cut short
    (a failure, a cancel) has no ``step.done``.
    """

    step: int
    finish_reason: str


class TextDelta(Event, tag="text.delta", frozen=True):
    """A piece of the assistant's answer."""

    delta: str


class TextDone(Event, tag="text.done", frozen=True):
    """The assistant's full answer text for this model turn."""

    text: str


class ReasoningDelta(Event, tag="reasoning.delta", frozen=True):
    """A piece of reasoning, when the upstream sends it."""

    delta: str


class ReasoningDone(Event, tag="reasoning.done", frozen=True):
    """The full reasoning of this model turn (sent when the turn had any)."""

    text: str


class ToolCallStarted(Event, tag="tool_call.started", frozen=True):
    """The model began a tool call."""

    call_id: str
    name: str


class ToolCallDelta(Event, tag="tool_call.delta", frozen=True):
    """More argument text; `parsed` is the partial object parsed so far (null until one parses)."""

    call_id: str
    arguments_delta: str
    parsed: dict[str, Any] | None = None


class ToolCallDone(Event, tag="tool_call.done", frozen=True):
    """The full arguments string and the validated object.

    ``parsed`` is None when the arguments are not a valid JSON object; the call
    is then not run and its ``tool.result`` is an error the model sees.
    """

    call_id: str
    name: str
    arguments: str
    parsed: dict[str, Any] | None = None


class ToolResult(Event, tag="tool.result", frozen=True):
    """What a tool returned (or why it failed, with ``is_error``)."""

    call_id: str
    name: str
    output: str
    is_error: bool = False


class OutputPartial(Event, tag="output.partial", frozen=True):
    """Structured output: the partial object parsed from the text so far."""

    partial: Any


class OutputDone(Event, tag="output.done", frozen=True):
    """Structured output: the final object, validated against the schema."""

    output: Any


class RefusalDelta(Event, tag="refusal.delta", frozen=True):
    """A piece of a refusal."""

    delta: str


class RefusalDone(Event, tag="refusal.done", frozen=True):
    """The full refusal."""

    refusal: str


class Usage(Event, tag="usage", frozen=True):
    """Token usage reported by the upstream, summed over the run's model turns."""

    prompt_tokens: int
    completion_tokens: int
    total_tokens: int


class TokenUsage(msgspec.Struct, frozen=True, gc=False):
    """Token counts (as in ``usage``)."""

    prompt_tokens: int
    completion_tokens: int
    total_tokens: int


class SnapshotToolCall(msgspec.Struct, frozen=True, gc=False):
    """A tool call as far as the run got: its arguments so far, complete once ``done``."""

    call_id: str
    name: str
    arguments: str = ""
    parsed: dict[str, Any] | None = None
    """The latest parsed arguments (partial until ``done``; null when they do not parse)."""
    done: bool = False


class SnapshotToolResult(msgspec.Struct, frozen=True, gc=False):
    """A tool's result (as in ``tool.result``)."""

    call_id: str
    name: str
    output: str
    is_error: bool = False


class RunSnapshot(Event, tag="run.snapshot", frozen=True):
    """The run's accumulated state through ``seq``: what a client that read every event up to it has built.

    Sent in place of the events up to ``seq`` to a reader whose cursor is older than the events the
    service still keeps, or who asked for it (``snapshot=true``); the events after ``seq`` follow, and a
    reconnect resumes after ``seq`` as after any event. ``text``, ``reasoning`` and ``refusal`` are the
    run's deltas concatenated (over all its model turns); ``tool_calls`` are in the order they started,
    ``tool_results`` in the order they came; ``output`` is the latest structured output (final once
    ``output_done``); ``usage`` the latest usage; ``chat_id``, ``model``, ``created_at`` and ``message_id``
    are what ``run.started`` said. A client replaces what it had built with this.
    """

    chat_id: str | None = None
    model: str | None = None
    created_at: float | None = None
    message_id: str | None = None
    text: str = ""
    reasoning: str = ""
    refusal: str = ""
    tool_calls: list[SnapshotToolCall] = msgspec.field(default_factory=list[SnapshotToolCall])
    tool_results: list[SnapshotToolResult] = msgspec.field(default_factory=list[SnapshotToolResult])
    output: Any = None
    output_done: bool = False
    usage: TokenUsage | None = None


class RunCompleted(Event, tag="run.completed", frozen=True):
    """Terminal: the model finished; the answer is stored as ``message_id``."""

    finish_reason: str
    message_id: str | None = None


class RunCancelled(Event, tag="run.cancelled", frozen=True):
    """Terminal: the run was stopped; the partial answer is stored as ``message_id``."""

    reason: str
    message_id: str | None = None


class ErrorInfo(msgspec.Struct, frozen=True, gc=False):
    """A typed failure."""

    code: ErrorCode
    message: str


class RunFailed(Event, tag="run.failed", frozen=True):
    """Terminal: the run failed; any partial answer is stored as ``message_id``."""

    error: ErrorInfo
    message_id: str | None = None


AnyEvent = (
    RunStarted
    | StepStarted
    | StepDone
    | TextDelta
    | TextDone
    | ReasoningDelta
    | ReasoningDone
    | ToolCallStarted
    | ToolCallDelta
    | ToolCallDone
    | ToolResult
    | OutputPartial
    | OutputDone
    | RefusalDelta
    | RefusalDone
    | Usage
    | RunSnapshot
    | RunCompleted
    | RunCancelled
    | RunFailed
)
TERMINAL_TYPES = (RunCompleted, RunCancelled, RunFailed)

_encoder = msgspec.json.Encoder()
_event_decoder = msgspec.json.Decoder(AnyEvent)


def is_terminal(event: Event) -> bool:
    """Whether ``event`` ends its run."""
    return isinstance(event, TERMINAL_TYPES)


def encode_json(obj: object) -> bytes:
    """Encode an event (or any msgspec-encodable value) to JSON bytes."""
    return _encoder.encode(obj)


def decode_event(data: bytes | str) -> AnyEvent:
    """Decode one event from its JSON form."""
    return _event_decoder.decode(data)


def sse_frame(event: Event) -> bytes:
    """Frame one event for Server-Sent Events: ``id`` is the seq, the JSON is one ``data`` line.

    msgspec never writes a raw newline inside JSON, so a single ``data:`` line is always valid.
    """
    return b"id: %d\ndata: %s\n\n" % (event.seq, _encoder.encode(event))


def ws_frame(obj: object) -> str:
    """Frame an event (or a server frame) as WebSocket text."""
    return _encoder.encode(obj).decode()
