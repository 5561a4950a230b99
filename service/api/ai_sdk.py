"""``/v1/ai-sdk/chat``: the Vercel AI SDK's chat protocol over the service's own runs.

``new DefaultChatTransport({ api: "<service>/v1/ai-sdk/chat" })`` (package ``ai``, 6.x) talks to
it as it is; with auth on, add ``headers: { Authorization: "Bearer <JWT>" }``. Nothing here runs a
model: a POST starts an ordinary run through the run manager and answers with that run's events
translated into UI message stream parts (:mod:`service.api.ui_stream`), so the run is stored,
resumable, visible at ``/v1/runs/{run_id}`` and in the chat, like any other.

- The SDK's chat ``id`` names a chat of the caller's: the service's chat id is derived from the
  caller and that id (:func:`chat_id_for`), and the chat is created on first use (model: the body's
  ``model`` or the default).
- The service keeps the history itself: only the last message of ``messages`` is read, and it must be
  a user message (its text parts, and image files as image parts). ``trigger: "regenerate-message"``
  answers that last user message again as a new turn; the earlier answer stays in the chat's stored
  history (which is append-only), so the model sees it.
- Stop (the SDK aborts the request) cancels the run: its runs are ``on_disconnect: "cancel"`` with a
  grace of ``SERVICE_AI_SDK_RESUME_GRACE_S`` (3 s), so a reload that resumes the stream within it
  (``resume: true``: ``GET {api}/{id}/stream``) keeps the run, and the stop takes effect after it.
- Resume replays the chat's active run from its first event (the SDK rebuilds the message from the
  replay); ``204`` when the chat has no active run.
"""

from __future__ import annotations

import dataclasses
import hashlib
import time
from collections.abc import AsyncIterator
from typing import Annotated, Any, Literal

import msgspec
from litestar import Controller, Response, get, post
from litestar.di import NamedDependency
from litestar.openapi.datastructures import ResponseSpec
from litestar.params import FromPath, JSONBody
from litestar.types import ASGIApp

from service import errors
from service.api.auth import BEARER
from service.api.deps import RunCaller
from service.api.schemas import ImagePart, ImageUrl, InvalidBodyError, Name, RunCreate, TextPart, run_options
from service.api.streaming import SSE_HEADERS, as_asgi, open_stream, stream_response
from service.api.ui_stream import (
    DONE_FRAME,
    UI_STREAM_HEADERS,
    AnyUiPart,
    UiError,
    UiStreamTranslator,
    ui_frame,
)
from service.errors import ErrorEnvelope
from service.events import AnyEvent, is_terminal
from service.settings import Settings
from service.store.base import Chat

SdkChatId = Annotated[str, msgspec.Meta(min_length=1, max_length=200)]

UI_STREAM_DESCRIPTION = (
    "The run's answer as the AI SDK's UI message stream (protocol v1, header "
    "`x-vercel-ai-ui-message-stream: v1`): Server-Sent Events whose `data` is one JSON part each "
    "(`start`, `start-step`, `text-delta` …), ending with `data: [DONE]` after the part that ends the "
    "message (`finish`, or `abort` for a cancelled run; a failed run sends `error` and then `finish`). "
    "Comment lines are heartbeats."
)
UI_STREAM_RESPONSE = ResponseSpec(
    AnyUiPart, media_type="text/event-stream", description=UI_STREAM_DESCRIPTION, generate_examples=False
)


class UiMessagePart(msgspec.Struct, frozen=True, rename="camel"):
    """A part of a UI message; only ``text`` parts and image ``file`` parts of the last message are read."""

    type: str
    text: str | None = None
    url: str | None = None
    media_type: str | None = None


class UiMessage(msgspec.Struct, frozen=True):
    """A message as the AI SDK sends it (other fields, such as ``metadata``, are ignored)."""

    role: Literal["system", "user", "assistant"]
    parts: list[UiMessagePart] = msgspec.field(default_factory=list[UiMessagePart])
    id: str = ""


class AiSdkChatRequest(msgspec.Struct, frozen=True, rename="camel"):
    """What ``DefaultChatTransport`` POSTs; fields of its ``body`` option other than ``model`` are ignored."""

    id: SdkChatId
    """The SDK's chat id: it names a chat of the caller's, created on first use."""
    messages: list[UiMessage]
    """The SDK's messages; the last one must be the user's new message (the service keeps the history)."""
    trigger: Literal["submit-message", "regenerate-message"] = "submit-message"
    """``regenerate-message`` answers the last user message again, as a new turn."""
    message_id: str | None = None
    model: Name | None = None
    """The model of this run (and of the chat when it is created); default: the chat's."""


def chat_id_for(owner: str | None, sdk_chat_id: str) -> str:
    """The service's chat id for the SDK's chat ``sdk_chat_id`` of ``owner``: another caller's is another chat."""
    digest = hashlib.sha256(f"{owner or ''}\x00{sdk_chat_id}".encode()).hexdigest()
    return digest[:32]


class AiSdkChatController(Controller):
    """The AI SDK's chat protocol (``DefaultChatTransport``)."""

    path = "/v1/ai-sdk/chat"
    tags = ["ai-sdk"]
    security = BEARER

    @post(
        "/",
        operation_id="AiSdkSendMessages",
        status_code=200,
        responses={
            200: UI_STREAM_RESPONSE,
            409: ResponseSpec(ErrorEnvelope, description="The chat already has an active run (`detail.active_run_id`)"),
            503: ResponseSpec(
                ErrorEnvelope, description="The chat store is unavailable, or the service is shutting down"
            ),
        },
    )
    async def send_messages(self, data: JSONBody[AiSdkChatRequest], caller: NamedDependency[RunCaller]) -> ASGIApp:
        """Answer the last user message of `messages` in the chat the SDK's `id` names, as a UI message stream.

        The chat (the caller's) is created on first use. The service keeps the history: earlier messages are not
        read. Aborting the request (the SDK's stop) cancels the run once `SERVICE_AI_SDK_RESUME_GRACE_S` has
        passed without a resume.
        """
        owner, settings = caller.principal.owner, caller.settings
        chat = await _chat(caller, data.id, data.model)
        options = dataclasses.replace(
            run_options(_run_create(data), settings),
            on_disconnect="cancel",
            disconnect_grace_s=settings.ai_sdk_resume_grace_s,
        )
        record, _ = await caller.runs.start_run(chat.id, options, owner=owner)
        return await _replay(caller, record.id)

    @get(
        "/{id:str}/stream",
        operation_id="AiSdkResumeStream",
        responses={
            200: UI_STREAM_RESPONSE,
            204: ResponseSpec(None, description="The chat has no active run (or does not exist yet)"),
        },
    )
    async def resume_stream(self, id: FromPath[str], caller: NamedDependency[RunCaller]) -> ASGIApp:
        """Replay the chat's active run from its start, then follow it live (the SDK's `resume: true`).

        `204` when the chat has no active run, which tells the SDK there is nothing to resume.
        """
        owner = caller.principal.owner
        try:
            active = await caller.runs.active_run(chat_id_for(owner, id), owner)
        except errors.NotFoundError:  # a chat the SDK has not sent to yet
            active = None
        return as_asgi(Response(None, status_code=204)) if active is None else await _replay(caller, active.id)


async def _replay(caller: RunCaller, run_id: str) -> ASGIApp:
    """The run's events from its first, then live, as a UI message stream (204 if it logged nothing)."""
    events = await caller.runs.open_events(run_id, 0, caller.principal.owner)
    if events is None:
        return as_asgi(Response(None, status_code=204))
    return ui_stream_response(events, caller.settings)


def ui_stream_response(batches: AsyncIterator[list[AnyEvent]], settings: Settings) -> ASGIApp:
    """Events as a UI message stream: one ``data`` line per part, ``[DONE]`` after the terminal event.

    The parts of a batch of events go out as one body message.
    """

    async def frames() -> AsyncIterator[bytes]:
        translator = UiStreamTranslator()
        with open_stream():
            try:
                async for batch in batches:
                    lines = [ui_frame(part) for event in batch for part in translator.parts(event)]
                    if is_terminal(batch[-1]):
                        lines.append(DONE_FRAME)
                    if lines:
                        yield b"".join(lines)
            except errors.ServiceError as exc:  # the run backend stayed down: the SDK shows it (and may resume)
                yield ui_frame(UiError(f"{exc.code}: {exc.message}"))

    return stream_response(frames(), settings, {**SSE_HEADERS, **UI_STREAM_HEADERS})


async def _chat(caller: RunCaller, sdk_chat_id: str, model: str | None) -> Chat:
    """The caller's chat for the SDK's chat id, created on first use."""
    runs, owner = caller.runs, caller.principal.owner
    chat_id = chat_id_for(owner, sdk_chat_id)
    try:
        return await runs.chat(chat_id, owner)
    except errors.NotFoundError:
        pass
    resolved, _, _ = runs.engine.providers.resolve(model or caller.settings.default_model)
    now = time.time()
    chat = Chat(id=chat_id, model=resolved, owner=owner, created_at=now, updated_at=now)
    try:
        created = await runs.store.create_chat(chat)
    except ValueError:  # created meanwhile by a concurrent first request
        return await runs.chat(chat_id, owner)
    runs.remember_chat(created)
    return created


def _run_create(body: AiSdkChatRequest) -> RunCreate:
    """The run body for the last message of ``messages``: its text parts, and image files as image parts."""
    if not body.messages or body.messages[-1].role != "user":
        raise InvalidBodyError("messages", "the last message must be the user's new message")
    texts: list[str] = []
    images: list[ImagePart] = []
    for part in body.messages[-1].parts:
        if part.type == "text" and part.text:
            texts.append(part.text)
        elif part.type == "file" and part.url and (part.media_type or "").startswith("image/"):
            images.append(ImagePart(ImageUrl(part.url)))
    text = "\n".join(texts)
    if not images:
        return RunCreate(message=text, model=body.model)
    content: list[Any] = [TextPart(text), *images] if text else images
    return RunCreate(message=content, model=body.model)
