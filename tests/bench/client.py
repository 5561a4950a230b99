"""The load client: one process drives a share of a scenario's streams and reports raw timings.

Run by the bench driver as ``python -m tests.bench.client`` with a JSON :class:`Plan` on stdin's
first line. It talks to the driver in lines, so that only the streaming itself falls inside the
driver's CPU window:

1. create the chats it needs (service only), run the warm-up streams, print ``READY1``;
2. on ``GO1``: open every connection (TCP, or TCP + WebSocket handshake), print ``READY2``;
3. on ``GO2``: start the streams (``rounds`` times ``streams`` at once), then print
   ``RESULT <json>`` with one record per stream.
"""

from __future__ import annotations

import asyncio
import sys
import time
from typing import Literal
from urllib.parse import urlencode

import msgspec

from tests.bench.upstream import expected_text, run
from tests.bench.wire import Kind, SSEReader, Tally, WSReader

Transport = Literal["sse", "ws"]
BODY = b'{"message":"hi"}'


class TargetPlan(msgspec.Struct, kw_only=True):
    """How to reach one target; paths may use ``{chat_id}`` and ``{query}``."""

    name: str
    kind: Kind
    port: int
    sse_path: str
    ws_path: str
    needs_chats: bool = False
    model: str = "openai/fake"


class Plan(msgspec.Struct, kw_only=True):
    """One client process's share of one scenario."""

    target: TargetPlan
    transport: Transport
    streams: int
    rounds: int = 1
    tokens: int
    delay_ms: float
    ttft_ms: float
    warmup_streams: int = 2
    warmup_tokens: int = 20
    timeout_s: float = 60.0
    arrivals_per_s: float = 0.0
    """0: each round's streams start at once; else one starts every ``1 / arrivals_per_s`` seconds."""


class StreamResult(msgspec.Struct, kw_only=True):
    """What one stream delivered, as sent back to the driver (times are ``time.monotonic()``)."""

    round: int
    t_sent: float
    ttft_s: float | None
    t_last: float
    tokens: int
    gaps_ms: list[float]
    error: str | None


class Stream:
    """One stream: its reader, chat and request, with its connection opened ahead of time."""

    def __init__(self, plan: Plan, chat_id: str | None, tokens: int, delay_ms: float, ttft_ms: float) -> None:
        self.plan, self.tally = plan, Tally()
        self.tokens = tokens
        query = urlencode({"tokens": tokens, "delay_ms": delay_ms, "ttft_ms": ttft_ms})
        t = plan.target
        self.path = (t.sse_path if plan.transport == "sse" else t.ws_path).format(chat_id=chat_id, query=query)
        self.chat_id = chat_id or ""
        self.reader: SSEReader | WSReader | None = None

    async def connect(self) -> None:
        """Open the TCP connection (and do the WebSocket handshake)."""
        loop = asyncio.get_running_loop()
        cls = SSEReader if self.plan.transport == "sse" else WSReader
        _, self.reader = await loop.create_connection(
            lambda: cls(self.plan.target.kind, self.tally), "127.0.0.1", self.plan.target.port
        )
        if isinstance(self.reader, WSReader):
            await asyncio.wait_for(self.reader.handshake(f"127.0.0.1:{self.plan.target.port}", self.path), 30)

    def start(self) -> None:
        """Send the request that starts the stream."""
        if isinstance(self.reader, SSEReader):
            self.reader.start(
                f"POST {self.path} HTTP/1.1\r\nHost: 127.0.0.1\r\nContent-Type: application/json\r\n"
                f"Accept: text/event-stream\r\nContent-Length: {len(BODY)}\r\n\r\n".encode()
                + BODY
            )
        elif isinstance(self.reader, WSReader):
            frame = {"type": "run.create", "client_ref": "c1", "chat_id": self.chat_id, "message": "hi"}
            self.reader.start(msgspec.json.encode(frame).decode())

    def result(self, round_no: int) -> StreamResult:
        """The record for the driver; a short or wrong text counts as an error."""
        t = self.tally
        if t.error is None and (t.tokens != self.tokens or t.chars != len(expected_text(self.tokens))):
            t.fail(
                f"got {t.tokens} tokens / {t.chars} chars, expected {self.tokens} / {len(expected_text(self.tokens))}"
            )
        ttft = None if t.t_first is None else t.t_first - t.t_sent
        gaps = [round(g * 1000, 3) for g in t.gaps]
        return StreamResult(
            round=round_no, t_sent=t.t_sent, ttft_s=ttft, t_last=t.t_last, tokens=t.tokens, gaps_ms=gaps, error=t.error
        )


async def create_chats(plan: Plan, count: int) -> list[str | None]:
    """Create ``count`` chats on the service (one active run per chat), 32 at a time."""
    if not plan.target.needs_chats:
        return [None] * count
    import httpx

    limit = asyncio.Semaphore(32)
    async with httpx.AsyncClient(base_url=f"http://127.0.0.1:{plan.target.port}", timeout=30) as http:

        async def one() -> str:
            async with limit:
                response = await http.post("/v1/chats", json={"model": plan.target.model})
                response.raise_for_status()
                return str(response.json()["id"])

        return list(await asyncio.gather(*(one() for _ in range(count))))


async def open_all(streams: list[Stream]) -> None:
    """Connect every stream, 100 at a time; a failed connect is that stream's error."""
    limit = asyncio.Semaphore(100)

    async def one(stream: Stream) -> None:
        async with limit:
            try:
                await stream.connect()
            except (TimeoutError, OSError) as exc:
                stream.tally.fail(f"connect: {exc!r}")

    await asyncio.gather(*(one(s) for s in streams))


async def run_round(streams: list[Stream], timeout_s: float, arrivals_per_s: float = 0.0) -> None:
    """Start every stream (at once, or ``arrivals_per_s`` apart) and wait for all to finish (or time out).

    Paced starts follow an absolute schedule (stream ``i`` at ``t0 + i / arrivals_per_s``), each
    from its own timer, so a late wake-up does not shift the streams after it.
    """
    live = [s for s in streams if s.reader is not None and s.tally.error is None]
    if arrivals_per_s > 0:
        loop = asyncio.get_running_loop()
        t0 = loop.time() + 0.01
        for i, stream in enumerate(live):
            loop.call_at(t0 + i / arrivals_per_s, stream.start)
        await asyncio.sleep(max(0.0, t0 + len(live) / arrivals_per_s - loop.time()))
    else:
        for stream in live:
            stream.start()
    waiting = [s.reader.finished for s in live if s.reader is not None]
    if waiting:
        await asyncio.wait(waiting, timeout=timeout_s)
    for stream in live:
        if stream.reader is not None and not stream.reader.finished.done():
            stream.tally.fail(f"timeout after {timeout_s:.0f} s")
    await asyncio.sleep(0.05)  # let close handshakes go out
    for stream in live:
        if stream.reader is not None:
            stream.reader.close()


async def _line(reader: asyncio.StreamReader, want: str) -> None:
    line = (await reader.readline()).decode().strip()
    if line != want:
        raise SystemExit(f"client: expected {want!r} from the driver, got {line!r}")


async def main_async(stdin: asyncio.StreamReader, plan: Plan) -> None:
    """Run the three phases described in the module docstring."""
    n = plan.streams * plan.rounds
    chats = await create_chats(plan, plan.warmup_streams + n)
    warm = [Stream(plan, c, plan.warmup_tokens, 0, 0) for c in chats[: plan.warmup_streams]]
    await open_all(warm)
    await run_round(warm, 30)
    failed = [s.tally.error for s in warm if s.tally.error]
    print("READY1", msgspec.json.encode(failed[:3]).decode(), flush=True)
    await _line(stdin, "GO1")
    streams = [Stream(plan, c, plan.tokens, plan.delay_ms, plan.ttft_ms) for c in chats[plan.warmup_streams :]]
    await open_all(streams)
    print("READY2", flush=True)
    await _line(stdin, "GO2")
    results: list[StreamResult] = []
    for r in range(plan.rounds):
        batch = streams[r * plan.streams : (r + 1) * plan.streams]
        await run_round(batch, plan.timeout_s, plan.arrivals_per_s)
        results += [s.result(r) for s in batch]
    sys.stdout.write("RESULT " + msgspec.json.encode(results).decode() + "\n")
    sys.stdout.flush()


async def _entry() -> None:
    loop = asyncio.get_running_loop()
    stdin = asyncio.StreamReader(limit=1 << 24)
    await loop.connect_read_pipe(lambda: asyncio.StreamReaderProtocol(stdin), sys.stdin)
    plan = msgspec.json.decode(await stdin.readline(), type=Plan)
    started = time.monotonic()
    await main_async(stdin, plan)
    print(f"client done in {time.monotonic() - started:.1f} s", file=sys.stderr)


if __name__ == "__main__":
    run(_entry())
