"""The real `ai` package (pinned in tests/e2e/ai_sdk/package-lock.json) against the live service's AI SDK endpoint.

tests/e2e/ai_sdk/chat.mjs drives ``AbstractChat`` (what ``useChat`` wraps) over ``DefaultChatTransport`` with
nothing but ``api`` and the bearer header: a text answer with reasoning then a tool call (the demo model),
a stop mid-answer, a stream cut by the network and resumed (``resumeStream``: the SDK's ``GET {api}/{id}/stream``),
and a run whose upstream (scripted, over real HTTP) cuts the answer. It prints the UI messages each ended with;
the assertions here go through them part by part, and check the service's side (the run cancelled, the
stored answer under the UI message's id). The README's AI SDK example runs as written against a service with
auth off, and every part shape the translator makes is checked against the package's own schema.
"""

from __future__ import annotations

import asyncio
import json
import os
import time
from collections.abc import AsyncIterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import httpx
import pytest
import pytest_asyncio

from service.api.ui_stream import AnyUiPart
from service.openapi import event_discriminator
from tests.support.auth import AUDIENCE, SECRET, hs256
from tests.support.live_server import REPO_ROOT, ServiceProcess
from tests.support.node import node_tools, npm_ci
from tests.support.readme import readme_block
from tests.support.upstream import ScriptedUpstream, cut, scripted_upstream, text
from tests.unit.test_ui_stream import ALL_RUNS, parts

AI_SDK_DIR = REPO_ROOT / "tests" / "e2e" / "ai_sdk"
TOKEN = hs256("ai-sdk-user", iss=None)
GRACE_S = 3.0
DEMO_ANSWER = "Hello! I am the demo model, answering offline. You said: "

# One worker: the module-wide fixtures (the service, npm ci, the generated client) are set up once
pytestmark = [
    pytest.mark.slow,
    pytest.mark.xdist_group("ai-sdk"),
    pytest.mark.timeout(300),
    pytest.mark.asyncio(loop_scope="module"),
]


@dataclass
class Session:
    result: dict[str, Any]
    http: httpx.AsyncClient
    upstream: ScriptedUpstream


async def run_node(script: Path, env: dict[str, str], timeout: float, stdin: bytes = b"") -> str:
    node, npm = node_tools("the AI SDK test")
    npm_ci(script.parent, npm)
    process = await asyncio.create_subprocess_exec(
        node, str(script), cwd=script.parent, env={**os.environ, **env},
        stdin=asyncio.subprocess.PIPE, stdout=asyncio.subprocess.PIPE, stderr=asyncio.subprocess.PIPE,
    )  # fmt: skip
    try:
        async with asyncio.timeout(timeout):
            stdout, stderr = await process.communicate(stdin)
    except TimeoutError:
        process.kill()
        await process.wait()
        raise
    assert process.returncode == 0, (
        f"{script.name} failed ({process.returncode}):\n{stdout.decode()}\n{stderr.decode()}"
    )
    return stdout.decode()


@pytest_asyncio.fixture(scope="module", loop_scope="module")
async def session(tmp_path_factory: pytest.TempPathFactory) -> AsyncIterator[Session]:
    """The service (auth on, the demo model slow enough to stop, a scripted upstream) and what the script saw."""
    database = tmp_path_factory.mktemp("ai-sdk") / "chats.db"
    async with scripted_upstream() as upstream:
        upstream.enqueue(text("Half an ans", pieces=3), cut())
        env = {
            "SERVICE_DATABASE_URL": f"sqlite+aiosqlite:///{database}",
            "SERVICE_DEMO": "true",
            "SERVICE_OPENAI_BASE_URL": upstream.base_url,
            "SERVICE_OPENAI_API_KEY": "test",
            "SERVICE_DEMO_TOKEN_DELAY_MS": "80",
            "SERVICE_AI_SDK_RESUME_GRACE_S": str(GRACE_S),
            "SERVICE_AUTH": "jwt",
            "SERVICE_JWT_SECRET": SECRET,
            "SERVICE_JWT_AUDIENCE": AUDIENCE,
            "SERVICE_LOG_LEVEL": "warning",
        }
        async with ServiceProcess(env, startup_timeout=60) as service:
            script_env = {"SERVICE_URL": service.url, "SERVICE_TOKEN": TOKEN, "FAILING_MODEL": "openai/scripted"}
            output = await run_node(AI_SDK_DIR / "chat.mjs", script_env, timeout=180)
            headers = {"Authorization": f"Bearer {TOKEN}"}
            async with httpx.AsyncClient(base_url=service.url, headers=headers, timeout=10) as http:
                yield Session(json.loads(output), http, upstream)


def kinds(message: dict[str, Any]) -> list[str]:
    return [part["type"] for part in message["parts"]]


def metadata(message: dict[str, Any]) -> dict[str, Any]:
    return message["metadata"]


async def stored(http: httpx.AsyncClient, message: dict[str, Any]) -> list[dict[str, Any]]:
    response = await http.get(f"/v1/chats/{metadata(message)['chat_id']}")
    assert response.status_code == 200, response.text
    return list(response.json()["messages"])


async def test_a_text_answer_with_reasoning_then_a_tool_call_and_its_output(session: Session) -> None:
    chat = session.result["textAnswerThenToolCall"]
    assert (chat["status"], chat["errors"]) == ("ready", [])
    user1, answer, user2, tool_answer = chat["messages"]
    assert (user1["role"], user2["role"], answer["role"], tool_answer["role"]) == (
        "user",
        "user",
        "assistant",
        "assistant",
    )

    assert kinds(answer) == ["step-start", "reasoning", "text"]
    reasoning, text_part = answer["parts"][1:]
    assert (reasoning["text"], reasoning["state"]) == ("The user wants me to think. Let me answer.", "done")
    assert (text_part["text"], text_part["state"]) == (DEMO_ANSWER + "Please think, then say hello", "done")
    meta = metadata(answer)
    assert meta["model"] == "demo" and meta["run_id"] and meta["chat_id"]
    assert meta["usage"]["completion_tokens"] > 0
    assert meta["usage"]["total_tokens"] == meta["usage"]["prompt_tokens"] + meta["usage"]["completion_tokens"]

    assert kinds(tool_answer) == ["step-start", "tool-clock", "step-start", "text"]
    call = tool_answer["parts"][1]
    assert (call["state"], call["input"], call["toolCallId"]) == (
        "output-available",
        {"timezone": "UTC"},
        "call_demo_0",
    )
    clock = json.loads(call["output"])
    assert clock["timezone"] == "UTC" and clock["datetime"].endswith("+00:00")
    assert tool_answer["parts"][3]["text"] == f"The tool answered: {call['output']}."
    assert metadata(tool_answer)["chat_id"] == meta["chat_id"]  # one SDK chat, one service chat
    assert [f["finishReason"] for f in chat["finishes"]] == ["stop", "stop"]

    messages = await stored(session.http, answer)
    assert [m["role"] for m in messages] == ["user", "assistant", "user", "assistant", "tool", "assistant"]
    assert (messages[1]["id"], messages[5]["id"]) == (answer["id"], tool_answer["id"])  # the UI ids are the stored ones
    assert messages[0]["content"] == "Please think, then say hello"  # only the new message was read


async def test_stop_aborts_the_stream_and_cancels_the_run(session: Session) -> None:
    chat = session.result["stop"]
    assert (chat["status"], chat["errors"]) == ("ready", [])
    assert chat["finishes"][0]["isAbort"] is True
    answer = chat["messages"][-1]
    assert chat["textAtStop"] and DEMO_ANSWER.startswith(chat["textAtStop"])
    run_id = metadata(answer)["run_id"]
    async with asyncio.timeout(GRACE_S + 15):
        while (run := (await session.http.get(f"/v1/runs/{run_id}")).json())["status"] == "running":
            await asyncio.sleep(0.1)
    assert run["status"] == "cancelled"
    final = (await stored(session.http, answer))[-1]
    assert (final["id"], final["status"]) == (answer["id"], "cancelled")
    assert DEMO_ANSWER in final["content"] and "word99" not in final["content"]  # stopped, not answered in full


async def test_a_stream_cut_by_the_network_resumes_with_the_whole_answer(session: Session) -> None:
    chat = session.result["resumeAfterCut"]
    cut_off = chat["afterCut"]
    assert cut_off["status"] == "error" and cut_off["finishes"][0]["isDisconnect"] is True
    assert DEMO_ANSWER.startswith(cut_off["text"])
    assert chat["status"] == "ready"
    assert [m["role"] for m in chat["messages"]] == ["user", "assistant"]  # the replay rebuilt the same message
    answer = chat["messages"][1]
    assert kinds(answer) == ["step-start", "text"]
    assert (answer["parts"][1]["text"], answer["parts"][1]["state"]) == (
        DEMO_ANSWER + "Say something I can resume",
        "done",
    )
    run = (await session.http.get(f"/v1/runs/{metadata(answer)['run_id']}")).json()
    assert (run["status"], run["message_id"]) == ("completed", answer["id"])
    assert chat["nothingActiveIsNull"] is True  # the run is over: 204
    assert session.result["unknownChatResumeIsNull"] is True


async def test_a_failed_run_reaches_on_error(session: Session) -> None:
    chat = session.result["failedRun"]
    assert chat["status"] == "error"
    assert len(chat["errors"]) == 1 and chat["errors"][0].startswith("upstream_error: ")
    assert chat["error"] == chat["errors"][0]
    assert chat["finishes"][0]["isError"] is True
    answer = chat["messages"][-1]
    assert kinds(answer) == ["step-start", "text"]
    assert answer["parts"][1]["text"] == "Half an ans"  # what came before the cut
    assert metadata(answer)["model"] == "openai/scripted"
    final = (await stored(session.http, answer))[-1]
    assert (final["id"], final["status"], final["content"]) == (answer["id"], "failed", "Half an ans")
    assert session.upstream.requests[0].body["messages"][-1] == {"role": "user", "content": "This answer will be cut"}


async def test_the_endpoint_needs_the_bearer_token(session: Session) -> None:
    body = {"id": "x", "messages": [{"id": "u", "role": "user", "parts": [{"type": "text", "text": "hi"}]}]}
    async with httpx.AsyncClient(base_url=str(session.http.base_url)) as anonymous:
        assert (await anonymous.post("/v1/ai-sdk/chat", json=body)).status_code == 401
        assert (await anonymous.get("/v1/ai-sdk/chat/x/stream")).status_code == 401
    started = time.monotonic()
    assert (await session.http.get("/v1/ai-sdk/chat/x/stream")).status_code == 204
    assert time.monotonic() - started < 5


async def test_every_part_the_translator_makes_passes_the_sdks_own_schema() -> None:
    """Each part shape, checked by the installed package's ``uiMessageChunkSchema`` (its zod schema)."""
    made = [part for run in ALL_RUNS for part in parts(run)]
    assert {p["type"] for p in made} == set(event_discriminator(AnyUiPart)["mapping"])  # every kind, at least once
    refused = await run_node(AI_SDK_DIR / "validate-parts.mjs", {}, timeout=60, stdin=json.dumps(made).encode())
    assert json.loads(refused) == []


async def test_the_readme_example_runs_as_written(tmp_path: Path) -> None:
    """The README's Node block, against the service as `just serve` runs it (auth off, the demo model)."""
    env = {"SERVICE_DATABASE_URL": f"sqlite+aiosqlite:///{tmp_path / 'chats.db'}", "SERVICE_DEMO_TOKEN_DELAY_MS": "5"}
    example = AI_SDK_DIR / f"readme-example-{os.getpid()}.mjs"  # beside node_modules, so that "ai" resolves
    example.write_text(readme_block("ai-sdk"), encoding="utf-8")
    try:
        async with ServiceProcess(env) as service:
            output = await run_node(example, {"SERVICE_URL": service.url}, timeout=60)
    finally:
        example.unlink()
    lines = output.splitlines()
    assert [line.split(" ", 1)[0] for line in lines] == ["step-start", "tool-clock", "step-start", "text"], output
    assert lines[1].startswith('tool-clock {"datetime":') and lines[3].startswith("text The tool answered: ")
