"""``SERVICE_LOG_FORMAT=json``: the real service's output, every line of it one JSON object.

The service runs as a process with auth on and a scripted upstream whose API key is a recognisable
value; one run completes and one fails (the upstream answers 401 quoting the key).
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import httpx

from tests.support.auth import AUDIENCE, ISSUER, SECRET, hs256
from tests.support.live_server import ServiceProcess
from tests.support.sse import collect_events
from tests.support.upstream import finish, scripted_upstream, status, text, usage

API_KEY = "upstream-key-Zq81Lm4Tx9"
MESSAGE = "the words of a private message"
SSE = {"accept": "text/event-stream"}


def parse_lines(output: str) -> list[dict[str, Any]]:
    """Every line of the output as a JSON object (a line that is not one fails the test here)."""
    lines = [json.loads(line) for line in output.splitlines() if line.strip()]
    assert all(isinstance(line, dict) for line in lines)
    return lines


async def test_json_lines_with_one_line_per_run_end(tmp_path: Path) -> None:
    async with scripted_upstream() as upstream:
        upstream.enqueue(text("hello"), finish(), usage(prompt=7, completion=5))
        upstream.enqueue(status(401, body={"error": {"message": f"Incorrect API key provided: {API_KEY}"}}))
        env = {
            "SERVICE_LOG_FORMAT": "json",
            "SERVICE_DATABASE_URL": f"sqlite+aiosqlite:///{tmp_path / 'chat.db'}",
            "SERVICE_OPENAI_BASE_URL": upstream.base_url,
            "SERVICE_OPENAI_API_KEY": API_KEY,
            "SERVICE_DEFAULT_MODEL": "openai/scripted",
            "SERVICE_UPSTREAM_MAX_RETRIES": "0",
            "SERVICE_AUTH": "jwt",
            "SERVICE_JWT_SECRET": SECRET,
            "SERVICE_JWT_AUDIENCE": AUDIENCE,
            "SERVICE_JWT_ISSUER": ISSUER,
        }
        headers = {"authorization": f"Bearer {hs256('alice')}"}
        async with (
            ServiceProcess(env, extra_args=["--log-level", "info"]) as proc,
            httpx.AsyncClient(base_url=proc.url, headers=headers, timeout=20) as http,
        ):
            chat = (await http.post("/v1/chats", json={})).json()["id"]
            runs: list[dict[str, Any]] = []
            for _ in range(2):
                _, events = await collect_events(
                    http, "POST", f"/v1/chats/{chat}/runs", json={"message": MESSAGE}, headers=SSE
                )
                runs.append(events[-1])
            assert [run["type"] for run in runs] == ["run.completed", "run.failed"], runs
            completed, failed = runs[0]["run_id"], runs[1]["run_id"]
            await proc.wait_for_log(f"run {completed} ended", f"run {failed} ended", "Incorrect API key provided: ***")
            await proc.stop()
            output = proc.logs()

    lines = parse_lines(output)
    assert {"uvicorn.error", "uvicorn.access", "httpx2", "service.runs", "service.engine"} <= {
        line["logger"] for line in lines
    }
    end_lines = [line for line in lines if line["logger"] == "service.runs" and "status" in line]
    ends = {line["run_id"]: line for line in end_lines}
    assert len(end_lines) == len(ends) == 2, end_lines
    context = {"chat_id": chat, "model": "openai/scripted", "subject": "alice"}
    assert ends[completed] == ends[completed] | context | {
        "level": "info",
        "status": "completed",
        "error_code": None,
        "prompt_tokens": 7,
        "completion_tokens": 5,
    }
    assert ends[failed] == ends[failed] | context | {
        "level": "info",
        "status": "failed",
        "error_code": "upstream_error",
        "ttft_s": None,
        "prompt_tokens": None,
        "completion_tokens": None,
    }
    for end in ends.values():
        assert isinstance(end["duration_s"], float) and end["duration_s"] > 0, end
    assert (
        isinstance(ends[completed]["ttft_s"], float) and 0 <= ends[completed]["ttft_s"] <= ends[completed]["duration_s"]
    )
    # Lines logged during a run carry its fields: the upstream request (httpx2) and the upstream's error.
    about_failed = [line for line in lines if line.get("run_id") == failed]
    assert {"httpx2", "service.engine", "service.runs"} <= {line["logger"] for line in about_failed}
    assert all(line == line | context for line in about_failed), about_failed
    assert API_KEY not in output
    assert MESSAGE not in output
