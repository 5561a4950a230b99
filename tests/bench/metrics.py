"""Turn the client's raw per-stream records and the /proc readings into one result row.

Definitions (all per target, transport and scenario):

- ``cpu_us_per_token``: target CPU (``utime + stime`` delta over the streaming window) divided by
  the tokens delivered; ``cpu_us_per_token_sched`` is the same from schedstat (ns resolution);
  ``cpu_us_per_run``: the schedstat CPU divided by the streams (runs) of the scenario.
- ``events_per_s``: token events delivered divided by the streaming time; per round, the time
  from the first request written to the last token received, summed over rounds.
- ``ttft_added_*``: per stream, (first token received - request written) - the upstream's TTFT.
- ``gap_*``: time between consecutive token events of a stream, over all streams (``added`` =
  minus the upstream's pacing delay).
- ``rss_*``: idle = VmRSS after warm-up and before connecting; open = VmHWM over the window
  (reset at its start), i.e. with all streams open; per stream = (open - idle) / concurrent
  streams (``Scenario.concurrent``); peak = the process's VmHWM over its whole life.
- ``foreign_load_pct``: CPU that other processes used on the target's core during the window
  (core busy time from /proc/stat minus the target's own), as % of the window; ``load_core_pct``:
  how busy the load core (upstream + clients) was. Both are noise indicators.
"""

from __future__ import annotations

import math
from collections import Counter
from collections.abc import Sequence
from typing import Any

from tests.bench.client import StreamResult
from tests.bench.procs import CpuSample
from tests.bench.scenarios import Scenario


def percentile(values: Sequence[float], q: float) -> float | None:
    """Nearest-rank percentile (``q`` in 0..100); None for no values."""
    if not values:
        return None
    ordered = sorted(values)
    return ordered[max(0, min(len(ordered) - 1, math.ceil(q / 100 * len(ordered)) - 1))]


def events_per_s(results: Sequence[StreamResult]) -> float | None:
    """Token events per second of streaming time (rounds run one after the other)."""
    spans: dict[int, tuple[float, float]] = {}
    for r in results:
        if r.tokens:
            lo, hi = spans.get(r.round, (r.t_sent, r.t_last))
            spans[r.round] = (min(lo, r.t_sent), max(hi, r.t_last))
    busy = sum(hi - lo for lo, hi in spans.values())
    return sum(r.tokens for r in results) / busy if busy > 0 else None


def _per_token(cpu_s: float, tokens: int) -> float | None:
    return cpu_s * 1e6 / tokens if tokens else None


def summarise(
    scenario: Scenario,
    results: Sequence[StreamResult],
    cpu: tuple[CpuSample, CpuSample],
    mem: dict[str, Any],
) -> dict[str, Any]:
    """One result row (see the module docstring for the definitions)."""
    tokens = sum(r.tokens for r in results)
    errors = Counter(r.error for r in results if r.error)
    ttfts = [r.ttft_s * 1000 - scenario.ttft_ms for r in results if r.ttft_s is not None]
    gaps = [g for r in results for g in r.gaps_ms]
    cpu_stat = cpu[1].stat_s - cpu[0].stat_s
    cpu_sched = cpu[1].sched_s - cpu[0].sched_s
    gap_p99 = percentile(gaps, 99)
    idle, open_ = mem["idle_kb"], mem["open_kb"]
    return {
        "streams": len(results),
        "tokens_expected": scenario.total_tokens,
        "tokens": tokens,
        "errors": sum(errors.values()),
        "error_samples": [f"{n} x {why}" for why, n in errors.most_common(3)],
        "cpu_s": round(cpu_stat, 3),
        "cpu_s_sched": round(cpu_sched, 4),
        "cpu_us_per_token": _per_token(cpu_stat, tokens),
        "cpu_us_per_token_sched": _per_token(cpu_sched, tokens),
        "cpu_us_per_run": _per_token(cpu_sched, len(results)),
        "events_per_s": events_per_s(results),
        "ttft_added_p50_ms": percentile(ttfts, 50),
        "ttft_added_p99_ms": percentile(ttfts, 99),
        "gap_p50_ms": percentile(gaps, 50),
        "gap_p99_ms": gap_p99,
        "gap_added_p99_ms": None if gap_p99 is None else gap_p99 - scenario.delay_ms,
        "rss_idle_mb": idle / 1024,
        "rss_open_mb": open_ / 1024,
        "peak_rss_mb": mem["peak_kb"] / 1024,
        "rss_per_stream_kb": (open_ - idle) / scenario.concurrent,
        "rss_open_source": mem["open_source"],
    }
