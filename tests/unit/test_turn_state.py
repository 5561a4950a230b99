"""``TurnState``: one model turn's chunks (as the upstream sends them) in, events out, no I/O."""

from __future__ import annotations

import json
from typing import Any

import pytest

from service.engine.chunks import ChunkUsage
from service.engine.state import (
    InvalidOutputError,
    TurnState,
    UpstreamChunkError,
    UpstreamStreamEndedError,
    output_schema,
    usage_sum,
)
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

RUN = "r1"


def data(finish: str | None = None, index: int = 0, **delta: Any) -> bytes:
    """One ``chat.completion.chunk`` payload, as the upstream's SSE ``data`` carries it."""
    return json.dumps({"choices": [{"index": index, "delta": delta, "finish_reason": finish}]}).encode()


def call(index: int, *, id: str | None = None, name: str | None = None, arguments: str | None = None) -> dict[str, Any]:
    function = {k: v for k, v in (("name", name), ("arguments", arguments)) if v is not None}
    return {"index": index, **({"id": id} if id else {}), "function": function}


def feed(state: TurnState, *payloads: bytes) -> list[AnyEvent]:
    return [event for payload in payloads for event in state.handle_data(payload)]


def test_text_streams_as_deltas_and_ends_with_the_whole_text() -> None:
    state = TurnState(RUN)
    assert feed(state, data(content="Hel"), data(content="lo"), data(finish="stop")) == [
        TextDelta(run_id=RUN, delta="Hel"),
        TextDelta(run_id=RUN, delta="lo"),
    ]
    assert state.finish() == [TextDone(run_id=RUN, text="Hello")]
    assert state.finish_reason == "stop"


def test_reasoning_comes_under_either_field_name_and_never_joins_the_text() -> None:
    state = TurnState(RUN)
    events = feed(state, data(reasoning_content="think "), data(reasoning="more"), data(content="ok", finish="stop"))
    assert events == [
        ReasoningDelta(run_id=RUN, delta="think "),
        ReasoningDelta(run_id=RUN, delta="more"),
        TextDelta(run_id=RUN, delta="ok"),
    ]
    assert state.finish() == [ReasoningDone(run_id=RUN, text="think more"), TextDone(run_id=RUN, text="ok")]


def test_a_refusal_streams_and_ends_with_the_whole_refusal() -> None:
    state = TurnState(RUN)
    assert feed(state, data(refusal="I can"), data(refusal="not.", finish="stop")) == [
        RefusalDelta(run_id=RUN, delta="I can"),
        RefusalDelta(run_id=RUN, delta="not."),
    ]
    assert state.finish() == [RefusalDone(run_id=RUN, refusal="I cannot.")]


def test_tool_calls_start_stream_their_parsed_arguments_and_end_in_call_order() -> None:
    state = TurnState(RUN)
    events = feed(
        state,
        data(tool_calls=[call(0, id="call_a", name="search", arguments='{"q": "ca')]),
        data(tool_calls=[call(1, id="call_b", name="clock")]),
        data(tool_calls=[call(0, arguments='ts"}')]),
        data(finish="tool_calls"),
    )
    assert events == [
        ToolCallStarted(run_id=RUN, call_id="call_a", name="search"),
        ToolCallDelta(run_id=RUN, call_id="call_a", arguments_delta='{"q": "ca', parsed={"q": "ca"}),
        ToolCallStarted(run_id=RUN, call_id="call_b", name="clock"),
        ToolCallDelta(run_id=RUN, call_id="call_a", arguments_delta='ts"}', parsed={"q": "cats"}),
    ]
    assert state.finish() == [
        ToolCallDone(run_id=RUN, call_id="call_a", name="search", arguments='{"q": "cats"}', parsed={"q": "cats"}),
        ToolCallDone(run_id=RUN, call_id="call_b", name="clock", arguments="", parsed={}),  # no arguments: {}
    ]
    assert state.assistant_message() == {
        "role": "assistant",
        "content": None,
        "tool_calls": [
            {"id": "call_a", "type": "function", "function": {"name": "search", "arguments": '{"q": "cats"}'}},
            {"id": "call_b", "type": "function", "function": {"name": "clock", "arguments": ""}},
        ],
    }


def test_a_call_without_an_id_gets_one_from_run_turn_and_index_and_a_late_name_is_kept() -> None:
    state = TurnState(RUN, turn=3)
    feed(state, data(tool_calls=[call(2, arguments="{}")]), data(tool_calls=[call(2, name="clock")], finish="stop"))
    assert state.finish() == [
        ToolCallDone(run_id=RUN, call_id=f"call_{RUN}_3_2", name="clock", arguments="{}", parsed={})
    ]


@pytest.mark.parametrize("arguments", ['["not", "an", "object"]', '{"cut": ', "42"])
def test_arguments_that_are_not_a_json_object_end_with_parsed_null(arguments: str) -> None:
    state = TurnState(RUN)
    feed(state, data(tool_calls=[call(0, id="c", name="t", arguments=arguments)], finish="tool_calls"))
    (done,) = state.finish()
    assert done == ToolCallDone(run_id=RUN, call_id="c", name="t", arguments=arguments, parsed=None)


def test_only_the_first_choice_counts() -> None:
    state = TurnState(RUN)
    assert feed(state, data(content="other", index=1), data(content="mine", finish="stop")) == [
        TextDelta(run_id=RUN, delta="mine")
    ]


def test_an_error_object_in_the_stream_raises_with_its_message() -> None:
    with pytest.raises(UpstreamChunkError, match="overloaded"):
        TurnState(RUN).handle_data(b'{"error": {"message": "overloaded", "code": 529}}')


def test_a_stream_that_ends_without_a_finish_reason_is_an_error() -> None:
    state = TurnState(RUN)
    feed(state, data(content="cut"))
    with pytest.raises(UpstreamStreamEndedError):
        state.finish()


def test_done_ends_the_stream_and_anything_after_it_is_ignored() -> None:
    state = TurnState(RUN)
    assert feed(state, data(content="a", finish="stop"), b"[DONE]", data(content="late")) == [
        TextDelta(run_id=RUN, delta="a")
    ]
    assert state.done
    assert state.finish() == [TextDone(run_id=RUN, text="a")]


def test_usage_is_kept_from_the_chunk_that_carries_it() -> None:
    state = TurnState(RUN)
    state.handle_data(b'{"choices": [], "usage": {"prompt_tokens": 3, "completion_tokens": 4, "total_tokens": 7}}')
    assert state.usage == ChunkUsage(3, 4, 7)
    assert usage_sum(state.usage, ChunkUsage(1, 1, 2)) == ChunkUsage(4, 5, 9)
    assert usage_sum(None, state.usage) == state.usage
    assert usage_sum(None, None) is None


SCHEMA = {"type": "object", "properties": {"n": {"type": "integer"}}, "required": ["n"]}


def test_structured_output_sends_a_partial_only_when_the_parsed_value_changes() -> None:
    state = TurnState(RUN, output_schema=SCHEMA)
    fragments = ['{"n": 4', "2", " ", "}"]
    events = feed(state, *(data(content=f) for f in fragments), data(finish="stop"))
    assert events == [
        TextDelta(run_id=RUN, delta='{"n": 4'),
        OutputPartial(run_id=RUN, partial={"n": 4}),
        TextDelta(run_id=RUN, delta="2"),
        OutputPartial(run_id=RUN, partial={"n": 42}),
        TextDelta(run_id=RUN, delta=" "),  # the blank and the brace change nothing parsed: no partial
        TextDelta(run_id=RUN, delta="}"),
    ]
    assert state.finish() == [TextDone(run_id=RUN, text='{"n": 42 }'), OutputDone(run_id=RUN, output={"n": 42})]


@pytest.mark.parametrize(
    ("text", "problem"), [('{"n": 1', "not valid JSON"), ('{"n": "one"}', "does not match the schema")]
)
def test_structured_output_that_is_not_json_or_off_schema_fails_the_turn(text: str, problem: str) -> None:
    state = TurnState(RUN, output_schema=SCHEMA)
    feed(state, data(content=text, finish="stop"))
    with pytest.raises(InvalidOutputError, match=problem):
        state.finish()


@pytest.mark.parametrize("how", ["length", "refusal"])
def test_no_output_done_for_a_cut_answer_or_a_refusal(how: str) -> None:
    state = TurnState(RUN, output_schema=SCHEMA)
    extra = {"refusal": "no"} if how == "refusal" else {}
    feed(state, data(content='{"n": 1', finish="stop" if how == "refusal" else "length", **extra))
    assert not [e for e in state.finish() if isinstance(e, OutputDone)]  # and no InvalidOutputError either


@pytest.mark.parametrize(
    ("response_format", "schema"),
    [
        (None, None),
        ({"type": "text"}, None),
        ({"type": "json_object"}, {"type": "object"}),
        ({"type": "json_schema", "json_schema": {"name": "a", "schema": SCHEMA}}, SCHEMA),
        ({"type": "json_schema", "json_schema": {"name": "a"}}, {}),  # no schema: any JSON
    ],
)
def test_output_schema_of_each_response_format(response_format: dict[str, Any] | None, schema: object) -> None:
    assert output_schema(response_format) == schema
