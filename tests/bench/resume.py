"""``just bench-resume``: replay speed of a late reader and memory held per finished run, per run backend.

For each backend (memory, and Redis when it answers) a run of 10,000 events is written and finished,
then a late reader replays it from seq 0: through the backend directly, and over HTTP as SSE from a
live service (``GET /v1/runs/{id}/events``). Memory per finished run: ``tracemalloc`` growth over
several finished runs for the memory backend, ``MEMORY USAGE`` of a run's keys for Redis.

    uv run python -m tests.bench.resume [--events 10000] [--redis-url redis://127.0.0.1:6379/0]

``--finished-runs N`` measures instead what N finished runs of ``--events`` events leave in the memory
backend's process (RSS growth and runs still kept), with no byte budget and with the default one
(``SERVICE_MAX_FINISHED_RUN_BYTES``; decision 48)::

    uv run python -m tests.bench.resume --finished-runs 10000 --events 1002
"""

from __future__ import annotations

import argparse
import asyncio
import gc
import json
import os
import sys
import time
import tracemalloc
import uuid
from collections.abc import AsyncIterator
from contextlib import asynccontextmanager
from pathlib import Path
from tempfile import TemporaryDirectory
from typing import Any

import httpx
import msgspec
import redis.asyncio

from service.app import create_app
from service.events import RunCompleted, RunStarted, TextDelta
from service.runs.base import RunBackend, RunExpiredError, RunRecord
from service.runs.memory import MemoryRunBackend
from service.settings import Settings
from tests.support.live_server import serve
from tests.support.sse import SSEParser

RETENTION_S = 600.0


async def write_run(backend: RunBackend, events: int) -> str:
    """A finished run of ``events`` events (run.started, text deltas, run.completed)."""
    run_id = uuid.uuid4().hex
    await backend.create_run(RunRecord(id=run_id, chat_id=uuid.uuid4().hex, model="bench", created_at=time.time()))
    await backend.append(run_id, RunStarted(run_id=run_id, chat_id="c", model="bench", created_at=time.time()))
    for i in range(events - 2):
        await backend.append(run_id, TextDelta(run_id=run_id, delta=f"token {i} "))
    await backend.append(run_id, RunCompleted(run_id=run_id, finish_reason="stop", message_id="m"))
    return run_id


async def replay_rate(backend: RunBackend, run_id: str, expected: int) -> float:
    """Events per second for a reader that joins after the end, through the backend."""
    started = time.perf_counter()
    count = 0
    async for _ in backend.read(run_id, 0):
        count += 1
    elapsed = time.perf_counter() - started
    assert count == expected, (count, expected)
    return count / elapsed


async def sse_replay_rate(url: str, run_id: str, expected: int) -> float:
    """Events per second for a late ``EventSource``-style reader over HTTP."""
    parser = SSEParser()
    count = 0
    async with httpx.AsyncClient(base_url=url, timeout=60) as client:
        started = time.perf_counter()
        async with client.stream("GET", f"/v1/runs/{run_id}/events") as response:
            async for chunk in response.aiter_bytes():
                count += sum(m.kind == "event" for m in parser.feed(chunk))
        elapsed = time.perf_counter() - started
    assert count == expected, (count, expected)
    return count / elapsed


async def memory_per_run(events: int, runs: int = 5) -> float:
    """Bytes the memory backend holds per finished run of ``events`` events."""
    backend = MemoryRunBackend(retention_s=RETENTION_S, max_events_per_run=events + 10)
    await backend.start(lambda run_id, reason: None)
    gc.collect()
    tracemalloc.start()
    before = tracemalloc.get_traced_memory()[0]
    for _ in range(runs):
        await write_run(backend, events)
    gc.collect()
    after = tracemalloc.get_traced_memory()[0]
    tracemalloc.stop()
    await backend.close()
    return (after - before) / runs


def rss_bytes() -> int:
    """This process's resident set size (Linux)."""
    with open("/proc/self/statm") as statm:
        return int(statm.read().split()[1]) * os.sysconf("SC_PAGE_SIZE")


async def finished_runs_held(runs: int, events: int, budget: int | None) -> dict[str, Any]:
    """RSS growth after ``runs`` finished runs of ``events`` events, with a byte ``budget`` (None: none)."""
    backend = MemoryRunBackend(
        retention_s=RETENTION_S,
        max_events_per_run=events + 10,
        max_finished_runs=max(runs, 10_000),
        max_finished_bytes=budget if budget is not None else 1 << 62,
    )
    await backend.start(lambda run_id, reason: None)
    gc.collect()
    before = rss_bytes()
    ids = [await write_run(backend, events) for _ in range(runs)]
    gc.collect()
    grown = rss_bytes() - before
    kept = 0
    for run_id in ids:
        try:
            await backend.get_run(run_id)
            kept += 1
        except RunExpiredError:
            pass
    estimated = backend.finished_bytes
    await backend.close()
    return {"budget": budget, "runs": runs, "events": events, "rss_growth": grown, "kept": kept, "estimated": estimated}


async def redis_bytes(url: str, prefix: str, run_id: str) -> int:
    client = redis.asyncio.Redis.from_url(url)
    try:
        total = 0
        async for key in client.scan_iter(match=f"{prefix}:run:{run_id}*"):
            total += int(await client.memory_usage(key) or 0)
        return total
    finally:
        await client.aclose()


@asynccontextmanager
async def service_on(settings: Settings) -> AsyncIterator[tuple[str, RunBackend]]:
    """A live service; yields its URL and the run backend it uses."""
    app = create_app(settings)
    async with serve(app) as url:
        yield url, app.state.runs.backend


async def bench_backend(name: str, overrides: dict[str, Any], events: int, tmp: Path) -> dict[str, Any]:
    settings = msgspec.convert(
        {"database_url": f"sqlite+aiosqlite:///{tmp / f'{name}.db'}", "max_events_per_run": events + 10, **overrides},
        Settings,
    )
    async with service_on(settings) as (url, backend):
        started = time.perf_counter()
        run_id = await write_run(backend, events)
        write_s = time.perf_counter() - started
        direct = max([await replay_rate(backend, run_id, events) for _ in range(3)])
        over_sse = max([await sse_replay_rate(url, run_id, events) for _ in range(3)])
        if name == "redis":
            held = float(await redis_bytes(overrides["redis_url"], overrides["redis_prefix"], run_id))
        else:
            held = await memory_per_run(events)
    return {
        "backend": name,
        "events": events,
        "append_events_per_s": events / write_s,
        "replay_events_per_s": direct,
        "sse_replay_events_per_s": over_sse,
        "bytes_per_finished_run": held,
    }


async def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--events", type=int, default=10_000)
    parser.add_argument("--redis-url", default=os.environ.get("SERVICE_TEST_REDIS_URL", "redis://127.0.0.1:6379/0"))
    parser.add_argument("--out", default="bench-results/resume.json")
    parser.add_argument("--finished-runs", type=int, default=0, help="measure memory held by N finished runs")
    parser.add_argument("--budget", type=int, default=None, help=argparse.SUPPRESS)  # one measurement, as JSON
    args = parser.parse_args()
    if args.finished_runs and args.budget is not None:
        print(json.dumps(await finished_runs_held(args.finished_runs, args.events, args.budget or None)))
        return None
    if args.finished_runs:
        return await bench_finished_runs(args.finished_runs, args.events)
    rows = []
    with TemporaryDirectory() as tmp:
        rows.append(await bench_backend("memory", {}, args.events, Path(tmp)))
        prefix = f"bench-{uuid.uuid4().hex[:8]}"
        try:
            overrides = {"redis_url": args.redis_url, "redis_prefix": prefix}
            rows.append(await bench_backend("redis", overrides, args.events, Path(tmp)))
        except OSError as exc:
            print(f"redis: skipped ({exc})")
        finally:
            client = redis.asyncio.Redis.from_url(args.redis_url)
            keys = [k async for k in client.scan_iter(match=f"{prefix}:*")]
            if keys:
                await client.delete(*keys)
            await client.aclose()
    print(f"{'backend':8} {'events':>7} {'append ev/s':>12} {'replay ev/s':>12} {'SSE replay ev/s':>16} {'KB/run':>8}")
    for row in rows:
        print(
            f"{row['backend']:8} {row['events']:>7} {row['append_events_per_s']:>12,.0f} "
            f"{row['replay_events_per_s']:>12,.0f} {row['sse_replay_events_per_s']:>16,.0f} "
            f"{row['bytes_per_finished_run'] / 1024:>8,.0f}"
        )
    write_json(Path(args.out), rows)


async def bench_finished_runs(runs: int, events: int) -> None:
    """Print what ``runs`` finished runs hold without a byte budget and with the default one.

    Each measurement runs in a process of its own, so that memory freed by one is not reused by the next.
    """
    default = msgspec.convert({}, Settings).max_finished_run_bytes
    print(f"{'budget MB':>10} {'runs':>6} {'events':>7} {'RSS growth MB':>14} {'estimated MB':>13} {'kept':>6}")
    for budget in (None, default):
        command = [sys.executable, "-m", "tests.bench.resume", "--finished-runs", str(runs), "--events", str(events)]
        child = await asyncio.create_subprocess_exec(
            *command, "--budget", str(budget or 0), stdout=asyncio.subprocess.PIPE
        )
        out, _ = await child.communicate()
        row = json.loads(out.decode().strip().splitlines()[-1])
        label = "none" if budget is None else f"{budget / 1e6:,.0f}"
        print(
            f"{label:>10} {runs:>6} {events:>7} {row['rss_growth'] / 1e6:>14,.0f} "
            f"{row['estimated'] / 1e6:>13,.0f} {row['kept']:>6}"
        )


def write_json(path: Path, rows: list[dict[str, Any]]) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(json.dumps(rows, indent=2) + "\n")


if __name__ == "__main__":
    asyncio.run(main())
