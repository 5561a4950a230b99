"""Every bad input gets the documented error; nothing is half-written; the next good request works."""

from __future__ import annotations

import asyncio
import json
from typing import Any

import pytest
import websockets

from tests.integration.conftest import MODEL, TERMINAL, Service, ServiceFactory
from tests.support.upstream import finish, text


def assert_error(response: Any, status: int, code: str, field: str | None = None) -> dict[str, Any]:
    assert response.status_code == status, response.text
    assert response.headers["content-type"].startswith("application/json")
    error = response.json()["error"]
    assert set(error) == {"code", "message", "detail"}
    assert error["code"] == code, error
    assert error["message"]
    if field is not None:
        assert field in json.dumps(error), error
    return dict(error)


@pytest.mark.parametrize(
    ("body", "field"),
    [
        ({"model": 5}, "model"),
        ({"model": ""}, "model"),
        ({"system": ["not", "text"]}, "system"),
        ({"tools": "clock"}, "tools"),
        ({"tools": [1]}, "tools"),
        ({"mcp_servers": {"a": 1}}, "mcp_servers"),
        ({"response_format": {"type": "xml"}}, "response_format"),
        ({"response_format": {"type": "json_schema"}}, "json_schema"),
        ({"response_format": {"type": "json_schema", "json_schema": {"name": "x", "schema": {"type": 7}}}}, "schema"),
        ({"unknown": 1}, "unknown"),
    ],
)
async def test_create_chat_rejects_each_bad_field_with_400_naming_it(
    service: Service, body: dict[str, Any], field: str
) -> None:
    response = await service.http.post("/v1/chats", json=body)
    assert_error(response, 400, "invalid_request", field)


async def test_create_chat_with_an_unknown_model_is_400_unknown_model(service: Service) -> None:
    for model in ["nope", "openai/", "ghost/model", "demo/x"]:
        response = await service.http.post("/v1/chats", json={"model": model})
        assert_error(response, 400, "unknown_model", "model")
    assert (await service.http.get("/v1/chats")).json()["items"] == []


@pytest.mark.parametrize(
    "raw", [b"{not json", b"[1, 2]", b'"text"', b""], ids=["malformed", "array", "string", "empty"]
)
async def test_bodies_that_are_not_a_json_object_are_400(service: Service, raw: bytes) -> None:
    response = await service.http.post("/v1/chats", content=raw, headers={"content-type": "application/json"})
    assert_error(response, 400, "invalid_request")


@pytest.mark.parametrize(
    ("body", "field"),
    [
        ({}, "message"),
        ({"message": 42}, "message"),
        ({"message": ""}, "message"),
        ({"message": []}, "message"),
        ({"message": [{"type": "audio", "data": "x"}]}, "message"),
        ({"message": [{"type": "text"}]}, "text"),
        ({"message": "hi", "model": 3}, "model"),
        ({"message": "hi", "on_disconnect": "explode"}, "on_disconnect"),
        ({"message": "hi", "tools": [None]}, "tools"),
        ({"message": "hi", "response_format": {"type": "json_schema", "json_schema": {"schema": {}}}}, "name"),
        ({"message": "hi", "extra": True}, "extra"),
    ],
)
async def test_create_run_rejects_each_bad_field_and_writes_nothing(
    service: Service, body: dict[str, Any], field: str
) -> None:
    chat = await service.create_chat()

    response = await service.http.post(f"/v1/chats/{chat}/runs", json=body)

    assert_error(response, 400, "invalid_request", field)
    assert (await service.http.get(f"/v1/chats/{chat}")).json()["messages"] == []
    assert (await service.http.get(f"/v1/chats/{chat}/active-run")).json() is None
    assert service.upstream.requests == []


async def test_create_run_with_an_unknown_model_or_chat(service: Service) -> None:
    chat = await service.create_chat()
    assert_error(
        await service.http.post(f"/v1/chats/{chat}/runs", json={"message": "hi", "model": "x/y"}), 400, "unknown_model"
    )
    assert_error(await service.http.post("/v1/chats/nope/runs", json={"message": "hi"}), 404, "not_found")
    assert (await service.http.get(f"/v1/chats/{chat}")).json()["messages"] == []


async def test_a_deleted_chat_that_ran_before_cannot_start_a_run(service: Service) -> None:
    service.upstream.enqueue(text("first"), finish())
    chat = await service.create_chat()
    await service.stream_run(chat, "one")
    assert (await service.http.delete(f"/v1/chats/{chat}")).status_code == 204

    again = await service.http.post(f"/v1/chats/{chat}/runs", json={"message": "two"})

    assert (again.status_code, again.json()["error"]["code"]) == (404, "not_found")
    assert len(service.upstream.requests) == 1


async def test_unknown_resources_are_404_in_the_error_shape(service: Service) -> None:
    for method, path in [
        ("GET", "/v1/chats/nope"),
        ("DELETE", "/v1/chats/nope"),
        ("GET", "/v1/chats/nope/active-run"),
        ("GET", "/v1/runs/nope"),
        ("GET", "/v1/runs/nope/events"),
        ("POST", "/v1/runs/nope/cancel"),
        ("GET", "/v1/nothing-here"),
    ]:
        assert_error(await service.http.request(method, path), 404, "not_found")


async def test_list_chats_rejects_bad_paging(service: Service) -> None:
    assert_error(await service.http.get("/v1/chats", params={"limit": 0}), 400, "invalid_request", "limit")
    assert_error(await service.http.get("/v1/chats", params={"limit": "ten"}), 400, "invalid_request", "limit")
    assert_error(await service.http.get("/v1/chats", params={"cursor": "garbage!"}), 400, "invalid_cursor", "cursor")


async def test_wrong_method_is_405_in_the_error_shape(service: Service) -> None:
    assert_error(await service.http.put("/v1/chats"), 405, "method_not_allowed")


# --- WebSocket -------------------------------------------------------------------------------------


async def recv(ws: Any) -> dict[str, Any]:
    return dict(json.loads(await ws.recv()))


BAD_FRAMES = [
    ("not json", "invalid_frame", None),
    ("[1, 2]", "invalid_frame", None),
    ('{"type": "run.explode", "client_ref": "c9"}', "invalid_frame", "c9"),
    ('{"client_ref": "c8", "chat_id": "x", "message": "hi"}', "invalid_frame", "c8"),
    ('{"type": "run.create", "client_ref": "c1", "message": "hi"}', "invalid_frame", "c1"),
    ('{"type": "run.create", "client_ref": "c2", "chat_id": "x", "message": 7}', "invalid_frame", "c2"),
    ('{"type": "run.create", "client_ref": "c3", "chat_id": "x", "message": "hi", "bogus": 1}', "invalid_frame", "c3"),
    ('{"type": "run.create", "client_ref": "c4", "chat_id": "missing", "message": "hi"}', "not_found", "c4"),
    ('{"type": "run.create", "client_ref": "c5", "chat_id": "CHAT", "message": ""}', "invalid_request", "c5"),
    (
        '{"type": "run.create", "client_ref": "c6", "chat_id": "CHAT", "message": "hi", "model": "x/y"}',
        "unknown_model",
        "c6",
    ),
    ('{"type": "run.resume", "run_id": "r404", "after": 0}', "not_found", "r404"),
    ('{"type": "run.resume", "run_id": "r1", "after": "zero"}', "invalid_frame", "r1"),
    ('{"type": "run.resume"}', "invalid_frame", None),
    ('{"type": "run.cancel", "run_id": "r405"}', "not_found", "r405"),
    ('{"type": "run.cancel", "run_id": 5}', "invalid_frame", None),
    ('{"type": "ping", "nonce": [1]}', "invalid_frame", None),
]


async def test_each_bad_frame_gets_an_error_frame_and_the_socket_stays_usable(service: Service) -> None:
    chat = await service.create_chat()
    service.upstream.enqueue(text("still works"), finish())
    async with websockets.connect(service.ws_url) as ws:
        for frame, code, ref in BAD_FRAMES:
            await ws.send(frame.replace("CHAT", chat))
            answer = await recv(ws)
            assert answer["type"] == "error", (frame, answer)
            assert (answer["code"], answer["ref"]) == (code, ref), (frame, answer)
            assert answer["message"]
        await ws.send(b'{"type": "ping"}')  # binary frame
        assert (await recv(ws))["code"] == "invalid_frame"
        await ws.send(json.dumps({"type": "ping", "nonce": "x" * 300_000}))  # over ws_max_frame_bytes
        assert (await recv(ws))["code"] == "frame_too_large"

        await ws.send(json.dumps({"type": "ping", "nonce": 7}))
        assert await recv(ws) == {"type": "pong", "nonce": 7}
        await ws.send(json.dumps({"type": "run.create", "client_ref": "ok", "chat_id": chat, "message": "hi"}))
        accepted = await recv(ws)
        assert accepted["type"] == "run.accepted" and accepted["client_ref"] == "ok"
        events = [await recv(ws)]
        while events[-1]["type"] not in TERMINAL:
            events.append(await recv(ws))
    assert "".join(e.get("delta", "") for e in events) == "still works"
    messages = (await service.http.get(f"/v1/chats/{chat}")).json()["messages"]
    assert [m["role"] for m in messages] == ["user", "assistant"]  # no bad frame wrote anything


async def test_a_flood_of_frames_is_closed_with_1008_and_other_sockets_are_unaffected(service: Service) -> None:
    async def flood(ws: Any) -> None:
        for _ in range(5000):  # a burst of 1,000 is allowed, then 500 frames/s: a flood is far faster
            await ws.send("garbage")
        async with asyncio.timeout(5):
            while True:
                await ws.recv()

    async with websockets.connect(service.ws_url) as calm, websockets.connect(service.ws_url) as noisy:
        with pytest.raises(websockets.ConnectionClosed) as closed:
            await flood(noisy)
        assert closed.value.rcvd is not None and closed.value.rcvd.code == 1008
        await calm.send(json.dumps({"type": "ping", "nonce": 1}))
        assert await recv(calm) == {"type": "pong", "nonce": 1}


async def test_an_honest_soak_of_back_to_back_runs_is_never_cut(make_service: ServiceFactory) -> None:
    """16 chats on one socket, each starting its next run (and a ping) as soon as the last one ended.

    That is the most a client doing real work sends: about 250 frames/s here, against the limit of
    500 frames/s after a burst of 1,000; with 50 frames/s and a burst of 100 it was cut with 1008
    after about 60 runs.
    """
    service = await make_service(demo=True)
    chats = [await service.create_chat(model="demo") for _ in range(16)]
    runs, started, ended = 400, 0, 0
    chat_of: dict[str, str] = {}
    async with websockets.connect(service.ws_url) as ws:

        async def start(chat: str) -> None:
            nonlocal started
            started += 1
            await ws.send(json.dumps({"type": "run.create", "chat_id": chat, "message": "hi", "client_ref": chat}))

        for chat in chats:
            await start(chat)
        async with asyncio.timeout(90):
            while ended < runs:
                frame = await recv(ws)
                assert frame["type"] != "error", frame
                if frame["type"] == "run.accepted":
                    chat_of[frame["run_id"]] = frame["client_ref"]
                elif frame["type"] in TERMINAL:
                    assert frame["type"] == "run.completed", frame
                    ended += 1
                    await ws.send(json.dumps({"type": "ping", "nonce": ended}))
                    if started < runs:
                        await start(chat_of.pop(frame["run_id"]))
        await ws.send(json.dumps({"type": "ping", "nonce": 0}))
        while (frame := await recv(ws))["type"] != "pong" or frame["nonce"] != 0:
            pass


async def test_frames_over_the_transport_limit_close_with_1009(service: Service) -> None:
    async with websockets.connect(service.ws_url, max_size=None) as ws:
        await ws.send("x" * (2 * 1024 * 1024))
        with pytest.raises(websockets.ConnectionClosed) as closed:
            await ws.recv()
    assert closed.value.rcvd is not None and closed.value.rcvd.code == 1009


@pytest.mark.parametrize("origin", ["https://evil.example", "null"])
async def test_cross_site_websocket_handshakes_are_refused(service: Service, origin: str) -> None:
    with pytest.raises(websockets.InvalidStatus) as refused:
        async with websockets.connect(service.ws_url, origin=origin):  # type: ignore[arg-type]
            pass
    assert refused.value.response.status_code == 403


async def test_same_origin_and_allow_listed_websocket_handshakes_are_accepted(service: Service) -> None:
    async with websockets.connect(service.ws_url, origin=service.url) as ws:  # type: ignore[arg-type]
        await ws.send('{"type": "ping"}')
        assert (await recv(ws))["type"] == "pong"
    assert MODEL  # the fixture's default model is the scripted upstream
