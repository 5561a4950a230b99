"""UiStreamTranslator: a run's events as the AI SDK's UI message stream parts, event by event."""

from __future__ import annotations

from typing import Any

import msgspec

from service.api.ui_stream import AnyUiPart, UiStreamTranslator, ui_frame
from service.events import (
    AnyEvent,
    ErrorInfo,
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

RUN = "r1"
STARTED = RunStarted(run_id=RUN, chat_id="c1", model="demo", created_at=1.0, message_id="m1")
START = {"type": "start", "messageId": "m1", "messageMetadata": {"run_id": RUN, "chat_id": "c1", "model": "demo"}}

TOOL_RUN: list[AnyEvent] = [
    STARTED,
    StepStarted(run_id=RUN, step=1),
    ReasoningDelta(run_id=RUN, delta="hm"),
    TextDelta(run_id=RUN, delta="Let me look."),
    ToolCallStarted(run_id=RUN, call_id="c_a", name="clock"),
    ToolCallDelta(run_id=RUN, call_id="c_a", arguments_delta='{"tz": '),
    ToolCallDelta(run_id=RUN, call_id="c_a", arguments_delta='"UTC"}', parsed={"tz": "UTC"}),
    ToolCallStarted(run_id=RUN, call_id="c_b", name="calculator"),
    ToolCallDelta(run_id=RUN, call_id="c_b", arguments_delta="{1"),
    TextDone(run_id=RUN, text="Let me look."),
    ToolCallDone(run_id=RUN, call_id="c_a", name="clock", arguments='{"tz": "UTC"}', parsed={"tz": "UTC"}),
    ToolCallDone(run_id=RUN, call_id="c_b", name="calculator", arguments="{1", parsed=None),
    StepDone(run_id=RUN, step=1, finish_reason="tool_calls"),
    ToolResult(run_id=RUN, call_id="c_a", name="clock", output='{"time": "noon"}'),
    ToolResult(run_id=RUN, call_id="c_b", name="calculator", output="not a JSON object", is_error=True),
    StepStarted(run_id=RUN, step=2),
    TextDelta(run_id=RUN, delta="It is "),
    TextDelta(run_id=RUN, delta="noon."),
    TextDone(run_id=RUN, text="It is noon."),
    StepDone(run_id=RUN, step=2, finish_reason="stop"),
    Usage(run_id=RUN, prompt_tokens=3, completion_tokens=4, total_tokens=7),
    RunCompleted(run_id=RUN, finish_reason="stop", message_id="m1"),
]
TYPED_RUN: list[AnyEvent] = [
    STARTED,
    StepStarted(run_id=RUN, step=1),
    TextDelta(run_id=RUN, delta='{"n": '),
    OutputPartial(run_id=RUN, partial={}),
    TextDelta(run_id=RUN, delta="4}"),
    OutputPartial(run_id=RUN, partial={"n": 4}),
    TextDone(run_id=RUN, text='{"n": 4}'),
    OutputDone(run_id=RUN, output={"n": 4}),
    StepDone(run_id=RUN, step=1, finish_reason="stop"),
    RunCompleted(run_id=RUN, finish_reason="stop"),
]
REFUSED_AND_FAILED: list[AnyEvent] = [
    STARTED,
    StepStarted(run_id=RUN, step=1),
    RefusalDelta(run_id=RUN, delta="I can't "),
    RefusalDelta(run_id=RUN, delta="help."),
    RefusalDone(run_id=RUN, refusal="I can't help."),
    StepDone(run_id=RUN, step=1, finish_reason="length"),
    RunFailed(run_id=RUN, error=ErrorInfo("length_exceeded", "cut off")),
]
SNAPSHOT_THEN_CANCEL: list[AnyEvent] = [
    RunSnapshot(
        run_id=RUN,
        seq=9,
        chat_id="c1",
        model="demo",
        message_id="m1",
        text="So far",
        reasoning="hm",
        refusal="no",
        tool_calls=[
            SnapshotToolCall("c_a", "clock", "{}", {}, done=True),
            SnapshotToolCall("c_b", "clock", '{"t', None),
        ],
        tool_results=[SnapshotToolResult("c_a", "clock", "noon")],
        output={"n": 1},
        usage=TokenUsage(1, 2, 3),
    ),
    TextDelta(run_id=RUN, delta=" and on"),
    ReasoningDelta(run_id=RUN, delta="again"),
    ReasoningDone(run_id=RUN, text="again"),
    RunCancelled(run_id=RUN, reason="cancelled by the client"),
]
ALL_RUNS = [TOOL_RUN, TYPED_RUN, REFUSED_AND_FAILED, SNAPSHOT_THEN_CANCEL]
"""Runs that between them give every kind of part (the e2e test checks each against the SDK's schema)."""


def usage(prompt: int, completion: int) -> dict[str, int]:
    return {"prompt_tokens": prompt, "completion_tokens": completion, "total_tokens": prompt + completion}


def parts(events: list[AnyEvent]) -> list[dict[str, Any]]:
    translator = UiStreamTranslator()
    return [msgspec.to_builtins(p) for e in events for p in translator.parts(e)]


def test_a_tool_loop_maps_to_steps_blocks_tool_parts_and_finish() -> None:
    assert parts(TOOL_RUN) == [
        START,
        {"type": "start-step"},
        {"type": "reasoning-start", "id": "reasoning-1"},
        {"type": "reasoning-delta", "id": "reasoning-1", "delta": "hm"},
        {"type": "reasoning-end", "id": "reasoning-1"},  # the text that follows ends the reasoning block
        {"type": "text-start", "id": "text-2"},
        {"type": "text-delta", "id": "text-2", "delta": "Let me look."},
        {"type": "tool-input-start", "toolCallId": "c_a", "toolName": "clock"},
        {"type": "tool-input-delta", "toolCallId": "c_a", "inputTextDelta": '{"tz": '},
        {"type": "tool-input-delta", "toolCallId": "c_a", "inputTextDelta": '"UTC"}'},
        {"type": "tool-input-start", "toolCallId": "c_b", "toolName": "calculator"},
        {"type": "tool-input-delta", "toolCallId": "c_b", "inputTextDelta": "{1"},
        {"type": "text-end", "id": "text-2"},
        {"type": "tool-input-available", "toolCallId": "c_a", "toolName": "clock", "input": {"tz": "UTC"}},
        {
            "type": "tool-input-error",
            "toolCallId": "c_b",
            "toolName": "calculator",
            "input": "{1",
            "errorText": "the arguments are not a valid JSON object; the tool was not run",
        },
        {"type": "finish-step"},
        {"type": "tool-output-available", "toolCallId": "c_a", "output": '{"time": "noon"}'},
        {"type": "tool-output-error", "toolCallId": "c_b", "errorText": "not a JSON object"},
        {"type": "start-step"},
        {"type": "text-start", "id": "text-3"},
        {"type": "text-delta", "id": "text-3", "delta": "It is "},
        {"type": "text-delta", "id": "text-3", "delta": "noon."},
        {"type": "text-end", "id": "text-3"},
        {"type": "finish-step"},
        {"type": "message-metadata", "messageMetadata": {"usage": usage(3, 4)}},
        {"type": "finish", "finishReason": "stop"},
    ]  # fmt: skip


def test_structured_output_is_one_data_part_replaced_in_place() -> None:
    data = [p for p in parts(TYPED_RUN) if p["type"].startswith("data-")]
    assert data == [
        {"type": "data-output", "id": "output", "data": {}},
        {"type": "data-output", "id": "output", "data": {"n": 4}},
        {"type": "data-output", "id": "output", "data": {"n": 4}},
    ]
    assert [p["type"] for p in parts(TYPED_RUN)].count("text-delta") == 2  # the JSON text streams as well


def test_a_refusal_is_a_data_part_and_a_failure_is_an_error_then_finish() -> None:
    assert parts(REFUSED_AND_FAILED)[2:] == [
        {"type": "data-refusal", "id": "refusal", "data": "I can't "},
        {"type": "data-refusal", "id": "refusal", "data": "I can't help."},
        {"type": "data-refusal", "id": "refusal", "data": "I can't help."},
        {"type": "finish-step"},
        {"type": "error", "errorText": "length_exceeded: cut off"},
        {
            "type": "finish",
            "finishReason": "error",
            "messageMetadata": {"error": {"code": "length_exceeded", "message": "cut off"}},
        },
    ]


def test_a_snapshot_gives_the_state_so_far_and_the_tail_continues_it() -> None:
    assert parts(SNAPSHOT_THEN_CANCEL) == [
        START,
        {"type": "start-step"},
        {"type": "reasoning-start", "id": "reasoning-1"},
        {"type": "reasoning-delta", "id": "reasoning-1", "delta": "hm"},
        {"type": "reasoning-end", "id": "reasoning-1"},
        {"type": "tool-input-start", "toolCallId": "c_a", "toolName": "clock"},
        {"type": "tool-input-delta", "toolCallId": "c_a", "inputTextDelta": "{}"},
        {"type": "tool-input-available", "toolCallId": "c_a", "toolName": "clock", "input": {}},
        {"type": "tool-input-start", "toolCallId": "c_b", "toolName": "clock"},
        {"type": "tool-input-delta", "toolCallId": "c_b", "inputTextDelta": '{"t'},
        {"type": "tool-output-available", "toolCallId": "c_a", "output": "noon"},
        {"type": "data-output", "id": "output", "data": {"n": 1}},
        {"type": "data-refusal", "id": "refusal", "data": "no"},
        {"type": "message-metadata", "messageMetadata": {"usage": usage(1, 2)}},
        {"type": "text-start", "id": "text-2"},
        {"type": "text-delta", "id": "text-2", "delta": "So far"},
        {"type": "text-delta", "id": "text-2", "delta": " and on"},  # the open block goes on
        {"type": "text-end", "id": "text-2"},
        {"type": "reasoning-start", "id": "reasoning-3"},
        {"type": "reasoning-delta", "id": "reasoning-3", "delta": "again"},
        {"type": "reasoning-end", "id": "reasoning-3"},
        {"type": "abort", "reason": "cancelled by the client"},
    ]  # fmt: skip


def test_a_replay_gives_the_same_parts_and_unknown_events_give_none() -> None:
    assert parts(TOOL_RUN) == parts(TOOL_RUN)  # a resume replays through a fresh translator: same ids
    translator = UiStreamTranslator()
    assert translator.parts(STARTED) != [] and translator.parts(STARTED) == []  # one start per stream


def test_frames_are_data_lines_with_the_protocols_field_names() -> None:
    part: AnyUiPart = UiStreamTranslator().parts(ToolCallStarted(run_id=RUN, call_id="c", name="clock"))[0]
    assert ui_frame(part) == b'data: {"type":"tool-input-start","toolCallId":"c","toolName":"clock"}\n\n'
