"""The committed API documents (openapi/openapi.json, openapi/asyncapi.yaml) are what the code produces."""

from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys
from pathlib import Path
from typing import Any

import httpx
import msgspec
import pytest
import schemathesis
import yaml

from service.api.ui_stream import AnyUiPart
from service.api.ws import ClientFrame, ServerFrame
from service.app import create_app
from service.events import AnyEvent
from service.openapi import (
    ASYNCAPI_PATH,
    OPENAPI_PATH,
    asyncapi_discriminators,
    build_asyncapi,
    build_openapi,
    dump_asyncapi,
    dump_openapi,
    event_discriminator,
    require_seq,
)
from service.settings import Settings
from tests.support.live_server import REPO_ROOT, serve

OPENAPI_FILE = REPO_ROOT / OPENAPI_PATH
ASYNCAPI_FILE = REPO_ROOT / ASYNCAPI_PATH
SSE = "text/event-stream"
ERROR_REF = "#/components/schemas/ErrorEnvelope"
# The one error response that is not ErrorEnvelope: readiness answers its Health body with 503.
NOT_ENVELOPE = {("/readyz", "get", "503")}


def _tags(union: object) -> set[str]:
    info = msgspec.inspect.type_info(union)
    assert isinstance(info, msgspec.inspect.UnionType)
    return {str(t.tag) for t in info.types if isinstance(t, msgspec.inspect.StructType)}


def _operations(doc: dict[str, Any]) -> list[tuple[str, str, dict[str, Any]]]:
    return [(path, method, op) for path, item in doc["paths"].items() for method, op in item.items()]


@pytest.fixture(scope="module")
def committed() -> dict[str, Any]:
    return json.loads(OPENAPI_FILE.read_text(encoding="utf-8"))


def test_committed_openapi_equals_what_the_app_produces() -> None:
    produced = dump_openapi(build_openapi(create_app(Settings())))
    assert OPENAPI_FILE.read_text(encoding="utf-8") == produced, "openapi/openapi.json is stale: run `just openapi`"


def test_committed_asyncapi_equals_what_the_code_produces() -> None:
    assert ASYNCAPI_FILE.read_text(encoding="utf-8") == dump_asyncapi(build_asyncapi()), (
        "openapi/asyncapi.yaml is stale: run `just openapi`"
    )


def test_the_document_is_stable_across_builds() -> None:
    first = dump_openapi(build_openapi(create_app(Settings())))
    second = dump_openapi(build_openapi(create_app(Settings(database_url="sqlite+aiosqlite:///other.db"))))
    assert first == second


async def test_served_spec_equals_the_committed_file(tmp_path: Path) -> None:
    """F1: what `/schema/openapi.json` serves is the committed document, byte for byte."""
    app = create_app(Settings(database_url=f"sqlite+aiosqlite:///{tmp_path / 'x.db'}"))
    async with serve(app) as url, httpx.AsyncClient(base_url=url) as client:
        response = await client.get("/schema/openapi.json")
    assert response.status_code == 200
    assert response.json() == json.loads(OPENAPI_FILE.read_text(encoding="utf-8")), (
        "the served spec is Litestar's raw document: list `service.openapi.OpenAPIJsonPlugin()` in "
        "OpenAPIConfig.render_plugins (service/app.py)"
    )
    assert response.content == OPENAPI_FILE.read_bytes()


def test_check_passes_on_the_repository() -> None:
    result = subprocess.run(
        [sys.executable, "-m", "service.openapi", "check"], cwd=REPO_ROOT, capture_output=True, text=True, timeout=60
    )
    assert result.returncode == 0, result.stdout + result.stderr


def test_check_fails_when_an_api_type_changes(tmp_path: Path) -> None:
    """The drift check catches a changed field in a copy of the service whose committed files are old."""
    shutil.copytree(REPO_ROOT / "service", tmp_path / "service", ignore=shutil.ignore_patterns("__pycache__"))
    shutil.copytree(REPO_ROOT / "openapi", tmp_path / "openapi")
    schemas = tmp_path / "service" / "api" / "schemas.py"
    source = schemas.read_text(encoding="utf-8")
    changed = source.replace("    events_url: str\n", "    events_url: str\n    stream_token: str | None = None\n", 1)
    assert changed != source, "RunOut.events_url moved: update this test"
    schemas.write_text(changed, encoding="utf-8")
    env = {**os.environ, "PYTHONPATH": str(tmp_path)}
    result = subprocess.run(
        [sys.executable, "-m", "service.openapi", "check"],
        cwd=tmp_path,
        env=env,
        capture_output=True,
        text=True,
        timeout=60,
    )
    assert result.returncode == 1, result.stdout + result.stderr
    assert "openapi/openapi.json is out of date" in result.stdout
    assert "stream_token" in result.stdout


def test_sse_responses_carry_the_full_discriminator(committed: dict[str, Any]) -> None:
    events = {tag: f"#/components/schemas/{name}" for tag, name in _tagged_classes(AnyEvent).items()}
    ui_parts = {tag: f"#/components/schemas/{name}" for tag, name in _tagged_classes(AnyUiPart).items()}
    streams = [
        (path, status, response["content"][SSE])
        for path, method, op in _operations(committed)
        for status, response in op["responses"].items()
        if SSE in response.get("content", {})
    ]
    assert {(path, status) for path, status, _ in streams} == {
        ("/v1/chats/{chat_id}/runs/stream", "200"),
        ("/v1/runs/{run_id}/events", "200"),
        ("/v1/runs/{run_id}/stream", "200"),
        ("/v1/ai-sdk/chat", "200"),
        ("/v1/ai-sdk/chat/{id}/stream", "200"),
    }
    for path, _, media in streams:
        expected = ui_parts if path.startswith("/v1/ai-sdk/") else events  # the AI SDK's UI message stream parts
        schema = media["schema"]
        assert schema["discriminator"] == {"propertyName": "type", "mapping": expected}
        assert sorted(m["$ref"] for m in schema["oneOf"]) == sorted(expected.values())
        assert "itemSchema" not in media, "itemSchema is OAS 3.2: the committed document is 3.1.0"
    for ref in [*events.values(), *ui_parts.values()]:
        assert ref.rsplit("/", 1)[1] in committed["components"]["schemas"]
    assert committed["openapi"] == "3.1.0"


def test_generated_clients_see_one_answer_per_streaming_operation(committed: dict[str, Any]) -> None:
    """A generator types a stream's items from all its 2xx answers: the streaming operations have only 200."""
    ops = {op["operationId"]: op for _, _, op in _operations(committed)}
    success = {name: sorted(s for s in op["responses"] if s.startswith("2")) for name, op in ops.items()}
    assert success["CreateRunStream"] == success["StreamRun"] == ["200"]
    assert success["CreateRun"] == ["202"]
    assert list(ops["CreateRun"]["responses"]["202"]["content"]) == ["application/json"]
    assert success["StreamRunEvents"] == ["200", "204"]  # EventSource's stop signal, kept


def _tagged_classes(union: object) -> dict[str, str]:
    info = msgspec.inspect.type_info(union)
    assert isinstance(info, msgspec.inspect.UnionType)
    return {str(t.tag): t.cls.__name__ for t in info.types if isinstance(t, msgspec.inspect.StructType)}


def test_event_discriminator_matches_the_union() -> None:
    assert set(event_discriminator()["mapping"]) == _tags(AnyEvent)


def test_every_error_response_is_the_error_envelope(committed: dict[str, Any]) -> None:
    errors: list[tuple[str, str, str]] = []
    for path, method, op in _operations(committed):
        statuses = set(op["responses"])
        assert "500" in statuses, f"{method.upper()} {path} does not document 500"
        for status, response in op["responses"].items():
            if int(status) < 400 or (path, method, status) in NOT_ENVELOPE:
                continue
            errors.append((path, method, status))
            assert response["content"] == {"application/json": {"schema": {"$ref": ERROR_REF}}}, (method, path, status)
    assert len(errors) > 20
    assert "Validation" not in json.dumps(committed["components"]["schemas"])  # Litestar's shape is gone


def test_readiness_documents_its_503_body(committed: dict[str, Any]) -> None:
    response = committed["paths"]["/readyz"]["get"]["responses"]["503"]
    assert response["content"]["application/json"]["schema"] == {"$ref": "#/components/schemas/Health"}


def test_links_follow_a_conversation(committed: dict[str, Any]) -> None:
    ops = {op["operationId"]: op for _, _, op in _operations(committed)}
    assert set(ops["CreateChat"]["responses"]["201"]["links"]) >= {"CreateRun", "GetChat", "DeleteChat"}
    assert set(ops["CreateRun"]["responses"]["202"]["links"]) >= {"GetRun", "StreamRunEvents", "StreamRun", "CancelRun"}
    for op in ops.values():
        for response in op["responses"].values():
            for link in response.get("links", {}).values():
                assert link["operationId"] in ops


def test_the_document_has_no_unstable_content() -> None:
    text = OPENAPI_FILE.read_text(encoding="utf-8")
    assert '"examples"' not in text
    assert text.endswith("}\n")
    assert text == json.dumps(json.loads(text), indent=2, sort_keys=True, ensure_ascii=False) + "\n"


def test_schemathesis_loads_the_committed_document_and_the_32_form() -> None:
    schemathesis.openapi.from_path(OPENAPI_FILE).validate()
    doc32 = build_openapi(create_app(Settings()), oas_version="3.2.0")
    assert doc32["openapi"] == "3.2.0"
    media = doc32["paths"]["/v1/runs/{run_id}/events"]["get"]["responses"]["200"]["content"][SSE]
    assert "schema" not in media
    content_schema = media["itemSchema"]["properties"]["data"]["contentSchema"]
    assert set(content_schema["discriminator"]["mapping"]) == _tags(AnyEvent)
    loaded = schemathesis.openapi.from_dict(doc32)
    loaded.validate()
    assert len(list(loaded.get_all_operations())) == len(_operations(doc32))


def test_asyncapi_describes_every_frame_and_event() -> None:
    doc = yaml.safe_load(ASYNCAPI_FILE.read_text(encoding="utf-8"))
    assert doc["asyncapi"].startswith("3.0")
    assert doc["channels"]["chat"]["address"] == "/v1/ws"
    names = {m["name"] for m in doc["components"]["messages"].values()}
    assert names == _tags(ClientFrame) | _tags(ServerFrame) | _tags(AnyEvent)
    actions = {op["action"]: op for op in doc["operations"].values()}
    assert set(actions) == {"send", "receive"}
    received = {ref["$ref"].rsplit("/", 1)[1] for ref in actions["receive"]["messages"]}
    assert received == {"CreateFrame", "ResumeFrame", "CancelFrame", "PingFrame"}
    schemas = doc["components"]["schemas"]
    for message in doc["components"]["messages"].values():
        name = message["payload"]["$ref"].rsplit("/", 1)[1]
        assert (
            schemas[name]["properties"]["type"]["enum"] == [message["name"]]
            or schemas[name]["properties"]["type"].get("const") == message["name"]
        )


def test_asyncapi_payloads_are_msgspec_generated() -> None:
    """msgspec's schemas, with the document's two adjustments: ``seq`` required, discriminators by name."""
    _, components = msgspec.json.schema_components(
        [ClientFrame, ServerFrame, AnyEvent], ref_template="#/components/schemas/{name}"
    )
    require_seq(components)
    asyncapi_discriminators(components)
    assert "seq" in components["TextDelta"]["required"]
    doc = yaml.safe_load(ASYNCAPI_FILE.read_text(encoding="utf-8"))
    for name, schema in components.items():
        assert doc["components"]["schemas"][name] == json.loads(json.dumps(schema))
