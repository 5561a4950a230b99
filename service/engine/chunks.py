"""The upstream wire: SSE bytes -> ``data`` payloads -> minimal msgspec chunk Structs.

The openai SDK builds a pydantic object per chunk (about 100 µs each); reading
the raw stream (``client.post(..., stream=True)``, see the engine) and decoding
only the fields we use with msgspec costs a few µs. Unknown fields are ignored, so any
OpenAI-compatible server's extras pass through harmlessly. The Structs are ``gc=False``: decoded
JSON cannot form reference cycles, so the cyclic GC need not track one more object per chunk.
"""

from __future__ import annotations

from typing import Any

import msgspec


class FunctionDelta(msgspec.Struct, gc=False):
    """Name and argument fragment of a streamed tool call."""

    name: str | None = None
    arguments: str | None = None


class ToolCallChunk(msgspec.Struct, gc=False):
    """One streamed tool-call fragment; ``index`` tells parallel calls apart."""

    index: int = 0
    id: str | None = None
    function: FunctionDelta | None = None


class Delta(msgspec.Struct, gc=False):
    """What one chunk adds to the assistant message."""

    content: str | None = None
    refusal: str | None = None
    reasoning_content: str | None = None
    reasoning: str | None = None
    tool_calls: list[ToolCallChunk] | None = None


class Choice(msgspec.Struct, gc=False):
    """A chunk's choice (only index 0 is used)."""

    index: int = 0
    delta: Delta | None = None
    finish_reason: str | None = None


class ChunkUsage(msgspec.Struct, gc=False):
    """Token counts, sent in the last chunk when ``include_usage`` is asked."""

    prompt_tokens: int = 0
    completion_tokens: int = 0
    total_tokens: int = 0


class Chunk(msgspec.Struct, gc=False):
    """A ``chat.completion.chunk``, or an in-stream error object."""

    choices: list[Choice] = msgspec.field(default_factory=list["Choice"])
    usage: ChunkUsage | None = None
    error: dict[str, Any] | None = None


DONE = object()
"""Returned by ``decode_chunk`` for the ``[DONE]`` sentinel."""

_chunk_decoder = msgspec.json.Decoder(Chunk)


def decode_chunk(data: bytes) -> Chunk | object:
    """Decode one ``data`` payload: a Chunk, or ``DONE``. Raises ``msgspec.DecodeError`` on bad JSON."""
    if data == b"[DONE]":
        return DONE
    return _chunk_decoder.decode(data)


class SseDataDecoder:
    """The ``data`` of each SSE event in a byte stream, fed piece by piece.

    WHATWG rules: any line ending, multi-line data. A plain class, not an async generator: one
    layer fewer on the path of every token.
    """

    __slots__ = ("_buffer", "_data", "_skip_lf")

    def __init__(self) -> None:
        self._buffer = b""
        self._data: list[bytes] = []
        self._skip_lf = False  # the last piece ended with CR: a LF starting the next one ends no line

    def feed(self, piece: bytes) -> list[bytes]:
        """The data of the events that ``piece`` completes."""
        if self._skip_lf and piece:
            self._skip_lf = False  # (also when that LF is the whole piece)
            if piece.startswith(b"\n"):
                piece = piece[1:]
        if not piece:
            return []
        self._skip_lf = piece.endswith(b"\r")
        buffer = self._buffer + piece
        if b"\r" in buffer:
            buffer = buffer.replace(b"\r\n", b"\n").replace(b"\r", b"\n")
        *lines, self._buffer = buffer.split(b"\n")
        out: list[bytes] = []
        data = self._data
        for line in lines:
            if not line:
                if data:
                    out.append(b"\n".join(data))
                    data.clear()
            elif line.startswith(b"data:"):
                value = line[5:]
                data.append(value[1:] if value.startswith(b" ") else value)
            # other fields (event, id, retry) and comments carry nothing for chat completions
        return out

    def close(self) -> list[bytes]:
        """The data of an event left unterminated when the stream ended (a lenient reading)."""
        return self.feed(b"\n\n")  # a blank line: ends the last line and dispatches what is pending
