"""``/v1/chats``: conversations, their messages, and starting a run on one.

Handlers let domain errors (an unknown model, a bad tool selection, the store down) propagate:
:mod:`service.api.error_map` answers each of them.
"""

from __future__ import annotations

import time
from typing import Annotated, Any

from litestar import Controller, Request, Response, delete, get, post
from litestar.di import NamedDependency
from litestar.openapi.datastructures import ResponseSpec
from litestar.params import FromPath, HeaderParameter, JSONBody, QueryParameter
from litestar.types import ASGIApp

from service import errors
from service.api.auth import BEARER
from service.api.deps import RunCaller
from service.api.schemas import (
    ChatCreate,
    ChatList,
    ChatOut,
    RunCreate,
    RunOut,
    chat_out,
    response_format_dict,
    run_options,
    run_out,
    sampling_dict,
)
from service.api.streaming import SSE_DESCRIPTION, as_asgi, sse_response
from service.engine.providers import ProviderRegistry
from service.engine.tools import ToolCatalog
from service.errors import ErrorEnvelope
from service.events import AnyEvent
from service.ids import new_id
from service.runs.base import RunRecord
from service.runs.manager import RunManager
from service.security import Principal
from service.settings import Settings
from service.store.base import Chat, ChatStore

ERRORS = {
    400: ResponseSpec(ErrorEnvelope, description="Invalid request: `error.detail.field` names the field"),
    404: ResponseSpec(ErrorEnvelope, description="No such chat"),
    503: ResponseSpec(ErrorEnvelope, description="The chat store is unavailable"),
}
RUN_ERRORS = {
    409: ResponseSpec(ErrorEnvelope, description="The chat already has an active run (`detail.active_run_id`)"),
    **ERRORS,
    503: ResponseSpec(
        ErrorEnvelope,
        description="The chat store is unavailable, or this instance is shutting down (`shutting_down`: "
        "start the run again, another instance will take it)",
    ),
}
"""The error answers of the operations that start a run."""
IdempotencyKey = Annotated[str | None, HeaderParameter(name="Idempotency-Key", min_length=1, max_length=200)]


class ChatController(Controller):
    """Chats and their messages."""

    path = "/v1/chats"
    tags = ["chats"]
    security = BEARER

    @post("/", operation_id="CreateChat", status_code=201, responses={400: ERRORS[400], 503: ERRORS[503]})
    async def create_chat(
        self,
        data: JSONBody[ChatCreate],
        store: NamedDependency[ChatStore],
        providers: NamedDependency[ProviderRegistry],
        tool_catalog: NamedDependency[ToolCatalog],
        runs: NamedDependency[RunManager],
        settings: NamedDependency[Settings],
        principal: NamedDependency[Principal],
    ) -> ChatOut:
        """Create a chat. Its fields become the defaults of its runs. The caller owns it."""
        model, _, _ = providers.resolve(data.model)
        response_format = response_format_dict(data.response_format, settings)
        tool_catalog.check(data.tools, data.mcp_servers)
        now = time.time()
        chat = Chat(
            id=new_id(),
            model=model,
            system=data.system,
            tools=data.tools,
            mcp_servers=data.mcp_servers,
            response_format=response_format,
            sampling=sampling_dict(data) or None,
            owner=principal.owner,
            created_at=now,
            updated_at=now,
        )
        created = await store.create_chat(chat)
        runs.remember_chat(created)
        return chat_out(created)

    @get("/", operation_id="ListChats", responses={400: ERRORS[400], 503: ERRORS[503]})
    async def list_chats(
        self,
        store: NamedDependency[ChatStore],
        principal: NamedDependency[Principal],
        limit: Annotated[int, QueryParameter(ge=1, le=100)] = 20,
        cursor: Annotated[str | None, QueryParameter(max_length=512)] = None,
    ) -> ChatList:
        """List the caller's chats, newest first. Pass `next_cursor` back as `cursor` for the next page."""
        try:
            page = await store.list_chats(limit=limit, cursor=cursor, owner=principal.owner)
        except ValueError as exc:
            raise errors.InvalidCursorError("invalid cursor", detail={"field": "cursor"}) from exc
        return ChatList(items=[chat_out(c) for c in page.items], next_cursor=page.next_cursor)

    @get("/{chat_id:str}", operation_id="GetChat", responses={404: ERRORS[404], 503: ERRORS[503]})
    async def get_chat(
        self,
        chat_id: FromPath[str],
        store: NamedDependency[ChatStore],
        runs: NamedDependency[RunManager],
        principal: NamedDependency[Principal],
    ) -> ChatOut:
        """A chat with all its messages, oldest first (interrupted answers carry `status`)."""
        chat = await runs.chat(chat_id, principal.owner)
        return chat_out(chat, await store.list_messages(chat_id))

    @delete(
        "/{chat_id:str}",
        operation_id="DeleteChat",
        responses={404: ERRORS[404], 409: ResponseSpec(ErrorEnvelope, description="A run is active"), 503: ERRORS[503]},
    )
    async def delete_chat(
        self,
        chat_id: FromPath[str],
        store: NamedDependency[ChatStore],
        runs: NamedDependency[RunManager],
        principal: NamedDependency[Principal],
    ) -> None:
        """Delete a chat and its messages. A chat with an active run answers 409 `chat_busy`."""
        active = await runs.active_run(chat_id, principal.owner)
        if active is not None:
            raise errors.ChatBusyError("the chat has an active run", detail={"active_run_id": active.id})
        runs.forget_chat(chat_id)
        if not await store.delete_chat(chat_id):
            raise errors.NotFoundError(f"no chat {chat_id!r}", detail={"chat_id": chat_id})

    @post(
        "/{chat_id:str}/runs",
        operation_id="CreateRun",
        status_code=202,
        responses={
            202: ResponseSpec(
                RunOut, description="The run started; follow it at `events_url`", generate_examples=False
            ),
            **RUN_ERRORS,
        },
    )
    async def create_run(
        self,
        request: Request[Any, Any, Any],
        chat_id: FromPath[str],
        data: JSONBody[RunCreate],
        caller: NamedDependency[RunCaller],
        idempotency_key: IdempotencyKey = None,
    ) -> ASGIApp:
        """Start a run that answers `message`: `202` with the run; follow it at `events_url`.

        A retried POST with the same `Idempotency-Key` returns the same run. A chat has at most one active
        run: a second one gets `409 chat_busy`. Sent with `Accept: text/event-stream`, this request answers
        the run's event stream instead (`200`, as `CreateRunStream` does); generated clients call
        `CreateRunStream` (`POST /v1/chats/{chat_id}/runs/stream`), whose only answer is the stream.
        """
        record = await _start_run(caller, chat_id, data, idempotency_key)
        if "text/event-stream" in request.headers.get("accept", ""):
            events = await caller.runs.open_events(record.id, 0, caller.principal.owner)
            if events is not None:
                return sse_response(events, caller.settings)
        return as_asgi(Response(run_out(record), status_code=202))

    @post(
        "/{chat_id:str}/runs/stream",
        operation_id="CreateRunStream",
        status_code=200,
        responses={
            200: ResponseSpec(
                AnyEvent, media_type="text/event-stream", description=SSE_DESCRIPTION, generate_examples=False
            ),
            **RUN_ERRORS,
        },
    )
    async def create_run_stream(
        self,
        chat_id: FromPath[str],
        data: JSONBody[RunCreate],
        caller: NamedDependency[RunCaller],
        idempotency_key: IdempotencyKey = None,
    ) -> ASGIApp:
        """Start a run that answers `message` and stream its events on this response (whatever `Accept` says).

        The same body, `Idempotency-Key` and `409 chat_busy` as `CreateRun`. The first event,
        `run.started`, names the run (`run_id`); when the connection drops, resume with
        `GET /v1/runs/{run_id}/stream` and `Last-Event-ID` (the last `seq` received): the run goes on
        without its stream unless it was started with `on_disconnect: "cancel"`.
        """
        record = await _start_run(caller, chat_id, data, idempotency_key)
        return sse_response(await caller.runs.open_events(record.id, 0, caller.principal.owner), caller.settings)

    @get(
        "/{chat_id:str}/active-run",
        operation_id="GetActiveRun",
        responses={404: ERRORS[404], 503: ERRORS[503]},
    )
    async def active_run(
        self, chat_id: FromPath[str], runs: NamedDependency[RunManager], principal: NamedDependency[Principal]
    ) -> RunOut | None:
        """The chat's running run, or `null` when none is running."""
        record = await runs.active_run(chat_id, principal.owner)
        return None if record is None else run_out(record)


async def _start_run(caller: RunCaller, chat_id: str, data: RunCreate, idempotency_key: str | None) -> RunRecord:
    options = run_options(data, caller.settings)
    record, _ = await caller.runs.start_run(chat_id, options, idempotency_key, owner=caller.principal.owner)
    return record
