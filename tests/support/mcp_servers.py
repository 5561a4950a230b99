"""MCP servers for tests, built with the SDK's ``MCPServer`` (mcp 2.x's name for FastMCP).

Tools: ``add(a, b)``, ``echo(text)``, ``fail()`` (raises), ``slow(seconds)``, ``big(chars)``.

- stdio: ``python -m tests.support.mcp_servers stdio`` (``stdio_server_config()`` builds the config);
- streamable HTTP, in-process: ``async with serve_mcp_http() as url:`` runs uvicorn on a free
  127.0.0.1 port and stops it on exit (``http_server_config(name, url)`` builds the config);
- streamable HTTP, as a process: ``python -m tests.support.mcp_servers http PORT``.
"""

from __future__ import annotations

import asyncio
import json
import socket
import sys
from collections.abc import AsyncIterator, Sequence
from contextlib import asynccontextmanager
from pathlib import Path

import uvicorn
from mcp.server import MCPServer
from starlette.types import Receive, Scope, Send

from service.engine.mcp import McpServerConfig

ROOT = Path(__file__).resolve().parents[2]


def build_server(name: str = "testtools") -> MCPServer:
    """A fresh server with the test tools."""
    server = MCPServer(name, log_level="WARNING")  # INFO logs every request through rich: slow and noisy

    @server.tool()
    def add(a: int, b: int) -> int:
        """Add two integers."""
        return a + b

    @server.tool()
    def echo(text: str) -> str:
        """Return the text unchanged."""
        return text

    @server.tool()
    def fail() -> str:
        """Always fails."""
        raise RuntimeError("fail was asked to fail")

    @server.tool()
    async def slow(seconds: float) -> str:
        """Sleep, then answer."""
        await asyncio.sleep(seconds)
        return f"slept {seconds}s"

    @server.tool()
    def big(chars: int) -> str:
        """Return a string of the given length."""
        return "x" * chars

    return server


@asynccontextmanager
async def serve_mcp_http(
    server: MCPServer | None = None, *, port: int = 0, seen_headers: list[dict[str, str]] | None = None
) -> AsyncIterator[str]:
    """Serve ``server`` over streamable HTTP on 127.0.0.1 (a free port by default); yield its MCP endpoint URL.

    ``seen_headers``, when given, receives the headers of every request.
    """
    mcp_app = (server or build_server()).streamable_http_app(host="127.0.0.1")

    async def app(scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] == "http" and seen_headers is not None:
            seen_headers.append({k.decode(): v.decode() for k, v in scope["headers"]})
        await mcp_app(scope, receive, send)

    sock = socket.socket()
    sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
    sock.bind(("127.0.0.1", port))
    config = uvicorn.Config(app, log_level="warning", lifespan="on", timeout_graceful_shutdown=2)
    uv = uvicorn.Server(config)
    task = asyncio.create_task(uv.serve(sockets=[sock]))
    try:
        async with asyncio.timeout(10):
            while not uv.started:
                if task.done():
                    task.result()
                await asyncio.sleep(0.01)
        yield f"http://127.0.0.1:{sock.getsockname()[1]}/mcp"
    finally:
        uv.should_exit = True
        await task
        sock.close()


def stdio_server_config(name: str = "stdio", *, extra_args: Sequence[str] = ()) -> McpServerConfig:
    """Config that launches this module as a stdio MCP server with the current interpreter."""
    return McpServerConfig(
        name=name,
        transport="stdio",
        command=sys.executable,
        args=("-m", "tests.support.mcp_servers", "stdio", *extra_args),
        cwd=str(ROOT),
    )


def http_server_config(name: str, url: str) -> McpServerConfig:
    """Config for a streamable HTTP server at ``url``."""
    return McpServerConfig(name=name, transport="http", url=url)


def write_mcp_config(path: Path, servers: Sequence[McpServerConfig]) -> Path:
    """Write ``servers`` as the JSON allow-list file read by ``load_mcp_config``; return ``path``."""
    entries = [{k: v for k, v in _as_dict(s).items() if v is not None} for s in servers]
    path.write_text(json.dumps({"servers": entries}))
    return path


def _as_dict(config: McpServerConfig) -> dict[str, object]:
    return {field: getattr(config, field) for field in config.__struct_fields__}


def main(argv: Sequence[str]) -> None:
    """Run the test server: ``stdio`` or ``http PORT``."""
    server = build_server()
    if argv[:1] == ["http"]:
        server.run("streamable-http", host="127.0.0.1", port=int(argv[1]))
    else:
        server.run("stdio")


if __name__ == "__main__":
    main(sys.argv[1:])
