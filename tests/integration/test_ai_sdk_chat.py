"""``/v1/ai-sdk/chat`` over real HTTP against the scripted upstream, on both run backends.

The real `ai` package drives it in tests/e2e/test_ai_sdk.py; here the wire and the run's fate are checked
directly: a stream cut and resumed within the grace keeps its run, a stream left alone cancels it after the
grace, resume answers 204 when nothing is active, and a body whose last message is not the user's is 400.
"""

from __future__ import annotations

import asyncio
from collections.abc import Callable
from typing import Any

import httpx

from tests.integration.conftest import Service, ServiceFactory
from tests.support.sse import iter_sse
from tests.support.upstream import finish, gate, text

API = "/v1/ai-sdk/chat"
GRACE_S = 1.5


def body(chat: str, message: str = "hi") -> dict[str, Any]:
    user = {"id": "u1", "role": "user", "parts": [{"type": "text", "text": message}]}
    return {"id": chat, "messages": [user], "trigger": "submit-message"}


async def read_parts(
    http: httpx.AsyncClient, method: str, url: str, until: Callable[[dict[str, Any]], bool] | None = None, **kw: Any
) -> tuple[httpx.Response, list[dict[str, Any]], bool]:
    """The response, its parts, and whether ``[DONE]`` ended it (reading stops early once ``until(part)``)."""
    parts: list[dict[str, Any]] = []
    async with http.stream(method, url, **kw) as response:
        if response.status_code != 200:
            await response.aread()
            return response, parts, False
        async for message in iter_sse(response):
            if message.kind != "event":
                continue
            if message.data == "[DONE]":
                return response, parts, True
            parts.append(message.json())
            if until is not None and until(parts[-1]):
                break
    return response, parts, False


def first_delta(part: dict[str, Any]) -> bool:
    return part["type"] == "text-delta"


async def run_status(service: Service, run_id: str) -> str:
    return str((await service.http.get(f"/v1/runs/{run_id}")).json()["status"])


async def test_a_stream_cut_and_resumed_within_the_grace_keeps_its_run(
    make_service: ServiceFactory, backend: dict[str, Any]
) -> None:
    service = await make_service(ai_sdk_resume_grace_s=GRACE_S, **backend)
    release = asyncio.Event()
    service.upstream.enqueue(text("one two"), gate(release), text(" three"), finish())

    response, head, _ = await read_parts(service.http, "POST", API, first_delta, json=body("chat-a"))
    assert response.headers["x-vercel-ai-ui-message-stream"] == "v1"
    assert response.headers["content-type"].startswith("text/event-stream")
    run_id = head[0]["messageMetadata"]["run_id"]
    resumed = asyncio.create_task(read_parts(service.http, "GET", f"{API}/chat-a/stream"))
    await asyncio.sleep(GRACE_S * 1.5)  # past the grace: the resumed reader is what keeps the run
    assert await run_status(service, run_id) == "running"
    release.set()
    response, parts, done = await resumed

    assert response.status_code == 200 and done
    assert parts[0] == head[0]  # a replay from the start: the same message id and metadata
    assert "".join(p["delta"] for p in parts if p["type"] == "text-delta") == "one two three"
    assert parts[-1] == {"type": "finish", "finishReason": "stop"}
    assert await run_status(service, run_id) == "completed"
    assert (await service.http.get(f"{API}/chat-a/stream")).status_code == 204  # nothing active any more


async def test_a_stream_left_alone_is_cancelled_once_the_grace_is_over(
    make_service: ServiceFactory, backend: dict[str, Any]
) -> None:
    service = await make_service(ai_sdk_resume_grace_s=GRACE_S, **backend)
    service.upstream.enqueue(text("never finished"), gate(asyncio.Event()), finish())

    _, head, _ = await read_parts(service.http, "POST", API, first_delta, json=body("chat-b"))
    run_id = head[0]["messageMetadata"]["run_id"]
    await asyncio.sleep(GRACE_S / 2)
    assert await run_status(service, run_id) == "running"  # a reload may still resume it
    async with asyncio.timeout(GRACE_S + 5):
        while await run_status(service, run_id) == "running":
            await asyncio.sleep(0.05)
    assert await run_status(service, run_id) == "cancelled"
    (request,) = service.upstream.requests
    assert request.client_disconnected  # the upstream request was closed


async def test_resume_without_an_active_run_is_204_and_a_turn_must_end_with_the_user(service: Service) -> None:
    assert (await service.http.get(f"{API}/never-used/stream")).status_code == 204
    _, parts, done = await read_parts(service.http, "POST", API, json=body("chat-c"))
    assert done and parts[-1]["type"] == "finish"
    assert (await service.http.get(f"{API}/chat-c/stream")).status_code == 204

    answer = {"id": "a1", "role": "assistant", "parts": [{"type": "text", "text": "hello"}]}
    refused = await service.http.post(API, json={**body("chat-c"), "messages": [answer]})
    assert refused.status_code == 400
    assert refused.json()["error"]["detail"]["field"] == "messages"
