"""``/metrics`` exposes runs (outcomes, durations, time to first token, tokens by provider and model),
upstream errors, open streams, run-log and store latencies and HTTP requests (Prometheus text).

The registry is the test process's, shared by the services of all tests: each test compares a
scrape with one taken before. The ``workers`` tests run ``uvicorn --workers 2`` in multiprocess
mode: every scrape, whichever worker answers it, holds both workers' runs, and a killed worker's
active run stops counting once uvicorn has started its replacement.
"""

from __future__ import annotations

import asyncio
import contextlib
import json
import os
import re
import signal
import uuid
from collections.abc import AsyncIterator, Iterator, Mapping
from dataclasses import dataclass
from pathlib import Path

import httpx
import pytest
from prometheus_client.multiprocess import MultiProcessCollector
from prometheus_client.parser import text_string_to_metric_families

from tests.integration.conftest import MODEL, Service, ServiceFactory, delete_prefix
from tests.integration.test_instances import instance_env
from tests.support.live_server import ServiceProcess
from tests.support.sse import iter_sse
from tests.support.upstream import ScriptedUpstream, finish, gate, scripted_upstream, status, text, usage
from tests.support.wait import until


async def scrape(service: Service) -> dict[str, float]:
    return await scrape_url(service.http)


async def scrape_url(http: httpx.AsyncClient) -> dict[str, float]:
    """``GET /metrics`` as ``{'name{label=value,...}': value}``, labels sorted by name."""
    response = await http.get("/metrics")
    assert response.status_code == 200
    assert response.headers["content-type"].startswith("text/plain")
    samples: dict[str, float] = {}
    for family in text_string_to_metric_families(response.text):
        for sample in family.samples:
            samples[key(sample.name, sample.labels)] = sample.value
    return samples


def key(name: str, labels: Mapping[str, str]) -> str:
    return name + "{" + ",".join(f"{k}={v}" for k, v in sorted(labels.items())) + "}"


def deltas(before: dict[str, float], after: dict[str, float]) -> dict[str, float]:
    """What changed between two scrapes (creation timestamps left out)."""
    return {
        name: value - before.get(name, 0.0)
        for name, value in after.items()
        if value != before.get(name, 0.0) and "_created{" not in name
    }


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
    assert delta("chat_service_time_to_first_token_seconds_count{model=other,provider=openai}", after) == 1
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


async def test_runs_on_two_providers_are_labelled_by_provider_and_configured_model(
    make_service: ServiceFactory, tmp_path: Path
) -> None:
    async with scripted_upstream() as alpha, scripted_upstream() as beta:
        providers = {
            "providers": {
                "alpha": {"base_url": alpha.base_url, "api_key": "a", "models": ["small", "large"]},
                "beta": {"base_url": beta.base_url, "api_key": "b"},  # any model name: labelled "other"
            }
        }
        (tmp_path / "providers.json").write_text(json.dumps(providers))
        service = await make_service(providers=str(tmp_path / "providers.json"))
        alpha.enqueue(text("one"), finish(), usage(10, 3))
        alpha.enqueue(text("two"), finish(), usage(12, 4))
        beta.enqueue(text("three"), finish(), usage(7, 5))
        beta.enqueue(status(429))
        before = await scrape(service)
        for model in ("alpha/small", "alpha/small", "beta/whatever-1", "beta/whatever-2"):
            events = await service.stream_run(await service.create_chat(model=model), "hi")
            assert events[-1]["type"] in ("run.completed", "run.failed")
        changed = deltas(before, await scrape(service))

    small, other = {"provider": "alpha", "model": "small"}, {"provider": "beta", "model": "other"}
    assert changed[key("chat_service_run_duration_seconds_count", small)] == 2
    assert changed[key("chat_service_run_duration_seconds_count", other)] == 2
    assert changed[key("chat_service_time_to_first_token_seconds_count", small)] == 2
    assert changed[key("chat_service_time_to_first_token_seconds_count", other)] == 1  # the 429 run had no output
    assert changed[key("chat_service_tokens_total", {**small, "type": "prompt"})] == 22
    assert changed[key("chat_service_tokens_total", {**small, "type": "completion"})] == 7
    assert changed[key("chat_service_tokens_total", {**other, "type": "prompt"})] == 7
    assert changed[key("chat_service_tokens_total", {**other, "type": "completion"})] == 5
    assert changed[key("chat_service_upstream_errors_total", {"provider": "beta", "code": "rate_limited"})] == 1
    assert not any("upstream_errors" in name and "provider=alpha" in name for name in changed)
    assert not any("whatever" in name or "model=large" in name for name in changed)  # only what ran, bounded
    assert changed[key("chat_service_run_log_seconds_count", {"operation": "create"})] == 4
    assert changed[key("chat_service_run_log_seconds_count", {"operation": "append"})] == 4
    assert changed[key("chat_service_store_seconds_count", {"operation": "create_chat"})] == 4
    assert changed[key("chat_service_store_seconds_count", {"operation": "append_and_list"})] == 4
    assert changed[key("chat_service_store_seconds_count", {"operation": "append_messages"})] == 4


def http_key(metric: str, method: str, path: str, status_code: int | None = None) -> str:
    labels = {"app_name": "chat_service", "method": method, "path": path}
    return key(metric, labels if status_code is None else {**labels, "status_code": str(status_code)})


async def test_event_streams_are_counted_but_kept_out_of_the_http_duration_histogram(service: Service) -> None:
    runs, events = "/v1/chats/{chat_id}/runs", "/v1/runs/{run_id}/events"
    hold = asyncio.Event()
    service.upstream.enqueue(text("held"), gate(hold), finish())
    chat = await service.create_chat()
    before = await scrape(service)
    started = await service.http.post(f"/v1/chats/{chat}/runs", json={"message": "hi"})
    assert started.status_code == 202
    async with service.http.stream("GET", started.json()["events_url"]) as stream:
        assert stream.headers["content-type"].startswith("text/event-stream")
        during = deltas(before, await scrape(service))
        hold.set()
        async for _ in iter_sse(stream):
            pass
    assert (await service.http.get("/v1/runs/no-such-run/events")).status_code == 404
    assert (await service.http.post(f"/v1/chats/{chat}/runs", json={})).status_code == 400
    service.upstream.enqueue(text("streamed"), finish())
    await service.stream_run(chat, "again")
    changed = deltas(before, await scrape(service))

    # An open stream is no request in progress: it left the gauge when its headers went out.
    assert during[key("chat_service_open_streams", {"transport": "sse"})] == 1
    assert http_key("litestar_requests_in_progress", "GET", events) not in during
    assert not any(name.startswith("litestar_requests_in_progress") and "status_code" in name for name in before)
    # Streams (200 text/event-stream) are counted, but their lifetimes are not request durations.
    for method, path in (("GET", events), ("POST", runs)):
        assert changed[http_key("litestar_requests_total", method, path, 200)] == 1
        assert http_key("litestar_request_duration_seconds_count", method, path, 200) not in changed
    # Their 4xx answers (JSON) and the JSON start of a run are requests like any other.
    for method, path, code in (("GET", events, 404), ("POST", runs, 400), ("POST", runs, 202)):
        assert changed[http_key("litestar_requests_total", method, path, code)] == 1
        assert changed[http_key("litestar_request_duration_seconds_count", method, path, code)] == 1


RUNS_ON = (2, 3)
"""Runs each worker serves (the scrapes must show their sum, 5, whichever worker answers)."""


def runs_per_worker(directory: Path) -> dict[int, float]:
    """Completed runs counted in each worker's own multiprocess file (``counter_<pid>.db``)."""
    counted: dict[int, float] = {}
    for path in directory.glob("counter_*.db"):
        for metric in MultiProcessCollector.merge([str(path)]):
            for sample in metric.samples:
                if sample.name == "chat_service_runs_finished_total" and sample.labels == {"status": "completed"}:
                    counted[int(path.stem.removeprefix("counter_"))] = sample.value
    return counted


@contextlib.contextmanager
def only(worker: int, workers: list[int]) -> Iterator[None]:
    """Let ``worker`` alone accept connections: the other workers are stopped (SIGSTOP) meanwhile.

    The kernel hands a new connection to whichever worker accepts first; left to itself, it gave all
    of 40 runs to one worker on a loaded machine.
    """
    others = [pid for pid in workers if pid != worker]
    for pid in others:
        os.kill(pid, signal.SIGSTOP)
    try:
        yield
    finally:
        for pid in others:
            os.kill(pid, signal.SIGCONT)


STARTED = "Application startup complete."


async def workers_started(process: ServiceProcess, count: int) -> list[int]:
    """The pids of the workers started so far, once ``count`` have completed their start-up (restarts count)."""

    async def all_started() -> bool:
        return process.logs().count(STARTED) >= count

    await until(all_started, timeout=60)
    return [int(pid) for pid in re.findall(r"Started server process \[(\d+)\]", process.logs())]


@dataclass
class Workers:
    """``uvicorn --workers 2`` in multiprocess mode, with Redis runs, and a client that reaches any worker."""

    process: ServiceProcess
    pids: list[int]
    http: httpx.AsyncClient
    upstream: ScriptedUpstream
    directory: Path


@pytest.fixture
async def workers(redis_url: str, tmp_path: Path) -> AsyncIterator[Workers]:
    directory = tmp_path / "metrics"
    directory.mkdir()  # empty before the service starts, as the README says
    prefix = f"test-{uuid.uuid4().hex}"
    async with scripted_upstream() as upstream:
        env = instance_env(tmp_path, upstream, redis_url, prefix) | {"PROMETHEUS_MULTIPROC_DIR": str(directory)}
        async with ServiceProcess(env, extra_args=["--workers", str(len(RUNS_ON))], startup_timeout=60) as process:
            pids = await workers_started(process, len(RUNS_ON))
            fresh = httpx.Limits(max_keepalive_connections=0)  # a new connection per request: never a stopped worker's
            async with httpx.AsyncClient(base_url=process.url, timeout=20, limits=fresh) as http:
                yield Workers(process, pids, http, upstream, directory)
    await delete_prefix(redis_url, prefix)


@pytest.mark.redis
@pytest.mark.xdist_group("redis")
@pytest.mark.slow
async def test_two_workers_merged_metrics_count_every_run_whichever_worker_answers(workers: Workers) -> None:
    http, pids = workers.http, workers.pids
    for worker, count in zip(pids, RUNS_ON, strict=True):
        with only(worker, pids):
            for _ in range(count):
                workers.upstream.enqueue(text("hi"), finish(), usage(3, 2))
                chat = (await http.post("/v1/chats", json={"model": MODEL})).json()["id"]
                response = await http.post(
                    f"/v1/chats/{chat}/runs", json={"message": "hi"}, headers={"accept": "text/event-stream"}
                )
                assert '"run.completed"' in response.text
    assert runs_per_worker(workers.directory) == dict(zip(pids, RUNS_ON, strict=True))
    scrapes: list[dict[str, float]] = []
    for worker in pids:
        with only(worker, pids):
            scrapes += [await scrape_url(http) for _ in range(3)]

    runs = sum(RUNS_ON)
    prompt = key("chat_service_tokens_total", {"provider": "openai", "model": "other", "type": "prompt"})
    for samples in scrapes:
        assert samples["chat_service_runs_finished_total{status=completed}"] == runs
        assert samples[prompt] == 3 * runs
        assert samples["chat_service_run_duration_seconds_count{model=other,provider=openai}"] == runs
        assert samples["chat_service_active_runs{}"] == 0
        assert samples[http_key("litestar_requests_total", "POST", "/v1/chats", 201)] == runs


@pytest.mark.redis
@pytest.mark.xdist_group("redis")
@pytest.mark.slow
async def test_a_killed_workers_active_runs_stop_counting_once_its_replacement_starts(workers: Workers) -> None:
    http, (doomed, other) = workers.http, workers.pids
    workers.upstream.enqueue(text("held"), gate(asyncio.Event()), finish())  # never released
    with only(doomed, workers.pids):
        chat = (await http.post("/v1/chats", json={"model": MODEL})).json()["id"]
        assert (await http.post(f"/v1/chats/{chat}/runs", json={"message": "hi"})).status_code == 202
        await workers.upstream.wait_for_requests(1)
        assert (await scrape_url(http))["chat_service_active_runs{}"] == 1

    os.kill(doomed, signal.SIGKILL)  # no shutdown: its files still say one run is active
    pids = await workers_started(workers.process, len(RUNS_ON) + 1)  # uvicorn starts a replacement

    for worker in (other, pids[-1]):
        with only(worker, [other, pids[-1]]):
            assert (await scrape_url(http))["chat_service_active_runs{}"] == 0
