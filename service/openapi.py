"""The API documents as a product: ``openapi/openapi.json`` and ``openapi/asyncapi.yaml``.

``build_openapi(app)`` is Litestar's own document, post-processed; ``build_asyncapi()`` describes the
WebSocket at ``/v1/ws`` (which OpenAPI cannot: Litestar leaves WebSocket routes out). Both are built
from the same msgspec types the service encodes and decodes, never written by hand. The committed
files are regenerated and checked by::

    python -m service.openapi write   # rewrite openapi/openapi.json and openapi/asyncapi.yaml
    python -m service.openapi check   # exit 1, with a diff, when a committed file is out of date

:class:`OpenAPIJsonPlugin` serves the same bytes at ``/schema/openapi.json`` once it is listed in the
app's ``OpenAPIConfig.render_plugins`` (the Scalar UI at ``/schema`` loads its document from there).

Post-processing (each is a deliberate deviation from Litestar's output):

1. Every ``text/event-stream`` response's ``schema`` is the event union (or, for the AI SDK's
   endpoints, the union of UI message stream parts) with a ``discriminator``
   (``propertyName: type`` and a ``mapping`` of every tag to ``#/components/schemas/<Class>``);
   Litestar emits a bare ``oneOf``.
2. The document stays ``"openapi": "3.1.0"`` by default and carries no ``itemSchema``. Decision:
   ``itemSchema`` is OAS 3.2 only, and the readers of the committed file disagree on 3.2:
   openapi-python-client 0.29 rejects any ``3.2.x`` document ("Only OpenAPI versions 3.1.* are
   supported"); @hey-api/openapi-ts reads 3.2 as 3.1 and types SSE events from ``schema`` only;
   and Schemathesis 4.32 (which loads 3.2) reads ``schema`` of an event stream as the schema of the
   *whole stream* (an array of ``{data, event, id, retry}`` objects) as soon as ``itemSchema`` is
   present, in any version, so ``schema`` = union next to ``itemSchema`` fails every stream.
   ``build_openapi(app, oas_version="3.2.0")`` gives the OAS 3.2 form for tools that read it: the
   version is ``3.2.0`` and each event stream has only ``itemSchema`` (``data`` is JSON whose
   ``contentSchema`` is the discriminated union). Switch the committed file to it when the client
   generators accept 3.2.
3. Every error response uses the one error shape, ``ErrorEnvelope``. Litestar adds a ``400``
   "ValidationException" response (``{status_code, detail, extra}``) to every operation with
   parameters or a body; the service never sends that shape (``service.errors`` renders validation
   failures as ``ErrorEnvelope``), so it is replaced. Every operation also lists ``500``
   (``internal``), and operations with a body list ``413`` (the body size limit).
   The one non-``ErrorEnvelope`` error is ``GET /readyz``'s ``503``: it answers the ``Health`` body.
4. ``GET /metrics`` is documented as Prometheus text (``text/plain``), not JSON.
5. OpenAPI ``links`` connect create chat -> run -> events / status / cancel, and chat -> delete, so
   stateful testers (Schemathesis) can follow a conversation.
6. Output is stable: keys sorted, no generated examples, nothing that depends on time, the
   environment or settings (the app is built from default ``Settings()``; building the document
   constructs objects only: no database, no network, no lifespan).
"""

from __future__ import annotations

import copy
import difflib
import json
import sys
from collections.abc import Callable, Iterable, Mapping, Sequence
from pathlib import Path
from typing import Any, Literal, cast

import msgspec
import yaml
from litestar import Litestar, Request
from litestar.openapi.plugins import JsonRenderPlugin

from service.api.ui_stream import AnyUiPart
from service.events import AnyEvent

JsonDict = dict[str, Any]
OasVersion = Literal["3.1.0", "3.2.0"]

OPENAPI_PATH = Path("openapi/openapi.json")
ASYNCAPI_PATH = Path("openapi/asyncapi.yaml")
SSE = "text/event-stream"
STREAM_UNIONS: tuple[object, ...] = (AnyEvent, AnyUiPart)
"""What an event stream's items are: the run's events, or the AI SDK's UI message stream parts."""
JSON = "application/json"
ERROR_REF = "#/components/schemas/ErrorEnvelope"
COMPONENTS = "#/components/schemas/"
HTTP_METHODS = ("get", "put", "post", "delete", "options", "head", "patch", "trace")

_VALIDATION_400 = "Invalid request: `error.detail.field` names the field"
_INTERNAL_500 = "Internal error (`internal`); the cause is logged, never sent"
_TOO_LARGE_413 = "The request body is larger than the limit (`payload_too_large`)"
_NOT_JSON_415 = (
    "The body is not labelled JSON (`unsupported_media_type`): send `Content-Type: application/json`; "
    "the types an HTML form can send are never accepted"
)


# --------------------------------------------------------------------------- OpenAPI


def build_openapi(app: Litestar, *, oas_version: OasVersion = "3.1.0") -> JsonDict:
    """The app's OpenAPI document, post-processed (see the module docstring).

    Args:
        app: the application; only its routes and OpenAPI config are read.
        oas_version: ``"3.1.0"`` (the committed form) or ``"3.2.0"`` (event streams as ``itemSchema``).

    Returns:
        A JSON-compatible dict; :func:`dump_openapi` gives its canonical bytes.
    """
    doc = copy.deepcopy(app.openapi_schema.to_schema())
    schemas: JsonDict = doc.setdefault("components", {}).setdefault("schemas", {})
    for schema in schemas.values():
        _strip_examples(schema)  # ResponseSpec's generated examples are noise, and not stable by design
    for path, method, operation in _operations(doc):
        _document_errors(operation)
        if path == "/readyz":
            operation["responses"]["503"] = _json_response("Not ready: the store or the run backend does not answer")
            operation["responses"]["503"]["content"][JSON]["schema"] = {"$ref": f"{COMPONENTS}Health"}
        if path == "/metrics" and method == "get":
            _document_metrics(operation)
        for response in operation.get("responses", {}).values():
            for media in cast(JsonDict, cast(JsonDict, response).get("content") or {}).values():
                cast(JsonDict, media).pop("examples", None)
            _document_event_stream(cast(JsonDict, response), schemas, oas_version)
    _add_links(doc)
    require_seq(schemas)
    doc["openapi"] = oas_version
    return _checked_json(doc)


def require_seq(schemas: JsonDict) -> None:
    """Mark ``seq`` required on every event: the run log stamps it before any reader sees the event.

    (msgspec gives it a default, ``0``, only because the engine yields events before they are stamped.)
    """
    for cls in _union_members(AnyEvent):
        schema = cast(JsonDict | None, schemas.get(cls.__name__))
        if schema is not None and "seq" in schema.get("properties", {}):
            schema["required"] = sorted({*schema.get("required", []), "seq"})
            cast(JsonDict, schema["properties"]["seq"]).pop("default", None)


def asyncapi_discriminators(schema: object) -> None:
    """AsyncAPI's schema object names its discriminator by property (a string), not OpenAPI's object."""
    if isinstance(schema, list):
        for item in cast(list[object], schema):
            asyncapi_discriminators(item)
    elif isinstance(schema, dict):
        node = cast(JsonDict, schema)
        discriminator = node.get("discriminator")
        if isinstance(discriminator, dict):
            node["discriminator"] = cast(JsonDict, discriminator)["propertyName"]
        for key, value in node.items():
            if key != "discriminator":
                asyncapi_discriminators(value)


def _strip_examples(schema: object) -> None:
    """Drop ``examples`` from a schema and its subschemas (not from property names)."""
    if isinstance(schema, list):
        for item in cast(list[object], schema):
            _strip_examples(item)
    elif isinstance(schema, dict):
        node = cast(JsonDict, schema)
        node.pop("examples", None)
        for key, value in node.items():
            if key in ("properties", "patternProperties", "$defs"):
                for subschema in cast(JsonDict, value).values():
                    _strip_examples(subschema)
            else:
                _strip_examples(value)


def dump_openapi(doc: Mapping[str, Any]) -> str:
    """The canonical text of an OpenAPI document: sorted keys, 2-space indent, trailing newline."""
    return json.dumps(doc, indent=2, sort_keys=True, ensure_ascii=False) + "\n"


def event_discriminator(union: object = AnyEvent) -> JsonDict:
    """The OpenAPI ``discriminator`` of a msgspec tagged union: tag -> ``#/components/schemas/<Class>``."""
    info = msgspec.inspect.type_info(union)
    members = info.types if isinstance(info, msgspec.inspect.UnionType) else (info,)
    mapping: dict[str, str] = {}
    tag_field = "type"
    for member in members:
        if isinstance(member, msgspec.inspect.StructType) and isinstance(member.tag, str):
            tag_field = member.tag_field or tag_field
            mapping[member.tag] = f"{COMPONENTS}{member.cls.__name__}"
    return {"propertyName": tag_field, "mapping": mapping}


def _operations(doc: JsonDict) -> Iterable[tuple[str, str, JsonDict]]:
    paths = cast(JsonDict, doc.get("paths", {}))
    for path, item in paths.items():
        for method in HTTP_METHODS:
            operation = cast(JsonDict | None, cast(JsonDict, item).get(method))
            if operation is not None:
                yield path, method, operation


_UNAUTHORIZED_401 = (
    "No valid credentials (`unauthorized`): with `SERVICE_AUTH=jwt` every call needs `Authorization: Bearer <JWT>`"
)
_TOO_MANY_429 = (
    "Over a limit of the caller (`too_many_runs`, `budget_exhausted`, or the request rate): see `Retry-After`. "
    "With auth on: at most `SERVICE_MAX_ACTIVE_RUNS_PER_SUBJECT` running runs (default 16), "
    "`SERVICE_RATE_LIMIT_PER_MINUTE` requests per minute (default 600), "
    "`SERVICE_TOKEN_BUDGET` tokens per `SERVICE_TOKEN_BUDGET_WINDOW_S` (default: no budget)"
)


def _json_response(description: str, ref: str = ERROR_REF) -> JsonDict:
    return {"description": description, "content": {JSON: {"schema": {"$ref": ref}}}}


def _references_error_envelope(response: JsonDict) -> bool:
    content = cast(JsonDict, response.get("content") or {})
    return bool(content) and all(
        cast(JsonDict, media).get("schema") == {"$ref": ERROR_REF} for media in content.values()
    )


def _document_errors(operation: JsonDict) -> None:
    """Make every error response ``ErrorEnvelope``; add ``500`` everywhere and ``413`` with a body."""
    responses = cast(JsonDict, operation.setdefault("responses", {}))
    for status, response in list(responses.items()):
        if status.startswith("4") and not _references_error_envelope(cast(JsonDict, response)):
            # Litestar's auto-added ValidationException shape; the service renders ErrorEnvelope.
            description = _VALIDATION_400 if status == "400" else cast(JsonDict, response).get("description", "")
            responses[status] = _json_response(description)
    if operation.get("parameters") or operation.get("requestBody"):
        responses.setdefault("400", _json_response(_VALIDATION_400))
    if operation.get("requestBody"):
        responses.setdefault("413", _json_response(_TOO_LARGE_413))
        responses.setdefault("415", _json_response(_NOT_JSON_415))
    if operation.get("security"):
        responses.setdefault("401", _json_response(_UNAUTHORIZED_401))
        responses.setdefault("429", _json_response(_TOO_MANY_429))
    responses.setdefault("500", _json_response(_INTERNAL_500))


def _document_metrics(operation: JsonDict) -> None:
    ok = cast(JsonDict, operation["responses"]["200"])
    ok["description"] = "Prometheus metrics in the text exposition format"
    ok["content"] = {"text/plain": {"schema": {"type": "string"}}}
    ok.pop("headers", None)
    operation["summary"] = "Metrics"
    operation["tags"] = ["health"]


def _document_event_stream(response: JsonDict, schemas: JsonDict, oas_version: OasVersion) -> None:
    content = cast(JsonDict | None, response.get("content"))
    if not content or SSE not in content:
        return
    media = cast(JsonDict, content[SSE])
    union = cast(JsonDict, media.get("schema") or {})
    members = [cast(JsonDict, m).get("$ref", "") for m in union.get("oneOf", [])]
    mapping: dict[str, str] = {}
    for ref in members:
        name = str(ref).removeprefix(COMPONENTS)
        tag = schemas.get(name, {}).get("properties", {}).get("type", {}).get("const")
        if not isinstance(tag, str):
            raise ValueError(f"event stream member {ref!r} has no `type` const: cannot build its discriminator")
        mapping[tag] = ref
    expected = next((d for d in map(event_discriminator, STREAM_UNIONS) if d["mapping"] == mapping), None)
    if expected is None:
        raise ValueError(f"event stream union {sorted(mapping)} is neither AnyEvent nor AnyUiPart")
    data_schema: JsonDict = {"oneOf": [{"$ref": ref} for ref in members], "discriminator": expected}
    if oas_version == "3.1.0":
        media["schema"] = data_schema
        return
    media.pop("schema", None)
    media["itemSchema"] = {
        "type": "object",
        "required": ["data"],
        "properties": {
            "id": {"type": "string", "description": "The event's `seq`"},
            "event": {"type": "string"},
            "retry": {"type": "integer", "minimum": 0},
            "data": {"type": "string", "contentMediaType": JSON, "contentSchema": data_schema},
        },
    }


def _link(operation_id: str, description: str, **parameters: str) -> JsonDict:
    return {"operationId": operation_id, "description": description, "parameters": parameters}


_CHAT_ID = "$response.body#/id"
_RUN_ID = "$response.body#/id"
LINKS: dict[tuple[str, str], dict[str, JsonDict]] = {
    ("CreateChat", "201"): {
        "CreateRun": _link("CreateRun", "Start a run on the new chat", chat_id=_CHAT_ID),
        "GetChat": _link("GetChat", "Read the new chat", chat_id=_CHAT_ID),
        "GetActiveRun": _link("GetActiveRun", "The new chat's active run", chat_id=_CHAT_ID),
        "DeleteChat": _link("DeleteChat", "Delete the new chat", chat_id=_CHAT_ID),
    },
    ("CreateRun", "202"): {
        "GetRun": _link("GetRun", "The run's status", run_id=_RUN_ID),
        "StreamRunEvents": _link("StreamRunEvents", "Follow the run's events", run_id=_RUN_ID),
        "StreamRun": _link("StreamRun", "Follow the run's events (200 only)", run_id=_RUN_ID),
        "CancelRun": _link("CancelRun", "Stop the run", run_id=_RUN_ID),
        "GetChat": _link("GetChat", "The run's chat", chat_id="$response.body#/chat_id"),
        "DeleteChat": _link("DeleteChat", "Delete the run's chat", chat_id="$response.body#/chat_id"),
    },
    ("CancelRun", "200"): {
        "GetRun": _link("GetRun", "The cancelled run", run_id=_RUN_ID),
        "StreamRunEvents": _link("StreamRunEvents", "The cancelled run's events", run_id=_RUN_ID),
        "StreamRun": _link("StreamRun", "The cancelled run's events (200 only)", run_id=_RUN_ID),
        "DeleteChat": _link("DeleteChat", "Delete the run's chat", chat_id="$response.body#/chat_id"),
    },
    ("DeleteChat", "204"): {
        "GetChat": _link("GetChat", "A deleted chat is gone (404)", chat_id="$request.path.chat_id"),
    },
}


def _add_links(doc: JsonDict) -> None:
    for _, _, operation in _operations(doc):
        for (operation_id, status), links in LINKS.items():
            if operation.get("operationId") == operation_id and status in operation.get("responses", {}):
                operation["responses"][status]["links"] = copy.deepcopy(links)


def _checked_json(doc: JsonDict) -> JsonDict:
    """Round-trip through JSON, so the dict holds nothing a JSON file cannot (floats like ``0.0`` stay)."""
    return cast(JsonDict, json.loads(json.dumps(doc)))


class OpenAPIJsonPlugin(JsonRenderPlugin):
    """Serve :func:`build_openapi` (the committed document, byte for byte) at ``/schema/openapi.json``.

    List it in ``OpenAPIConfig.render_plugins``; it replaces Litestar's default JSON handler.
    """

    def __init__(self, *, path: str | Sequence[str] = "/openapi.json") -> None:
        super().__init__(path=path)
        self._rendered: dict[int, bytes] = {}

    def render(self, request: Request[Any, Any, Any], openapi_schema: dict[str, Any]) -> bytes:
        """The post-processed document (built once per app), ignoring Litestar's ``openapi_schema``."""
        key = id(request.app)
        if key not in self._rendered:
            self._rendered[key] = dump_openapi(build_openapi(request.app)).encode()
        return self._rendered[key]


# --------------------------------------------------------------------------- AsyncAPI


def build_asyncapi() -> JsonDict:
    """The AsyncAPI 3.0 document of ``/v1/ws``; every payload schema is generated from the msgspec frames.

    The document describes the service: per AsyncAPI 3.0, ``receive`` is what the service gets (the
    client frames) and ``send`` what it sends (server frames and run events).
    """
    from service.api import ws  # the API package, imported only when the document is built

    client = _union_members(ws.ClientFrame)
    server = _union_members(ws.ServerFrame) + _union_members(AnyEvent)
    schemas_list, components = msgspec.json.schema_components(
        [ws.ClientFrame, ws.ServerFrame, AnyEvent], ref_template=COMPONENTS + "{name}"
    )
    union_schemas = dict(zip(("ClientFrame", "ServerFrame", "AnyEvent"), schemas_list, strict=True))
    require_seq(components)
    asyncapi_discriminators([components, union_schemas])
    messages: JsonDict = {}
    for cls in client + server:
        tag = cls.__struct_config__.tag
        messages[cls.__name__] = {
            "name": str(tag),
            "title": cls.__name__,
            "summary": (cls.__doc__ or "").strip().splitlines()[0],
            "contentType": JSON,
            "payload": {"$ref": f"{COMPONENTS}{cls.__name__}"},
        }
    channel_messages = {name: {"$ref": f"#/components/messages/{name}"} for name in messages}
    doc: JsonDict = {
        "asyncapi": "3.0.0",
        "info": {
            "title": "Chat service WebSocket",
            "version": "0.1.0",
            "description": _WS_DESCRIPTION,
        },
        "defaultContentType": JSON,
        "servers": {"local": {"host": "127.0.0.1:8000", "protocol": "ws", "description": "`just serve`"}},
        "channels": {
            "chat": {
                "address": "/v1/ws",
                "title": "Multiplexed chat runs",
                "description": "One socket per tab; frames are JSON text; events carry `run_id` and `seq`.",
                "messages": channel_messages,
                "bindings": {"ws": {"method": "GET", "bindingVersion": "0.1.0"}},
            }
        },
        "operations": {
            "receiveClientFrame": _operation("receive", "Frames a client sends to the service", client),
            "sendServerFrame": _operation("send", "Frames and run events the service sends to a client", server),
        },
        "components": {
            "schemas": {**components, **union_schemas},
            "messages": messages,
        },
    }
    return _checked_json(doc)


_WS_DESCRIPTION = """One WebSocket, many runs (multiplexed by `run_id`), resumable after a reconnect.

Client frames: `run.create`, `run.resume`, `run.cancel`, `ping`. Server frames: `run.accepted`,
`run.resumed`, `run.cancel_ack`, `pong`, `error`, and the run events (the same JSON as the SSE `data`
lines of the HTTP API). A bad frame (invalid JSON, unknown `type`, missing field, over 256 KiB, nesting too deep) gets
an `error` frame whose `ref` is its `client_ref` or `run_id` when known, and the socket stays open; so
does any failure of the service while handling a frame (code `internal` when unexpected). A `run.cancel`
is answered `run.cancel_ack` with the state the cancel leads to, whether or not the socket follows the
run. A handshake whose `Origin` is not allowed is refused with HTTP 403 before any socket opens (with
auth on, one without a valid token with 401). Close codes: 1008 when a client sends frames (or pings)
faster than the rate limit allows, 1009 for a message over the service's maximum size (1 MiB), 1012 when
the service shuts down: it keeps streaming through its grace period, refuses `run.create` with an
`error` frame `shutting_down`, and closes the socket once every run it follows has sent its terminal
event (a run still going at the end of the grace period is cancelled with reason `shutdown`); reconnect
and resume, on another instance with Redis. Runs continue when the socket drops; resume with
`run.resume`. While the run backend (Redis) does not answer, `run.create`, `run.resume` and `run.cancel`
get an `error` frame `runs_unavailable`; a followed run whose backend stays down for
`SERVICE_RUNS_OUTAGE_S` gets one too (`ref`: its `run_id`) and is no longer followed: resume it once the
backend is back. Clients must ignore frame and event types they do not know."""


def _union_members(union: object) -> list[type[msgspec.Struct]]:
    info = msgspec.inspect.type_info(union)
    members = info.types if isinstance(info, msgspec.inspect.UnionType) else (info,)
    return [m.cls for m in members if isinstance(m, msgspec.inspect.StructType)]


def _operation(action: str, summary: str, classes: Sequence[type[msgspec.Struct]]) -> JsonDict:
    return {
        "action": action,
        "summary": summary,
        "channel": {"$ref": "#/channels/chat"},
        "messages": [{"$ref": f"#/channels/chat/messages/{cls.__name__}"} for cls in classes],
    }


def dump_asyncapi(doc: Mapping[str, Any]) -> str:
    """The canonical YAML text of the AsyncAPI document (sorted keys, block style)."""
    header = "# Generated by `python -m service.openapi write` from the msgspec frame types: do not edit.\n"
    return header + yaml.safe_dump(dict(doc), sort_keys=True, allow_unicode=True, width=100, default_flow_style=False)


# --------------------------------------------------------------------------- CLI


def render_documents() -> dict[Path, str]:
    """The text of every committed API document, as the code produces it now."""
    from service.app import create_app  # the whole app, imported only when the documents are built
    from service.settings import Settings

    app = create_app(Settings())
    return {OPENAPI_PATH: dump_openapi(build_openapi(app)), ASYNCAPI_PATH: dump_asyncapi(build_asyncapi())}


def write(root: Path) -> list[Path]:
    """Write the documents under ``root``; return the paths that changed."""
    changed: list[Path] = []
    for relative, text in render_documents().items():
        target = root / relative
        if not target.exists() or target.read_text(encoding="utf-8") != text:
            target.parent.mkdir(parents=True, exist_ok=True)
            target.write_text(text, encoding="utf-8")
            changed.append(relative)
    return changed


def check(root: Path, out: Callable[[str], object] = print, max_lines: int = 80) -> bool:
    """Whether the committed documents under ``root`` are up to date; print a diff summary when not."""
    ok = True
    for relative, text in render_documents().items():
        target = root / relative
        committed = target.read_text(encoding="utf-8") if target.exists() else ""
        if committed == text:
            continue
        ok = False
        diff = list(
            difflib.unified_diff(
                committed.splitlines(keepends=True),
                text.splitlines(keepends=True),
                fromfile=f"{relative} (committed)",
                tofile=f"{relative} (from the code)",
            )
        )
        added = sum(1 for line in diff if line.startswith("+") and not line.startswith("+++"))
        removed = sum(1 for line in diff if line.startswith("-") and not line.startswith("---"))
        out(f"{relative} is out of date: +{added} -{removed} lines (run `just openapi`)")
        out("".join(diff[:max_lines]).rstrip("\n"))
        if len(diff) > max_lines:
            out(f"... {len(diff) - max_lines} more diff lines")
    return ok


def main(argv: Sequence[str] | None = None) -> int:
    """``python -m service.openapi write|check`` (run from the repository root)."""
    args = list(sys.argv[1:] if argv is None else argv)
    root = Path.cwd()
    if args == ["write"]:
        for relative in write(root):
            print(f"wrote {relative}")
        return 0
    if args == ["check"]:
        if check(root):
            print(f"{OPENAPI_PATH} and {ASYNCAPI_PATH} are up to date")
            return 0
        return 1
    print("usage: python -m service.openapi write|check", file=sys.stderr)
    return 2


if __name__ == "__main__":
    raise SystemExit(main())
