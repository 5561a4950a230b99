"""A run's events folded into its ``run.snapshot``: the state a client builds from them (decision 47).

A client that reads a run's events from seq 1 concatenates the text, reasoning and refusal deltas,
collects tool calls (with their arguments so far) and results, keeps the latest structured output
and usage (``*.done`` events and the step boundaries add nothing the deltas did not say).
:class:`SnapshotFold` builds the same from the events and renders it as a
:class:`~service.events.RunSnapshot` at the seq of the last event it took; it can start from an
earlier snapshot, so a backend keeps only a base (the memory backend: the events it dropped; Redis:
one snapshot every half of the per-run cap) and a reader folds the kept events after it.

Terminal events are never folded: they follow the snapshot, so a reader still ends on one. Deltas
are kept joined in blocks of :data:`BLOCK`, so a fold holds a long run's text, not one object per delta.
"""

from __future__ import annotations

from typing import Any

from service.events import (
    AnyEvent,
    OutputDone,
    OutputPartial,
    ReasoningDelta,
    RefusalDelta,
    RunSnapshot,
    RunStarted,
    SnapshotToolCall,
    SnapshotToolResult,
    TextDelta,
    TokenUsage,
    ToolCallDelta,
    ToolCallDone,
    ToolCallStarted,
    ToolResult,
    Usage,
)

BLOCK = 64
"""Deltas joined into one string at a time (a memory backend's base folds every dropped event)."""


class _Joined:
    """Strings appended one by one and kept joined in blocks of :data:`BLOCK`."""

    __slots__ = ("blocks", "recent")

    def __init__(self, text: str = "") -> None:
        self.blocks = [text] if text else []
        self.recent: list[str] = []

    def append(self, piece: str) -> None:
        self.recent.append(piece)
        if len(self.recent) >= BLOCK:
            self.blocks.append("".join(self.recent))
            self.recent = []

    def value(self) -> str:
        return "".join(self.blocks) + "".join(self.recent)


class _Call:
    __slots__ = ("arguments", "done", "name", "parsed")

    def __init__(
        self, name: str, arguments: str = "", parsed: dict[str, Any] | None = None, done: bool = False
    ) -> None:
        self.name = name
        self.arguments = _Joined(arguments)
        self.parsed = parsed
        self.done = done


class SnapshotFold:
    """Folds events into a run's accumulated state; see the module docstring."""

    def __init__(self, base: RunSnapshot | None = None) -> None:
        self.chat_id = base.chat_id if base else None
        self.model = base.model if base else None
        self.created_at = base.created_at if base else None
        self.message_id = base.message_id if base else None
        self._text = _Joined(base.text if base else "")
        self._reasoning = _Joined(base.reasoning if base else "")
        self._refusal = _Joined(base.refusal if base else "")
        self._calls: dict[str, _Call] = {}
        for call in base.tool_calls if base else ():
            self._calls[call.call_id] = _Call(call.name, call.arguments, call.parsed, call.done)
        self._results = list(base.tool_results) if base else []
        self._output: Any = base.output if base else None
        self._output_done = base.output_done if base else False
        self._usage = base.usage if base else None

    def add(self, event: AnyEvent) -> None:  # noqa: C901 - one case per event type
        """Take one event into account (types it does not know change nothing)."""
        match event:
            case TextDelta(delta=delta):
                self._text.append(delta)
            case ReasoningDelta(delta=delta):
                self._reasoning.append(delta)
            case RefusalDelta(delta=delta):
                self._refusal.append(delta)
            case ToolCallStarted(call_id=call_id, name=name):
                self._calls[call_id] = _Call(name)
            case ToolCallDelta(call_id=call_id):
                call = self._calls.setdefault(call_id, _Call(""))
                call.arguments.append(event.arguments_delta)
                if event.parsed is not None:
                    call.parsed = event.parsed
            case ToolCallDone(call_id=call_id):
                self._calls[call_id] = _Call(event.name, event.arguments, event.parsed, done=True)
            case ToolResult():
                self._results.append(SnapshotToolResult(event.call_id, event.name, event.output, event.is_error))
            case OutputPartial(partial=partial):
                self._output = partial
            case OutputDone(output=output):
                self._output, self._output_done = output, True
            case Usage():
                self._usage = TokenUsage(event.prompt_tokens, event.completion_tokens, event.total_tokens)
            case RunStarted():
                self.chat_id, self.model, self.created_at = event.chat_id, event.model, event.created_at
                self.message_id = event.message_id
            case _:
                pass

    def event(self, run_id: str, seq: int) -> RunSnapshot:
        """The state as a ``run.snapshot`` standing for the run's events through ``seq``."""
        return RunSnapshot(
            run_id=run_id,
            seq=seq,
            chat_id=self.chat_id,
            model=self.model,
            created_at=self.created_at,
            message_id=self.message_id,
            text=self._text.value(),
            reasoning=self._reasoning.value(),
            refusal=self._refusal.value(),
            tool_calls=[
                SnapshotToolCall(call_id, call.name, call.arguments.value(), call.parsed, call.done)
                for call_id, call in self._calls.items()
            ],
            tool_results=list(self._results),
            output=self._output,
            output_done=self._output_done,
            usage=self._usage,
        )
