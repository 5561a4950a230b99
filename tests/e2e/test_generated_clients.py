"""Clients generated from the committed openapi/openapi.json drive the live service (Python and TypeScript).

The service runs with auth on: the clients send the bearer token the way their generators provide
(openapi-python-client's ``AuthenticatedClient``, the TypeScript client's ``auth`` callback).

The generated code is not committed: the Python client goes to a temporary directory, the TypeScript one to
tests/e2e/generated/ts/ (git-ignored), with node_modules kept in tests/e2e/ts_client/ between runs.

The README's curl, Python and TypeScript examples (the fenced blocks after ``<!-- example: NAME -->``) run
here as written, against a second service with auth off, as `just serve` runs it.
"""

from __future__ import annotations

import asyncio
import importlib
import json
import os
import re
import shutil
import sys
import typing
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest

from tests.support.auth import AUDIENCE, SECRET, hs256
from tests.support.live_server import REPO_ROOT, ServiceProcess
from tests.support.node import node_tools, npm_ci, run
from tests.support.readme import readme_block

SPEC = REPO_ROOT / "openapi" / "openapi.json"
TS_DIR = REPO_ROOT / "tests" / "e2e" / "ts_client"
TS_OUT = REPO_ROOT / "tests" / "e2e" / "generated" / "ts"
PACKAGE = "chat_service_client"
HELPER = REPO_ROOT / "clients" / "python" / "chat_service_events.py"
CUT_AFTER = 4

# One worker: the module-wide fixtures (the service, npm ci, the generated client) are set up once
pytestmark = [pytest.mark.slow, pytest.mark.xdist_group("generated-clients"), pytest.mark.timeout(300)]


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


@pytest.fixture(scope="module")
def open_url(tmp_path_factory: pytest.TempPathFactory) -> Iterator[str]:
    """The service as `just serve` runs it (auth off), for the README's examples."""
    db = tmp_path_factory.mktemp("readme") / "chat.db"
    service = ServiceProcess({"SERVICE_DATABASE_URL": f"sqlite+aiosqlite:///{db}", "SERVICE_DEMO_TOKEN_DELAY_MS": "5"})
    asyncio.run(service.start())
    try:
        yield service.url
    finally:
        asyncio.run(service.stop())
        service.log_path.unlink(missing_ok=True)


# --------------------------------------------------------------------------- Python


@pytest.fixture(scope="module")
def python_out(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """The generated package, as the README says to generate it, in a directory of its own."""
    out = tmp_path_factory.mktemp("pyclient")
    generator = [sys.executable, "-m", "openapi_python_client"]
    run([*generator, "generate", "--path", str(SPEC), "--output-path", str(out / PACKAGE), "--meta", "none"], out, 120)
    return out


@pytest.fixture(scope="module")
def python_client(python_out: Path) -> Iterator[Any]:
    paths = [str(python_out), str(HELPER.parent)]
    sys.path[:0] = paths
    try:
        yield importlib.import_module(PACKAGE)
    finally:
        for path in paths:
            sys.path.remove(path)
        for name in [m for m in sys.modules if m in (PACKAGE, HELPER.stem) or m.startswith(f"{PACKAGE}.")]:
            del sys.modules[name]


def bearer_token() -> str:
    """A JWT the live service accepts for five minutes from now (one minted at import time expired in long runs)."""
    return hs256("client-user", iss=None)


def _helper() -> Any:
    return importlib.import_module(HELPER.stem)


def test_python_client_drives_arun(python_client: Any, live_url: str) -> None:
    """The generated client with the typed stream helper: stream a run, cut it while it runs, resume it."""
    chats = importlib.import_module(f"{PACKAGE}.api.chats")
    runs = importlib.import_module(f"{PACKAGE}.api.runs")
    models = importlib.import_module(f"{PACKAGE}.models")
    helper = _helper()
    for name in ("create_chat", "create_run", "create_run_stream", "get_chat"):
        importlib.import_module(f"{PACKAGE}.api.chats.{name}")
    for name in ("get_run", "cancel_run", "stream_run"):
        importlib.import_module(f"{PACKAGE}.api.runs.{name}")

    anonymous = python_client.Client(base_url=live_url)
    refused = chats.create_chat.sync_detailed(client=anonymous, body=models.ChatCreate(model="demo"))
    assert refused.status_code == 401

    token = {"token": bearer_token(), "raise_on_unexpected_status": True, "timeout": None}
    with python_client.AuthenticatedClient(base_url=live_url, **token) as client:
        chat = chats.create_chat.sync_detailed(client=client, body=models.ChatCreate(model="demo"))
        assert chat.status_code == 201, chat.content
        assert isinstance(chat.parsed, models.ChatOut)
        chat_id = chat.parsed.id

        stream = helper.start_run(client, chat_id, models.RunCreate(message="Hello from the generated Python client"))
        first = [event for _, event in zip(range(CUT_AFTER), stream, strict=False)]
        stream.close()  # cut: the run goes on
        assert isinstance(first[0], models.RunStarted)
        run_id = first[0].run_id
        during = runs.get_run.sync(run_id, client=client)
        assert isinstance(during, models.RunOut)
        assert during.status.value == "running"  # the events came as they were made, not at the end

        events = first + list(helper.stream_run(client, run_id, after=first[-1].seq))
        assert [e.seq for e in events] == list(range(1, len(events) + 1))
        assert {e.run_id for e in events} == {run_id}
        assert isinstance(events[-1], models.RunCompleted)
        done = [e for e in events if isinstance(e, models.TextDone)]
        assert [e.text for e in done] == ["".join(e.delta for e in events if isinstance(e, models.TextDelta))]
        assert list(helper.stream_run(client, run_id, after=len(events))) == []  # finished: nothing more
        with pytest.raises(helper.StreamError) as missing_run:
            list(helper.stream_run(client, "no-such-run"))
        assert (missing_run.value.status_code, missing_run.value.error.error.code) == (404, "not_found")

        status = runs.get_run.sync(run_id, client=client)
        assert isinstance(status, models.RunOut)
        assert status.status.value == "completed"
        assert status.last_seq == len(events)

        for _ in range(2):  # cancel is idempotent: a finished run is returned unchanged
            cancelled = runs.cancel_run.sync_detailed(run_id, client=client)
            assert cancelled.status_code == 200, cancelled.content
            assert isinstance(cancelled.parsed, models.RunOut)
            assert cancelled.parsed.status.value == "completed"

        started = chats.create_run.sync_detailed(chat_id, client=client, body=models.RunCreate(message="And now?"))
        assert started.status_code == 202, started.content  # the JSON answer, typed
        assert isinstance(started.parsed, models.RunOut)
        assert started.parsed.events_url == f"/v1/runs/{started.parsed.id}/events"
        followed = list(helper.stream_run(client, started.parsed.id))
        assert isinstance(followed[-1], models.RunCompleted)

        fetched = chats.get_chat.sync(chat_id, client=client)
        assert isinstance(fetched, models.ChatOut)
        messages = fetched.messages
        assert isinstance(messages, list)
        assert [m.role.value for m in messages] == ["user", "assistant", "user", "assistant"]

        missing = chats.get_chat.sync_detailed("no-such-chat", client=client)
        assert missing.status_code == 404
        assert isinstance(missing.parsed, models.ErrorEnvelope)
        assert missing.parsed.error.code == "not_found"


async def test_python_helper_streams_on_the_async_client(python_client: Any, live_url: str) -> None:
    create_chat = importlib.import_module(f"{PACKAGE}.api.chats.create_chat")  # not imported by the package
    models = importlib.import_module(f"{PACKAGE}.models")
    helper = _helper()
    async with python_client.AuthenticatedClient(base_url=live_url, token=bearer_token(), timeout=None) as client:
        chat = await create_chat.asyncio(client=client, body=models.ChatCreate(model="demo"))
        events = [e async for e in helper.astart_run(client, chat.id, models.RunCreate(message="Hi"))]
        assert [e.seq for e in events] == list(range(1, len(events) + 1))
        assert isinstance(events[-1], models.RunCompleted)
        again = [e async for e in helper.astream_run(client, events[0].run_id, after=len(events) - 1)]
        assert [type(e) for e in again] == [models.RunCompleted]
        with pytest.raises(helper.StreamError) as busy:
            await anext(helper.astart_run(client, "no-such-chat", models.RunCreate(message="Hi")))
        assert busy.value.status_code == 404


def test_python_helper_dispatches_on_the_documents_discriminator(python_client: Any) -> None:
    """The helper's type -> class table is the API document's mapping; unknown types are skipped."""
    helper = _helper()
    doc = json.loads(SPEC.read_text(encoding="utf-8"))
    for path, method in [("/v1/runs/{run_id}/stream", "get"), ("/v1/chats/{chat_id}/runs/stream", "post")]:
        schema = doc["paths"][path][method]["responses"]["200"]["content"]["text/event-stream"]["schema"]
        mapping = {tag: ref.rsplit("/", 1)[1] for tag, ref in schema["discriminator"]["mapping"].items()}
        assert {tag: cls.__name__ for tag, cls in helper.EVENT_TYPES.items()} == mapping
    assert set(typing.get_args(helper.Event)) == set(helper.EVENT_TYPES.values())
    frames = helper._Frames()
    lines = ["retry: 1000", "", ": ping", "id: 7", 'data: {"type":"text.future","run_id":"r","seq":7}', ""]
    lines += ["id: 8", 'data: {"type":"text.delta","run_id":"r","seq":8,"delta":"hi"}', ""]
    parsed = [event for event in map(frames.feed, lines) if event is not None]
    models = importlib.import_module(f"{PACKAGE}.models")
    assert parsed == [models.TextDelta(run_id="r", seq=8, delta="hi", type_="text.delta")]


def test_python_helper_and_readme_example_type_check_strictly(python_client: Any, python_out: Path) -> None:
    """pyright --strict on the helper and the README's Python example, against the generated package."""
    shutil.copy(HELPER, python_out / HELPER.name)
    (python_out / "readme_example.py").write_text(readme_block("python"), encoding="utf-8")
    files = [HELPER.name, "readme_example.py"]
    config = {"include": files, "strict": files, "pythonVersion": "3.11", "reportMissingModuleSource": False}
    (python_out / "pyrightconfig.json").write_text(json.dumps(config), encoding="utf-8")
    output = run(
        [sys.executable, "-m", "pyright", "-p", str(python_out), "--pythonpath", sys.executable], python_out, 180
    )
    assert "0 errors" in output, output


def test_readme_python_example_runs_as_written(python_client: Any, python_out: Path, open_url: str) -> None:
    (python_out / "readme_example.py").write_text(readme_block("python"), encoding="utf-8")
    env = {**os.environ, "SERVICE_URL": open_url, "PYTHONPATH": f"{python_out}:{HELPER.parent}"}
    output = run([sys.executable, "readme_example.py"], python_out, 120, env=env)
    assert "[clock: " in output, output  # the tool's result, after the cut
    assert output.count("[run.completed]") == 1, output
    print(output)


# --------------------------------------------------------------------------- curl


def test_readme_curl_example_runs_as_written(open_url: str, tmp_path: Path) -> None:
    env = {**os.environ, "SERVICE_URL": open_url}
    output = run(["bash", "-euo", "pipefail", "-c", readme_block("curl")], tmp_path, 120, env=env)
    streams = output.split("retry: ")[1:]
    assert len(streams) == 3, output
    ids = [[int(i) for i in re.findall(r"^id: (\d+)$", stream, re.MULTILINE)] for stream in streams]
    assert ids[0] == list(range(1, len(ids[0]) + 1))
    assert ids[1] == list(range(1, len(ids[1]) + 1))
    assert ids[2] == ids[1][3:]  # Last-Event-ID: 3
    assert '"name":"clock"' in streams[0]
    assert '"name":"calculator"' in streams[1]
    assert all('"type":"run.completed"' in stream for stream in streams)


# --------------------------------------------------------------------------- TypeScript


@pytest.fixture(scope="module")
def ts_client() -> Path:
    """The TypeScript client generated from the committed document, with its packages installed."""
    _, npm = node_tools("the TypeScript client tests")
    npm_ci(TS_DIR, npm)
    shutil.rmtree(TS_OUT, ignore_errors=True)
    run([_bin("openapi-ts"), "-i", str(SPEC), "-o", str(TS_OUT), "-c", "@hey-api/client-fetch"], TS_DIR, 120)
    assert (TS_OUT / "sdk.gen.ts").exists()
    return TS_OUT


def _bin(name: str) -> str:
    return str(TS_DIR / "node_modules" / ".bin" / name)


def test_typescript_client_streams_and_resumes(ts_client: Path, live_url: str) -> None:
    run([_bin("tsc"), "-p", "tsconfig.json", "--strict", "--noEmit"], TS_DIR, 180)  # no cast, exhaustive switch
    env = {**os.environ, "SERVICE_URL": live_url, "SERVICE_TOKEN": bearer_token()}
    output = run([_bin("tsx"), "e2e.ts"], TS_DIR, 120, env=env)
    assert output.startswith("OK:"), output
    print(output)


def test_readme_typescript_example_compiles_strictly_and_runs(ts_client: Path, open_url: str) -> None:
    """The README's block, beside the client as the README generates it (``./client``), as an ES module."""
    example = ts_client.parent / "readme"
    shutil.rmtree(example, ignore_errors=True)
    example.mkdir()
    (example / "client").symlink_to(ts_client, target_is_directory=True)
    (example / "package.json").write_text('{"type": "module"}\n', encoding="utf-8")
    (example / "example.ts").write_text(readme_block("typescript"), encoding="utf-8")
    options = ["--target", "ES2022", "--module", "ESNext", "--moduleResolution", "Bundler"]
    options += [
        "--lib",
        "ES2022,DOM,DOM.Iterable",
        "--types",
        "node",
        "--typeRoots",
        str(TS_DIR / "node_modules/@types"),
    ]
    run([_bin("tsc"), "--strict", "--noEmit", *options, str(example / "example.ts")], TS_DIR, 180)
    output = run([_bin("tsx"), str(example / "example.ts")], example, 120, env={**os.environ, "SERVICE_URL": open_url})
    assert "The tool answered" in output, output
