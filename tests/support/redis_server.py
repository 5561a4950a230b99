"""A redis-server of a test's own, on a free port, that the test may pause, stop and restart.

The shared Redis (``SERVICE_TEST_REDIS_URL``) is never paused or restarted: outage tests start
their own server with this class::

    async with RedisServer(tmp_path, persistent=True) as redis:
        ...  # redis.url
        with redis.paused():  # SIGSTOP ... SIGCONT
            ...
        await redis.restart()  # SIGTERM (a persistent server writes its append-only file), then start again

Without ``persistent`` the server keeps nothing on disk, so a restart comes back empty.
"""

from __future__ import annotations

import asyncio
import contextlib
import os
import shutil
import signal
import subprocess
import time
from collections.abc import Iterator
from pathlib import Path
from types import TracebackType
from typing import Self

import pytest
import redis.asyncio as aioredis

from tests.support.live_server import free_port

REDIS_SERVER = shutil.which("redis-server")


class RedisServer:
    """One redis-server process; ``persistent`` keeps an append-only file (fsync always) across restarts."""

    def __init__(self, directory: Path, *, persistent: bool = False) -> None:
        if REDIS_SERVER is None:
            if os.environ.get("CI") == "true":
                pytest.fail("redis-server is not installed; CI requires it", pytrace=False)
            pytest.skip("redis-server is not installed")
        self.directory = directory
        self.persistent = persistent
        self.port = free_port()
        self.url = f"redis://127.0.0.1:{self.port}/0"
        self.process: subprocess.Popen[bytes] | None = None

    def _command(self) -> list[str]:
        command = [REDIS_SERVER or "redis-server", "--port", str(self.port), "--bind", "127.0.0.1"]
        command += ["--dir", str(self.directory), "--save", "", "--protected-mode", "no"]
        if self.persistent:
            command += ["--appendonly", "yes", "--appendfsync", "always"]
        else:
            command += ["--appendonly", "no"]
        return command

    async def start(self) -> Self:
        """Start the server and wait until it answers PING (at most 10 s)."""
        log = (self.directory / "redis.log").open("ab")
        self.process = subprocess.Popen(self._command(), stdout=log, stderr=subprocess.STDOUT)  # noqa: ASYNC220, S603
        log.close()
        client = aioredis.Redis.from_url(self.url, socket_connect_timeout=0.5)
        deadline = time.monotonic() + 10
        try:
            while True:
                try:
                    if await client.ping():  # pyright: ignore[reportUnknownMemberType]
                        return self
                except (OSError, aioredis.ConnectionError):
                    if time.monotonic() > deadline or self.process.poll() is not None:
                        raise
                await asyncio.sleep(0.02)
        finally:
            await client.aclose()

    async def stop(self) -> None:
        """SIGTERM the server (a persistent one flushes its file) and wait for it to exit."""
        if self.process is None or self.process.poll() is not None:
            return
        self.process.send_signal(signal.SIGCONT)  # a paused server cannot handle SIGTERM
        self.process.terminate()
        deadline = time.monotonic() + 10
        while self.process.poll() is None:
            if time.monotonic() > deadline:
                self.process.kill()
            await asyncio.sleep(0.02)

    async def restart(self, down_s: float = 0.0) -> None:
        """Stop the server, stay down ``down_s`` seconds, start it again on the same port."""
        await self.stop()
        await asyncio.sleep(down_s)
        await self.start()

    @contextlib.contextmanager
    def paused(self) -> Iterator[None]:
        """SIGSTOP the server for the block: connections stay open, nothing answers."""
        process = self.process
        assert process is not None
        process.send_signal(signal.SIGSTOP)
        try:
            yield
        finally:
            process.send_signal(signal.SIGCONT)

    async def __aenter__(self) -> Self:
        return await self.start()

    async def __aexit__(
        self, exc_type: type[BaseException] | None, exc: BaseException | None, tb: TracebackType | None
    ) -> None:
        await self.stop()
