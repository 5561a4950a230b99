"""No secret reaches a client or a log line: upstream error text, MCP server URLs, tokens in query strings.

The service runs as a real process at log level INFO (uvicorn's access log and httpx2's request lines
on), in each log format, with credentials in every place a deployment puts them: the upstream's API key, a password in
its base URL, an MCP server URL with a password and a token, bearer JWTs and stream tokens.
"""

from __future__ import annotations

import json
from collections.abc import AsyncIterator
from pathlib import Path

import httpx
import pytest
import websockets

from service.engine.mcp import McpServerConfig
from tests.support.auth import SECRET, hs256
from tests.support.live_server import ServiceProcess, free_port
from tests.support.mcp_servers import write_mcp_config
from tests.support.sse import collect_events
from tests.support.upstream import ScriptedUpstream, finish, raw, scripted_upstream, status, text

API_KEY = "sk-live-7fQ2mZ9xKc4vB8nR1tY6"
URL_PASSWORD = "pw-Hx81Lq0Zr"
MCP_PASSWORD = "mcp-pw-Rt5Yz2"
MCP_TOKEN = "mcp-tok-9Kq3Vd7"


@pytest.fixture
async def upstream() -> AsyncIterator[ScriptedUpstream]:
    async with scripted_upstream() as scripted:
        yield scripted


@pytest.fixture(params=["text", "json"])
async def proc(
    request: pytest.FixtureRequest, tmp_path: Path, upstream: ScriptedUpstream
) -> AsyncIterator[ServiceProcess]:
    dead_mcp = f"http://bob:{MCP_PASSWORD}@127.0.0.1:{free_port()}/mcp?token={MCP_TOKEN}"
    mcp_file = write_mcp_config(tmp_path / "mcp.json", [McpServerConfig(name="docs", transport="http", url=dead_mcp)])
    env = {
        "SERVICE_DATABASE_URL": f"sqlite+aiosqlite:///{tmp_path / 'chat.db'}",
        "SERVICE_OPENAI_BASE_URL": upstream.base_url.replace("http://", f"http://alice:{URL_PASSWORD}@"),
        "SERVICE_OPENAI_API_KEY": API_KEY,
        "SERVICE_DEFAULT_MODEL": "openai/scripted",
        "SERVICE_UPSTREAM_MAX_RETRIES": "0",
        "SERVICE_MCP_SERVERS": str(mcp_file),
        "SERVICE_LOG_LEVEL": "info",
        "SERVICE_LOG_FORMAT": request.param,
        "SERVICE_AUTH": "jwt",
        "SERVICE_JWT_SECRET": SECRET,
        "SERVICE_JWT_AUDIENCE": "chat-service-tests",
        "SERVICE_JWT_ISSUER": "https://issuer.test",
    }
    async with ServiceProcess(env, extra_args=["--log-level", "info"]) as service:
        yield service


def secrets_in(text: str, *extra: str) -> list[str]:
    return [s for s in (API_KEY, URL_PASSWORD, MCP_PASSWORD, MCP_TOKEN, SECRET, *extra) if s in text]


async def test_no_secret_reaches_a_client_or_a_log_line(proc: ServiceProcess, upstream: ScriptedUpstream) -> None:
    bearer = hs256("alice")
    leaked_401 = {"error": {"message": f"Incorrect API key provided: {API_KEY}", "code": "invalid_api_key"}}
    upstream.enqueue(status(401, body=leaked_401))
    stream_error = {"error": {"message": f"key {API_KEY} was revoked"}}
    upstream.enqueue(text("partial"), raw(f"data: {json.dumps(stream_error)}\n\n"))
    upstream.enqueue(text("fine"), finish())
    headers = {"authorization": f"Bearer {bearer}"}
    client_saw: list[str] = []
    async with httpx.AsyncClient(base_url=proc.url, headers=headers, timeout=20) as http:
        chat = (await http.post("/v1/chats", json={})).json()["id"]

        # An upstream 401 that quotes the key: SSE sees the service's own words.
        _, events = await collect_events(
            http, "POST", f"/v1/chats/{chat}/runs", json={"message": "hi"}, headers={"accept": "text/event-stream"}
        )
        failed = events[-1]
        assert (failed["type"], failed["error"]) == (
            "run.failed",
            {"code": "upstream_error", "message": "the upstream answered 401"},
        ), failed
        client_saw += [json.dumps(events), (await http.get(f"/v1/chats/{chat}")).text]

        # An error object inside the stream that quotes the key: the WebSocket sees the service's words.
        token = (await http.post("/v1/ws-token")).json()["token"]
        ws_url = proc.url.replace("http://", "ws://") + f"/v1/ws?token={token}"
        async with websockets.connect(ws_url, origin=proc.url) as ws:  # pyright: ignore[reportArgumentType]
            await ws.send(json.dumps({"type": "run.create", "client_ref": "r", "chat_id": chat, "message": "again"}))
            frames = [json.loads(await ws.recv())]
            while frames[-1]["type"] not in {"run.completed", "run.failed", "error"}:
                frames.append(json.loads(await ws.recv()))
        assert frames[-1]["type"] == "run.failed", frames[-1]
        assert frames[-1]["error"]["message"] == "the upstream reported an error in the stream"
        client_saw.append(json.dumps(frames))

        # A stream token in EventSource's query string (the access log writes query strings).
        run = (await http.post(f"/v1/chats/{chat}/runs", json={"message": "third"})).json()
        stream_token = (await http.post(f"/v1/runs/{run['id']}/stream-token")).json()["token"]
        _, replay = await collect_events(http, "GET", f"/v1/runs/{run['id']}/events?token={stream_token}")
        assert replay[-1]["type"] == "run.completed"

        # An MCP server that cannot be reached: the 503 names it, not its URL.
        mcp_chat = await http.post("/v1/chats", json={"mcp_servers": ["docs"]})
        refused = await http.post(f"/v1/chats/{mcp_chat.json()['id']}/runs", json={"message": "use docs"})
        assert refused.status_code == 503, refused.text
        assert refused.json()["error"]["message"].startswith("MCP server 'docs' is unavailable: ")
        client_saw.append(refused.text)

    assert secrets_in("\n".join(client_saw), bearer) == []
    # The server log keeps what the upstream said, masked: that is where an operator looks.
    logs = await proc.wait_for_log(
        "Incorrect API key provided: ***",
        "UpstreamChunkError: key *** was revoked",
        f"/v1/runs/{run['id']}/events?token=*** HTTP/1.1",  # uvicorn's access line
        "MCP server 'docs' (http://***@127.0.0.1:",
        "HTTP Request: POST http://***@127.0.0.1:",  # httpx2's INFO line
    )
    assert secrets_in(logs, bearer, token, stream_token) == [], logs
    if proc.env["SERVICE_LOG_FORMAT"] == "json":
        assert all(isinstance(json.loads(line), dict) for line in logs.splitlines()), logs
