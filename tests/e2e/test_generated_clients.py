"""Clients generated from the committed openapi/openapi.json drive the live service (Python and TypeScript).

The service runs with auth on: the clients send the bearer token the way their generators provide
(openapi-python-client's ``AuthenticatedClient``, the TypeScript client's ``auth`` callback).

The generated code is not committed: the Python client goes to a temporary directory, the TypeScript one to
tests/e2e/generated/ts/ (git-ignored), with node_modules kept in tests/e2e/ts_client/ between runs.
"""

from __future__ import annotations

import asyncio
import importlib
import os
import shutil
import sys
import time
from collections.abc import Iterator
from typing import Any

import pytest

from tests.support.auth import AUDIENCE, SECRET, hs256
from tests.support.live_server import REPO_ROOT, ServiceProcess
from tests.support.node import node_tools, npm_ci, run

SPEC = REPO_ROOT / "openapi" / "openapi.json"
TS_DIR = REPO_ROOT / "tests" / "e2e" / "ts_client"
TS_OUT = REPO_ROOT / "tests" / "e2e" / "generated" / "ts"
PACKAGE = "chat_service_client"
TOKEN = hs256("client-user", iss=None)

pytestmark = [pytest.mark.slow, pytest.mark.timeout(300)]


@pytest.fixture(scope="module")
def live_url(tmp_path_factory: pytest.TempPathFactory) -> Iterator[str]:
    db = tmp_path_factory.mktemp("clients") / "chat.db"
    service = ServiceProcess(
        {
            "SERVICE_DATABASE_URL": f"sqlite+aiosqlite:///{db}",
            "SERVICE_DEMO_TOKEN_DELAY_MS": "20",
            "SERVICE_AUTH": "jwt",
            "SERVICE_JWT_SECRET": SECRET,
            "SERVICE_JWT_AUDIENCE": AUDIENCE,
        }
    )
    asyncio.run(service.start())
    try:
        yield service.url
    finally:
        asyncio.run(service.stop())
        service.log_path.unlink(missing_ok=True)


# --------------------------------------------------------------------------- Python


@pytest.fixture(scope="module")
def python_client(tmp_path_factory: pytest.TempPathFactory) -> Any:
    out = tmp_path_factory.mktemp("pyclient")
    generator = [sys.executable, "-m", "openapi_python_client"]
    run([*generator, "generate", "--path", str(SPEC), "--output-path", str(out / PACKAGE), "--meta", "none"], out, 120)
    sys.path.insert(0, str(out))
    try:
        yield importlib.import_module(PACKAGE)
    finally:
        sys.path.remove(str(out))
        for name in [m for m in sys.modules if m == PACKAGE or m.startswith(f"{PACKAGE}.")]:
            del sys.modules[name]


def test_python_client_drives_arun(python_client: Any, live_url: str) -> None:
    api = importlib.import_module(f"{PACKAGE}.api")
    chats = importlib.import_module(f"{PACKAGE}.api.chats")
    runs = importlib.import_module(f"{PACKAGE}.api.runs")
    models = importlib.import_module(f"{PACKAGE}.models")
    assert api is not None
    for name in ("create_chat", "create_run", "get_chat"):
        importlib.import_module(f"{PACKAGE}.api.chats.{name}")
    for name in ("get_run", "cancel_run"):
        importlib.import_module(f"{PACKAGE}.api.runs.{name}")

    anonymous = python_client.Client(base_url=live_url)
    refused = chats.create_chat.sync_detailed(client=anonymous, body=models.ChatCreate(model="demo"))
    assert refused.status_code == 401

    token = {"token": TOKEN, "raise_on_unexpected_status": True, "timeout": None}
    with python_client.AuthenticatedClient(base_url=live_url, **token) as client:
        chat = chats.create_chat.sync_detailed(client=client, body=models.ChatCreate(model="demo"))
        assert chat.status_code == 201, chat.content
        assert isinstance(chat.parsed, models.ChatOut)
        chat_id = chat.parsed.id

        started = chats.create_run.sync_detailed(
            chat_id, client=client, body=models.RunCreate(message="Hello from the generated Python client")
        )
        assert started.status_code == 202, started.content
        run = started.parsed
        assert isinstance(run, models.RunOut)
        assert run.events_url == f"/v1/runs/{run.id}/events"

        deadline = time.monotonic() + 30
        while True:
            status = runs.get_run.sync(run.id, client=client)
            assert isinstance(status, models.RunOut)
            if status.status.value != "running":
                break
            assert time.monotonic() < deadline, "the run did not finish in 30 s"
            time.sleep(0.05)
        assert status.status.value == "completed"
        assert status.last_seq > 0

        for _ in range(2):  # cancel is idempotent: a finished run is returned unchanged
            cancelled = runs.cancel_run.sync_detailed(run.id, client=client)
            assert cancelled.status_code == 200, cancelled.content
            assert isinstance(cancelled.parsed, models.RunOut)
            assert cancelled.parsed.status.value == "completed"

        fetched = chats.get_chat.sync(chat_id, client=client)
        assert isinstance(fetched, models.ChatOut)
        messages = fetched.messages
        assert isinstance(messages, list)
        assert [m.role.value for m in messages] == ["user", "assistant"]

        missing = chats.get_chat.sync_detailed("no-such-chat", client=client)
        assert missing.status_code == 404
        assert isinstance(missing.parsed, models.ErrorEnvelope)
        assert missing.parsed.error.code == "not_found"


# --------------------------------------------------------------------------- TypeScript


def test_typescript_client_streams_and_resumes(live_url: str) -> None:
    _, npm = node_tools("the TypeScript client test")
    npm_ci(TS_DIR, npm)
    shutil.rmtree(TS_OUT, ignore_errors=True)
    openapi_ts = str(TS_DIR / "node_modules" / ".bin" / "openapi-ts")
    run([openapi_ts, "-i", str(SPEC), "-o", str(TS_OUT), "-c", "@hey-api/client-fetch"], TS_DIR, 120)
    assert (TS_OUT / "sdk.gen.ts").exists()
    tsx = str(TS_DIR / "node_modules" / ".bin" / "tsx")
    output = run([tsx, "e2e.ts"], TS_DIR, 120, env={**os.environ, "SERVICE_URL": live_url, "SERVICE_TOKEN": TOKEN})
    assert output.startswith("OK:"), output
    print(output)
