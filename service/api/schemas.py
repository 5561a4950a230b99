"""Request and response bodies of the HTTP and WebSocket APIs (msgspec Structs, validated on decode)."""

from __future__ import annotations

from typing import Annotated, Any, Literal

import msgspec

from service import errors
from service.engine.json_schema import SchemaError, SchemaLimits, check_schema
from service.runs.base import OnDisconnect, RunRecord, RunStatus
from service.runs.manager import RunOptions
from service.settings import Settings
from service.store.base import Chat, Message

Name = Annotated[str, msgspec.Meta(min_length=1, max_length=128)]


class JsonSchemaSpec(msgspec.Struct, frozen=True, forbid_unknown_fields=True, omit_defaults=True):
    """A named JSON schema for structured output."""

    name: Annotated[str, msgspec.Meta(min_length=1, max_length=64, pattern=r"^[a-zA-Z0-9_-]+$")]
    schema: dict[str, Any]
    description: str | None = None
    strict: bool | None = None


class JsonSchemaFormat(msgspec.Struct, frozen=True, tag_field="type", tag="json_schema", forbid_unknown_fields=True):
    """Ask for structured output matching ``json_schema.schema``."""

    json_schema: JsonSchemaSpec


class JsonObjectFormat(msgspec.Struct, frozen=True, tag_field="type", tag="json_object", forbid_unknown_fields=True):
    """Ask for any JSON object."""


class TextFormat(msgspec.Struct, frozen=True, tag_field="type", tag="text", forbid_unknown_fields=True):
    """Ask for free text (the default)."""


ResponseFormat = JsonSchemaFormat | JsonObjectFormat | TextFormat


class TextPart(msgspec.Struct, frozen=True, tag_field="type", tag="text", forbid_unknown_fields=True):
    """A text content part."""

    text: str


class ImageUrl(msgspec.Struct, frozen=True, forbid_unknown_fields=True, omit_defaults=True):
    """Where an image is (an http(s) or data: URL)."""

    url: Annotated[str, msgspec.Meta(min_length=1)]
    detail: Literal["auto", "low", "high"] | None = None


class ImagePart(msgspec.Struct, frozen=True, tag_field="type", tag="image_url", forbid_unknown_fields=True):
    """An image content part (for models that accept images)."""

    image_url: ImageUrl


ContentPart = TextPart | ImagePart

MAX_TOKENS_LIMIT = 1_000_000
"""The largest ``max_tokens`` accepted (each model has its own, lower limit: the upstream enforces it)."""
StopSequence = Annotated[str, msgspec.Meta(min_length=1, max_length=1000)]


class Sampling(msgspec.Struct, frozen=True, kw_only=True):
    """The common sampling parameters, sent to the upstream as given; those left out (or null) are not sent.

    On a run, each one set overrides the chat's. A model may ignore some of them (the demo model does).
    """

    temperature: Annotated[float, msgspec.Meta(ge=0, le=2)] | None = None
    top_p: Annotated[float, msgspec.Meta(gt=0, le=1)] | None = None
    max_tokens: Annotated[int, msgspec.Meta(ge=1, le=MAX_TOKENS_LIMIT)] | None = None
    """Most tokens the model may generate in one turn."""
    stop: StopSequence | Annotated[list[StopSequence], msgspec.Meta(min_length=1, max_length=4)] | None = None
    """Up to 4 sequences where the model stops."""
    seed: Annotated[int, msgspec.Meta(ge=-(2**63), le=2**63 - 1)] | None = None
    """Ask for deterministic sampling, where the model supports it."""


def sampling_dict(body: Sampling) -> dict[str, Any]:
    """The sampling parameters a body sets, by name (what goes into the upstream request)."""
    return {name: value for name in Sampling.__struct_fields__ if (value := getattr(body, name)) is not None}


class ChatCreate(Sampling, frozen=True, forbid_unknown_fields=True):
    """A new chat; every field is optional and becomes the default of the chat's runs."""

    model: Name | None = None
    system: Annotated[str, msgspec.Meta(max_length=100_000)] | None = None
    tools: list[Name] | None = None
    """Local tools the model may call (default: all local tools for the demo model, none for others)."""
    mcp_servers: list[Name] | None = None
    """Allowed MCP servers whose tools the model may call (default: none)."""
    response_format: ResponseFormat | None = None


class RunCreate(Sampling, frozen=True, forbid_unknown_fields=True):
    """A user message and the options of the run that answers it."""

    message: str | list[ContentPart]
    model: Name | None = None
    response_format: ResponseFormat | None = None
    tools: list[Name] | None = None
    """Local tools for this run (default: the chat's)."""
    mcp_servers: list[Name] | None = None
    on_disconnect: OnDisconnect = "continue"
    """``cancel`` stops the run when its last reader disconnects; by default it goes on."""


class ChatOut(Sampling, frozen=True):
    """A chat, with its messages when fetched alone; the sampling parameters it was not given are null."""

    id: str
    model: str
    system: str | None
    tools: list[str] | None
    mcp_servers: list[str] | None
    response_format: dict[str, Any] | None
    created_at: float
    updated_at: float
    messages: list[Message] | None = None


class ChatList(msgspec.Struct, frozen=True):
    """A page of chats, newest first; pass ``next_cursor`` as ``cursor`` for the next page."""

    items: list[ChatOut]
    next_cursor: str | None


class RunOut(msgspec.Struct, frozen=True):
    """A run: its status, its last event's seq, and where to follow its events."""

    id: str
    chat_id: str
    model: str
    status: RunStatus
    on_disconnect: OnDisconnect
    created_at: float
    finished_at: float | None
    last_seq: int
    message_id: str | None
    events_url: str


class ModelOut(msgspec.Struct, frozen=True):
    """A model id usable in ``model`` fields."""

    id: str
    provider: str
    object: Literal["model"] = "model"


class ModelList(msgspec.Struct, frozen=True):
    """Every model the service can route to."""

    data: list[ModelOut]
    object: Literal["list"] = "list"


class InvalidBodyError(ValueError):
    """A body that decodes but is not acceptable; ``field`` names the offending field."""

    def __init__(self, field: str, message: str) -> None:
        super().__init__(message)
        self.field = field


def response_format_dict(value: ResponseFormat | None, settings: Settings) -> dict[str, Any] | None:
    """The OpenAI ``response_format`` to send upstream, after checking its schema (``service.engine.json_schema``)."""
    if value is None or isinstance(value, TextFormat):
        return None
    if isinstance(value, JsonSchemaFormat):
        try:
            check_schema(value.json_schema.schema, schema_limits(settings))
        except SchemaError as exc:
            raise InvalidBodyError("response_format.json_schema.schema", str(exc)) from exc
    return msgspec.to_builtins(value)


def schema_limits(settings: Settings) -> SchemaLimits:
    """The configured caps of client JSON schemas."""
    return SchemaLimits(
        max_bytes=settings.schema_max_bytes,
        max_depth=settings.schema_max_depth,
        max_properties=settings.schema_max_properties,
        max_enum_values=settings.schema_max_enum_values,
        max_string_chars=settings.schema_max_string_chars,
    )


def run_options(body: RunCreate, settings: Settings) -> RunOptions:
    """Turn a validated body into run options, enforcing the message limits (422 ``limit_exceeded``)."""
    message: str | list[dict[str, Any]]
    if isinstance(body.message, str):
        message, size = body.message, len(body.message)
    else:
        if not body.message:
            raise InvalidBodyError("message", "message has no content parts")
        if len(body.message) > settings.max_content_parts:
            raise errors.LimitExceededError(
                f"message has more than {settings.max_content_parts} content parts", detail={"field": "message"}
            )
        message = msgspec.to_builtins(body.message)
        size = sum(len(p.text) for p in body.message if isinstance(p, TextPart))
    if size == 0 and isinstance(body.message, str):
        raise InvalidBodyError("message", "message is empty")
    if size > settings.max_message_chars:
        raise errors.LimitExceededError(
            f"message is longer than {settings.max_message_chars} characters", detail={"field": "message"}
        )
    return RunOptions(
        message=message,
        model=body.model,
        response_format=response_format_dict(body.response_format, settings),
        tools=body.tools,
        mcp_servers=body.mcp_servers,
        on_disconnect=body.on_disconnect,
        sampling=sampling_dict(body),
    )


def chat_out(chat: Chat, messages: list[Message] | None = None) -> ChatOut:
    """A stored chat as the API shows it (its owner stays inside)."""
    return msgspec.convert({**msgspec.structs.asdict(chat), **(chat.sampling or {}), "messages": messages}, ChatOut)


def run_out(record: RunRecord) -> RunOut:
    """A run record as the API shows it, with the URL of its event stream."""
    fields = {**msgspec.structs.asdict(record), "events_url": f"/v1/runs/{record.id}/events"}
    return msgspec.convert(fields, RunOut)
