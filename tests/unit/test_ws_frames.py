"""The WebSocket frame decoder answers any input with a client frame or a typed error, never an exception."""

from __future__ import annotations

import json

from hypothesis import given, settings
from hypothesis import strategies as st

from service.api.ws import CancelFrame, CreateFrame, ErrorFrame, PingFrame, ResumeFrame, parse_frame

json_values = st.recursive(
    st.none() | st.booleans() | st.integers() | st.floats(allow_nan=False) | st.text(max_size=20),
    lambda inner: st.lists(inner, max_size=4) | st.dictionaries(st.text(max_size=10), inner, max_size=4),
    max_leaves=12,
)
frame_like = st.fixed_dictionaries(
    {"type": st.sampled_from(["run.create", "run.resume", "run.cancel", "ping", "run.nope", 5])},
    optional={
        "client_ref": st.text(max_size=8) | st.integers(),
        "chat_id": st.text(max_size=8) | st.none(),
        "run_id": st.text(max_size=8) | st.integers(),
        "message": st.text(max_size=8) | st.integers() | st.lists(st.text(max_size=4), max_size=2),
        "after": st.integers() | st.text(max_size=3),
        "nonce": json_values,
    },
)


@settings(max_examples=300, database=None, derandomize=True)
@given(st.text(max_size=200) | st.builds(json.dumps, json_values) | st.builds(json.dumps, frame_like))
def test_any_text_decodes_to_a_frame_or_a_typed_error(text: str) -> None:
    frame = parse_frame(text, max_bytes=1024)
    assert isinstance(frame, CreateFrame | ResumeFrame | CancelFrame | PingFrame | ErrorFrame)
    if isinstance(frame, ErrorFrame):
        assert frame.code in {"invalid_frame", "frame_too_large"}
        assert frame.message


def test_binary_and_oversized_frames_are_refused_by_kind() -> None:
    assert parse_frame(None, 1024).code == "invalid_frame"  # type: ignore[union-attr]
    assert parse_frame('{"type": "ping", "nonce": "' + "é" * 600 + '"}', 1024).code == "frame_too_large"  # type: ignore[union-attr]
    assert parse_frame('{"type": "ping", "nonce": 1}', 1024) == PingFrame(nonce=1)


def test_an_invalid_frame_names_the_field_and_echoes_its_reference() -> None:
    frame = parse_frame('{"type": "run.create", "client_ref": "c1", "chat_id": "x", "message": 5}', 1024)
    assert isinstance(frame, ErrorFrame)
    assert frame.ref == "c1"
    assert "$.message" in frame.message
