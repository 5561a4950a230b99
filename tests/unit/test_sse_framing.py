"""`sse_frame` and the test SSE reader agree under any chunking; the reader follows WHATWG rules."""

from __future__ import annotations

import itertools
from typing import Any

import httpx
import msgspec
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from service.events import TextDelta, decode_event, sse_frame
from tests.support.live_server import serve
from tests.support.sse import SSEMessage, SSEParser, collect_events, iter_sse, parse_sse

# Any text, biased towards what breaks line-based framing.
tricky_text = st.text(st.characters(codec="utf-8") | st.sampled_from("\r\n\x00\u2028\u2029\ufeff:é😀"))
text_deltas = st.builds(TextDelta, run_id=tricky_text, seq=st.integers(min_value=0, max_value=2**53), delta=tricky_text)


def feed_in_chunks(data: bytes, cuts: list[int]) -> list[SSEMessage]:
    parser = SSEParser()
    bounds = [0, *sorted(cut % (len(data) + 1) for cut in cuts), len(data)]
    messages = [m for start, end in itertools.pairwise(bounds) for m in parser.feed(data[start:end])]
    return messages + parser.close()


@settings(database=None, max_examples=300)
@given(events=st.lists(text_deltas, min_size=1, max_size=5), cuts=st.lists(st.integers(min_value=0), max_size=30))
def test_sse_frame_round_trips_under_any_chunking(events: list[TextDelta], cuts: list[int]) -> None:
    wire = b"".join(sse_frame(event) for event in events)
    messages = feed_in_chunks(wire, cuts)
    assert [m.id for m in messages] == [str(event.seq) for event in events]
    assert [decode_event(m.data) for m in messages] == events
    assert [msgspec.json.decode(m.data, type=TextDelta) for m in messages] == events


@pytest.mark.parametrize("newline", ["\n", "\r\n", "\r"])
def test_every_line_ending_is_accepted(newline: str) -> None:
    body = newline.join(["id: 7", "event: note", "data: a", "data: b", "", ""])
    assert parse_sse(body.encode()) == [SSEMessage(data="a\nb", event="note", id="7")]


def test_crlf_split_across_chunks_is_one_line_end() -> None:
    parser = SSEParser()
    assert parser.feed(b"data: x\r") == []
    assert parser.feed(b"\n\r") == []
    assert parser.feed(b"\n") == [SSEMessage(data="x")]
    assert parser.close() == []


def test_utf8_split_across_chunks_is_decoded() -> None:
    wire = "data: é😀\n\n".encode()
    assert feed_in_chunks(wire, [7, 8, 9, 10]) == [SSEMessage(data="é😀")]


def test_field_rules_colon_space_and_unknown_fields() -> None:
    body = b"data\ndata:  two spaces\ndata:nospace\nfoo: ignored\nretry: 3000\n\n"
    assert parse_sse(body) == [SSEMessage(data="\n two spaces\nnospace", retry=3000)]


def test_comments_and_control_blocks_are_reported() -> None:
    body = b": ping\n\nretry: 15000\n\nretry: soon\nid: 4\n\nevent: only\n\n"
    assert parse_sse(body) == [
        SSEMessage(comment="ping", kind="comment"),
        SSEMessage(retry=15000, kind="control"),
        SSEMessage(id="4", kind="control"),
    ]


def test_bom_is_skipped_and_unterminated_event_dropped() -> None:
    parser = SSEParser()
    messages = parser.feed("\ufeffid: 1\ndata: {}\n\nid: 2\ndata: partial".encode())
    assert messages == [SSEMessage(data="{}", id="1")]
    assert parser.close() == []
    assert parser.last_event_id == "2"


def test_id_with_nul_is_ignored_and_last_event_id_is_sticky() -> None:
    parser = SSEParser()
    messages = parser.feed(b"id: 3\ndata: a\n\nid: x\x00y\ndata: b\n\n") + parser.close()
    assert [m.id for m in messages] == ["3", None]
    assert parser.last_event_id == "3"


async def test_iter_sse_and_collect_events_over_real_http() -> None:
    """Comments, retry and a frame split across two writes, read back from a live server."""
    first, second = TextDelta(run_id="r1", seq=1, delta="a\nb"), TextDelta(run_id="r1", seq=2, delta="c")
    frame = sse_frame(second)

    async def app(scope: dict[str, Any], receive: Any, send: Any) -> None:
        await send({"type": "http.response.start", "status": 200, "headers": [(b"content-type", b"text/event-stream")]})
        for part in [b": ping\r\n\r\nretry: 1000\n\n", sse_frame(first), frame[:9], frame[9:]]:
            await send({"type": "http.response.body", "body": part, "more_body": True})
        await send({"type": "http.response.body", "body": b""})

    async with serve(app, lifespan="off") as url, httpx.AsyncClient(base_url=url) as client:
        async with client.stream("GET", "/") as response:
            messages = [message async for message in iter_sse(response)]
        assert [m.kind for m in messages] == ["comment", "control", "event", "event"]
        assert (messages[0].comment, messages[1].retry, messages[3].id) == ("ping", 1000, "2")
        response, events = await collect_events(client, "GET", "/")
        assert response.status_code == 200
        assert events == [msgspec.to_builtins(first), msgspec.to_builtins(second)]
        _, until_first = await collect_events(client, "GET", "/", until=lambda event: event["seq"] == 1)
        assert until_first == events[:1]
