"""``/metrics`` exposes runs, their outcomes, time to first token and open streams (Prometheus text)."""

from __future__ import annotations

import asyncio

from prometheus_client.parser import text_string_to_metric_families

from tests.integration.conftest import Service
from tests.support.sse import iter_sse
from tests.support.upstream import finish, gate, status, text


async def scrape(service: Service) -> dict[str, float]:
    response = await service.http.get("/metrics")
    assert response.status_code == 200
    assert response.headers["content-type"].startswith("text/plain")
    samples: dict[str, float] = {}
    for family in text_string_to_metric_families(response.text):
        for sample in family.samples:
            labels = ",".join(f"{k}={v}" for k, v in sorted(sample.labels.items()))
            samples[f"{sample.name}{{{labels}}}"] = sample.value
    return samples


async def test_metrics_count_runs_outcomes_first_tokens_and_open_streams(service: Service) -> None:
    before = await scrape(service)
    hold = asyncio.Event()
    service.upstream.enqueue(text("hello", pieces=2), gate(hold), finish())
    service.upstream.enqueue(status(429))
    chat, other = await service.create_chat(), await service.create_chat()
    async with service.http.stream(
        "POST", f"/v1/chats/{chat}/runs", json={"message": "hi"}, headers={"accept": "text/event-stream"}
    ) as response:
        async for message in iter_sse(response):
            if message.kind == "event" and message.json()["type"] == "text.delta":
                break
        during = await scrape(service)
    hold.set()
    await service.stream_run(other, "hi")
    while (await service.http.get(f"/v1/chats/{chat}/active-run")).json() is not None:
        await asyncio.sleep(0.01)
    after = await scrape(service)

    def delta(name: str, snapshot: dict[str, float]) -> float:
        return snapshot.get(name, 0.0) - before.get(name, 0.0)

    assert delta("chat_service_active_runs{}", during) == 1
    assert delta("chat_service_open_streams{transport=sse}", during) == 1
    assert delta("chat_service_active_runs{}", after) == 0
    assert delta("chat_service_open_streams{transport=sse}", after) == 0
    assert delta("chat_service_runs_finished_total{status=completed}", after) == 1
    assert delta("chat_service_runs_finished_total{status=failed}", after) == 1
    assert delta("chat_service_run_errors_total{code=rate_limited}", after) == 1
    assert delta("chat_service_time_to_first_token_seconds_count{}", after) == 1
    assert delta("chat_service_run_events_total{}", after) >= 7


async def test_websocket_sessions_are_counted_as_streams_not_as_http_requests(service: Service) -> None:
    service.upstream.enqueue(text("over the socket"), finish())
    chat = await service.create_chat()

    events = await service.ws_run(chat, "hi")

    assert events[-1]["type"] == "run.completed"
    samples = await scrape(service)
    http = {name for name in samples if name.startswith("litestar_requests_total")}
    assert any("method=POST" in name and "path=/v1/chats" in name for name in http)
    assert not any("method=websocket" in name for name in http)
    assert samples["chat_service_open_streams{transport=websocket}"] == 0
