"""A small Server-Sent Events reader for tests that need the raw wire.

Line parsing follows the WHATWG ``text/event-stream`` rules: ``\\n``, ``\\r\\n`` and ``\\r`` end
lines (also when a ``\\r\\n`` is split across chunks); a line without a colon is a field with an
empty value; one leading space of a value is stripped; ``data`` lines are joined with ``\\n``; a
blank line dispatches; a leading BOM is skipped; an unterminated event at the end is discarded.

Intentional divergences, so tests can see everything that was sent:

1. Comments (``: ping``) are yielded as messages of ``kind == "comment"`` (``.comment`` holds the
   text), in stream order.
2. ``id`` is the id given in *this* event's block (``None`` if none), not the sticky "last event
   ID"; :attr:`SSEParser.last_event_id` keeps the sticky one.
3. A block with ``retry``/``id`` but no ``data`` is yielded as ``kind == "control"`` (a browser
   would only update its state).
4. ``event`` is ``None`` when absent (a browser would say ``"message"``).

Usage::

    async with client.stream("GET", url) as response:
        async for message in iter_sse(response):
            ...

    response, events = await collect_events(client, "POST", "/v1/chats/c1/runs", json=body,
                                            headers={"Accept": "text/event-stream"})
"""

from __future__ import annotations

import codecs
import re
from collections.abc import AsyncIterator, Callable
from dataclasses import dataclass
from typing import Any, Literal

import httpx
import msgspec

_LINE_END = re.compile(r"\r\n|\r|\n")


@dataclass(frozen=True, slots=True)
class SSEMessage:
    """One event, comment or control block read from an SSE stream."""

    data: str = ""
    event: str | None = None
    id: str | None = None
    retry: int | None = None
    comment: str | None = None
    kind: Literal["event", "comment", "control"] = "event"

    def json(self) -> Any:
        """The ``data`` decoded as JSON."""
        return msgspec.json.decode(self.data)


class SSEParser:
    """Incremental parser: :meth:`feed` bytes in any chunking, then :meth:`close` at the end."""

    def __init__(self) -> None:
        self._decoder = codecs.getincrementaldecoder("utf-8")(errors="replace")
        self._buffer = ""
        self._at_start = True
        self.last_event_id = ""
        self._reset()

    def _reset(self) -> None:
        self._data: list[str] = []
        self._event: str | None = None
        self._id: str | None = None
        self._retry: int | None = None

    def feed(self, chunk: bytes | str) -> list[SSEMessage]:
        """Parse more of the stream; return the messages it completed."""
        text = chunk if isinstance(chunk, str) else self._decoder.decode(chunk)
        return self._parse(text, final=False)

    def close(self) -> list[SSEMessage]:
        """End of stream: a final ``\\r`` ends its line; an unterminated event is dropped."""
        return self._parse(self._decoder.decode(b"", final=True), final=True)

    def _parse(self, text: str, *, final: bool) -> list[SSEMessage]:
        buffer = self._buffer + text
        if self._at_start and buffer:
            buffer, self._at_start = buffer.removeprefix("\ufeff"), False
        out: list[SSEMessage] = []
        position = 0
        while match := _LINE_END.search(buffer, position):
            if match.group() == "\r" and match.end() == len(buffer) and not final:
                break  # maybe the first half of "\r\n": wait for the next chunk
            if (message := self._line(buffer[position : match.start()])) is not None:
                out.append(message)
            position = match.end()
        self._buffer = buffer[position:]
        return out

    def _line(self, line: str) -> SSEMessage | None:
        if not line:
            return self._dispatch()
        name, colon, value = line.partition(":")
        value = value.removeprefix(" ") if colon else ""
        if not name:
            return SSEMessage(comment=value, kind="comment")
        if name == "data":
            self._data.append(value)
        elif name == "event":
            self._event = value
        elif name == "id" and "\0" not in value:
            self._id = self.last_event_id = value
        elif name == "retry" and value.isascii() and value.isdigit():
            self._retry = int(value)
        return None

    def _dispatch(self) -> SSEMessage | None:
        has_data, event, event_id, retry = bool(self._data), self._event, self._id, self._retry
        data = "\n".join(self._data)
        self._reset()
        if has_data:
            return SSEMessage(data=data, event=event or None, id=event_id, retry=retry)
        if retry is not None or event_id is not None:
            return SSEMessage(id=event_id, retry=retry, kind="control")
        return None


def parse_sse(data: bytes | str) -> list[SSEMessage]:
    """Parse a whole SSE body."""
    parser = SSEParser()
    return parser.feed(data) + parser.close()


async def iter_sse(response: httpx.Response) -> AsyncIterator[SSEMessage]:
    """Yield the messages of a streaming ``httpx`` response as they arrive (comments included)."""
    parser = SSEParser()
    async for chunk in response.aiter_bytes():
        for message in parser.feed(chunk):
            yield message
    for message in parser.close():
        yield message


async def collect_events(
    client: httpx.AsyncClient,
    method: str,
    url: str,
    *,
    until: Callable[[dict[str, Any]], bool] | None = None,
    **kwargs: Any,
) -> tuple[httpx.Response, list[dict[str, Any]]]:
    """Send a request and return its response and the JSON ``data`` of every event until the end.

    Comments and control blocks are skipped. ``until(event)`` returning true stops reading early
    (the connection is closed). A response that is not ``text/event-stream`` is read whole and
    returned with no events, so the test can assert on its status and body.
    """
    events: list[dict[str, Any]] = []
    async with client.stream(method, url, **kwargs) as response:
        if not response.headers.get("content-type", "").startswith("text/event-stream"):
            await response.aread()
            return response, events
        async for message in iter_sse(response):
            if message.kind == "event":
                events.append(message.json())
                if until is not None and until(events[-1]):
                    break
    return response, events
