"""The chat list cursor: opaque, round-trips, and any other text is ``ValueError("invalid cursor")``."""

from __future__ import annotations

import base64

import pytest
from hypothesis import given
from hypothesis import strategies as st

from service.store.base import Chat
from service.store.sql import _decode_cursor, _encode_cursor  # pyright: ignore[reportPrivateUsage]


@given(created_at=st.floats(allow_nan=False, allow_infinity=False), chat_id=st.text())
def test_cursor_round_trips(created_at: float, chat_id: str) -> None:
    cursor = _encode_cursor(Chat(id=chat_id, model="m", created_at=created_at))

    assert _decode_cursor(cursor) == (created_at, chat_id)
    assert "=" not in cursor


def _decode_or_error(text: str) -> tuple[float, str] | str:
    try:
        return _decode_cursor(text)
    except ValueError as exc:
        return str(exc)


@given(st.text() | st.binary().map(lambda raw: base64.urlsafe_b64encode(raw).decode()))
def test_any_other_text_is_an_invalid_cursor_or_a_pair(text: str) -> None:
    result = _decode_or_error(text)

    if isinstance(result, str):
        assert result == "invalid cursor"
    else:
        assert [type(part) for part in result] == [float, str]


def test_a_truncated_cursor_is_invalid() -> None:
    cursor = _encode_cursor(Chat(id="abc", model="m", created_at=1.5))

    with pytest.raises(ValueError, match="invalid cursor"):
        _decode_cursor(cursor[:-3])
