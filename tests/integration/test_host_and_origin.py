"""DNS rebinding and cross-site requests: the Host allow-list, JSON-only bodies, the WebSocket Origin's scheme."""

from __future__ import annotations

import asyncio
import base64
import os

import pytest
import websockets
from websockets.exceptions import InvalidStatus

from tests.integration.conftest import Service, ServiceFactory


async def raw_handshake(port: int, host: str, origin: str) -> int:
    """A WebSocket handshake with exactly these Host and Origin headers; the status of the answer."""
    reader, writer = await asyncio.open_connection("127.0.0.1", port)
    key = base64.b64encode(os.urandom(16)).decode()
    writer.write(
        f"GET /v1/ws HTTP/1.1\r\nHost: {host}\r\nOrigin: {origin}\r\nUpgrade: websocket\r\nConnection: Upgrade\r\n"
        f"Sec-WebSocket-Key: {key}\r\nSec-WebSocket-Version: 13\r\n\r\n".encode()
    )
    status_line = await reader.readline()
    writer.close()
    return int(status_line.split()[1])


async def chat_count(service: Service) -> int:
    return len((await service.http.get("/v1/chats", params={"limit": 100})).json()["items"])


async def test_a_rebound_host_is_refused_on_http_and_websocket(service: Service) -> None:
    response = await service.http.get("/v1/chats", headers={"host": "rebind.evil"})
    assert response.status_code == 400
    assert response.json()["error"]["code"] == "invalid_host"
    port = service.url.rsplit(":", 1)[1]
    assert await raw_handshake(int(port), "rebind.evil", "http://rebind.evil") == 400  # as a rebound browser sends
    with pytest.raises(InvalidStatus) as refused:  # (this client adds its own Host: two of them)
        await websockets.connect(service.ws_url, additional_headers={"host": "rebind.evil"})
    assert refused.value.response.status_code == 400
    assert await raw_handshake(int(port), f"127.0.0.1:{port}", f"http://127.0.0.1:{port}") == 101
    for host in [f"127.0.0.1:{port}", f"localhost:{port}", "localhost"]:
        assert (await service.http.get("/v1/chats", headers={"host": host})).status_code == 200, host


async def test_configured_hosts_replace_the_loopback_names(make_service: ServiceFactory) -> None:
    service = await make_service(allowed_hosts=("chat.example.com", "*.internal.example"))
    assert (await service.http.get("/v1/chats", headers={"host": "chat.example.com"})).status_code == 200
    assert (await service.http.get("/v1/chats", headers={"host": "a.internal.example:443"})).status_code == 200
    assert (await service.http.get("/v1/chats")).status_code == 400  # 127.0.0.1 is no longer named


@pytest.mark.parametrize(
    "content_type", ["text/plain", "application/x-www-form-urlencoded", "multipart/form-data; boundary=x", None]
)
async def test_bodies_that_are_not_labelled_json_are_415_and_change_nothing(
    service: Service, content_type: str | None
) -> None:
    chat = await service.create_chat()
    before = await chat_count(service)
    headers = {} if content_type is None else {"content-type": content_type}
    for path, body in [("/v1/chats", b"{}"), (f"/v1/chats/{chat}/runs", b'{"message": "hi"}')]:
        response = await service.http.post(path, content=body, headers=headers)
        assert response.status_code == 415, (path, response.text)
        assert response.json()["error"]["code"] == "unsupported_media_type"
    assert await chat_count(service) == before
    assert service.upstream.requests == []


async def test_json_with_parameters_is_accepted(service: Service) -> None:
    for content_type in ["application/json; charset=utf-8", "application/vnd.chat+json"]:
        response = await service.http.post("/v1/chats", content=b"{}", headers={"content-type": content_type})
        assert response.status_code == 201, response.text


async def test_the_websocket_origin_must_match_the_scheme_too(service: Service) -> None:
    netloc = service.url.removeprefix("http://")
    with pytest.raises(InvalidStatus) as refused:
        await websockets.connect(service.ws_url, additional_headers={"origin": f"https://{netloc}"})
    assert refused.value.response.status_code == 403
    async with websockets.connect(service.ws_url, additional_headers={"origin": f"http://{netloc}"}) as ws:
        await ws.send('{"type": "ping", "nonce": 1}')
        assert '"pong"' in await ws.recv()
