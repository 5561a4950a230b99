"""Fold a run's events into the messages stored when the run ends.

A run with tool calls stores, in order: an assistant message carrying the
calls, one ``tool`` message per result, then the final assistant message
(id = the run's ``message_id``), whose ``status`` says whether the run
completed, was cancelled or failed.

Also the history a run sends: the newest whole turns that fit the cap (``recent``), what an
instance keeps of recent chats so that a run's start reads only what was added since
(``RecentHistories``), and the OpenAI ``messages`` list (``openai_history``).
"""

from __future__ import annotations

import time
from collections import OrderedDict
from dataclasses import dataclass
from typing import Any

from service.engine.state import openai_tool_call
from service.events import (
    AnyEvent,
    OutputDone,
    ReasoningDelta,
    RefusalDelta,
    TextDelta,
    ToolCallDone,
    ToolResult,
    Usage,
)
from service.ids import new_id
from service.store.base import Message, MessageStatus, ToolCallRecord, UsageRecord


class Transcript:
    """The messages of one run, built event by event."""

    def __init__(self, *, chat_id: str, run_id: str, message_id: str, owner: str | None = None) -> None:
        self.chat_id = chat_id
        self.run_id = run_id
        self.message_id = message_id
        self.owner = owner
        self._done: list[Message] = []
        self._text: list[str] = []
        self._reasoning: list[str] = []
        self._refusal: list[str] = []
        self._calls: list[ToolCallRecord] = []
        self._output: Any = None
        self._usage: UsageRecord | None = None
        self.seq = 0
        """The seq of the last event taken (a run's events are numbered 1, 2, ... in the order taken)."""

    @property
    def usage(self) -> UsageRecord | None:
        """The run's token usage so far (summed over its turns), once the upstream reported it."""
        return self._usage

    def add(self, event: AnyEvent) -> None:
        """Take one event into account."""
        self.seq += 1
        match event:
            case TextDelta(delta=delta):
                self._text.append(delta)
            case ReasoningDelta(delta=delta):
                self._reasoning.append(delta)
            case RefusalDelta(delta=delta):
                self._refusal.append(delta)
            case OutputDone(output=output):
                self._output = output
            case ToolCallDone():
                self._calls.append(ToolCallRecord(id=event.call_id, name=event.name, arguments=event.arguments))
            case ToolResult():
                self._close_tool_turn()
                self._done.append(
                    Message(
                        id=new_id(),
                        chat_id=self.chat_id,
                        role="tool",
                        content=event.output,
                        tool_call_id=event.call_id,
                        name=event.name,
                        is_error=event.is_error,
                        run_id=self.run_id,
                        created_at=time.time(),
                    )
                )
            case Usage():
                self._usage = UsageRecord(event.prompt_tokens, event.completion_tokens, event.total_tokens)
            case _:
                pass

    def _close_tool_turn(self) -> None:
        """The first result of a turn: the assistant message that asked for the tools goes first."""
        if not self._calls:
            return
        self._done.append(self._assistant(new_id(), "completed", "tool_calls", tool_calls=self._calls))
        self._text, self._reasoning, self._refusal, self._calls = [], [], [], []

    def _assistant(self, message_id: str, status: MessageStatus, finish_reason: str | None, **extra: Any) -> Message:
        return Message(
            id=message_id,
            chat_id=self.chat_id,
            role="assistant",
            content="".join(self._text) or None,
            reasoning="".join(self._reasoning) or None,
            refusal="".join(self._refusal) or None,
            finish_reason=finish_reason,
            status=status,
            run_id=self.run_id,
            created_at=time.time(),
            **extra,
        )

    def messages(self, status: MessageStatus, finish_reason: str | None) -> list[Message]:
        """Everything to store for this run, ending with the final assistant message (the run so far, if it runs)."""
        final = self._assistant(
            self.message_id,
            status,
            finish_reason,
            tool_calls=self._calls or None,
            output=self._output,
            usage=self._usage,
        )
        return [*self._done, final]


def _size(message: Message) -> int:
    """Characters a stored message adds to the model's input (text, image URLs, tool arguments)."""
    content = message.content
    if isinstance(content, str):
        size = len(content)
    elif content is None:
        size = 0
    else:
        size = sum(len(str(part.get("text") or part.get("image_url") or "")) for part in content)
    return size + sum(len(call.arguments) for call in message.tool_calls or ())


def recent(messages: list[Message], max_chars: int) -> list[Message]:
    """The newest messages that fit in ``max_chars``, starting at a user message (so no tool result is orphaned).

    The newest user message is always kept (its own length is capped when it is accepted).
    """
    sizes = [_size(message) for message in messages]
    return messages[_recent_start(messages, sizes, sum(sizes), max_chars) :]


def _recent_start(messages: list[Message], sizes: list[int], total: int, max_chars: int) -> int:
    """Where ``recent`` starts: the oldest user message that fits with all after it, else the newest one.

    ``total`` is ``sum(sizes)``; the walk stops at the start, so it costs what is dropped, not what is kept.
    """
    newest_user, suffix = 0, total  # no user message at all: everything
    for index, message in enumerate(messages):
        if message.role == "user":
            if suffix <= max_chars:
                return index
            newest_user = index
        suffix -= sizes[index]
    return newest_user


@dataclass(frozen=True)
class KnownHistory:
    """What an instance keeps of a chat's messages: the newest ones a run sends, and how many the chat had."""

    count: int
    """The chat's messages in the store up to the newest of ``messages``."""
    messages: list[Message]
    """The newest of them that fit the history cap (``recent``)."""
    sizes: list[int]
    """The size of each of ``messages`` (characters for the model)."""
    total: int
    """Their sum, kept: summing a long window on every run made ``extend`` 3-4x dearer (21 -> 71-92 µs at 5,400)."""


class RecentHistories:
    """The newest messages of recent chats, least recent first, within a count and a size (``RunManager``).

    A chat's messages are only ever appended, so the newest ones that fit the cap start no earlier
    after an append than before it: the window kept from one run and the messages added since (the
    answer, what other instances wrote, the new question) make the next run's window.
    """

    def __init__(self, max_chars: int, *, max_chats: int, max_kept_chars: int) -> None:
        self.max_chars = max_chars
        self._max_chats, self._max_kept = max_chats, max_kept_chars
        self._chats: OrderedDict[str, KnownHistory] = OrderedDict()
        self._kept = 0

    def get(self, chat_id: str) -> KnownHistory | None:
        """What is kept of the chat (its ``count`` is how many messages its next append may skip)."""
        return self._chats.get(chat_id)

    def extend(self, chat_id: str, known: KnownHistory | None, added: list[Message]) -> list[Message]:
        """The messages a run sends: ``known`` (what ``get`` gave before the append) with the ``added`` ones.

        ``added`` are the chat's messages after ``known.count`` (all of them without ``known``).
        """
        added_sizes = [_size(message) for message in added]
        if known is None:
            count, messages, sizes, total = 0, added, added_sizes, sum(added_sizes)
        else:
            count, total = known.count, known.total + sum(added_sizes)
            messages, sizes = [*known.messages, *added], [*known.sizes, *added_sizes]
        start = _recent_start(messages, sizes, total, self.max_chars)
        kept = KnownHistory(count + len(added), messages[start:], sizes[start:], total - sum(sizes[:start]))
        self.forget(chat_id)
        self._chats[chat_id] = kept
        self._kept += _kept_chars(kept)
        while len(self._chats) > self._max_chats or self._kept > self._max_kept:
            _, oldest = self._chats.popitem(last=False)
            self._kept -= _kept_chars(oldest)
        return kept.messages

    def forget(self, chat_id: str) -> None:
        """Drop what is kept of a chat (deleted, or replaced by ``extend``)."""
        gone = self._chats.pop(chat_id, None)
        if gone is not None:
            self._kept -= _kept_chars(gone)


def _kept_chars(history: KnownHistory) -> int:
    return history.total + 256 * len(history.messages)  # (a message's struct costs about that beside its text)


def openai_history(system: str | None, messages: list[Message]) -> list[dict[str, Any]]:
    """Stored messages as the OpenAI ``messages`` list sent to the model."""
    history: list[dict[str, Any]] = [{"role": "system", "content": system}] if system else []
    for message in messages:
        match message.role:
            case "user" | "system":
                history.append({"role": message.role, "content": message.content})
            case "tool":
                history.append({"role": "tool", "tool_call_id": message.tool_call_id, "content": message.content})
            case "assistant":
                entry: dict[str, Any] = {"role": "assistant", "content": message.content}
                if message.tool_calls and message.status == "completed":
                    entry["tool_calls"] = [openai_tool_call(c.id, c.name, c.arguments) for c in message.tool_calls]
                elif not message.content:
                    continue  # an interrupted turn with nothing said adds nothing for the model
                history.append(entry)
    return history
