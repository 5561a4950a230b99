"""The chat store contract: chats, their messages and run records, whatever the database.

A run's messages (the assistant turns, tool calls and tool results) are written
together, once, when the run ends: ``append_messages`` is all-or-nothing.

With the in-memory run backend the store also keeps each run's record (:class:`StoredRun`), written
with the run's first and last messages and checkpointed while it runs, so that a restart can
still answer for the runs of a process that died (:mod:`service.runs.journal`).
"""

from __future__ import annotations

from abc import ABC, abstractmethod
from typing import Any, Literal

import msgspec

Role = Literal["system", "user", "assistant", "tool"]
MessageStatus = Literal["completed", "cancelled", "failed"]


class ToolCallRecord(msgspec.Struct, frozen=True):
    """A tool call the model made, as sent back to it in later turns."""

    id: str
    name: str
    arguments: str


class UsageRecord(msgspec.Struct, frozen=True):
    """Token usage of one run."""

    prompt_tokens: int
    completion_tokens: int
    total_tokens: int


class Message(msgspec.Struct, frozen=True, kw_only=True):
    """One message of a chat.

    ``content`` is the text (or, for a user message, a string or a list of
    OpenAI content parts). An assistant message may carry ``tool_calls``,
    ``output`` (structured output), ``refusal``, ``reasoning``,
    ``finish_reason``, ``usage``; a tool message carries ``tool_call_id`` and
    ``name``. ``status`` is ``cancelled`` or ``failed`` for the partial answer
    of an interrupted run.
    """

    id: str
    chat_id: str
    role: Role
    content: str | list[dict[str, Any]] | None = None
    tool_calls: list[ToolCallRecord] | None = None
    tool_call_id: str | None = None
    name: str | None = None
    is_error: bool | None = None
    output: Any = None
    refusal: str | None = None
    reasoning: str | None = None
    finish_reason: str | None = None
    usage: UsageRecord | None = None
    status: MessageStatus = "completed"
    run_id: str | None = None
    created_at: float = 0.0


class Chat(msgspec.Struct, frozen=True, kw_only=True):
    """A conversation and the options its runs default to."""

    id: str
    model: str
    system: str | None = None
    tools: list[str] | None = None
    mcp_servers: list[str] | None = None
    response_format: dict[str, Any] | None = None
    sampling: dict[str, Any] | None = None
    """The sampling parameters the chat was created with (only those set), sent with each of its runs."""
    owner: str | None = None
    created_at: float = 0.0
    updated_at: float = 0.0


class StoredRun(msgspec.Struct, frozen=True, kw_only=True):
    """A run's record as the store keeps it.

    ``partial`` (while the run runs) is what to store should the process die: the run's messages
    so far, the last one ``failed`` with ``finish_reason`` ``interrupted``.
    """

    id: str
    chat_id: str
    model: str
    message_id: str
    subject: str | None = None
    status: Literal["running", "completed", "cancelled", "failed"] = "running"
    error_code: str | None = None
    last_seq: int = 0
    created_at: float = 0.0
    finished_at: float | None = None
    partial: list[Message] | None = None


class ChatPage(msgspec.Struct, frozen=True):
    """One page of chats, newest first; ``next_cursor`` is None on the last page."""

    items: list[Chat]
    next_cursor: str | None


class StoreUnavailableError(Exception):
    """The database could not be reached or refused the operation."""


class ChatStore(ABC):
    """Chats and messages. Implementations raise ``StoreUnavailableError`` when the database fails."""

    @abstractmethod
    async def start(self) -> None:
        """Connect and make sure the schema is current."""

    @abstractmethod
    async def close(self) -> None:
        """Release connections."""

    @abstractmethod
    async def ping(self) -> bool:
        """Whether the database answers (for ``/readyz``)."""

    @abstractmethod
    async def create_chat(self, chat: Chat) -> Chat:
        """Store a new chat and return it."""

    @abstractmethod
    async def get_chat(self, chat_id: str) -> Chat | None:
        """The chat, or None."""

    @abstractmethod
    async def list_chats(self, *, limit: int, cursor: str | None, owner: str | None = None) -> ChatPage:
        """Chats newest first, ``limit`` at a time, after the opaque ``cursor``."""

    @abstractmethod
    async def delete_chat(self, chat_id: str) -> bool:
        """Delete the chat and its messages; False when there was none."""

    @abstractmethod
    async def append_messages(
        self, chat_id: str, messages: list[Message], *, idempotent: bool = False, run: StoredRun | None = None
    ) -> None:
        """Append messages to a chat in one transaction (all or nothing).

        With ``idempotent``, messages whose first id is stored already were written by an earlier
        call (whose answer was lost: a cancel, a dropped connection) and are not written again.
        ``run`` is written (inserted or replaced) in the same transaction.
        """

    @abstractmethod
    async def list_messages(self, chat_id: str) -> list[Message]:
        """The chat's messages, oldest first."""

    async def append_and_list(
        self, chat_id: str, messages: list[Message], *, run: StoredRun | None = None, skip: int = 0
    ) -> list[Message]:
        """Append ``messages`` like ``append_messages``, then return the chat's messages from ``skip`` on, oldest first.

        The start of a run needs both; a store may do them in one round trip (this default makes two).
        Messages are only ever appended, so a caller that has the first ``skip`` already asks for the rest.
        """
        await self.append_messages(chat_id, messages, run=run)
        return (await self.list_messages(chat_id))[skip:]

    @abstractmethod
    async def get_run(self, run_id: str) -> StoredRun | None:
        """The run's record, or None."""

    @abstractmethod
    async def checkpoint_runs(self, runs: list[StoredRun]) -> None:
        """Update the ``last_seq`` and ``partial`` of runs still ``running`` (a finished one is left as it is)."""

    @abstractmethod
    async def interrupt_runs(self, *, now: float) -> list[StoredRun]:
        """Fail every ``running`` run (code ``interrupted``), storing its partial answer; returns them.

        Only for a process that knows no other one serves these runs (the in-memory run backend
        holds :class:`service.runs.solo.SoloLock`).
        """
