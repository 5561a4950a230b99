"""Schemathesis against the live service, from the COMMITTED openapi/openapi.json (F1, bounded for `just test`).

Every operation gets positive and negative cases (``MAX_EXAMPLES`` each, plus the examples and coverage
phases) and the stateful phase follows the document's OpenAPI links (create chat -> run -> events /
cancel -> delete). The checks: not_a_server_error, status_code_conformance, content_type_conformance,
response_schema_conformance, response_headers_conformance, negative_data_rejection, and, in the
stateful phase, use_after_free and ensure_resource_availability.

Event streams: the committed document is OAS 3.1 (see ``service/openapi.py``), where Schemathesis reads
an event stream's ``schema`` as the schema of each parsed SSE event object ``{data, event, id}``. Ours
describes the JSON inside ``data`` (the event union), so this module registers a ``text/event-stream``
deserializer that yields the decoded ``data`` of each event for 3.1 documents: every event of every
stream Schemathesis reads is validated against the discriminated union (F2). For 3.2 documents the
built-in reading (``itemSchema`` + ``contentSchema``) is kept.
"""

from __future__ import annotations

import asyncio
import json
import os
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import hypothesis
import jwt
import pytest
import schemathesis
from schemathesis import checks
from schemathesis.config import SchemathesisConfig
from schemathesis.core.deserialization import DeserializationContext, _parse_sse_events
from schemathesis.core.transport import Response

from tests.support.live_server import REPO_ROOT, ServiceProcess

SPEC = REPO_ROOT / "openapi" / "openapi.json"
MAX_EXAMPLES = int(os.environ.get("SERVICE_TEST_FUZZ_EXAMPLES", "30"))
"""Examples per operation and mode; `just fuzz` runs the F1 figure of 200."""
STATEFUL_EXAMPLES = max(15, MAX_EXAMPLES // 2)
CHECKS = [
    checks.not_a_server_error,
    checks.status_code_conformance,
    checks.content_type_conformance,
    checks.response_schema_conformance,
    checks.response_headers_conformance,
    checks.negative_data_rejection,
    checks.ignored_auth,
]
CASES: dict[str, int] = {}
SECRET = "schemathesis-signing-secret-0123456789abcdef"
AUDIENCE = "chat-service-fuzz"
TOKEN = jwt.encode({"sub": "fuzzer", "aud": AUDIENCE, "exp": int(time.time()) + 3600}, SECRET, algorithm="HS256")
"""The service under fuzz runs with auth on, so `ignored_auth` and the missing-header cases mean something."""
AUTH = {"Authorization": f"Bearer {TOKEN}"}
METHODS = {"GET", "POST", "PUT", "PATCH", "DELETE", "HEAD", "OPTIONS"}

pytestmark = [pytest.mark.xdist_group("schemathesis"), pytest.mark.slow, pytest.mark.timeout(240)]


@schemathesis.deserializer("text/event-stream")
def _sse_data(ctx: DeserializationContext, response: Response) -> list[Any]:
    """Each SSE event's ``data`` decoded as JSON (OAS 3.1); the SSE event objects for OAS 3.2 documents."""
    events = _parse_sse_events(response.content, "utf-8")
    CASES["SSE events validated"] = CASES.get("SSE events validated", 0) + len(events)
    if str(ctx.operation.schema.raw_schema.get("openapi", "")).startswith("3.2"):
        return list(events)
    return [json.loads(event["data"]) for event in events]


def _config(base_url: str | None = None) -> SchemathesisConfig:
    return SchemathesisConfig.from_dict(
        {
            **({"base-url": base_url} if base_url else {}),
            "headers": AUTH,
            "request-timeout": 10,
            "generation": {
                "max-examples": MAX_EXAMPLES,
                "mode": "all",
                "deterministic": True,
                "database": "none",
            },
            # Only the document's own links: links inferred from field names (e.g. a chat id taken from the
            # chat list, whose contents change as the run goes on) make Hypothesis' replay inconsistent.
            "phases": {"stateful": {"inference": {"algorithms": []}}},
        }
    )


@pytest.fixture(scope="module")
def live_url(tmp_path_factory: pytest.TempPathFactory) -> Iterator[str]:
    db: Path = tmp_path_factory.mktemp("schemathesis") / "chat.db"
    service = ServiceProcess(
        {
            "SERVICE_DATABASE_URL": f"sqlite+aiosqlite:///{db}",
            "SERVICE_DEMO_TOKEN_DELAY_MS": "0",
            "SERVICE_LOG_LEVEL": "warning",
            "SERVICE_AUTH": "jwt",
            "SERVICE_JWT_SECRET": SECRET,
            "SERVICE_JWT_AUDIENCE": AUDIENCE,
            "SERVICE_RATE_LIMIT_PER_MINUTE": "0",  # the fuzzer is one subject making thousands of requests
        }
    )
    asyncio.run(service.start())
    try:
        yield service.url
    finally:
        asyncio.run(service.stop())
        logs = service.logs()
        service.log_path.unlink(missing_ok=True)
        # A 5xx is a check failure already; one the checks could not see (e.g. mid-stream) shows here.
        assert '" 500 ' not in logs, logs


@pytest.fixture(scope="module")
def api_schema(live_url: str) -> Any:
    return schemathesis.openapi.from_path(SPEC, config=_config(live_url))


@pytest.fixture(scope="module", autouse=True)
def _report_cases() -> Iterator[None]:
    yield
    total = sum(n for label, n in CASES.items() if label.split(" ", 1)[0] in METHODS)
    print(f"\nschemathesis: {total} generated cases; {json.dumps(CASES, sort_keys=True, indent=1)}")


# Loaded eagerly (the file is local); `from_fixture` breaks on pytest 9 (`Function._nodeid` is gone).
schema = schemathesis.openapi.from_path(SPEC, config=_config())
OPERATIONS = {result.ok().definition.raw["operationId"]: result.ok().label for result in schema.get_all_operations()}
"""operationId -> label (``GET /v1/chats/{chat_id}``) of every operation in the committed document."""


def _fuzz(case: Any, live_url: str) -> None:
    label = case.operation.label
    CASES[label] = CASES.get(label, 0) + 1
    response = case.call(base_url=live_url)
    case.validate_response(response, checks=CHECKS, transport_kwargs={"base_url": live_url})


def test_every_operation_with_a_body_documents_415() -> None:
    document = json.loads(SPEC.read_text())
    operations = [op for path in document["paths"].values() for op in path.values() if isinstance(op, dict)]
    with_body = [op for op in operations if "requestBody" in op]
    assert with_body
    assert [op["operationId"] for op in with_body if "415" not in op["responses"]] == []


# One test function per operation, each under its own name (`test_api_GetChat`, ...). pytest 9 builds the
# node id of a schemathesis item from the function's name alone (`test_api`, not `test_api[GET /healthz]`),
# and pytest-xdist schedules by node id: under one `@schema.parametrize()` function, `-n auto` fuzzed one
# operation of the sixteen. Schemathesis documents reusing one base function for several `parametrize()`
# calls assigned to distinct names; each keeps every phase (examples, coverage, fuzzing).
for _operation_id, _label in OPERATIONS.items():
    globals()[f"test_api_{_operation_id}"] = schema.include(name=_label).parametrize()(_fuzz)


def test_stateful_links(api_schema: Any) -> None:
    """The stateful phase: random walks over the OpenAPI links, with the resource-lifecycle checks."""
    machine = api_schema.as_state_machine()
    steps = 0

    class Machine(machine):  # type: ignore[misc, valid-type]
        def validate_response(self, response: Any, case: Any, **kwargs: Any) -> None:
            nonlocal steps
            steps += 1
            case.validate_response(
                response,
                checks=[*CHECKS, checks.use_after_free, checks.ensure_resource_availability],
            )

    Machine.run(
        settings=hypothesis.settings(
            max_examples=STATEFUL_EXAMPLES,
            stateful_step_count=8,
            deadline=None,
            derandomize=True,
            database=None,
            suppress_health_check=list(hypothesis.HealthCheck),
        )
    )
    CASES["stateful steps"] = steps
    assert steps > 0


SSE_RUNS = 25


def test_sse_events_conform_per_event(live_url: str) -> None:
    """F2: real runs' streams (all three SSE operations) validated event by event against the committed union."""
    api = schemathesis.openapi.from_path(SPEC, config=_config(live_url))
    create_chat = api["/v1/chats"]["POST"]
    create_run = api["/v1/chats/{chat_id}/runs"]["POST"]
    create_run_stream = api["/v1/chats/{chat_id}/runs/stream"]["POST"]
    streams = [api["/v1/runs/{run_id}/events"]["GET"], api["/v1/runs/{run_id}/stream"]["GET"]]
    before = CASES.get("SSE events validated", 0)
    for i in range(SSE_RUNS):
        chat = create_chat.Case(body={}, headers=AUTH).call_and_validate(checks=CHECKS)
        assert chat.status_code == 201, chat.text
        chat_id = chat.json()["id"]
        if i % 2:  # request-bound SSE on the POST itself
            response = create_run_stream.Case(
                path_parameters={"chat_id": chat_id}, headers=AUTH, body={"message": f"hello {i}"}
            ).call_and_validate(checks=CHECKS)
            assert response.status_code == 200, response.text
        else:  # 202, then the resumable stream
            run = create_run.Case(path_parameters={"chat_id": chat_id}, body={"message": f"hello {i}"}, headers=AUTH)
            accepted = run.call_and_validate(checks=CHECKS)
            assert accepted.status_code == 202, accepted.text
            run_id = accepted.json()["id"]
            stream = streams[i // 2 % 2]
            response = stream.Case(path_parameters={"run_id": run_id}, headers=AUTH).call_and_validate(checks=CHECKS)
            assert response.status_code in (200, 204), response.text
        CASES["SSE runs"] = CASES.get("SSE runs", 0) + 1
    assert CASES.get("SSE events validated", 0) > before


STRANGER = {
    "Authorization": "Bearer "
    + jwt.encode({"sub": "stranger", "aud": AUDIENCE, "exp": int(time.time()) + 3600}, SECRET)
}
"""Another subject: on the fuzzer's chats and runs it must find exactly what an unknown id finds."""


def test_a_foreign_subjects_ids_give_only_404(live_url: str) -> None:
    """Schemathesis' positive cases of every operation with an id, on the fuzzer's ids, as another subject.

    Each answer equals, byte for byte but for the id, the answer to the same case with an unknown id: 404,
    or the same 400/422 when the generated body is refused before any id is looked at.
    """
    api = schemathesis.openapi.from_path(SPEC, config=_config(live_url))
    chat = api["/v1/chats"]["POST"].Case(body={}, headers=AUTH).call()
    chat_id = chat.json()["id"]
    run = (
        api["/v1/chats/{chat_id}/runs"]["POST"]
        .Case(path_parameters={"chat_id": chat_id}, body={"message": "mine"}, headers=AUTH)
        .call()
    )
    ids = {"chat_id": chat_id, "run_id": run.json()["id"]}
    unknown = {"chat_id": "0" * 32, "run_id": "f" * 32}
    seen: dict[str, set[int]] = {}
    for result in api.get_all_operations():
        operation = result.ok()
        names = {p.name for p in operation.path_parameters}
        if not names or not names <= ids.keys():  # the AI SDK's chat `id` is a name in the caller's own space
            continue
        strategy = operation.as_strategy(path_parameters={n: ids[n] for n in names}, headers=STRANGER)

        @hypothesis.given(case=strategy)
        @hypothesis.settings(max_examples=10, deadline=None, database=None, derandomize=True,
                             suppress_health_check=list(hypothesis.HealthCheck))  # fmt: skip
        def probe(case: Any) -> None:
            case.headers = {**(case.headers or {}), **STRANGER}
            theirs = case.call()
            case.path_parameters = {n: unknown[n] for n in case.path_parameters}
            other = case.call()
            assert theirs.status_code == other.status_code, (case.operation.label, theirs.text, other.text)
            text = theirs.text
            for name, value in ids.items():
                text = text.replace(value, unknown[name])
            assert text == other.text
            seen.setdefault(case.operation.label, set()).add(theirs.status_code)

        probe()
    assert len(seen) == 10, seen  # every operation on a chat or a run
    # 401: a generated ?token= (the stream-token scheme) that is no token; the same for an unknown id
    assert all(statuses <= {400, 401, 404, 422} for statuses in seen.values()), json.dumps(
        {k: sorted(v) for k, v in seen.items()}
    )
    assert sum(404 in statuses for statuses in seen.values()) >= 8, json.dumps({k: sorted(v) for k, v in seen.items()})
    start = api["/v1/chats/{chat_id}/runs"]["POST"].Case(
        path_parameters={"chat_id": chat_id}, body={"message": "theirs"}, headers=STRANGER
    )
    assert start.call().status_code == 404
    owner_view = api["/v1/chats/{chat_id}"]["GET"].Case(path_parameters={"chat_id": chat_id}, headers=AUTH).call()
    assert owner_view.status_code == 200  # and the fuzzer's chat is still there
