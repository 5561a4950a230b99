"""In-memory runs are one process's: a second process on the same database must not start.

With the embedded run backend (no ``SERVICE_REDIS_URL``) each process knows only its own runs, so
two processes serving one database (``uvicorn --workers 2``, or a second instance) answer 404 for
each other's runs and accept a second run on a busy chat. :class:`SoloLock` makes that
impossible: the first process holds a lock on the database for as long as it runs, and any other
one fails at start-up with :class:`SharedDatabaseError`, which says to set ``SERVICE_REDIS_URL``.

- SQLite: an exclusive ``flock`` on ``<database>.solo.lock`` beside the database file (released
  by the kernel when the process dies, ``kill -9`` included).
- PostgreSQL: a session-level advisory lock held on one dedicated connection (released by the
  server when that connection ends).
- ``:memory:`` SQLite databases are the process's own: nothing to lock.
"""

from __future__ import annotations

import fcntl
import os
from pathlib import Path
from typing import Final

import sqlalchemy as sa
from sqlalchemy.engine import make_url
from sqlalchemy.ext.asyncio import AsyncConnection, AsyncEngine, create_async_engine
from sqlalchemy.pool import NullPool

ADVISORY_KEY: Final = 0x63686174_736F6C6F  # "chatsolo"; the migrations lock "chat" (store/sql.py)
"""The PostgreSQL advisory lock key (a bigint) of the process that owns in-memory runs."""


class SharedDatabaseError(RuntimeError):
    """Another process already serves this database with in-memory runs."""

    def __init__(self, where: str) -> None:
        super().__init__(
            f"another process already serves {where} with in-memory runs; several processes "
            "(uvicorn --workers, or more instances) must share runs: set SERVICE_REDIS_URL"
        )


class SoloLock:
    """The lock of the module docstring for ``database_url``; :meth:`acquire` it, :meth:`release` it."""

    def __init__(self, database_url: str) -> None:
        self._url = make_url(database_url)
        self._fd: int | None = None
        self._engine: AsyncEngine | None = None
        self._connection: AsyncConnection | None = None

    async def acquire(self) -> None:
        """Take the lock. Raises ``SharedDatabaseError`` when another process holds it."""
        if self._url.get_backend_name() == "sqlite":
            self._lock_file()
        else:
            await self._lock_postgres()

    async def release(self) -> None:
        """Let the lock go (idempotent)."""
        if self._fd is not None:
            os.close(self._fd)  # closing the descriptor releases the flock
            self._fd = None
        if self._connection is not None:
            await self._connection.close()
            self._connection = None
        if self._engine is not None:
            await self._engine.dispose()
            self._engine = None

    def _lock_file(self) -> None:
        database = self._url.database or ""
        if database in ("", ":memory:") or database.startswith("file:"):
            return
        path = Path(database).absolute().with_name(Path(database).name + ".solo.lock")
        fd = os.open(path, os.O_RDWR | os.O_CREAT, 0o600)
        try:
            fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            os.close(fd)
            raise SharedDatabaseError(f"the SQLite database {database}") from None
        self._fd = fd

    async def _lock_postgres(self) -> None:
        self._engine = create_async_engine(self._url, poolclass=NullPool)
        self._connection = await self._engine.connect()
        locked = await self._connection.scalar(sa.text("SELECT pg_try_advisory_lock(:key)"), {"key": ADVISORY_KEY})
        if not locked:
            await self.release()
            database = self._url.database or "the database"
            raise SharedDatabaseError(f"the PostgreSQL database {database!r}")
