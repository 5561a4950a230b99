"""Issue 16, items 3, 6, 7, 8 and 9: hostile or careless clients get typed answers, and nothing dies silently.

- 3: a body or WebSocket frame nesting 1,000 brackets answered 500 ``internal`` / closed the socket with
  4500 (a ``RecursionError`` in msgspec's decoder and in ``_guess_ref``): now 400 / an ``error`` frame.
- 6: an ``Idempotency-Key`` reused with a different body silently returned the old run: now 422.
- 7: an unknown body field (``{"modle": "demo"}``) was reported as ``detail.field: "data"``.
- 8: the first cancel answered ``status: "running"``; a WebSocket ``run.cancel`` got no answer at all.
- 9: a WebSocket handler that failed with anything but a ``ServiceError`` died as an unretrieved task
  exception: the client never heard back.
"""

from __future__ import annotations

import asyncio
import gc
import json
from pathlib import Path
from typing import Any

import pytest
import websockets

from tests.integration.conftest import TERMINAL, Service, ServiceFactory, types
from tests.support.log_records import recorded
from tests.support.redis_server import RedisServer
from tests.support.upstream import finish, gate, text

DEEP = "[" * 1000 + "]" * 1000


def error_of(response: Any, status: int, code: str) -> dict[str, Any]:
    assert response.status_code == status, response.text
    error = response.json()["error"]
    assert error["code"] == code, error
    return dict(error)


async def answer(ws: Any, frame: dict[str, Any] | str) -> dict[str, Any]:
    await ws.send(frame if isinstance(frame, str) else json.dumps(frame))
    async with asyncio.timeout(10):
        return dict(json.loads(await ws.recv()))


async def still_open(ws: Any) -> None:
    assert await answer(ws, {"type": "ping", "nonce": "alive"}) == {"type": "pong", "nonce": "alive"}


# -- item 3: nesting -------------------------------------------------------------------------------


def nested_schema(levels: int) -> dict[str, Any]:
    schema: dict[str, Any] = {"type": "string"}
    for _ in range(levels):
        schema = {"type": "object", "properties": {"a": schema}}
    return schema


async def test_a_deeply_nested_body_is_400_naming_the_problem_and_the_service_goes_on(service: Service) -> None:
    chat = await service.create_chat()
    for path, raw in [
        ("/v1/chats", DEEP),
        ("/v1/chats", f'{{"model": {DEEP}}}'),
        (f"/v1/chats/{chat}/runs", f'{{"message": "hi", "tools": {DEEP}}}'),
        (f"/v1/chats/{chat}/runs", '{"message": [%s]}' % ('{"type": "text", "text": ' * 500 + '"x"' + "}" * 500)),
    ]:
        response = await service.http.post(path, content=raw, headers={"content-type": "application/json"})
        error = error_of(response, 400, "invalid_request")
        assert "deeper than 64 levels" in error["message"]
        assert error["detail"]["max_depth"] == 64
    # Brackets inside strings are text, not nesting; a response_format schema nested within the body's cap
    # but past the schema's own (SERVICE_SCHEMA_MAX_DEPTH) is that check's 400.
    assert (await service.http.post("/v1/chats", json={"model": "openai/scripted", "system": DEEP})).status_code == 201
    schema = {"type": "json_schema", "json_schema": {"name": "deep", "schema": nested_schema(30)}}
    response = await service.http.post("/v1/chats", json={"model": "openai/scripted", "response_format": schema})
    error = error_of(response, 400, "invalid_request")
    assert error["detail"]["field"] == "response_format.json_schema.schema"
    assert "deeper than 20" in error["message"]
    assert (await service.http.get("/v1/chats")).status_code == 200


async def test_the_nesting_cap_is_a_setting(make_service: ServiceFactory) -> None:
    service = await make_service(max_json_depth=4)
    ok = await service.http.post("/v1/chats", json={"tools": [], "response_format": {"type": "text"}})
    assert ok.status_code == 201, ok.text
    deep = await service.http.post("/v1/chats", json={"system": "x", "tools": [[[[["clock"]]]]]})
    assert "deeper than 4 levels" in error_of(deep, 400, "invalid_request")["message"]


async def test_a_deeply_nested_frame_gets_an_error_frame_and_the_socket_stays_open(service: Service) -> None:
    async with websockets.connect(service.ws_url) as ws:
        for frame in [DEEP, f'{{"type": "ping", "nonce": {DEEP}}}', f'{{"type": "run.create", "client_ref": {DEEP}}}']:
            error = await answer(ws, frame)
            assert (error["type"], error["code"]) == ("error", "invalid_frame"), error
            assert "deeper than 64 levels" in error["message"]
            await still_open(ws)


# -- item 6: idempotency ---------------------------------------------------------------------------


async def test_an_idempotency_key_reused_with_another_body_is_422(
    make_service: ServiceFactory, backend: dict[str, Any]
) -> None:
    service = await make_service(**backend)
    service.upstream.enqueue(text("one answer"), finish())
    chat = await service.create_chat()
    key = {"idempotency-key": "k-1"}
    body = {"message": "hello", "response_format": {"type": "json_object"}}
    first = await service.http.post(f"/v1/chats/{chat}/runs", json=body, headers=key)
    # The same request again (its JSON keys in another order) is the same run.
    again = await service.http.post(
        f"/v1/chats/{chat}/runs", json={"response_format": {"type": "json_object"}, "message": "hello"}, headers=key
    )
    assert (first.status_code, again.status_code) == (202, 202), again.text
    assert again.json()["id"] == first.json()["id"]
    for other in [{"message": "hello!"}, {"message": "hello"}, {**body, "on_disconnect": "cancel"}]:
        reused = await service.http.post(f"/v1/chats/{chat}/runs", json=other, headers=key)
        error = error_of(reused, 422, "idempotency_key_reused")
        assert error["detail"] == {"field": "Idempotency-Key", "run_id": first.json()["id"]}
    async with websockets.connect(service.ws_url) as ws:
        frame = {"type": "run.create", "client_ref": "c", "chat_id": chat, "message": "bye", "idempotency_key": "k-1"}
        error = await answer(ws, frame)
        assert (error["type"], error["code"], error["ref"]) == ("error", "idempotency_key_reused", "c")
    # Only the first one reached the upstream.
    assert len(service.upstream.requests) == 1


# -- item 7: field names ---------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("path", "body", "field"),
    [
        ("/v1/chats", {"modle": "demo"}, "modle"),
        ("/v1/chats", {"model": 5}, "model"),
        ("/v1/chats", {"tools": ["clock", 1]}, "tools[1]"),
        (
            "/v1/chats",
            {"response_format": {"type": "json_schema", "json_schema": {"name": "x", "schema": {}, "strictt": 1}}},
            "response_format.json_schema.strictt",
        ),
        (
            "/v1/chats",
            {"response_format": {"type": "json_schema", "json_schema": {"schema": {}}}},
            "response_format.json_schema.name",
        ),
        ("runs", {}, "message"),
        ("runs", {"message": "hi", "extra": True}, "extra"),
        ("runs", {"message": [{"type": "text"}]}, "message[0].text"),
    ],
    ids=["unknown", "wrong-type", "list-item", "nested-unknown", "nested-missing", "missing", "run-unknown", "part"],
)
async def test_a_400_names_the_offending_body_field(
    service: Service, path: str, body: dict[str, Any], field: str
) -> None:
    if path == "runs":
        path = f"/v1/chats/{await service.create_chat()}/runs"
    error = error_of(await service.http.post(path, json=body), 400, "invalid_request")
    assert error["detail"]["field"] == field, error
    assert error["message"].startswith(f"{field}: ")


async def test_query_header_and_frame_errors_name_their_field(service: Service) -> None:
    error = error_of(await service.http.get("/v1/chats", params={"limit": "many"}), 400, "invalid_request")
    assert error["detail"]["field"] == "limit"
    chat = await service.create_chat()
    response = await service.http.post(
        f"/v1/chats/{chat}/runs", json={"message": "hi"}, headers={"idempotency-key": ""}
    )
    assert error_of(response, 400, "invalid_request")["detail"]["field"] == "Idempotency-Key"
    async with websockets.connect(service.ws_url) as ws:
        for frame, field in [
            ({"type": "ping", "nonse": 1}, "nonse"),
            ({"type": "run.create", "client_ref": "c", "chat_id": chat, "message": 5}, "message"),
            ({"type": "run.create", "client_ref": "c", "message": "hi"}, "chat_id"),
            ({"type": "run.resume", "run_id": "r", "after": "x"}, "after"),
        ]:
            error = await answer(ws, frame)
            assert (error["type"], error["detail"]["field"]) == ("error", field), error


# -- item 8: cancel answers ------------------------------------------------------------------------


async def held_run(service: Service) -> tuple[str, dict[str, Any]]:
    """A run that has streamed its first words and waits (forever) for the rest."""
    service.upstream.enqueue(text("partial", pieces=2), gate(asyncio.Event()), text(" never"), finish())
    chat = await service.create_chat()
    run = (await service.http.post(f"/v1/chats/{chat}/runs", json={"message": "go"})).json()
    await service.upstream.wait_for_requests(1)
    return chat, dict(run)


async def test_cancel_answers_the_state_it_leads_to(make_service: ServiceFactory, backend: dict[str, Any]) -> None:
    service = await make_service(**backend)
    _, run = await held_run(service)
    cancelled = await service.http.post(f"/v1/runs/{run['id']}/cancel")
    assert cancelled.status_code == 200
    body = cancelled.json()
    assert (body["status"], body["message_id"] is not None, body["finished_at"] is not None) == (
        "cancelled",
        True,
        True,
    )
    # A run that finished first keeps its own end.
    service.upstream.enqueue(text("done"), finish())
    chat = await service.create_chat()
    events = await service.stream_run(chat, "go")
    late = await service.http.post(f"/v1/runs/{events[0]['run_id']}/cancel")
    assert (late.status_code, late.json()["status"]) == (200, "completed")


async def test_a_websocket_cancel_is_acknowledged_also_to_a_socket_not_following_the_run(
    make_service: ServiceFactory, backend: dict[str, Any]
) -> None:
    service = await make_service(**backend)
    _, run = await held_run(service)
    async with websockets.connect(service.ws_url) as follower, websockets.connect(service.ws_url) as other:
        resumed = await answer(follower, {"type": "run.resume", "run_id": run["id"], "after": 0})
        assert resumed["type"] == "run.resumed"
        ack = await answer(other, {"type": "run.cancel", "run_id": run["id"]})
        assert ack == {
            "type": "run.cancel_ack",
            "run_id": run["id"],
            "status": "cancelled",
            "last_seq": ack["last_seq"],
        }
        seen = []
        async with asyncio.timeout(10):
            while not seen or seen[-1]["type"] not in TERMINAL:
                seen.append(json.loads(await follower.recv()))
        assert seen[-1]["type"] == "run.cancelled"
        assert seen[-1]["seq"] == ack["last_seq"]
        again = await answer(other, {"type": "run.cancel", "run_id": run["id"]})
        assert again == ack  # idempotent: the finished run as it is
        unknown_cancel = await answer(other, {"type": "run.cancel", "run_id": "nope"})
        unknown_resume = await answer(other, {"type": "run.resume", "run_id": "nope"})
        assert unknown_cancel == unknown_resume
        assert (unknown_cancel["type"], unknown_cancel["code"], unknown_cancel["ref"]) == ("error", "not_found", "nope")


# -- item 9: no handler dies silently --------------------------------------------------------------


async def test_a_websocket_handler_that_fails_answers_an_error_frame_and_logs_it(
    make_service: ServiceFactory, tmp_path: Path
) -> None:
    loop = asyncio.get_running_loop()
    unhandled: list[dict[str, Any]] = []
    previous = loop.get_exception_handler()
    loop.set_exception_handler(lambda _, context: unhandled.append(context))
    try:
        async with RedisServer(tmp_path) as redis_server:
            service = await make_service(redis_url=redis_server.url, redis_prefix="t")
            chat = await service.create_chat()
            with recorded("service") as log:
                async with websockets.connect(service.ws_url) as ws:
                    await still_open(ws)
                    await redis_server.stop()
                    for frame, ref in [
                        ({"type": "run.create", "client_ref": "c1", "chat_id": chat, "message": "hi"}, "c1"),
                        ({"type": "run.resume", "run_id": "r1"}, "r1"),
                        ({"type": "run.cancel", "run_id": "r2"}, "r2"),
                    ]:
                        error = await answer(ws, frame)
                        assert error["type"] == "error", error
                        assert error["code"] in {"internal", "runs_unavailable"}, error
                        assert error["ref"] == ref
                        await still_open(ws)
            gc.collect()
            await asyncio.sleep(0)
    finally:
        loop.set_exception_handler(previous)
    logged = " | ".join(log.messages())
    for kind in ("run.create", "run.resume", "run.cancel"):
        assert f"websocket {kind}" in logged or error["code"] == "runs_unavailable", logged
    assert [c for c in unhandled if "never retrieved" in str(c.get("message"))] == []


async def test_a_follower_whose_log_fails_mid_run_gets_an_error_frame(
    make_service: ServiceFactory, tmp_path: Path
) -> None:
    # the follower fails once Redis has been gone for runs_outage_s (2 s here, 30 s by default)
    async with RedisServer(tmp_path) as redis_server:
        service = await make_service(
            redis_url=redis_server.url, redis_prefix="t", runs_outage_s=2
        )  # fail fast, not in 30 s
        service.upstream.enqueue(text("partial"), gate(asyncio.Event()), finish())
        chat = await service.create_chat()
        async with websockets.connect(service.ws_url) as ws:
            frame = {"type": "run.create", "client_ref": "c1", "chat_id": chat, "message": "hi"}
            accepted = await answer(ws, frame)
            assert accepted["type"] == "run.accepted"
            seen = [json.loads(await ws.recv()) for _ in range(3)]
            assert types(seen) == ["run.started", "step.started", "text.delta"]
            await redis_server.stop()
            async with asyncio.timeout(15):
                error = json.loads(await ws.recv())
            assert (error["type"], error["ref"]) == ("error", accepted["run_id"]), error
            await still_open(ws)
