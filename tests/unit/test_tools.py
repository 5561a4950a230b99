"""Local tools, the toolbox's error handling, and the catalog's typed errors."""

from __future__ import annotations

import asyncio
import json
import time
from datetime import datetime
from pathlib import Path
from typing import Annotated, Any

import msgspec
import pytest

from service.engine.mcp import McpConfigError, McpHub, McpServerConfig, load_mcp_config
from service.engine.tools import (
    DEFAULT_TOOLS,
    LocalTool,
    ServerNotAllowedError,
    Toolbox,
    ToolCatalog,
    ToolOutcome,
    UnknownToolError,
    local_tool,
    mcp_tool_name,
)


class Point(msgspec.Struct, forbid_unknown_fields=True):
    x: int
    y: int = 0


class Shape(msgspec.Struct, forbid_unknown_fields=True):
    """Developer notes, not shown to the model."""

    name: Annotated[str, msgspec.Meta(description="What to call it", max_length=20)]
    points: list[Point]
    origin: Point | None = None


@local_tool
async def draw(params: Shape) -> dict[str, Any]:
    """Draw a shape."""
    return {"name": params.name, "count": len(params.points)}


class Empty(msgspec.Struct, forbid_unknown_fields=True):
    pass


class Sleep(msgspec.Struct):
    seconds: float


@local_tool
def explode(params: Empty) -> str:
    """Always raises."""
    raise RuntimeError("kaboom")


@local_tool
async def nap(params: Sleep) -> str:
    """Sleep a while."""
    await asyncio.sleep(params.seconds)
    return "rested"


@local_tool
def blocking_nap(params: Sleep) -> str:
    """Sleep a while without yielding (runs in a worker thread)."""
    time.sleep(params.seconds)
    return "rested"


@local_tool
def chatty(params: Empty) -> str:
    """Says too much."""
    return "x" * 500


TEST_TOOLS = (*DEFAULT_TOOLS, draw, explode, nap, blocking_nap, chatty)


@pytest.fixture
async def toolbox() -> Toolbox:
    catalog = ToolCatalog(timeout_s=0.5, max_output_chars=100, local=TEST_TOOLS)
    return await catalog.toolbox(None, None)


def test_schema_is_derived_from_the_struct_and_self_contained() -> None:
    schema = draw.spec.parameters
    assert "$ref" not in json.dumps(schema)
    assert "$defs" not in schema
    assert schema["type"] == "object"
    assert schema["required"] == ["name", "points"]
    assert schema["additionalProperties"] is False
    assert schema["properties"]["name"] == {"description": "What to call it", "type": "string", "maxLength": 20}
    point = schema["properties"]["points"]["items"]
    assert point["properties"] == {"x": {"type": "integer"}, "y": {"type": "integer", "default": 0}}
    assert {"type": "null"} in schema["properties"]["origin"]["anyOf"]
    assert draw.spec.description == "Draw a shape."
    assert draw.spec.source == "local"
    # the component msgspec generates for Point, inlined
    assert msgspec.json.schema(Point)["$defs"]["Point"]["properties"] == point["properties"]


def test_from_function_rejects_what_it_cannot_describe() -> None:
    def no_doc(params: Empty) -> str:
        return ""

    def two(a: Empty, b: Empty) -> str:
        """Two parameters."""
        return ""

    def not_struct(params: dict[str, int]) -> str:
        """A dict."""
        return ""

    with pytest.raises(TypeError, match="docstring"):
        LocalTool.from_function(no_doc)
    with pytest.raises(TypeError, match=r"exactly one parameter"):
        LocalTool.from_function(two)  # pyright: ignore[reportArgumentType]
    with pytest.raises(TypeError, match=r"exactly one parameter"):
        LocalTool.from_function(not_struct)  # pyright: ignore[reportArgumentType]
    with pytest.raises(TypeError, match="tool name"):
        LocalTool.from_function(draw.fn, name="bad name")
    with pytest.raises(TypeError, match="tool name"):
        LocalTool.from_function(draw.fn, name="a__b")


def test_openai_tools_shape(toolbox: Toolbox) -> None:
    first = toolbox.openai_tools()[0]
    assert first == {
        "type": "function",
        "function": {
            "name": "clock",
            "description": DEFAULT_TOOLS[0].spec.description,
            "parameters": DEFAULT_TOOLS[0].spec.parameters,
        },
    }
    assert [s.name for s in toolbox.specs()] == [t.spec.name for t in TEST_TOOLS]


def test_validate(toolbox: Toolbox) -> None:
    assert toolbox.validate("draw", {"name": "sq", "points": [{"x": 1}]}) is None
    assert toolbox.validate("nope", {}) == (
        "unknown tool 'nope' (available: clock, calculator, draw, explode, nap, blocking_nap, chatty)"
    )
    assert toolbox.validate("draw", {"name": "sq", "points": [{"x": "1"}]}) == (
        "invalid arguments for draw: Expected `int`, got `str` - at `$.points[0].x`"
    )
    assert (
        toolbox.validate("draw", {"points": []}) == "invalid arguments for draw: Object missing required field `name`"
    )
    message = toolbox.validate("draw", {"name": "sq", "points": [], "colour": "red"})
    assert message == "invalid arguments for draw: Object contains unknown field `colour`"


async def test_call_returns_json_for_structured_results(toolbox: Toolbox) -> None:
    outcome = await toolbox.call("draw", {"name": "sq", "points": [{"x": 1}, {"x": 2, "y": 3}]})
    assert outcome == ToolOutcome('{"name":"sq","count":2}')


async def test_invalid_arguments_are_an_error_outcome(toolbox: Toolbox) -> None:
    outcome = await toolbox.call("draw", {"name": 3, "points": []})
    assert outcome.is_error
    assert outcome.output == "invalid arguments for draw: Expected `str`, got `int` - at `$.name`"


async def test_unknown_tool_is_an_error_outcome(toolbox: Toolbox) -> None:
    outcome = await toolbox.call("nope", {})
    assert outcome.is_error
    assert outcome.output.startswith("unknown tool 'nope'")


@pytest.mark.parametrize(
    ("expression", "expected"),
    [
        ("1 + 2 * 3", 7),
        ("(1 + 2) * 3", 9),
        ("-2 ** 2", -4),
        ("7 // 2 + 7 % 2", 4),
        ("1 / 4", 0.25),
        ("2 ** -1", 0.5),
        ("2 ** 100", 2**100),
        ("1.5e3 - -1", 1501.0),
    ],
)
async def test_calculator(toolbox: Toolbox, expression: str, expected: float) -> None:
    outcome = await toolbox.call("calculator", {"expression": expression})
    assert outcome == ToolOutcome(json.dumps(expected))


@pytest.mark.parametrize(
    ("expression", "message"),
    [
        ("9**9**9", "too large"),
        ("2 ** 5000", "too large"),
        ("10 ** 2000", "too large"),
        ("(10 ** 1000) * (10 ** 1000)", "too large"),
        ("1e308 * 10", "not a finite number"),
        ("1 / 0", "division by zero"),
        ("(-8) ** 0.5", "not a real number"),
        ("__import__('os').system('true')", "unsupported syntax"),
        ("x + 1", "unsupported syntax"),
        ("(1).__class__", "unsupported syntax"),
        ("'a' * 3", "unsupported syntax"),
        ("True + 1", "unsupported syntax"),
        ("1 << 2", "unsupported syntax"),
        ("[1, 2]", "unsupported syntax"),
        ("lambda: 1", "unsupported syntax"),
        ("1 +", "not an arithmetic expression"),
    ],
)
async def test_calculator_refuses(toolbox: Toolbox, expression: str, message: str) -> None:
    outcome = await toolbox.call("calculator", {"expression": expression})
    assert outcome.is_error
    assert message in outcome.output
    assert outcome.output.startswith("tool calculator failed: ")


async def test_clock_default_is_utc(toolbox: Toolbox) -> None:
    outcome = await toolbox.call("clock", {})
    reading = json.loads(outcome.output)
    assert not outcome.is_error
    assert reading["timezone"] == "UTC"
    assert datetime.fromisoformat(reading["datetime"]).utcoffset() is not None
    assert reading["weekday"] == datetime.fromisoformat(reading["datetime"]).strftime("%A")


async def test_clock_in_a_time_zone(toolbox: Toolbox) -> None:
    outcome = await toolbox.call("clock", {"timezone": "Asia/Kolkata"})
    assert datetime.fromisoformat(json.loads(outcome.output)["datetime"]).utcoffset() == (
        datetime.fromisoformat("2000-01-01T00:00:00+05:30").utcoffset()
    )


@pytest.mark.parametrize("zone", ["Mars/Olympus", "../../etc/passwd", ""])
async def test_clock_bad_timezone(toolbox: Toolbox, zone: str) -> None:
    outcome = await toolbox.call("clock", {"timezone": zone})
    assert outcome.is_error
    assert outcome.output == f"tool clock failed: unknown time zone {zone!r}; use an IANA name such as Europe/Paris"


async def test_a_raising_tool_is_an_error_outcome(toolbox: Toolbox) -> None:
    assert await toolbox.call("explode", {}) == ToolOutcome("tool explode failed: RuntimeError: kaboom", is_error=True)


@pytest.mark.parametrize("name", ["nap", "blocking_nap"])
async def test_a_slow_tool_times_out(toolbox: Toolbox, name: str) -> None:
    started = time.monotonic()
    outcome = await toolbox.call(name, {"seconds": 3})
    assert outcome == ToolOutcome(f"tool {name} timed out after 0.5s", is_error=True)
    assert time.monotonic() - started < 2.5  # did not wait for the tool
    assert await toolbox.call(name, {"seconds": 0}) == ToolOutcome("rested")


async def test_too_much_output_is_an_error_outcome(toolbox: Toolbox) -> None:
    outcome = await toolbox.call("chatty", {})
    assert outcome.is_error
    assert outcome.output == "tool chatty returned 500 characters, more than the limit of 100; ask for less"


async def test_cancellation_propagates(toolbox: Toolbox) -> None:
    task = asyncio.create_task(toolbox.call("nap", {"seconds": 0.4}))
    await asyncio.sleep(0.05)
    task.cancel()
    with pytest.raises(asyncio.CancelledError):
        await task


async def test_toolbox_selects_local_tools() -> None:
    catalog = ToolCatalog(timeout_s=1, max_output_chars=100)
    assert [s.name for s in (await catalog.toolbox(None, None)).specs()] == ["clock", "calculator"]
    assert [s.name for s in (await catalog.toolbox(["calculator"], [])).specs()] == ["calculator"]
    assert (await catalog.toolbox([], None)).specs() == []
    assert [s.name for s in await catalog.list_specs()] == ["clock", "calculator"]


async def test_unknown_tool_error_names_the_offender_and_the_choice() -> None:
    catalog = ToolCatalog(timeout_s=1, max_output_chars=100)
    with pytest.raises(UnknownToolError) as caught:
        await catalog.toolbox(["calculator", "weather"], None)
    assert caught.value.code == "unknown_tool"
    assert str(caught.value) == "unknown tool 'weather' (available tools: clock, calculator)"
    with pytest.raises(UnknownToolError, match="MCP tools are chosen with mcp_servers"):
        await catalog.toolbox(["docs__search"], None)


async def test_server_not_allowed_error_names_the_offender_and_the_allow_list() -> None:
    without_mcp = ToolCatalog(timeout_s=1, max_output_chars=100)
    with pytest.raises(ServerNotAllowedError, match="'evil' is not allowed: no MCP servers are configured") as caught:
        await without_mcp.toolbox(None, ["evil"])
    assert caught.value.code == "mcp_server_not_allowed"
    hub = McpHub([McpServerConfig(name="docs", transport="http", url="http://127.0.0.1:9/mcp")])
    catalog = ToolCatalog(timeout_s=1, max_output_chars=100, mcp=hub)
    with pytest.raises(ServerNotAllowedError) as caught:
        await catalog.toolbox(None, ["evil"])
    assert str(caught.value) == "MCP server 'evil' is not in the allow-list (allowed: docs)"
    with pytest.raises(ServerNotAllowedError):
        await catalog.list_specs(["evil"])
    await catalog.close()


def test_mcp_tool_names_are_sanitised() -> None:
    assert mcp_tool_name("docs", "search") == "docs__search"
    assert mcp_tool_name("docs", "files.read/all") == "docs__files_read_all"
    assert len(mcp_tool_name("docs", "x" * 100)) == 64


def test_load_mcp_config(tmp_path: Path) -> None:
    path = tmp_path / "mcp.json"
    path.write_text(
        json.dumps(
            {
                "servers": [
                    {"name": "docs", "transport": "http", "url": "http://127.0.0.1:9000/mcp", "headers": {"X-K": "v"}},
                    {"name": "files", "transport": "stdio", "command": "uvx", "args": ["fs"], "env": {"A": "1"}},
                ]
            }
        )
    )
    docs, files = load_mcp_config(path)
    assert docs == McpServerConfig(name="docs", transport="http", url="http://127.0.0.1:9000/mcp", headers={"X-K": "v"})
    assert files.command == "uvx"
    assert files.args == ("fs",)
    assert files.env == {"A": "1"}


@pytest.mark.parametrize(
    ("servers", "message"),
    [
        ([{"name": "docs", "transport": "http"}], r"servers\[0\] \('docs'\): an http server needs `url`"),
        (
            [{"name": "a", "transport": "stdio", "command": "x"}, {"name": "b", "transport": "ftp"}],
            r"servers\[1\] \('b'\)",
        ),
        (
            [{"name": "a__b", "transport": "stdio", "command": "x"}],
            r"servers\[0\] \('a__b'\): Expected `str` matching regex",
        ),
        ([{"transport": "stdio", "command": "x"}], r"servers\[0\]: Object missing required field `name`"),
        ([{"name": "a", "transport": "stdio", "command": "x", "cmd": 1}], "unknown field `cmd`"),
        ([{"name": "a", "transport": "stdio", "command": "x"}] * 2, r"servers\[1\] \('a'\): duplicate server name"),
    ],
)
def test_load_mcp_config_names_the_bad_entry(tmp_path: Path, servers: list[dict[str, Any]], message: str) -> None:
    path = tmp_path / "mcp.json"
    path.write_text(json.dumps({"servers": servers}))
    with pytest.raises(McpConfigError, match=message):
        load_mcp_config(path)


def test_load_mcp_config_unreadable(tmp_path: Path) -> None:
    with pytest.raises(McpConfigError, match=r"missing\.json"):
        load_mcp_config(tmp_path / "missing.json")
    (tmp_path / "bad.json").write_text("{")
    with pytest.raises(McpConfigError, match=r"bad\.json"):
        load_mcp_config(tmp_path / "bad.json")


@local_tool
def own_timeout(params: Empty) -> str:
    """Raises TimeoutError itself, long before the time limit."""
    raise TimeoutError("upstream took too long")


async def test_a_tool_raising_timeout_error_is_not_reported_as_our_timeout() -> None:
    toolbox = await ToolCatalog(timeout_s=5, max_output_chars=100, local=[own_timeout]).toolbox(None, None)
    outcome = await toolbox.call("own_timeout", {})
    assert outcome == ToolOutcome("tool own_timeout failed: TimeoutError: upstream took too long", is_error=True)
