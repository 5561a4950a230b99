"""Run one (target, transport, scenario): the target process, the clients, the CPU window.

Each row gets a fresh target process (``launched``), except with ``--reuse`` (the default for
``--quick``), where one process per target and transport serves all scenarios. Sequence of one
row (``measure``), so that only streaming falls inside the window:

1. the target runs alone on ``target_cpu``; the upstream is set to the warm-up shape;
2. the clients (on ``load_cpu``) create their chats and run warm-up streams -> ``READY1``;
3. idle RSS is read; the upstream is set to the scenario's shape; ``GO1``: clients open all
   connections -> ``READY2``;
4. VmHWM is reset, CPU is read, ``GO2``: clients stream, then report; after a 0.3 s settle, CPU
   and memory are read again.
"""

from __future__ import annotations

import asyncio
import contextlib
import itertools
import signal
import sys
import tempfile
import time
from collections import Counter
from collections.abc import AsyncIterator
from contextlib import asynccontextmanager
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import msgspec

from tests.bench import upstream
from tests.bench.client import Plan, StreamResult, TargetPlan, Transport
from tests.bench.metrics import summarise
from tests.bench.procs import (
    Server,
    core_busy_s,
    free_port,
    pinned,
    read_cpu,
    read_mem_kb,
    reset_hwm,
    uvicorn_argv,
)
from tests.bench.scenarios import Scenario, Target

WARMUP = upstream.StreamConfig(tokens=20)
Row = dict[str, Any]
ROOT = Path(__file__).resolve().parents[2]


@dataclass
class Context:
    """What every run shares."""

    upstream_port: int
    target_cpu: int = 1
    load_cpu: int = 0
    clients: int = 1
    logs: Path = ROOT / "bench-results" / "logs"
    profile: bool = False


class Client:
    """One load-client process and its line protocol."""

    def __init__(self, proc: asyncio.subprocess.Process, log: Path) -> None:
        self.proc, self.log = proc, log

    @classmethod
    async def spawn(cls, plan: Plan, ctx: Context, log: Path) -> Client:
        """Start a client pinned to the load core and hand it its plan."""
        with log.open("wb") as err:
            proc = await asyncio.create_subprocess_exec(
                *pinned(ctx.load_cpu, [sys.executable, "-m", "tests.bench.client"]),
                stdin=asyncio.subprocess.PIPE,
                stdout=asyncio.subprocess.PIPE,
                stderr=err,
                cwd=ROOT,
                limit=1 << 27,
            )
        client = cls(proc, log)
        client.send(msgspec.json.encode(plan).decode())
        return client

    def send(self, line: str) -> None:
        """Write one line to the client."""
        assert self.proc.stdin is not None
        self.proc.stdin.write(line.encode() + b"\n")

    async def expect(self, word: str, timeout_s: float) -> str:
        """Wait for the line starting with ``word``; returns the rest of it."""
        assert self.proc.stdout is not None
        line = await asyncio.wait_for(self.proc.stdout.readline(), timeout_s)
        if not line.startswith(word.encode()):
            tail = " | ".join(self.log.read_text(errors="replace").strip().splitlines()[-5:])
            raise RuntimeError(f"client: expected {word}, got {line[:200]!r}; stderr: {tail}")
        return line[len(word) :].decode().strip()

    async def stop(self) -> None:
        """Kill the client if it is still running."""
        if self.proc.returncode is None:
            with contextlib.suppress(ProcessLookupError):
                self.proc.kill()
        await self.proc.wait()


def plans(scenario: Scenario, target: Target, transport: Transport, port: int, clients: int) -> list[Plan]:
    """Split the scenario's streams over ``clients`` processes (only the first one warms up)."""
    tplan = TargetPlan(
        name=target.name,
        kind=target.kind,
        port=port,
        sse_path=target.sse_path,
        ws_path=target.ws_path,
        needs_chats=target.needs_chats,
    )
    n = max(1, min(clients, scenario.streams))
    shares = [scenario.streams // n + (i < scenario.streams % n) for i in range(n)]
    return [
        Plan(
            target=tplan,
            transport=transport,
            streams=share,
            rounds=scenario.rounds,
            tokens=scenario.tokens,
            delay_ms=scenario.delay_ms,
            ttft_ms=scenario.ttft_ms,
            warmup_streams=2 if i == 0 else 0,
            warmup_tokens=WARMUP.tokens,
            timeout_s=scenario.timeout_s,
            arrivals_per_s=scenario.arrivals_per_s * share / scenario.streams,
        )
        for i, share in enumerate(shares)
    ]


async def _sample_rss(pid: int, peak: list[int]) -> None:
    while True:
        with contextlib.suppress(OSError):
            peak[0] = max(peak[0], read_mem_kb(pid)["VmRSS"])
        await asyncio.sleep(0.02)


async def _measure(
    ctx: Context, server: Server, target: Target, transport: Transport, scenario: Scenario
) -> dict[str, Any]:
    tag = f"{target.name}-{transport}-{scenario.name}"
    await upstream.configure(ctx.upstream_port, WARMUP)
    clients = [
        await Client.spawn(plan, ctx, ctx.logs / f"{tag}-client{i}.log")
        for i, plan in enumerate(plans(scenario, target, transport, server.port, ctx.clients))
    ]
    try:
        phases = [time.monotonic()]
        warm = [await c.expect("READY1", 120) for c in clients]
        phases.append(time.monotonic())
        idle = read_mem_kb(server.pid)
        await upstream.configure(
            ctx.upstream_port,
            upstream.StreamConfig(tokens=scenario.tokens, delay_ms=scenario.delay_ms, ttft_ms=scenario.ttft_ms),
        )
        for c in clients:
            c.send("GO1")
        for c in clients:
            await c.expect("READY2", 120)
        phases.append(time.monotonic())
        reset_ok = reset_hwm(server.pid)
        sampled = [0]
        sampler = asyncio.create_task(_sample_rss(server.pid, sampled))
        cpu0, core0, t0 = read_cpu(server.pid), core_busy_s(ctx.target_cpu), time.monotonic()
        load0 = core_busy_s(ctx.load_cpu)
        async with profiled(ctx, server.pid, tag):
            for c in clients:
                c.send("GO2")
            limit = scenario.timeout_s * scenario.rounds + 30
            raw = [await c.expect("RESULT", limit) for c in clients]
        phases.append(time.monotonic())
        await asyncio.sleep(0.3)
        cpu1, core1, t1 = read_cpu(server.pid), core_busy_s(ctx.target_cpu), time.monotonic()
        load1 = core_busy_s(ctx.load_cpu)
        sampler.cancel()
        end = read_mem_kb(server.pid)
    finally:
        for c in clients:
            await c.stop()
    results = [r for line in raw for r in msgspec.json.decode(line, type=list[StreamResult])]
    mem = {
        "idle_kb": idle["VmRSS"],
        "open_kb": end["VmHWM"] if reset_ok else max(sampled[0], end["VmRSS"]),
        "open_source": "VmHWM reset at window start" if reset_ok else "VmRSS sampled every 20 ms",
        "peak_kb": max(idle["VmHWM"], end["VmHWM"]),
    }
    row = summarise(scenario, results, (cpu0, cpu1), mem)
    steps = (round(b - a, 2) for a, b in itertools.pairwise(phases))
    row["phase_s"] = dict(zip(("setup", "connect", "stream"), steps, strict=True))
    # noise indicators: CPU other processes used on the target's core; how busy the load core was
    row["load_core_pct"] = round((load1 - load0) / (t1 - t0) * 100, 1)
    row["foreign_load_pct"] = round(max(0.0, (core1 - core0) - (cpu1.stat_s - cpu0.stat_s)) / (t1 - t0) * 100, 1)
    warm_errors = [e for w in warm for e in msgspec.json.decode(w or "[]")]
    if warm_errors:
        row["warmup_errors"] = warm_errors
    return row


@asynccontextmanager
async def profiled(ctx: Context, pid: int, tag: str) -> AsyncIterator[None]:
    """With ``ctx.profile``: py-spy samples ``pid`` for the block; writes ``<tag>.folded`` and ``<tag>.top.txt``."""
    if not ctx.profile:
        yield
        return
    folded = ctx.logs / f"{tag}.folded"
    # Not --nonblocking: reading a running process's frames tears most stacks (on a busy service 88 % of
    # the samples were Runner.run alone); pausing it for each sample costs latency, not the stacks.
    argv = ["py-spy", "record", "--pid", str(pid), "--rate", "250", "--format", "raw"]
    proc = await asyncio.create_subprocess_exec(
        *pinned(ctx.load_cpu, [*argv, "--output", str(folded)]),
        stdout=asyncio.subprocess.DEVNULL,
        stderr=asyncio.subprocess.DEVNULL,
    )
    try:
        await asyncio.sleep(0.5)  # py-spy attaches
        yield
    finally:
        with contextlib.suppress(ProcessLookupError):
            proc.send_signal(signal.SIGINT)
        await proc.wait()
    if folded.exists():
        (ctx.logs / f"{tag}.top.txt").write_text(profile_summary(folded.read_text()))


def profile_summary(folded: str, top: int = 45) -> str:
    """Self and inclusive share of the event loop thread's samples per function (py-spy folded stacks).

    Only stacks through ``Runner.run`` (uvicorn's loop) count. py-spy sees Python frames only: time in
    uvloop's C code and in system calls made from it shows as ``Runner.run``'s own; ``perf record``
    on the same pid splits that part (kernel, interpreter, uvloop).
    """
    own: Counter[str] = Counter()
    total: Counter[str] = Counter()
    samples = 0
    for line in folded.splitlines():
        stack, _, count = line.rpartition(" ")
        if "Runner.run" not in stack:
            continue
        n = int(count)
        samples += n
        frames = [f.split(" (")[0] + " " + f.rsplit("/", 1)[-1].split(":")[0].rstrip(")") for f in stack.split(";")]
        own[frames[-1]] += n
        for frame in set(frames):
            total[frame] += n
    samples = max(samples, 1)
    lines = [f"{samples} samples of the event loop thread", "", "self %  function"]
    lines += [f"{n / samples * 100:6.1f}  {f}" for f, n in own.most_common(top)]
    lines += ["", "incl %  function"]
    lines += [f"{n / samples * 100:6.1f}  {f}" for f, n in total.most_common(top * 2)]
    return "\n".join(lines) + "\n"


@asynccontextmanager
async def launched(ctx: Context, target: Target, tag: str) -> AsyncIterator[Server]:
    """A fresh target process (its own temp database) for the block; raises RuntimeError if it cannot start."""
    with tempfile.TemporaryDirectory(prefix="bench-db-") as tmp:
        env = dict(target.env)
        if "SERVICE_DATABASE_URL" in env:
            env["SERVICE_DATABASE_URL"] = f"sqlite+aiosqlite:///{tmp}/bench.db"
        port = free_port()
        argv = [*uvicorn_argv(target.app, port, factory=target.factory), *target.uvicorn_args]
        server = Server(target.name, argv, port, env, ctx.logs / f"{tag}.log")
        await server.start(ctx.target_cpu)
        try:
            yield server
        finally:
            await server.stop()


async def measure(ctx: Context, server: Server, target: Target, transport: Transport, scenario: Scenario) -> Row:
    """Measure one row on a running target; a broken run gives a row with ``failed``."""
    row: Row = {"target": target.name, "label": target.label, "transport": transport, "scenario": scenario.name}
    started = time.monotonic()
    try:
        row.update(await _measure(ctx, server, target, transport, scenario))
    except (TimeoutError, RuntimeError, OSError, msgspec.DecodeError) as exc:
        row.update(failed=f"{type(exc).__name__}: {exc}", errors=scenario.streams * scenario.rounds)
    row["wall_s"] = round(time.monotonic() - started, 2)
    return row
