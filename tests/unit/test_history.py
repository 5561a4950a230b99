"""``recent``: the newest whole turns of a chat that fit the history cap."""

from __future__ import annotations

from service.runs.transcript import recent
from service.store.base import Message, ToolCallRecord


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
