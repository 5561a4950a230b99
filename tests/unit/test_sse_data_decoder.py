"""`SseDataDecoder` (the upstream's SSE) yields the same data whatever the read boundaries."""

from __future__ import annotations

import itertools

from hypothesis import given, settings
from hypothesis import strategies as st

from service.engine.chunks import SseDataDecoder

line_text = st.text(st.characters(codec="utf-8", exclude_characters="\r\n"), max_size=20)
newlines = st.sampled_from([b"\n", b"\r\n", b"\r"])


@st.composite
def streams(draw: st.DrawFn) -> tuple[bytes, list[bytes]]:
    """A wire of events (multi-line data, comments, other fields, a line ending of its own per line) and their data."""
    wire, expected = b"", []
    for _ in range(draw(st.integers(min_value=1, max_value=5))):
        lines = draw(st.lists(line_text, min_size=1, max_size=3))
        if draw(st.booleans()):
            wire += b": keep-alive" + draw(newlines)
        if draw(st.booleans()):
            wire += b"id: 7" + draw(newlines)
        for line in lines:
            wire += b"data: " + line.encode() + draw(newlines)
        # The blank line: after a CR, a LF would only complete that CR's line ending (CRLF is one).
        wire += b"\r" if wire.endswith(b"\r") else draw(newlines)
        expected.append(b"\n".join(line.encode() for line in lines))
    return wire, expected


@settings(database=None, max_examples=300)
@given(stream=streams(), cuts=st.lists(st.integers(min_value=0), max_size=30), unterminated=st.booleans())
def test_data_is_the_same_under_any_chunking(
    stream: tuple[bytes, list[bytes]], cuts: list[int], unterminated: bool
) -> None:
    wire, expected = stream
    if unterminated:  # the upstream closed without the last blank line
        wire = wire.rstrip(b"\r\n")
    decoder = SseDataDecoder()
    bounds = [0, *sorted(cut % (len(wire) + 1) for cut in cuts), len(wire)]

    data = [d for start, end in itertools.pairwise(bounds) for d in decoder.feed(wire[start:end])]

    assert data + decoder.close() == expected


def test_done_and_fields_without_space() -> None:
    decoder = SseDataDecoder()

    assert decoder.feed(b'data:{"a":1}\n\ndata: [DONE]\r\n\r\n') == [b'{"a":1}', b"[DONE]"]
    assert decoder.close() == []


def test_a_cr_then_lf_alone_in_their_reads_end_one_line_not_two() -> None:
    """A LF read on its own after a CR completes that line ending; the next LF is the blank line."""
    decoder = SseDataDecoder()
    reads = [b"data: a\r", b"\n", b"\n", b"data: b\n\n"]

    assert [d for piece in reads for d in decoder.feed(piece)] == [b"a", b"b"]
