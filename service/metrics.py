"""Prometheus metrics of runs and streams, served at ``/metrics`` next to Litestar's HTTP metrics.

Kept off the per-token path: counters are added once per run, not once per event.
"""

from __future__ import annotations

from prometheus_client import Counter, Gauge, Histogram

ACTIVE_RUNS = Gauge("chat_service_active_runs", "Runs executing on this instance")
RUNS_FINISHED = Counter("chat_service_runs_finished_total", "Runs ended, by outcome", ["status"])
RUN_ERRORS = Counter("chat_service_run_errors_total", "Failed runs, by error code", ["code"])
RUN_EVENTS = Counter("chat_service_run_events_total", "Events produced by runs on this instance")
TIME_TO_FIRST_EVENT = Histogram(
    "chat_service_time_to_first_token_seconds",
    "From a run's start to its first model output (text, reasoning, tool call or refusal)",
    buckets=(0.05, 0.1, 0.25, 0.5, 1, 2, 4, 8, 16, 32),
)
OPEN_STREAMS = Gauge("chat_service_open_streams", "Open event streams, by transport", ["transport"])

SKIP_HTTP_METRICS = "skip_http_metrics"
"""Route handler ``opt`` key: keep the route out of Litestar's Prometheus HTTP request metrics."""
