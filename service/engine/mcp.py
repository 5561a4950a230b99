"""MCP client sessions for the allow-listed MCP servers.

The allow-list is a JSON file (``SERVICE_MCP_SERVERS``)::

    {"servers": [
        {"name": "docs", "transport": "http", "url": "http://127.0.0.1:9000/mcp", "headers": {"Authorization": "..."}},
        {"name": "files", "transport": "stdio", "command": "uvx", "args": ["some-mcp-server"], "env": {}}
    ]}

``McpHub`` owns one ``mcp.Client`` per server, opened on first use and kept open.

Intentional choices:

1. Each session lives in its own long-lived *owner task*, which enters and exits the client's
   ``AsyncExitStack``: anyio cancel scopes and task groups must be exited by the task that entered
   them, while tool calls arrive from the engine's run tasks. Callers only send requests on the
   open session, which anyio allows from any task.
2. A request that fails at the connection level (not a tool error, not an MCP error answer) closes
   the session, reconnects once and is retried once, so a restarted server costs one call nothing.
   A tool call interrupted by a dropped connection may therefore run twice on the server.
3. The tool list is fetched once per session (servers rarely change it; a reconnect refreshes it).
"""

from __future__ import annotations

import asyncio
import logging
from collections.abc import Awaitable, Callable, Mapping, Sequence
from contextlib import AsyncExitStack
from pathlib import Path
from typing import Annotated, Any, Literal, TypeVar, cast

import anyio
import httpx2
import msgspec
from mcp import Client, MCPError, StdioServerParameters
from mcp.client.streamable_http import StreamableHTTPError, streamable_http_client
from mcp.shared._httpx_utils import create_mcp_http_client
from mcp_types import CONNECTION_CLOSED, CallToolResult, EmbeddedResource, TextContent, TextResourceContents, Tool

from service.engine.tools import (
    McpUnavailableError,
    ServerNotAllowedError,
    ToolOutcome,
    ToolSpec,
    mcp_tool_name,
)
from service.logs import redact

__all__ = ["McpConfigError", "McpHub", "McpServerConfig", "load_mcp_config"]

log = logging.getLogger(__name__)
_T = TypeVar("_T")
_CONNECTION_ERRORS = (
    OSError,
    anyio.BrokenResourceError,
    anyio.ClosedResourceError,
    anyio.EndOfStream,
    httpx2.TransportError,
    StreamableHTTPError,
)
_MAX_PAGES = 50
"""Pages of ``tools/list`` read at most, so a server that paginates forever cannot hang a run."""

ServerName = Annotated[str, msgspec.Meta(pattern=r"^[A-Za-z0-9-]+(_[A-Za-z0-9-]+)*$", max_length=32)]
"""Letters, digits, ``-`` and single ``_``: ``__`` separates server and tool in tool names."""


class McpConfigError(ValueError):
    """The MCP allow-list file is unreadable or has a bad entry; the message names it."""


class McpServerConfig(msgspec.Struct, frozen=True, kw_only=True, forbid_unknown_fields=True):
    """One allow-listed MCP server."""

    name: ServerName
    """Name used in ``mcp_servers`` lists and as the tool name prefix (``<name>__<tool>``)."""
    transport: Literal["http", "stdio"]
    url: str | None = None
    """Streamable HTTP endpoint (``transport: "http"``), e.g. ``http://127.0.0.1:9000/mcp``."""
    headers: dict[str, str] = msgspec.field(default_factory=dict[str, str])
    """Extra HTTP headers (e.g. ``Authorization``) for ``http`` servers."""
    command: str | None = None
    """Executable launched for ``transport: "stdio"``."""
    args: tuple[str, ...] = ()
    env: dict[str, str] = msgspec.field(default_factory=dict[str, str])
    """Extra environment for the stdio process, over the SDK's safe default environment."""
    cwd: str | None = None
    """Working directory of the stdio process."""

    def __post_init__(self) -> None:
        if self.transport == "http" and not self.url:
            raise ValueError("an http server needs `url`")
        if self.transport == "stdio" and not self.command:
            raise ValueError("a stdio server needs `command`")


class _RawFile(msgspec.Struct, forbid_unknown_fields=True):
    servers: list[dict[str, Any]]


def load_mcp_config(path: str | Path) -> list[McpServerConfig]:
    """Read the allow-list file; raise ``McpConfigError`` naming the file and the bad entry."""
    try:
        raw = msgspec.json.decode(Path(path).read_bytes(), type=_RawFile)
    except (OSError, msgspec.DecodeError) as exc:
        raise McpConfigError(f"MCP server file {path}: {exc}") from exc
    configs: list[McpServerConfig] = []
    for index, entry in enumerate(raw.servers):
        label = f"servers[{index}]" + (f" ({entry['name']!r})" if isinstance(entry.get("name"), str) else "")
        try:
            config = msgspec.convert(entry, McpServerConfig)
        except msgspec.ValidationError as exc:
            raise McpConfigError(f"MCP server file {path}: {label}: {exc}") from exc
        if any(c.name == config.name for c in configs):
            raise McpConfigError(f"MCP server file {path}: {label}: duplicate server name")
        configs.append(config)
    return configs


class _Connection:
    """One server's session, owned by a dedicated task (see the module docstring)."""

    def __init__(self, config: McpServerConfig, connect_timeout_s: float) -> None:
        self.config = config
        self._connect_timeout_s = connect_timeout_s
        self._lock = asyncio.Lock()
        self._client: Client | None = None
        self._owner: asyncio.Task[None] | None = None
        self._stop = asyncio.Event()
        self._closed = False
        self.tools: tuple[Client, list[tuple[ToolSpec, str]]] | None = None
        """The tool list of the current session, fetched on first use."""

    async def client(self) -> Client:
        """The open client, connecting first if needed."""
        async with self._lock:
            if self._closed:
                raise McpUnavailableError(
                    f"MCP server {self.config.name!r} is unavailable: the service is shutting down"
                )
            if self._client is not None and self._owner is not None and not self._owner.done():
                return self._client
            await self._close_locked()
            return await self._open_locked()

    async def reset(self, broken: Client) -> None:
        """Close the session if it is still ``broken`` (another task may have reconnected already)."""
        async with self._lock:
            if self._client is broken:
                await self._close_locked()

    async def close(self) -> None:
        async with self._lock:
            self._closed = True
            await self._close_locked()

    async def _open_locked(self) -> Client:
        ready: asyncio.Future[Client] = asyncio.get_running_loop().create_future()
        self._stop = asyncio.Event()
        owner = asyncio.create_task(self._own(ready, self._stop), name=f"mcp-session:{self.config.name}")
        try:
            async with asyncio.timeout(self._connect_timeout_s):
                client = await ready
        except BaseException as exc:
            owner.cancel()
            await asyncio.wait([owner])
            if isinstance(exc, Exception):
                raise McpUnavailableError(self.unavailable(exc)) from exc
            raise
        self._client, self._owner, self.tools = client, owner, None
        return client

    async def _close_locked(self) -> None:
        owner, self._owner, self._client, self.tools = self._owner, None, None, None
        if owner is None:
            return
        self._stop.set()
        _, pending = await asyncio.wait([owner], timeout=5.0)
        if pending:
            owner.cancel()
            await asyncio.wait([owner])

    async def _own(self, ready: asyncio.Future[Client], stop: asyncio.Event) -> None:
        """Enter the client, hand it out, hold it until told to stop, exit it in this same task."""
        try:
            async with AsyncExitStack() as stack:
                client = await stack.enter_async_context(self._make_client(stack))
                if ready.done():  # the opener gave up meanwhile
                    return
                ready.set_result(client)
                await stop.wait()
        except Exception as exc:
            if not ready.done():
                ready.set_exception(exc)
            else:
                log.warning("MCP server %r: session ended: %r", self.config.name, exc)

    def _make_client(self, stack: AsyncExitStack) -> Client:
        config = self.config
        if config.transport == "stdio":
            assert config.command is not None  # noqa: S101 - checked by McpServerConfig
            params = StdioServerParameters(command=config.command, args=list(config.args), env=config.env or None)
            if config.cwd is not None:
                params.cwd = config.cwd
            return Client(params)
        assert config.url is not None  # noqa: S101 - checked by McpServerConfig
        if not config.headers:
            return Client(config.url)
        http = create_mcp_http_client(headers=dict(config.headers))
        stack.push_async_callback(http.aclose)
        return Client(streamable_http_client(config.url, http_client=http))

    def unavailable(self, exc: BaseException) -> str:
        """What a client is told: the server's name and the kind of failure, never its URL or command."""
        timed_out = isinstance(exc, TimeoutError)
        reason = "no answer within the connect timeout" if timed_out else type(_leaves(exc)[0]).__name__
        where = redact(self.config.url) if self.config.url else self.config.command
        log.warning("MCP server %r (%s) is unavailable: %s", self.config.name, where, _reason(exc))
        return f"MCP server {self.config.name!r} is unavailable: {reason}"


def _leaves(exc: BaseException) -> list[BaseException]:
    """The exceptions inside a (nested) exception group, or ``[exc]``."""
    if isinstance(exc, BaseExceptionGroup):
        group = cast("BaseExceptionGroup[BaseException]", exc)
        return [leaf for inner in group.exceptions for leaf in _leaves(inner)]
    return [exc]


def _reason(exc: BaseException) -> str:
    """The first useful message of a (possibly grouped) exception."""
    leaf = _leaves(exc)[0]
    return f"{type(leaf).__name__}: {leaf}" if str(leaf) else type(leaf).__name__


def _is_connection_failure(exc: BaseException) -> bool:
    """True when ``exc`` means the session is gone, not that the server answered or a result was bad."""
    for leaf in _leaves(exc):
        if isinstance(leaf, MCPError) and leaf.code == CONNECTION_CLOSED:
            return True
        if not isinstance(leaf, MCPError) and isinstance(leaf, _CONNECTION_ERRORS):
            return True
    return False


class McpHub:
    """Client sessions to the allow-listed MCP servers: connect on first use, reconnect once on failure."""

    def __init__(self, servers: Sequence[McpServerConfig], *, connect_timeout_s: float = 10.0) -> None:
        self._connections = {s.name: _Connection(s, connect_timeout_s) for s in servers}

    @classmethod
    def from_file(cls, path: str | Path, *, connect_timeout_s: float = 10.0) -> McpHub:
        """A hub for the servers listed in the JSON file at ``path`` (see ``load_mcp_config``)."""
        return cls(load_mcp_config(path), connect_timeout_s=connect_timeout_s)

    def secrets(self) -> list[str]:
        """Values that must never reach a log line: header values, URLs (for their passwords), env values."""
        values: list[str] = []
        for connection in self._connections.values():
            config = connection.config
            values += [*config.headers.values(), *config.env.values(), config.url or ""]
        return values

    @property
    def server_names(self) -> list[str]:
        """Names of the allow-listed servers, in file order."""
        return list(self._connections)

    def check_allowed(self, server: str) -> None:
        """Raise ``ServerNotAllowedError`` unless ``server`` is allow-listed."""
        self._connection(server)

    async def list_tools(self, server: str) -> list[ToolSpec]:
        """The server's tools, named ``<server>__<tool>``; ``McpUnavailableError`` if it cannot be reached."""
        return [spec for spec, _ in await self.list_tool_bindings(server)]

    async def list_tool_bindings(self, server: str) -> list[tuple[ToolSpec, str]]:
        """Like ``list_tools``, each spec paired with the server's own tool name (for ``call_tool``)."""
        connection = self._connection(server)

        async def fetch(client: Client) -> list[tuple[ToolSpec, str]]:
            cached = connection.tools
            if cached is not None and cached[0] is client:
                return cached[1]
            bindings = _bindings(server, await _list_all_tools(client))
            connection.tools = (client, bindings)
            return bindings

        try:
            return await self._request(connection, fetch)
        except McpUnavailableError:
            raise
        except Exception as exc:  # an error answer to tools/list, or a listing the SDK rejects
            raise McpUnavailableError(connection.unavailable(exc)) from exc

    async def call_tool(self, server: str, tool: str, arguments: Mapping[str, Any]) -> ToolOutcome:
        """Call ``tool`` (the server's own name, unprefixed); MCP error answers become error outcomes."""
        connection = self._connection(server)

        async def call(client: Client) -> CallToolResult:
            return await client.call_tool(tool, dict(arguments))

        try:
            result = await self._request(connection, call)
        except MCPError as exc:
            return ToolOutcome(f"MCP server {server!r} answered with an error: {exc.message}", is_error=True)
        return _outcome(result)

    async def close(self) -> None:
        """Close every open session (and stop stdio server processes)."""
        await asyncio.gather(*(c.close() for c in self._connections.values()))

    def _connection(self, server: str) -> _Connection:
        connection = self._connections.get(server)
        if connection is None:
            allowed = ", ".join(self._connections) or "none are configured"
            raise ServerNotAllowedError(f"MCP server {server!r} is not in the allow-list (allowed: {allowed})")
        return connection

    async def _request(self, connection: _Connection, send: Callable[[Client], Awaitable[_T]]) -> _T:
        """Send on the open session; on a connection failure reconnect and retry once."""
        for attempt in (1, 2):
            client = await connection.client()
            try:
                return await send(client)
            except Exception as exc:
                if not _is_connection_failure(exc):
                    raise
                await connection.reset(client)
                if attempt == 2:
                    raise McpUnavailableError(connection.unavailable(exc)) from exc
                log.warning("MCP server %r: request failed, reconnecting: %s", connection.config.name, _reason(exc))
        raise AssertionError("unreachable: the second attempt returns or raises")


async def _list_all_tools(client: Client) -> list[Tool]:
    tools: list[Tool] = []
    cursor: str | None = None
    for _ in range(_MAX_PAGES):
        page = await client.list_tools(cursor=cursor)
        tools.extend(page.tools)
        cursor = page.next_cursor
        if cursor is None:
            break
    return tools


def _bindings(server: str, tools: Sequence[Tool]) -> list[tuple[ToolSpec, str]]:
    bindings: dict[str, tuple[ToolSpec, str]] = {}
    for tool in tools:
        name = mcp_tool_name(server, tool.name)
        if name in bindings:
            log.warning("MCP server %r: tool %r skipped, its name clashes as %r", server, tool.name, name)
            continue
        bindings[name] = (ToolSpec(name, tool.description or "", dict(tool.input_schema), server), tool.name)
    return list(bindings.values())


def _outcome(result: CallToolResult) -> ToolOutcome:
    """Structured content as JSON text, else the text blocks joined (other blocks summarised)."""
    if result.structured_content is not None and not result.is_error:
        return ToolOutcome(msgspec.json.encode(result.structured_content).decode())
    parts: list[str] = []
    for block in result.content:
        if isinstance(block, TextContent):
            parts.append(block.text)
        elif isinstance(block, EmbeddedResource) and isinstance(block.resource, TextResourceContents):
            parts.append(block.resource.text)
        else:
            parts.append(f"[{block.type} content omitted]")
    return ToolOutcome("\n".join(parts), is_error=result.is_error)
