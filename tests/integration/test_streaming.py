"""The engine over real HTTP: every upstream behaviour gives its documented events, on SSE and WebSocket."""

from __future__ import annotations

import asyncio
import itertools
import json
from typing import Any

import pytest

from tests.integration.conftest import TERMINAL, Service, ServiceFactory, text_of, types
from tests.support.upstream import (
    cut,
    finish,
    raw,
    reasoning,
    refusal,
    stall,
    status,
    text,
    tool_call,
    usage,
)


def assert_gapless(events: list[dict[str, Any]]) -> None:
    assert [e["seq"] for e in events] == list(range(1, len(events) + 1))
    assert len({e["run_id"] for e in events}) == 1
    assert events[-1]["type"] in TERMINAL
    assert sum(e["type"] in TERMINAL for e in events) == 1


async def stored_messages(service: Service, chat_id: str) -> list[dict[str, Any]]:
    response = await service.http.get(f"/v1/chats/{chat_id}")
    assert response.status_code == 200
    return list(response.json()["messages"])


async def test_text_streams_as_deltas_then_done_usage_and_completed(service: Service) -> None:
    service.upstream.enqueue(
        reasoning("Let me see.", pieces=3), text("Hello, streaming world!", pieces=5), finish("stop"), usage(7, 5)
    )
    chat = await service.create_chat(system="Be brief.")

    events = await service.stream_run(chat, "Say hello")

    assert_gapless(events)
    assert types(events)[:2] == ["run.started", "step.started"]
    assert events[0]["message_id"] == events[-1]["message_id"]  # the answer's id is known from the start
    assert events[1]["step"] == 1
    assert types(events)[2:5] == ["reasoning.delta"] * 3
    assert text_of(events) == "Hello, streaming world!"
    assert types(events)[-5:] == ["reasoning.done", "text.done", "step.done", "usage", "run.completed"]
    assert events[-5]["text"] == "Let me see."
    assert events[-4]["text"] == "Hello, streaming world!"
    assert (events[-3]["step"], events[-3]["finish_reason"]) == (1, "stop")
    assert events[-2] == {**events[-2], "prompt_tokens": 7, "completion_tokens": 5, "total_tokens": 12}
    sent = service.upstream.requests[0].body
    assert sent["messages"] == [{"role": "system", "content": "Be brief."}, {"role": "user", "content": "Say hello"}]
    assert sent["model"] == "scripted" and sent["stream"] is True
    final = (await stored_messages(service, chat))[-1]
    assert final["id"] == events[-1]["message_id"]
    assert (final["content"], final["reasoning"], final["status"]) == (
        "Hello, streaming world!",
        "Let me see.",
        "completed",
    )


async def test_structured_output_split_at_awkward_places_gives_partials_then_validated_object(
    service: Service,
) -> None:
    schema = {
        "type": "object",
        "properties": {"city": {"type": "string"}, "temps": {"type": "array", "items": {"type": "number"}}},
        "required": ["city", "temps"],
    }
    document = '{"city": "Lisb\\u00f6n \\"old\\"", "temps": [12.5, -3, 1e2]}'
    fragments = [document[i : i + 3] for i in range(0, len(document), 3)]
    service.upstream.enqueue([t for f in fragments for t in text(f, pieces=1)], finish("stop"))
    chat = await service.create_chat()
    response_format = {"type": "json_schema", "json_schema": {"name": "weather", "schema": schema}}

    events = await service.stream_run(chat, {"message": "Weather?", "response_format": response_format})

    assert_gapless(events)
    partials = [e["partial"] for e in events if e["type"] == "output.partial"]
    assert len(partials) >= 5
    assert partials[-1]["city"] == 'Lisbön "old"'
    for earlier, later in itertools.pairwise(partials):
        assert len(json.dumps(earlier)) <= len(json.dumps(later)) + 2  # grows (a trailing string may be re-cut)
    done = next(e for e in events if e["type"] == "output.done")
    assert done["output"] == {"city": 'Lisbön "old"', "temps": [12.5, -3, 100.0]}
    assert service.upstream.requests[0].body["response_format"] == response_format
    assert (await stored_messages(service, chat))[-1]["output"] == done["output"]


async def test_structured_output_that_breaks_the_schema_fails_with_invalid_output(service: Service) -> None:
    service.upstream.enqueue(text('{"city": 5}'), finish("stop"))
    chat = await service.create_chat()
    schema = {"type": "object", "properties": {"city": {"type": "string"}}}
    body = {"message": "x", "response_format": {"type": "json_schema", "json_schema": {"name": "w", "schema": schema}}}

    events = await service.stream_run(chat, body)

    assert events[-1]["type"] == "run.failed"
    assert events[-1]["error"]["code"] == "invalid_output"


async def test_refusal_streams_as_refusal_events(service: Service) -> None:
    service.upstream.enqueue(refusal("I can't help with that.", pieces=4), finish("stop"))
    chat = await service.create_chat()

    events = await service.stream_run(chat, "Do something bad")

    assert types(events) == [
        "run.started",
        "step.started",
        *["refusal.delta"] * 4,
        "refusal.done",
        "step.done",
        "run.completed",
    ]
    assert events[-3]["refusal"] == "I can't help with that."
    assert (await stored_messages(service, chat))[-1]["refusal"] == "I can't help with that."


@pytest.mark.parametrize(("reason", "code"), [("length", "length_exceeded"), ("content_filter", "content_filter")])
async def test_finish_reasons_that_cut_the_answer_fail_with_their_code(
    service: Service, reason: str, code: str
) -> None:
    service.upstream.enqueue(text("Partial ans", pieces=2), finish(reason))
    chat = await service.create_chat()

    events = await service.stream_run(chat, "Tell me everything")

    assert_gapless(events)
    assert events[-1]["type"] == "run.failed" and events[-1]["error"]["code"] == code
    stored = (await stored_messages(service, chat))[-1]
    assert (stored["content"], stored["status"], stored["finish_reason"]) == ("Partial ans", "failed", code)


@pytest.mark.parametrize(
    ("step", "code"),
    [
        (status(429, headers={"retry-after": "0"}, body={"error": {"message": "slow down"}}), "rate_limited"),
        (status(500, body={"error": {"message": "boom"}}), "upstream_error"),
        (status(400, body={"error": {"message": "bad model"}}), "upstream_error"),
    ],
)
async def test_upstream_http_errors_fail_the_run_with_a_typed_code(service: Service, step: Any, code: str) -> None:
    service.upstream.enqueue(step)
    chat = await service.create_chat()

    events = await service.stream_run(chat, "hi")

    assert types(events) == ["run.started", "step.started", "run.failed"]  # a failed step has no step.done
    assert events[-1]["error"]["code"] == code
    assert "test" not in events[-1]["error"]["message"]  # the API key never shows


@pytest.mark.parametrize(
    "steps",
    [[*text("Half an ans", pieces=3), cut()], [*text("Half", pieces=1), raw(b"data: {not json\n\n")]],
    ids=["connection-cut", "invalid-json-chunk"],
)
async def test_a_broken_stream_fails_with_upstream_error_and_keeps_the_partial_text(
    service: Service, steps: list[Any]
) -> None:
    service.upstream.enqueue(steps)
    chat = await service.create_chat()

    events = await service.stream_run(chat, "hi")

    assert_gapless(events)
    assert events[-1]["type"] == "run.failed" and events[-1]["error"]["code"] == "upstream_error"
    stored = (await stored_messages(service, chat))[-1]
    assert stored["status"] == "failed" and stored["content"] == text_of(events)


async def test_a_stalled_upstream_times_out_within_the_read_timeout(make_service: ServiceFactory) -> None:
    service = await make_service(upstream_timeout_s=1.0)
    service.upstream.enqueue(text("Hel"), stall(30))
    chat = await service.create_chat()

    loop = asyncio.get_running_loop()
    started = loop.time()
    events = await service.stream_run(chat, "hi")

    assert events[-1]["type"] == "run.failed" and events[-1]["error"]["code"] == "timeout"
    assert loop.time() - started < 1.0 + 1.5


async def test_parallel_tool_calls_stream_partial_arguments_run_both_and_answer_with_both(service: Service) -> None:
    first = tool_call(0, "call_a", "calculator", ['{"exp', 'ression"', ': "6 *', " 7", '"}'])
    second = tool_call(1, "call_b", "clock", ['{"time', 'zone": ', '"Europe/', 'Lisbon"}'])
    mixed = [step for pair in zip(first, second, strict=False) for step in pair] + first[len(second) :]
    service.upstream.enqueue(mixed, finish("tool_calls"), usage(5, 5))
    service.upstream.enqueue(text("6*7 is 42 and it is late in Lisbon."), finish("stop"), usage(9, 9))
    chat = await service.create_chat(tools=["calculator", "clock"])  # a real model gets only the tools named (X6)

    events = await service.stream_run(chat, "What is 6*7 and the time in Lisbon?")

    assert_gapless(events)
    deltas = [e for e in events if e["type"] == "tool_call.delta" and e["call_id"] == "call_a"]
    parsed = [e["parsed"] for e in deltas if e["parsed"] is not None]
    assert parsed[-1] == {"expression": "6 * 7"}
    assert any(p != parsed[-1] for p in parsed)  # the object grew as fragments arrived
    done = {e["call_id"]: e for e in events if e["type"] == "tool_call.done"}
    assert done["call_a"]["parsed"] == {"expression": "6 * 7"}
    assert done["call_b"]["parsed"] == {"timezone": "Europe/Lisbon"}
    results = {e["call_id"]: e for e in events if e["type"] == "tool.result"}
    assert results["call_a"]["output"] == "42" and not results["call_a"]["is_error"]
    assert "Lisbon" in results["call_b"]["output"] and not results["call_b"]["is_error"]
    assert events[-1]["type"] == "run.completed"
    usage_event = next(e for e in events if e["type"] == "usage")
    assert usage_event["total_tokens"] == 28
    second_request = service.upstream.requests[1].body["messages"]
    assert [m["role"] for m in second_request] == ["user", "assistant", "tool", "tool"]
    assert {m["tool_call_id"]: m["content"] for m in second_request[2:]}["call_a"] == "42"


async def test_malformed_tool_arguments_become_an_error_result_and_the_run_goes_on(service: Service) -> None:
    service.upstream.enqueue(tool_call(0, "call_x", "calculator", '{"expression": "1+', pieces=2), finish("tool_calls"))
    service.upstream.enqueue(text("Sorry, let me retry."), finish("stop"))
    chat = await service.create_chat()

    events = await service.stream_run(chat, "compute")

    done = next(e for e in events if e["type"] == "tool_call.done")
    assert done["parsed"] is None and done["arguments"] == '{"expression": "1+'
    result = next(e for e in events if e["type"] == "tool.result")
    assert result["is_error"] and "not a valid JSON object" in result["output"]
    assert events[-1]["type"] == "run.completed"


async def test_the_same_run_over_sse_and_websocket_gives_the_same_events(service: Service) -> None:
    script = [*reasoning("hmm", pieces=2), *text("Same answer on both transports.", pieces=6), finish(), usage(3, 4)]
    service.upstream.enqueue(script)
    service.upstream.enqueue(script)
    chat = await service.create_chat()

    over_sse = await service.stream_run(chat, "hello")
    over_ws = await service.ws_run(chat, "hello")

    def comparable(events: list[dict[str, Any]]) -> list[dict[str, Any]]:
        volatile = {"run_id", "created_at", "message_id"}
        return [{k: v for k, v in e.items() if k not in volatile} for e in events]

    assert len(over_sse) == len(over_ws) > 10
    assert comparable(over_sse) == comparable(over_ws)
