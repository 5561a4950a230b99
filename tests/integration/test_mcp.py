"""MCP tools against real MCPServer (FastMCP) servers, over streamable HTTP and over stdio."""

from __future__ import annotations

import asyncio
import json
from collections.abc import AsyncIterator
from pathlib import Path

import pytest

from service.engine.mcp import McpHub, McpServerConfig
from service.engine.tools import (
    McpUnavailableError,
    ServerNotAllowedError,
    ToolCatalog,
    ToolOutcome,
)
from tests.support.mcp_servers import (
    http_server_config,
    serve_mcp_http,
    stdio_server_config,
    write_mcp_config,
)

TOOLS = ["add", "echo", "fail", "slow", "big"]
DEAD = McpServerConfig(name="dead", transport="http", url="http://127.0.0.1:9/mcp")


@pytest.fixture
async def mcp_http_url() -> AsyncIterator[str]:
    """URL of a test MCP server over streamable HTTP, in this process, on a free port."""
    async with serve_mcp_http() as url:
        yield url


@pytest.fixture(params=["http", "stdio"])
async def server(request: pytest.FixtureRequest) -> AsyncIterator[McpServerConfig]:
    """The test server named ``tools``, over each transport."""
    if request.param == "stdio":
        yield stdio_server_config("tools")
    else:
        async with serve_mcp_http() as url:
            yield http_server_config("tools", url)


@pytest.fixture
async def hub(server: McpServerConfig) -> AsyncIterator[McpHub]:
    """A hub whose allow-list is the test server plus a server nobody listens on."""
    hub = McpHub([server, DEAD], connect_timeout_s=10)
    try:
        yield hub
    finally:
        await hub.close()


@pytest.fixture
async def catalog(hub: McpHub) -> AsyncIterator[ToolCatalog]:
    """A catalog over ``hub`` with a generous time limit (a loaded CI machine must not make calls time out)."""
    catalog = ToolCatalog(timeout_s=10, max_output_chars=1000, mcp=hub)
    await catalog.start()
    try:
        yield catalog
    finally:
        await catalog.close()


async def test_lists_prefixed_tools(catalog: ToolCatalog) -> None:
    toolbox = await catalog.toolbox([], ["tools"])
    specs = {s.name: s for s in toolbox.specs()}
    assert list(specs) == [f"tools__{t}" for t in TOOLS]
    add = specs["tools__add"]
    assert add.source == "tools"
    assert add.description == "Add two integers."
    assert add.parameters["properties"]["a"]["type"] == "integer"
    assert add.parameters["required"] == ["a", "b"]
    names = [s.name for s in await catalog.list_specs()]
    assert names == ["clock", "calculator", *(f"tools__{t}" for t in TOOLS)]  # dead is skipped


async def test_calls(catalog: ToolCatalog) -> None:
    toolbox = await catalog.toolbox(None, ["tools"])
    assert await toolbox.call("tools__add", {"a": 2, "b": 40}) == ToolOutcome('{"result":42}')
    assert await toolbox.call("tools__echo", {"text": "héllo"}) == ToolOutcome('{"result":"héllo"}')
    assert await toolbox.call("calculator", {"expression": "6 * 7"}) == ToolOutcome("42")


async def test_a_failing_tool_is_an_error_outcome(catalog: ToolCatalog) -> None:
    toolbox = await catalog.toolbox([], ["tools"])
    outcome = await toolbox.call("tools__fail", {})
    assert outcome.is_error
    assert "fail" in outcome.output


async def test_arguments_are_checked_against_the_input_schema(catalog: ToolCatalog) -> None:
    toolbox = await catalog.toolbox([], ["tools"])
    assert toolbox.validate("tools__add", {"a": 1, "b": 2}) is None
    assert (
        toolbox.validate("tools__add", {"a": 1}) == "invalid arguments for tools__add: 'b' is a required property at $"
    )
    assert (
        toolbox.validate("tools__add", {"a": 1, "b": "2"})
        == "invalid arguments for tools__add: '2' is not of type 'integer' at $.b"
    )
    outcome = await toolbox.call("tools__add", {"a": 1, "b": "2"})
    assert outcome == ToolOutcome(
        "invalid arguments for tools__add: '2' is not of type 'integer' at $.b", is_error=True
    )


async def test_slow_tool_times_out_and_the_session_survives(hub: McpHub) -> None:
    toolbox = await ToolCatalog(timeout_s=1, max_output_chars=1000, mcp=hub).toolbox([], ["tools"])
    assert await toolbox.call("tools__slow", {"seconds": 5}) == ToolOutcome(
        "tool tools__slow timed out after 1s", is_error=True
    )
    assert await toolbox.call("tools__slow", {"seconds": 0}) == ToolOutcome('{"result":"slept 0.0s"}')


async def test_too_much_output_is_an_error_outcome(catalog: ToolCatalog) -> None:
    toolbox = await catalog.toolbox([], ["tools"])
    outcome = await toolbox.call("tools__big", {"chars": 5000})
    assert outcome.is_error
    assert "more than the limit of 1000" in outcome.output


async def test_server_not_in_allow_list(catalog: ToolCatalog) -> None:
    with pytest.raises(ServerNotAllowedError) as caught:
        await catalog.toolbox([], ["tools", "elsewhere"])
    assert str(caught.value) == "MCP server 'elsewhere' is not in the allow-list (allowed: tools, dead)"


async def test_dead_server(catalog: ToolCatalog) -> None:
    with pytest.raises(McpUnavailableError) as caught:
        await catalog.toolbox([], ["tools", "dead"])
    assert caught.value.code == "mcp_unavailable"
    assert str(caught.value).startswith("MCP server 'dead' is unavailable: ")  # never its URL


async def test_dead_stdio_server() -> None:
    broken = McpServerConfig(name="broken", transport="stdio", command="/nonexistent/mcp-server")
    exits = McpServerConfig(name="exits", transport="stdio", command="python3", args=("-c", "pass"))
    hub = McpHub([broken, exits], connect_timeout_s=5)
    try:
        for name in ("broken", "exits"):
            with pytest.raises(McpUnavailableError, match=f"MCP server '{name}'"):
                await hub.list_tools(name)
    finally:
        await hub.close()


async def test_calls_from_concurrent_tasks(catalog: ToolCatalog) -> None:
    async def one(i: int) -> ToolOutcome:
        toolbox = await catalog.toolbox([], ["tools"])  # first use connects, from whichever task comes first
        if i % 5 == 0:
            return await toolbox.call("tools__slow", {"seconds": 0.1})
        return await toolbox.call("tools__add", {"a": i, "b": 1})

    outcomes = await asyncio.gather(*(asyncio.create_task(one(i)) for i in range(20)))
    for i, outcome in enumerate(outcomes):
        expected = '{"result":"slept 0.1s"}' if i % 5 == 0 else f'{{"result":{i + 1}}}'
        assert outcome == ToolOutcome(expected)


async def test_cancelled_call_leaves_the_session_usable(catalog: ToolCatalog) -> None:
    toolbox = await catalog.toolbox([], ["tools"])
    task = asyncio.create_task(toolbox.call("tools__slow", {"seconds": 5}))
    await asyncio.sleep(0.2)
    task.cancel()
    with pytest.raises(asyncio.CancelledError):
        await task
    assert await toolbox.call("tools__add", {"a": 1, "b": 1}) == ToolOutcome('{"result":2}')


async def test_reconnects_after_the_server_restarts() -> None:
    async with serve_mcp_http() as url:
        port = int(url.rsplit(":", 1)[1].split("/")[0])
        hub = McpHub([http_server_config("tools", url)], connect_timeout_s=5)
        assert (await hub.call_tool("tools", "add", {"a": 1, "b": 1})).output == '{"result":2}'
    try:
        with pytest.raises(McpUnavailableError):
            await hub.call_tool("tools", "add", {"a": 1, "b": 1})
        async with serve_mcp_http(port=port):
            assert (await hub.call_tool("tools", "add", {"a": 2, "b": 2})).output == '{"result":4}'
            assert len(await hub.list_tools("tools")) == len(TOOLS)
    finally:
        await hub.close()


async def test_unreachable_server_during_a_run_is_an_error_outcome() -> None:
    async with serve_mcp_http() as url:
        catalog = ToolCatalog(timeout_s=5, max_output_chars=1000, mcp=McpHub([http_server_config("tools", url)]))
        toolbox = await catalog.toolbox([], ["tools"])
    try:
        outcome = await toolbox.call("tools__add", {"a": 1, "b": 1})
        assert outcome.is_error
        assert outcome.output.startswith("tool tools__add failed: MCP server 'tools'")
    finally:
        await catalog.close()


async def test_http_headers_are_sent() -> None:
    seen: list[dict[str, str]] = []
    async with serve_mcp_http(seen_headers=seen) as url:
        config = McpServerConfig(name="tools", transport="http", url=url, headers={"Authorization": "Bearer t0ken"})
        hub = McpHub([config])
        try:
            assert (await hub.call_tool("tools", "add", {"a": 1, "b": 1})).output == '{"result":2}'
        finally:
            await hub.close()
    assert seen
    assert all(h.get("authorization") == "Bearer t0ken" for h in seen)


async def test_hub_from_config_file(tmp_path: Path, mcp_http_url: str) -> None:
    path = write_mcp_config(
        tmp_path / "mcp.json", [http_server_config("web", mcp_http_url), stdio_server_config("local")]
    )
    assert [s["name"] for s in json.loads(path.read_text())["servers"]] == ["web", "local"]
    catalog = ToolCatalog(timeout_s=5, max_output_chars=1000, mcp=McpHub.from_file(path))
    try:
        toolbox = await catalog.toolbox([], ["web", "local"])
        assert len(toolbox.specs()) == 2 * len(TOOLS)
        web, local = await asyncio.gather(
            toolbox.call("web__echo", {"text": "a"}), toolbox.call("local__echo", {"text": "b"})
        )
        assert (web.output, local.output) == ('{"result":"a"}', '{"result":"b"}')
    finally:
        await catalog.close()
