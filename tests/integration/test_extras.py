"""The optional extras (``redis``, ``postgres``, ``mcp``): the embedded defaults need none of them,
and a setting that needs a missing one names the extra to install.

The service runs as a real process in which those packages cannot be imported
(``tests/support/without_extras.py``), as after ``pip install chat-service`` without extras.
"""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path

import httpx
import pytest

from tests.support.live_server import REPO_ROOT, ServiceProcess
from tests.support.sse import collect_events

WITHOUT_EXTRAS = "tests.support.without_extras"


async def test_the_embedded_defaults_serve_a_run_without_any_extra(tmp_path: Path) -> None:
    proc = ServiceProcess({"SERVICE_DATABASE_URL": f"sqlite+aiosqlite:///{tmp_path / 'chat.db'}"})
    proc.command[2:2] = [WITHOUT_EXTRAS]  # python -m tests.support.without_extras uvicorn ...
    async with proc, httpx.AsyncClient(base_url=proc.url, timeout=20) as http:
        chat = (await http.post("/v1/chats", json={})).json()["id"]
        _, events = await collect_events(
            http, "POST", f"/v1/chats/{chat}/runs", json={"message": "hi"}, headers={"accept": "text/event-stream"}
        )
        assert events[-1]["type"] == "run.completed", events
        assert (await http.get("/readyz")).status_code == 200
        assert "blocked by the test" not in proc.logs()


@pytest.mark.parametrize(
    ("setting", "value", "message"),
    [
        ("SERVICE_REDIS_URL", "redis://127.0.0.1:6379/0", "SERVICE_REDIS_URL needs the redis package"),
        (
            "SERVICE_DATABASE_URL",
            "postgresql+asyncpg://postgres@127.0.0.1:5432/test",
            "a PostgreSQL SERVICE_DATABASE_URL needs the asyncpg package",
        ),
        ("SERVICE_MCP_SERVERS", "mcp.json", "SERVICE_MCP_SERVERS needs the mcp package"),
    ],
)
def test_a_setting_whose_extra_is_missing_names_the_extra(setting: str, value: str, message: str) -> None:
    extra = {"SERVICE_REDIS_URL": "redis", "SERVICE_DATABASE_URL": "postgres", "SERVICE_MCP_SERVERS": "mcp"}[setting]
    checked = subprocess.run(  # noqa: S603 - our own argv
        [sys.executable, "-m", WITHOUT_EXTRAS, "service", "check-config"],
        cwd=REPO_ROOT,
        env={"PATH": "/usr/bin:/bin", setting: value},
        capture_output=True,
        text=True,
        timeout=60,
        check=False,
    )
    assert checked.returncode == 1, checked
    assert checked.stderr.strip() == f"error: {message}, which is not installed: pip install 'chat-service[{extra}]'"
