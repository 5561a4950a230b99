"""SnapshotFold: a run's events folded into the state a client builds from them (decision 47)."""

from __future__ import annotations

import msgspec

from service.events import (
    AnyEvent,
    OutputDone,
    OutputPartial,
    ReasoningDelta,
    ReasoningDone,
    RefusalDelta,
    RunCompleted,
    RunStarted,
    SnapshotToolCall,
    SnapshotToolResult,
    StepDone,
    StepStarted,
    TextDelta,
    TextDone,
    TokenUsage,
    ToolCallDelta,
    ToolCallDone,
    ToolCallStarted,
    ToolResult,
    Usage,
)
from service.runs.snapshot import BLOCK, SnapshotFold

RUN = "r1"


def stamped(events: list[AnyEvent]) -> list[AnyEvent]:
    return [msgspec.structs.replace(e, seq=i) for i, e in enumerate(events, start=1)]


EVENTS = stamped(
    [
        RunStarted(run_id=RUN, chat_id="c1", model="m", created_at=1.5, message_id="m1"),
        StepStarted(run_id=RUN, step=1),
        ReasoningDelta(run_id=RUN, delta="hm"),
        ReasoningDone(run_id=RUN, text="hm"),
        TextDelta(run_id=RUN, delta="Let me "),
        ToolCallStarted(run_id=RUN, call_id="a", name="add"),
        ToolCallDelta(run_id=RUN, call_id="a", arguments_delta='{"x": ', parsed=None),
        ToolCallStarted(run_id=RUN, call_id="b", name="echo"),
        ToolCallDelta(run_id=RUN, call_id="a", arguments_delta="1}", parsed={"x": 1}),
        ToolCallDelta(run_id=RUN, call_id="b", arguments_delta='{"t"', parsed=None),
        ToolCallDone(run_id=RUN, call_id="a", name="add", arguments='{"x": 1}', parsed={"x": 1}),
        StepDone(run_id=RUN, step=1, finish_reason="tool_calls"),
        ToolResult(run_id=RUN, call_id="a", name="add", output="2"),
        StepStarted(run_id=RUN, step=2),
        TextDelta(run_id=RUN, delta="check."),
        TextDone(run_id=RUN, text="check."),
        OutputPartial(run_id=RUN, partial={"n": 1}),
        RefusalDelta(run_id=RUN, delta="no"),
        Usage(run_id=RUN, prompt_tokens=1, completion_tokens=2, total_tokens=3),
    ]
)


def folded(events: list[AnyEvent], base: SnapshotFold | None = None) -> SnapshotFold:
    fold = base or SnapshotFold()
    for event in events:
        fold.add(event)
    return fold


def test_the_fold_is_what_a_client_builds_from_the_events() -> None:
    snapshot = folded(EVENTS).event(RUN, len(EVENTS))
    started = (snapshot.run_id, snapshot.seq, snapshot.chat_id, snapshot.model, snapshot.created_at)
    assert (*started, snapshot.message_id) == (RUN, len(EVENTS), "c1", "m", 1.5, "m1")
    assert (snapshot.text, snapshot.reasoning, snapshot.refusal) == ("Let me check.", "hm", "no")
    assert snapshot.tool_calls == [
        SnapshotToolCall("a", "add", '{"x": 1}', {"x": 1}, done=True),
        SnapshotToolCall("b", "echo", '{"t"', None, done=False),
    ]
    assert snapshot.tool_results == [SnapshotToolResult("a", "add", "2")]
    assert (snapshot.output, snapshot.output_done) == ({"n": 1}, False)
    assert snapshot.usage == TokenUsage(1, 2, 3)


def test_a_fold_started_from_a_snapshot_equals_the_fold_of_every_event() -> None:
    for cut in range(len(EVENTS) + 1):
        base = folded(EVENTS[:cut]).event(RUN, cut)
        whole = folded(EVENTS).event(RUN, len(EVENTS))
        assert folded(EVENTS[cut:], SnapshotFold(base)).event(RUN, len(EVENTS)) == whole, cut


def test_final_output_and_unknown_or_terminal_events() -> None:
    fold = folded([OutputPartial(run_id=RUN, partial={"a": 1}), OutputDone(run_id=RUN, output={"a": 2})])
    before = fold.event(RUN, 2)
    fold.add(RunCompleted(run_id=RUN, finish_reason="stop"))
    assert fold.event(RUN, 2) == before
    assert (before.output, before.output_done, before.text, before.tool_calls) == ({"a": 2}, True, "", [])


def test_the_empty_snapshot() -> None:
    snapshot = SnapshotFold().event(RUN, 0)
    assert (snapshot.seq, snapshot.chat_id, snapshot.text, snapshot.usage) == (0, None, "", None)


def test_a_long_run_s_deltas_are_held_joined_in_blocks() -> None:
    """A memory backend's base folds every dropped delta: it keeps the text, not one object per delta."""
    deltas = [f"d{i} " for i in range(10 * BLOCK + 3)]
    fold = folded([TextDelta(run_id=RUN, seq=i, delta=d) for i, d in enumerate(deltas, start=1)])
    held = fold._text  # pyright: ignore[reportPrivateUsage]
    assert (len(held.blocks), len(held.recent)) == (10, 3)
    assert fold.event(RUN, len(deltas)).text == "".join(deltas)
