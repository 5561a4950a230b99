"""Prometheus metrics of runs and streams, served at ``/metrics`` next to Litestar's HTTP metrics.

Kept off the per-token path: a run's figures are added once, when it ends (its time to first
token once, at its first output), and the run log's latency is timed at a run's creation, at its
terminal event and at each read of its record, never at each event.

Labels stay bounded: ``provider`` and ``model`` take only configured names (anything else is
``other``, see ``ProviderRegistry.metric_labels``), ``operation`` and ``code`` closed sets.

Several workers (``uvicorn --workers N``): with ``PROMETHEUS_MULTIPROC_DIR`` set, prometheus-client
keeps every process's values in files there and ``/metrics`` (Litestar's controller) merges them,
so any worker's answer holds the whole service's figures. The directory must exist and be emptied
before the service starts (never while it runs): see the README. Gauges say how processes' values
merge (``livesum``: the sum over the running ones); those of a worker that died without stopping
(killed) are dropped when the next one starts.
"""

from __future__ import annotations

import functools
import os
import re
from collections.abc import Awaitable, Callable
from pathlib import Path
from types import CoroutineType
from typing import Any, ParamSpec, TypeVar

from prometheus_client import Counter, Gauge, Histogram, multiprocess

_P = ParamSpec("_P")
_T = TypeVar("_T")

_LATENCY_BUCKETS = (0.0005, 0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1, 2.5, 5)

ACTIVE_RUNS = Gauge("chat_service_active_runs", "Runs executing", multiprocess_mode="livesum")
RUNS_FINISHED = Counter("chat_service_runs_finished_total", "Runs ended, by outcome", ["status"])
RUN_ERRORS = Counter("chat_service_run_errors_total", "Failed runs, by error code", ["code"])
RUN_EVENTS = Counter("chat_service_run_events_total", "Events produced by runs")
TIME_TO_FIRST_EVENT = Histogram(
    "chat_service_time_to_first_token_seconds",
    "From a run's start to its first model output (text, reasoning, tool call or refusal)",
    ["provider", "model"],
    buckets=(0.05, 0.1, 0.25, 0.5, 1, 2, 4, 8, 16, 32),
)
RUN_SECONDS = Histogram(
    "chat_service_run_duration_seconds",
    "From a run's start to its end (whatever the outcome)",
    ["provider", "model"],
    buckets=(0.1, 0.25, 0.5, 1, 2.5, 5, 10, 20, 40, 80, 160, 320),
)
TOKENS = Counter(
    "chat_service_tokens_total",
    "Tokens of finished runs as the upstream reported them, by type (prompt, completion)",
    ["provider", "model", "type"],
)
UPSTREAM_ERRORS = Counter(
    "chat_service_upstream_errors_total",
    "Upstream failures that ended a run, by provider and error code (timeout, rate_limited, upstream_error, ...)",
    ["provider", "code"],
)
OPEN_STREAMS = Gauge(
    "chat_service_open_streams", "Open event streams, by transport", ["transport"], multiprocess_mode="livesum"
)
RUN_LOG_SECONDS = Histogram(
    "chat_service_run_log_seconds",
    "Run backend calls: create (a run's start), append (its terminal event), read (its record, per status or stream)",
    ["operation"],
    buckets=_LATENCY_BUCKETS,
)
STORE_SECONDS = Histogram(
    "chat_service_store_seconds",
    "Chat store (SQL) calls, by store method",
    ["operation"],
    buckets=_LATENCY_BUCKETS,
)

SKIP_HTTP_METRICS = "skip_http_metrics"
"""Route handler ``opt`` key: keep the route out of Litestar's Prometheus HTTP request metrics."""


def timed(histogram: Histogram) -> Callable[[Callable[_P, Awaitable[_T]]], Callable[_P, CoroutineType[Any, Any, _T]]]:
    """Decorate a coroutine function: each call's duration goes to ``histogram``, labelled with the function's name."""

    def decorate(function: Callable[_P, Awaitable[_T]]) -> Callable[_P, CoroutineType[Any, Any, _T]]:
        child = histogram.labels(function.__name__)

        @functools.wraps(function)
        async def timed_call(*args: _P.args, **kwargs: _P.kwargs) -> _T:
            with child.time():
                return await function(*args, **kwargs)

        return timed_call

    return decorate


def _multiprocess_dir() -> Path | None:
    path = os.environ.get("PROMETHEUS_MULTIPROC_DIR")
    return Path(path) if path else None


_LIVE_GAUGE_FILE = re.compile(r"gauge_live[a-z]+_(\d+)\.db")


def forget_dead_workers() -> None:
    """Multiprocess mode: drop the live gauges of processes that are gone (a worker killed, not stopped)."""
    directory = _multiprocess_dir()
    if directory is None:
        return
    for path in directory.iterdir():
        match = _LIVE_GAUGE_FILE.fullmatch(path.name)
        if match is not None and not _alive(int(match[1])):
            multiprocess.mark_process_dead(int(match[1]), str(directory))  # pyright: ignore[reportUnknownMemberType]


def _alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:  # someone else's process: alive
        return True
    return True
