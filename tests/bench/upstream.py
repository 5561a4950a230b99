"""A fast fake OpenAI-compatible upstream: raw asyncio, no framework.

``POST /v1/chat/completions`` with ``"stream": true`` answers a chunked ``text/event-stream`` of
realistic ``chat.completion.chunk`` JSON: a role chunk, one chunk per token, a ``finish_reason``
chunk, a usage chunk (``choices: []``), then ``data: [DONE]``. Without ``stream`` it answers one
``chat.completion``. The request content is ignored; what is streamed comes from the current
:class:`StreamConfig`, which the bench driver changes between scenarios with
``POST /_bench/config`` (JSON ``{"tokens", "delay_ms", "ttft_ms"}``). ``GET /_bench/stats`` counts
requests. Tokens are paced on an absolute schedule: token ``i`` is due at ``ttft + i * delay``
after the request, so timer jitter does not accumulate.

Run it alone with ``python -m tests.bench.upstream --port 0``: it prints ``LISTENING <port>``.
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import functools
import sys
import time
from collections.abc import Coroutine
from typing import Any, TypeVar

import msgspec

WORDS = (" lorem", " ipsum", " dolor", " sit", " amet", ",", " consectetur", " adipiscing", " elit", ".")
"""The streamed text cycles through these words, one per token."""

_ENC = msgspec.json.Encoder()
_HEAD = (
    b"HTTP/1.1 200 OK\r\ncontent-type: text/event-stream; charset=utf-8\r\ncache-control: no-cache\r\n"
    b"x-request-id: req_bench\r\ntransfer-encoding: chunked\r\nconnection: keep-alive\r\n\r\n"
)
_DONE = b"data: [DONE]\n\n"
T = TypeVar("T")


class StreamConfig(msgspec.Struct, kw_only=True):
    """What the next streams look like."""

    tokens: int = 50
    delay_ms: float = 0.0
    ttft_ms: float = 0.0


class _Request(msgspec.Struct):
    model: str = "fake"
    stream: bool = False


def token_text(i: int) -> str:
    """The text of token ``i``."""
    return WORDS[i % len(WORDS)]


def expected_text(tokens: int) -> str:
    """The whole text a stream of ``tokens`` tokens carries."""
    return "".join(token_text(i) for i in range(tokens))


def _chunk(model: str, choices: list[dict[str, object]], usage: dict[str, object] | None = None) -> bytes:
    body = {
        "id": "chatcmpl-bench0000000000000000000000",
        "object": "chat.completion.chunk",
        "created": 1_700_000_000,
        "model": model,
        "service_tier": "default",
        "system_fingerprint": "fp_bench",
        "choices": choices,
        "usage": usage,
    }
    frame = b"data: " + _ENC.encode(body) + b"\n\n"
    return b"%x\r\n%s\r\n" % (len(frame), frame)


def _usage(tokens: int) -> dict[str, object]:
    return {
        "prompt_tokens": 8,
        "completion_tokens": tokens,
        "total_tokens": tokens + 8,
        "prompt_tokens_details": {"cached_tokens": 0, "audio_tokens": 0},
        "completion_tokens_details": {"reasoning_tokens": 0, "audio_tokens": 0},
    }


@functools.lru_cache(maxsize=32)
def stream_frames(tokens: int, model: str) -> tuple[bytes, tuple[bytes, ...], bytes]:
    """Pre-encoded HTTP chunks: (role chunk, one chunk per token, tail ending the response)."""

    def choice(delta: dict[str, object], finish: str | None = None) -> list[dict[str, object]]:
        return [{"index": 0, "delta": delta, "logprobs": None, "finish_reason": finish}]

    role = _chunk(model, choice({"role": "assistant", "content": "", "refusal": None}))
    toks = tuple(_chunk(model, choice({"content": token_text(i)})) for i in range(tokens))
    done = b"%x\r\n%s\r\n" % (len(_DONE), _DONE)
    tail = _chunk(model, choice({}, "stop")) + _chunk(model, [], _usage(tokens)) + done + b"0\r\n\r\n"
    return role, toks, tail


def _completion(tokens: int, model: str) -> bytes:
    message = {"role": "assistant", "content": expected_text(tokens), "refusal": None}
    choice = {"index": 0, "message": message, "logprobs": None, "finish_reason": "stop"}
    return _ENC.encode(
        {
            "id": "chatcmpl-bench",
            "object": "chat.completion",
            "created": 1_700_000_000,
            "model": model,
            "choices": [choice],
            "usage": _usage(tokens),
        }
    )


def _response(status: str, body: bytes) -> bytes:
    head = f"HTTP/1.1 {status}\r\ncontent-type: application/json\r\ncontent-length: {len(body)}\r\n\r\n"
    return head.encode() + body


class FakeUpstream:
    """The request handler; one instance per server, holding the config and counters."""

    def __init__(self, config: StreamConfig | None = None) -> None:
        self.config = config or StreamConfig()
        self.stats = {"requests": 0, "streams": 0, "completed": 0, "aborted": 0}

    async def handle(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        """Serve HTTP/1.1 requests on one keep-alive connection."""
        try:
            while True:
                head = await reader.readuntil(b"\r\n\r\n")
                method, path, length = _parse_head(head)
                body = await reader.readexactly(length) if length else b""
                self.stats["requests"] += 1
                await self._dispatch(method, path, body, writer)
        except (asyncio.IncompleteReadError, asyncio.LimitOverrunError, ConnectionError, ValueError):
            pass
        except asyncio.CancelledError:  # server shutdown; ending quietly avoids a 3.11 streams callback error
            pass
        finally:
            writer.close()

    async def _dispatch(self, method: str, path: str, body: bytes, writer: asyncio.StreamWriter) -> None:
        if path.endswith("/chat/completions") and method == "POST":
            request = msgspec.json.decode(body or b"{}", type=_Request)
            if request.stream:
                await self._stream(writer, self.config, request.model)
            else:
                writer.write(_response("200 OK", _completion(self.config.tokens, request.model)))
        elif path.startswith("/_bench/config") and method == "POST":
            self.config = msgspec.json.decode(body, type=StreamConfig)
            writer.write(_response("200 OK", _ENC.encode(self.config)))
        elif path.startswith("/_bench/stats"):
            writer.write(_response("200 OK", _ENC.encode(self.stats)))
        elif path.endswith("/models"):
            writer.write(_response("200 OK", b'{"object":"list","data":[{"id":"fake","object":"model"}]}'))
        else:
            writer.write(_response("404 Not Found", b'{"error":{"message":"not found","type":"invalid_request"}}'))
        await writer.drain()

    async def _stream(self, writer: asyncio.StreamWriter, cfg: StreamConfig, model: str) -> None:
        self.stats["streams"] += 1
        role, toks, tail = stream_frames(cfg.tokens, model)
        start = time.monotonic() + cfg.ttft_ms / 1000  # not loop.time(): uvloop caches it per iteration
        delay = cfg.delay_ms / 1000
        transport = writer.transport
        writer.write(_HEAD)
        for i, frame in enumerate(toks):
            wait = start + i * delay - time.monotonic()
            if wait > 0:
                await asyncio.sleep(wait)
            if transport.is_closing():
                self.stats["aborted"] += 1
                raise ConnectionResetError("client went away")
            writer.write(role + frame if i == 0 else frame)
            if transport.get_write_buffer_size() > 1 << 18:
                await writer.drain()
        writer.write(tail)
        await writer.drain()
        self.stats["completed"] += 1


def _parse_head(head: bytes) -> tuple[str, str, int]:
    lines = head.split(b"\r\n")
    method, path, _ = lines[0].decode("latin-1").split(" ", 2)
    length = 0
    for line in lines[1:]:
        name, _, value = line.partition(b":")
        if name.strip().lower() == b"content-length":
            length = int(value)
    return method, path, length


def run(coro: Coroutine[Any, Any, T]) -> T:
    """Run ``coro`` on uvloop when it is installed, else on asyncio."""
    try:
        import uvloop
    except ImportError:
        return asyncio.run(coro)
    return uvloop.run(coro)


async def start_upstream(config: StreamConfig | None = None, port: int = 0) -> tuple[asyncio.Server, FakeUpstream]:
    """Start the fake upstream on 127.0.0.1 in the running loop; returns the server and handler."""
    upstream = FakeUpstream(config)
    server = await asyncio.start_server(upstream.handle, "127.0.0.1", port, backlog=4096, limit=1 << 20)
    return server, upstream


async def call(port: int, method: str, path: str, body: bytes = b"") -> bytes:
    """One request to an upstream's control endpoints; returns the response body."""
    reader, writer = await asyncio.open_connection("127.0.0.1", port)
    try:
        writer.write(
            f"{method} {path} HTTP/1.1\r\nhost: 127.0.0.1\r\ncontent-length: {len(body)}\r\n\r\n".encode() + body
        )
        _, _, length = _parse_head(b"GET / x\r\n" + (await reader.readuntil(b"\r\n\r\n")).split(b"\r\n", 1)[1])
        return await reader.readexactly(length)
    finally:
        writer.close()


async def configure(port: int, config: StreamConfig) -> None:
    """Set what the upstream at ``port`` streams next."""
    await call(port, "POST", "/_bench/config", _ENC.encode(config))


async def _main(port: int) -> None:
    server, _ = await start_upstream(port=port)
    print(f"LISTENING {server.sockets[0].getsockname()[1]}", flush=True)
    async with server:
        await server.serve_forever()


def main() -> None:
    """Command-line entry point: serve until killed."""
    parser = argparse.ArgumentParser(description=(__doc__ or "").splitlines()[0])
    parser.add_argument("--port", type=int, default=0)
    args = parser.parse_args()
    with contextlib.suppress(KeyboardInterrupt):
        run(_main(args.port))
    sys.exit(0)


if __name__ == "__main__":
    main()
