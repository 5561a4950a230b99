"""RunManager against a real store and the memory backend, with interleavings forced in-process."""

from __future__ import annotations

from pathlib import Path

import pytest

from service import errors
from service.engine.engine import ChatEngine
from service.engine.providers import ProviderRegistry
from service.runs.manager import RunManager, RunOptions
from service.runs.memory import MemoryRunBackend
from service.settings import Settings
from service.store.base import Chat
from service.store.sql import SqlChatStore


class DeletedAfterRead(SqlChatStore):
    """A store where another client deletes the chat right after the run manager read it."""

    async def get_chat(self, chat_id: str) -> Chat | None:
        chat = await super().get_chat(chat_id)
        await self.delete_chat(chat_id)
        return chat


async def test_a_chat_deleted_while_its_run_starts_is_not_found_and_writes_nothing(tmp_path: Path) -> None:
    store = DeletedAfterRead(f"sqlite+aiosqlite:///{tmp_path / 'chats.db'}")
    backend = MemoryRunBackend(retention_s=60, max_events_per_run=100)
    runs = RunManager(
        engine=ChatEngine(ProviderRegistry(Settings()), max_tool_rounds=1),
        backend=backend,
        store=store,
        tools=None,
        shutdown_grace_s=1,
    )
    await store.start()
    await runs.start()
    try:
        await store.create_chat(Chat(id="c", model="demo"))

        with pytest.raises(errors.NotFoundError):
            await runs.start_run("c", RunOptions(message="hi"))

        assert await backend.active_run("c") is None
        assert await store.get_chat("c") is None
        assert await store.list_messages("c") == []
    finally:
        await runs.close()
        await store.close()
