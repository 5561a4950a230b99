"""A chat's history (service/runs/transcript.py): a run's events folded into the messages it stores
(``Transcript``), the newest whole turns that fit the history cap (``recent``), what an instance keeps
of recent chats so that a run's start reads only what was added (``RecentHistories``), and the stored
messages as the model's ``messages`` list (``openai_history``)."""

from __future__ import annotations

import random
from typing import Any

import msgspec
import pytest

from service.events import (
    OutputDone,
    ReasoningDelta,
    ReasoningDone,
    RefusalDelta,
    RunStarted,
    StepDone,
    StepStarted,
    TextDelta,
    TextDone,
    ToolCallDone,
    ToolResult,
    Usage,
)
from service.runs.transcript import RecentHistories, Transcript, openai_history, recent
from service.store.base import Message, ToolCallRecord, UsageRecord


def msg(role: str, content: object = None, **fields: object) -> Message:
    values: dict[str, object] = {"content": content, **fields}
    return Message(id=role, chat_id="c", role=role, **values)  # type: ignore[arg-type]


def test_everything_that_fits_is_kept() -> None:
    history = [msg("user", "a" * 10), msg("assistant", "b" * 10), msg("user", "c" * 10)]
    assert recent(history, 30) == history


def test_the_oldest_turns_go_first_and_a_turn_is_never_split() -> None:
    call = ToolCallRecord(id="t", name="clock", arguments="{}")
    history = [
        msg("user", "a" * 10),
        msg("assistant", None, tool_calls=[call]),
        msg("tool", "result", tool_call_id="t"),
        msg("assistant", "b" * 10),
        msg("user", "c" * 10),
    ]
    kept = recent(history, 25)
    assert kept == history[4:]  # the first turn (28 characters with its tool call) does not fit whole
    assert recent(history, 40) == history


def test_the_newest_user_message_is_kept_even_alone_over_the_cap() -> None:
    history = [msg("user", "a" * 10), msg("assistant", "b"), msg("user", "c" * 50)]
    assert recent(history, 20) == history[2:]


def test_image_parts_count_by_their_url() -> None:
    image = [{"type": "image_url", "image_url": {"url": "data:" + "x" * 100}}]
    history = [msg("user", image), msg("assistant", "ok"), msg("user", "hi")]
    assert recent(history, 50) == history[2:]


def _turn(rng: random.Random, turn: int) -> list[Message]:
    """What one run appends after its question: maybe a tool round, then the answer (random sizes)."""
    call = ToolCallRecord(id=f"t{turn}", name="clock", arguments="{}" * rng.randint(0, 20))
    tools = [msg("assistant", None, tool_calls=[call]), msg("tool", "r" * rng.randint(0, 30), tool_call_id=call.id)]
    return [*(tools if rng.random() < 0.3 else []), msg("assistant", "a" * rng.randint(0, 60))]


@pytest.mark.parametrize("seed", range(6), ids=[f"seed{n}" for n in range(6)])
def test_kept_histories_send_what_the_whole_history_would(seed: int) -> None:
    """Runs on a few chats, in random order, as the run manager makes them: the window built from what was
    kept and what the store added is ``recent`` of the whole history, with chats dropped for room now
    and then (a small budget) and another instance's turns in between."""
    rng = random.Random(seed)
    max_chars = rng.choice([40, 120, 400, 10_000])
    kept = RecentHistories(max_chars, max_chats=3, max_kept_chars=rng.choice([2_000, 50_000]))
    stored: dict[str, list[Message]] = {f"c{n}": [] for n in range(5)}
    for turn in range(300):
        chat = rng.choice(list(stored))
        if rng.random() < 0.1:  # a run on another instance: this one does not see it happen
            stored[chat] += [msg("user", "o" * rng.randint(1, 50)), *_turn(rng, turn)]
        known = kept.get(chat)
        stored[chat].append(msg("user", "q" * rng.randint(1, 80)))
        added = stored[chat][known.count if known else 0 :]  # what append_and_list(skip=...) returns

        window = kept.extend(chat, known, added)

        assert window == recent(stored[chat], max_chars), (seed, turn, chat)
        stored[chat] += _turn(rng, turn)
    assert len([chat for chat in stored if kept.get(chat) is not None]) <= 3


def test_a_chat_dropped_while_its_run_started_is_rebuilt_from_what_the_run_read() -> None:
    kept = RecentHistories(1_000, max_chats=1, max_kept_chars=10_000)
    history = [msg("user", "a"), msg("assistant", "b"), msg("user", "c")]
    kept.extend("c1", None, history[:1])
    known = kept.get("c1")
    kept.extend("c2", None, [msg("user", "other")])  # c1 is dropped for room meanwhile
    assert kept.get("c1") is None

    assert kept.extend("c1", known, history[1:]) == history  # what get() gave before the append is used
    assert kept.get("c1") is not None
    kept.forget("c1")
    assert kept.get("c1") is None


# --- Transcript -------------------------------------------------------------------------------------

RUN = "run-1"


def transcript(*events: Any) -> Transcript:
    folded = Transcript(chat_id="c", run_id=RUN, message_id="final")
    for event in events:
        folded.add(event)
    return folded


def fields(message: Message) -> dict[str, Any]:
    """A stored message without what is minted as it is built (its id, unless it is the final one, and its time)."""
    values = msgspec.structs.asdict(message)
    del values["created_at"]
    if values["id"] != "final":
        del values["id"]
    return {k: v for k, v in values.items() if v is not None and k not in {"chat_id", "run_id"}}


def test_a_plain_answer_is_one_assistant_message_under_the_runs_message_id() -> None:
    folded = transcript(
        RunStarted(run_id=RUN, chat_id="c", model="m", created_at=1.0),  # events without content change nothing
        StepStarted(run_id=RUN, step=1),
        ReasoningDelta(run_id=RUN, delta="hm "),
        ReasoningDelta(run_id=RUN, delta="ok"),
        TextDelta(run_id=RUN, delta="Hello"),
        TextDelta(run_id=RUN, delta=" there"),
        ReasoningDone(run_id=RUN, text="hm ok"),
        TextDone(run_id=RUN, text="Hello there"),
        StepDone(run_id=RUN, step=1, finish_reason="stop"),
        Usage(run_id=RUN, prompt_tokens=5, completion_tokens=2, total_tokens=7),
    )
    assert folded.usage == UsageRecord(5, 2, 7)
    (final,) = folded.messages("completed", "stop")
    assert (final.chat_id, final.run_id) == ("c", RUN)
    assert fields(final) == {
        "id": "final",
        "role": "assistant",
        "content": "Hello there",  # the deltas, not TextDone as well
        "reasoning": "hm ok",  # nor ReasoningDone
        "finish_reason": "stop",
        "usage": UsageRecord(5, 2, 7),
        "status": "completed",
    }


def test_a_tool_round_stores_the_call_message_then_each_result_then_the_answer() -> None:
    search = ToolCallDone(run_id=RUN, call_id="call_1", name="search", arguments='{"q": "x"}', parsed={"q": "x"})
    clock = ToolCallDone(run_id=RUN, call_id="call_2", name="clock", arguments="{}", parsed={})
    folded = transcript(
        TextDelta(run_id=RUN, delta="Let me look."),
        search,
        clock,
        ToolResult(run_id=RUN, call_id="call_1", name="search", output="found"),
        ToolResult(run_id=RUN, call_id="call_2", name="clock", output="boom", is_error=True),
        TextDelta(run_id=RUN, delta="It is noon."),
    )
    asked, first, second, final = folded.messages("completed", "stop")
    calls = [ToolCallRecord("call_1", "search", '{"q": "x"}'), ToolCallRecord("call_2", "clock", "{}")]
    assert fields(asked) == {
        "role": "assistant",
        "content": "Let me look.",  # what the model said before calling stays with its calls
        "tool_calls": calls,
        "finish_reason": "tool_calls",
        "status": "completed",
    }
    assert fields(first) == {
        "role": "tool",
        "content": "found",
        "tool_call_id": "call_1",
        "name": "search",
        "is_error": False,
        "status": "completed",  # the default: a tool message has no status of its own
    }
    assert fields(second) == {
        "role": "tool",
        "content": "boom",
        "tool_call_id": "call_2",
        "name": "clock",
        "is_error": True,
        "status": "completed",
    }
    assert fields(final) == {
        "id": "final",
        "role": "assistant",
        "content": "It is noon.",
        "finish_reason": "stop",
        "status": "completed",
    }
    assert len({asked.id, first.id, second.id, final.id}) == 4


def test_calls_without_results_when_the_run_stops_stay_on_the_final_message() -> None:
    pending = ToolCallDone(run_id=RUN, call_id="call_1", name="search", arguments="{}", parsed={})
    (final,) = transcript(TextDelta(run_id=RUN, delta="Searching"), pending).messages("cancelled", None)
    assert fields(final) == {
        "id": "final",
        "role": "assistant",
        "content": "Searching",
        "tool_calls": [ToolCallRecord("call_1", "search", "{}")],
        "status": "cancelled",
    }


def test_refusal_and_structured_output_are_kept_on_the_final_message() -> None:
    refused = transcript(RefusalDelta(run_id=RUN, delta="I can"), RefusalDelta(run_id=RUN, delta="not"))
    assert fields(refused.messages("completed", "stop")[0])["refusal"] == "I cannot"
    answered = transcript(TextDelta(run_id=RUN, delta='{"n": 1}'), OutputDone(run_id=RUN, output={"n": 1}))
    assert fields(answered.messages("completed", "stop")[0])["output"] == {"n": 1}


def test_a_run_that_said_nothing_stores_an_empty_final_message() -> None:
    folded = transcript()
    assert folded.usage is None
    (final,) = folded.messages("failed", None)
    assert fields(final) == {"id": "final", "role": "assistant", "status": "failed"}


# --- openai_history ---------------------------------------------------------------------------------


def test_openai_history_is_the_system_prompt_then_each_message_as_the_model_reads_it() -> None:
    call = ToolCallRecord(id="t1", name="clock", arguments="{}")
    parts = [{"type": "text", "text": "look"}, {"type": "image_url", "image_url": {"url": "data:,"}}]
    history = [
        msg("user", parts),
        msg("assistant", "Checking.", tool_calls=[call]),
        msg("tool", "noon", tool_call_id="t1", name="clock"),
        msg("assistant", "It is noon."),
    ]
    assert openai_history("Be brief.", history) == [
        {"role": "system", "content": "Be brief."},
        {"role": "user", "content": parts},
        {
            "role": "assistant",
            "content": "Checking.",
            "tool_calls": [{"id": "t1", "type": "function", "function": {"name": "clock", "arguments": "{}"}}],
        },
        {"role": "tool", "tool_call_id": "t1", "content": "noon"},
        {"role": "assistant", "content": "It is noon."},
    ]
    assert openai_history(None, history[:1]) == [{"role": "user", "content": parts}]


def test_an_interrupted_answer_keeps_its_text_but_never_calls_that_got_no_result() -> None:
    call = ToolCallRecord(id="t1", name="clock", arguments="{}")
    history = [
        msg("user", "a"),
        msg("assistant", "Half an ans", status="cancelled", tool_calls=[call]),
        msg("user", "b"),
        msg("assistant", None, status="failed", tool_calls=[call]),  # nothing said: nothing for the model
        msg("user", "c"),
        msg("assistant", None, status="cancelled"),
    ]
    assert openai_history(None, history) == [
        {"role": "user", "content": "a"},
        {"role": "assistant", "content": "Half an ans"},
        {"role": "user", "content": "b"},
        {"role": "user", "content": "c"},
    ]
