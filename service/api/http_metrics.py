"""Litestar's Prometheus HTTP metrics, with event streams measured as requests, not as lifetimes.

``StreamAwarePrometheusMiddleware`` is Litestar's ``PrometheusMiddleware`` (its metrics, names and
labels) with two intentional divergences:

1. A response whose ``Content-Type`` is ``text/event-stream`` (``GET /v1/runs/{id}/events`` and
   ``/stream``, ``POST /v1/chats/{id}/runs/stream``, ``POST /v1/chats/{id}/runs`` with
   ``Accept: text/event-stream``) is counted
   in ``litestar_requests_total`` with its status, but stays out of
   ``litestar_request_duration_seconds`` (its "duration" would be the stream's whole life, minutes,
   burying the API's latencies) and leaves ``litestar_requests_in_progress`` once its headers are
   sent (``chat_service_open_streams`` counts it from then on). Its 4xx answers are JSON, not
   streams, so they are measured like any request. The WebSocket stays out altogether (``opt``
   ``SKIP_HTTP_METRICS``), as before.
2. ``litestar_requests_in_progress`` has no ``status_code`` label (the plugin gives it one, always
   ``200``: a request in progress has no status yet).

Exemplars and ``excluded_http_methods`` of ``PrometheusConfig`` are not supported (not used here).
"""

from __future__ import annotations

import time
from typing import Any

from litestar.connection.request import Request
from litestar.plugins.prometheus import PrometheusMiddleware
from litestar.status_codes import HTTP_500_INTERNAL_SERVER_ERROR
from litestar.types import Message, Receive, Scope, Send

_EVENT_STREAM = b"text/event-stream"


def _is_event_stream(start: Message) -> bool:
    return any(
        name.lower() == b"content-type" and value.startswith(_EVENT_STREAM)
        for name, value in start.get("headers", ())  # pyright: ignore[reportUnknownVariableType]
    )


class StreamAwarePrometheusMiddleware(PrometheusMiddleware):
    """See the module docstring."""

    def _get_default_labels(self, request: Request[Any, Any, Any]) -> dict[str, str | int | float]:
        if not self._config.group_path:
            return super()._get_default_labels(request)
        # Litestar's builds the request's URL (~25 µs a request) and then takes the path template instead.
        scope = request.scope
        return {
            "method": scope["method"] if scope["type"] == "http" else scope["type"],  # pyright: ignore[reportTypedDictNotRequiredAccess]
            "path": scope["path_template"],
            "status_code": 200,
            "app_name": self._config.app_name,
        }

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:  # noqa: D102
        request = Request[Any, Any, Any](scope, receive)
        labels = {**self._get_default_labels(request), **self._get_extra_labels(request)}
        progress_labels = {name: value for name, value in labels.items() if name != "status_code"}
        in_progress = self.requests_in_progress(progress_labels).labels(*progress_labels.values())
        started = time.perf_counter()
        status, stream, ended = 200, False, started

        async def measured_send(message: Message) -> None:
            nonlocal status, stream, ended
            if message["type"] == "http.response.start":
                status, stream = message["status"], _is_event_stream(message)
                if stream:
                    in_progress.dec()
            elif message["type"] == "http.response.body" and not stream:
                ended = time.perf_counter()
            await send(message)

        in_progress.inc()
        try:
            await self.app(scope, receive, measured_send)
        finally:
            if not stream:
                in_progress.dec()
            labels["status_code"] = status
            values = [*labels.values()]
            if status >= HTTP_500_INTERNAL_SERVER_ERROR:
                self.requests_error_count(labels).labels(*values).inc()
            self.request_count(labels).labels(*values).inc()
            if not stream:
                self.request_time(labels).labels(*values).observe(ended - started)
