"""The server-side tool loop end to end: local tools and real MCP servers (streamable HTTP and stdio),
driven through the service on both transports."""

from __future__ import annotations

import asyncio
import json
from collections.abc import AsyncIterator
from pathlib import Path
from typing import Any

import pytest

from tests.integration.conftest import Service, ServiceFactory, text_of, types
from tests.support.mcp_servers import http_server_config, serve_mcp_http, stdio_server_config, write_mcp_config
from tests.support.sse import collect_events, iter_sse
from tests.support.upstream import finish, gate, text, tool_call


@pytest.fixture
async def mcp_config(tmp_path: Path) -> AsyncIterator[Path]:
    """An allow-list with a streamable HTTP server (``web``) and a stdio server (``proc``)."""
    async with serve_mcp_http() as url:
        yield write_mcp_config(tmp_path / "mcp.json", [http_server_config("web", url), stdio_server_config("proc")])


@pytest.fixture
async def tool_service(make_service: ServiceFactory, mcp_config: Path) -> Service:
    return await make_service(mcp_servers=str(mcp_config), tool_timeout_s=1.5)


async def run_over(service: Service, transport: str, chat: str, message: str) -> list[dict[str, Any]]:
    if transport == "sse":
        return await service.stream_run(chat, message)
    return await service.ws_run(chat, message)


@pytest.mark.parametrize("transport", ["sse", "ws"])
async def test_mcp_tools_over_http_and_stdio_run_in_one_turn_and_feed_the_answer(
    tool_service: Service, transport: str
) -> None:
    service = tool_service
    add = tool_call(0, "c_add", "web__add", ['{"a": ', "2, ", '"b": 40}'])
    echo = tool_call(1, "c_echo", "proc__echo", ['{"te', 'xt": "hel', 'lo"}'])
    service.upstream.enqueue([*add, *echo], finish("tool_calls"))
    service.upstream.enqueue(text("2 + 40 = 42, and the echo said hello."), finish())
    chat = await service.create_chat(mcp_servers=["web", "proc"], tools=[])

    events = await run_over(service, transport, chat, "add and echo")

    results = {e["call_id"]: e for e in events if e["type"] == "tool.result"}
    assert json.loads(results["c_add"]["output"]) == {"result": 42}
    assert json.loads(results["c_echo"]["output"]) == {"result": "hello"}
    assert not any(r["is_error"] for r in results.values())
    assert events[-1]["type"] == "run.completed"
    offered = {t["function"]["name"] for t in service.upstream.requests[0].body["tools"]}
    assert {"web__add", "web__echo", "proc__add", "proc__slow"} <= offered
    assert "clock" not in offered
    tool_messages = [m for m in service.upstream.requests[1].body["messages"] if m["role"] == "tool"]
    assert [m["tool_call_id"] for m in tool_messages] == ["c_add", "c_echo"]
    stored = (await service.http.get(f"/v1/chats/{chat}")).json()["messages"]
    assert [m["role"] for m in stored] == ["user", "assistant", "tool", "tool", "assistant"]
    assert [c["name"] for c in stored[1]["tool_calls"]] == ["web__add", "proc__echo"]


@pytest.mark.parametrize(
    ("name", "arguments", "expected"),
    [
        ("web__fail", "{}", "error executing tool fail"),
        ("web__slow", '{"seconds": 10}', "time"),
        ("web__big", '{"chars": 50000}', "more than the limit of 10000"),
        ("web__add", '{"a": "two", "b": 1}', "a"),
        ("web__nonexistent", "{}", "web__nonexistent"),
        ("clock", '{"timezone": "Mars/Olympus"}', "Mars/Olympus"),
    ],
    ids=["raises", "too-slow", "too-much-output", "invalid-arguments", "unknown-tool", "bad-local-argument"],
)
async def test_a_failing_tool_gives_an_error_result_and_the_run_goes_on(
    make_service: ServiceFactory, mcp_config: Path, name: str, arguments: str, expected: str
) -> None:
    service = await make_service(mcp_servers=str(mcp_config), tool_timeout_s=1.0, tool_max_output_chars=10_000)
    service.upstream.enqueue(tool_call(0, "c1", name, arguments, pieces=2), finish("tool_calls"))
    service.upstream.enqueue(text("I could not do that."), finish())
    chat = await service.create_chat(mcp_servers=["web"], tools=["calculator", "clock"])
    loop = asyncio.get_running_loop()
    started = loop.time()

    events = await service.stream_run(chat, "try it")

    result = next(e for e in events if e["type"] == "tool.result")
    assert result["is_error"] is True
    assert expected.lower() in result["output"].lower()
    assert events[-1]["type"] == "run.completed"
    assert text_of(events) == "I could not do that."
    assert loop.time() - started < 1.0 + 3.0  # the slow tool is stopped at its time limit


async def test_servers_outside_the_allow_list_and_unknown_local_tools_are_refused(tool_service: Service) -> None:
    service = tool_service
    refused = await service.http.post("/v1/chats", json={"mcp_servers": ["elsewhere"]})
    assert refused.status_code == 400
    assert refused.json()["error"]["code"] == "mcp_server_not_allowed"
    assert refused.json()["error"]["detail"]["field"] == "mcp_servers"
    unknown = await service.http.post("/v1/chats", json={"tools": ["rm_rf"]})
    assert unknown.status_code == 400
    assert unknown.json()["error"]["code"] == "unknown_tool"
    chat = await service.create_chat()
    per_run = await service.http.post(f"/v1/chats/{chat}/runs", json={"message": "x", "mcp_servers": ["elsewhere"]})
    assert per_run.status_code == 400
    assert per_run.json()["error"]["code"] == "mcp_server_not_allowed"
    assert service.upstream.requests == []


async def test_the_tool_listing_shows_local_and_allowed_mcp_tools_with_schemas(tool_service: Service) -> None:
    tools = {t["name"]: t for t in (await tool_service.http.get("/v1/tools")).json()}
    assert {"clock", "calculator", "web__add", "web__fail", "proc__echo"} <= set(tools)
    assert tools["calculator"]["parameters"]["properties"]["expression"]["type"] == "string"
    assert tools["web__add"]["parameters"]["required"] == ["a", "b"]
    assert (tools["web__add"]["source"], tools["clock"]["source"]) == ("web", "local")


async def test_a_resumed_reader_sees_each_tool_call_once_and_no_tool_runs_twice(tool_service: Service) -> None:
    service = tool_service
    hold = asyncio.Event()
    service.upstream.enqueue(
        tool_call(0, "c1", "calculator", '{"expression": "2**10"}', pieces=3), finish("tool_calls")
    )
    service.upstream.enqueue(text("It is "), gate(hold), text("1024."), finish())
    chat = await service.create_chat(tools=["calculator"])
    run = (await service.http.post(f"/v1/chats/{chat}/runs", json={"message": "2**10?"})).json()

    seen: list[dict[str, Any]] = []
    async with service.http.stream("GET", run["events_url"]) as first:
        async for message in iter_sse(first):
            if message.kind == "event":
                seen.append(message.json())
                if seen[-1]["type"] == "text.delta":
                    break
    hold.set()
    headers = {"Last-Event-ID": str(seen[-1]["seq"])}
    _, rest = await collect_events(service.http, "GET", run["events_url"], headers=headers)
    events = seen + rest

    assert [e["seq"] for e in events] == list(range(1, len(events) + 1))
    assert types(events).count("tool_call.done") == 1
    assert types(events).count("tool.result") == 1
    assert next(e for e in events if e["type"] == "tool.result")["output"] == "1024"
    assert len(service.upstream.requests) == 2


async def test_the_offline_demo_model_runs_the_whole_tool_loop(make_service: ServiceFactory) -> None:
    service = await make_service(default_model="demo", demo=True)
    response = await service.http.post("/v1/chats", json={"model": "demo"})
    chat = response.json()["id"]

    events = await service.stream_run(chat, "What time is it? Also calculate 6*7")

    kinds = types(events)
    assert kinds.index("tool_call.started") < kinds.index("tool_call.done") < kinds.index("tool.result")
    done = next(e for e in events if e["type"] == "tool_call.done")
    assert done["name"] == "calculator"
    assert done["parsed"] == {"expression": "6*7"}
    assert "42" in text_of(events)
    assert events[-1]["type"] == "run.completed"


async def test_a_real_model_gets_only_the_tools_it_is_given(tool_service: Service) -> None:
    """ACCEPTANCE X6: the local tools are the demo's; a chat on a real upstream names what it uses."""
    service = tool_service
    for _ in range(3):
        service.upstream.enqueue(text("ok"), finish())
    bare = await service.create_chat()
    await service.stream_run(bare, "hi")
    await service.stream_run(bare, {"message": "now with a clock", "tools": ["clock"]})
    named = await service.create_chat(tools=["calculator"])
    await service.stream_run(named, "hi")
    offered = [{t["function"]["name"] for t in r.body.get("tools", [])} for r in service.upstream.requests]
    assert offered == [set(), {"clock"}, {"calculator"}]


@pytest.mark.parametrize("transport", ["sse", "ws"])
async def test_each_upstream_call_is_a_step_and_tool_results_come_between_steps(
    service: Service, transport: str
) -> None:
    service.upstream.enqueue(tool_call(0, "c1", "calculator", ['{"expression": ', '"6*7"}']), finish("tool_calls"))
    service.upstream.enqueue(text("It is 42."), finish())
    chat = await service.create_chat(tools=["calculator"])

    events = await run_over(service, transport, chat, "calculate 6*7")

    boundaries = [
        (e["type"], e.get("step"), e.get("finish_reason"))
        for e in events
        if e["type"] in {"run.started", "step.started", "step.done", "tool.result", "run.completed"}
    ]
    assert boundaries == [
        ("run.started", None, None),
        ("step.started", 1, None),
        ("step.done", 1, "tool_calls"),
        ("tool.result", None, None),
        ("step.started", 2, None),
        ("step.done", 2, "stop"),
        ("run.completed", None, "stop"),
    ]
    first_step = types(events)[types(events).index("step.started") : types(events).index("step.done")]
    assert first_step[-1] == "tool_call.done"  # a step's closing events come before its step.done
    assert events[0]["message_id"] == events[-1]["message_id"]
