"""Run ASGI apps for tests over real HTTP on 127.0.0.1.

Two ways:

- :func:`serve` runs any ASGI app with ``uvicorn.Server`` inside the test's own event loop, on a
  port the test binds itself (no race for the port)::

      async with serve(app, ws_max_size=1 << 20) as url:  # "http://127.0.0.1:PORT"
          async with httpx.AsyncClient(base_url=url) as client:
              ...

- :class:`ServiceProcess` runs the real service in a subprocess (``python -m uvicorn
  service.app:create_app --factory``), for crash, signal and multi-instance tests::

      async with ServiceProcess({"SERVICE_REDIS_URL": redis_url}) as proc:
          ...  # proc.url; proc.kill() simulates a crash; proc.logs() is its stdout+stderr

Intentional divergences from a plain ``uvicorn.Server``:

1. :func:`serve` does not install signal handlers (``capture_signals`` is a no-op): several servers
   share one test process, and restoring handlers out of order would leave a dead server's handler
   catching Ctrl-C.
2. A ``SystemExit`` from a failed start-up (uvicorn calls ``sys.exit``) is turned into a
   ``RuntimeError``: raised inside a task it would otherwise escape the event loop and end pytest.
"""

from __future__ import annotations

import asyncio
import contextlib
import os
import signal
import socket
import subprocess
import sys
import tempfile
import time
from collections.abc import AsyncIterator, Iterator, Mapping, Sequence
from pathlib import Path
from types import TracebackType
from typing import Any, Self

import httpx
import uvicorn

REPO_ROOT = Path(__file__).resolve().parents[2]
SERVICE_APP = "service.app:create_app"


class _TestServer(uvicorn.Server):
    """A uvicorn server that leaves the process's signal handlers alone (divergence 1)."""

    @contextlib.contextmanager
    def capture_signals(self) -> Iterator[None]:
        yield


async def _serve_until_exit(server: uvicorn.Server, sock: socket.socket) -> None:
    try:
        await server.serve(sockets=[sock])
    except SystemExit as exc:  # divergence 2
        raise RuntimeError(f"uvicorn exited during start-up (exit code {exc.code})") from None


@contextlib.asynccontextmanager
async def serve(app: Any, **uvicorn_config: Any) -> AsyncIterator[str]:
    """Serve ``app`` on a free 127.0.0.1 port in this event loop; yield its base URL.

    Args:
        app: any ASGI application (or an import string uvicorn accepts).
        **uvicorn_config: extra ``uvicorn.Config`` keyword arguments (``ws_max_size``,
            ``ws_ping_interval``, ``timeout_graceful_shutdown``...). Defaults:
            ``log_level="warning"``, ``lifespan="on"``.

    Start-up is awaited on ``server.started`` (a flag, not a sleep), for at most 10 s. On exit the
    server is asked to stop (``should_exit``); if it has not stopped within 5 s (a request that
    never ends, e.g. an app that ignores ``http.disconnect``), ``force_exit`` is set and the
    requests still running are cancelled (uvicorn logs them as errors: the app misbehaved).
    """
    uvicorn_config.setdefault("log_level", "warning")
    uvicorn_config.setdefault("lifespan", "on")
    # IPPROTO_TCP, not 0: asyncio sets TCP_NODELAY only on sockets whose proto says TCP, and without it
    # a response written in two parts waits ~40 ms for the client's delayed ACK on a kept-alive connection.
    sock = socket.socket(socket.AF_INET, socket.SOCK_STREAM, socket.IPPROTO_TCP)
    sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
    sock.bind(("127.0.0.1", 0))
    server = _TestServer(uvicorn.Config(app, **uvicorn_config))
    task = asyncio.create_task(_serve_until_exit(server, sock))
    try:
        async with asyncio.timeout(10):
            while not server.started:
                if task.done():
                    task.result()  # raises the start-up failure
                    raise RuntimeError("uvicorn stopped before it started")
                await asyncio.sleep(0.005)
        yield f"http://127.0.0.1:{sock.getsockname()[1]}"
    finally:
        server.should_exit = True
        try:
            await asyncio.wait_for(asyncio.shield(task), timeout=5)
        except TimeoutError:
            server.force_exit = True
            await task
            leftovers = list(server.server_state.tasks)  # requests still running: don't leak them
            for leftover in leftovers:
                leftover.cancel()
            await asyncio.gather(*leftovers, return_exceptions=True)
        finally:
            sock.close()


def free_port() -> int:
    """A TCP port on 127.0.0.1 that was free a moment ago (another process may take it first)."""
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as sock:
        sock.bind(("127.0.0.1", 0))
        return int(sock.getsockname()[1])


class ServiceProcess:
    """The service (or any ASGI app factory) under ``python -m uvicorn`` in a subprocess.

    Args:
        env: variables merged over ``os.environ`` for the child (``SERVICE_*`` settings).
        app: the import string handed to uvicorn; default ``service.app:create_app``.
        factory: pass ``--factory`` (``app`` names a function that returns the app).
        port: the port to listen on; default a free one.
        extra_args: more uvicorn command-line arguments.
        startup_timeout: seconds :meth:`start` waits for ``GET /healthz`` to answer 200 (a start under
            the full suite's load took 27 s; an exit is seen at once).
        health_path: the path polled by :meth:`start`.
        cwd: the child's working directory; default the repository root.

    The child's stdout and stderr go to one temporary file; :meth:`logs` reads it. Leaving an
    ``async with`` block with an exception prints the logs to stderr, so pytest shows them.
    """

    def __init__(
        self,
        env: Mapping[str, str] | None = None,
        *,
        app: str = SERVICE_APP,
        factory: bool = True,
        port: int | None = None,
        extra_args: Sequence[str] = (),
        startup_timeout: float = 60.0,
        health_path: str = "/healthz",
        cwd: Path = REPO_ROOT,
    ) -> None:
        self.port = port or free_port()
        self.url = f"http://127.0.0.1:{self.port}"
        self.env = {**os.environ, "PYTHONUNBUFFERED": "1", **(env or {})}
        self.command = [sys.executable, "-m", "uvicorn", app, *(["--factory"] if factory else [])]
        self.command += ["--host", "127.0.0.1", "--port", str(self.port), "--ws-max-size", "1048576"]
        self.command += ["--ws", "service.api.ws_protocol:WebSocketProtocol"]  # as in the README
        self.command += ["--http", "service.api.http_protocol:HttpProtocol", *extra_args]
        self.startup_timeout = startup_timeout
        self.health_path = health_path
        self.cwd = cwd
        self.log_path = Path(tempfile.mkstemp(prefix="service-", suffix=".log")[1])
        self.process: subprocess.Popen[bytes] | None = None

    @property
    def pid(self) -> int:
        """The child's process id."""
        return self._running().pid

    @property
    def returncode(self) -> int | None:
        """The child's exit status, or ``None`` while it runs (negative: killed by that signal)."""
        return None if self.process is None else self.process.poll()

    def logs(self) -> str:
        """Everything the child wrote to stdout and stderr so far."""
        return self.log_path.read_text(errors="replace")

    async def wait_for_log(self, *lines: str, timeout: float = 10.0) -> str:
        """The logs once each of ``lines`` appears in them (log handlers write from their own thread).

        Raises:
            AssertionError: not all appeared within ``timeout`` s; the message has the logs.
        """
        deadline = time.monotonic() + timeout
        while not all(line in (logs := self.logs()) for line in lines):
            if time.monotonic() >= deadline:
                missing = [line for line in lines if line not in logs]
                raise AssertionError(f"not in the service's logs after {timeout} s: {missing}\n{logs}")
            await asyncio.sleep(0.05)
        return logs

    async def start(self) -> Self:
        """Start the child and wait until ``GET /healthz`` answers 200.

        Raises:
            RuntimeError: the child exited, or did not become healthy within ``startup_timeout``;
                the message includes its output.
        """
        with self.log_path.open("ab") as log:
            self.process = subprocess.Popen(  # noqa: ASYNC220, S603 - our own argv; Popen returns at once
                self.command, cwd=self.cwd, env=self.env, stdout=log, stderr=subprocess.STDOUT
            )
        deadline = time.monotonic() + self.startup_timeout
        async with httpx.AsyncClient(base_url=self.url, timeout=1.0) as client:
            while time.monotonic() < deadline:
                if self.process.poll() is not None:
                    raise RuntimeError(f"service exited with {self.process.returncode}:\n{self.logs()}")
                with contextlib.suppress(httpx.TransportError):
                    if (await client.get(self.health_path)).status_code == 200:
                        return self
                await asyncio.sleep(0.05)
        self.kill()
        raise RuntimeError(f"service not healthy within {self.startup_timeout} s:\n{self.logs()}")

    async def stop(self, timeout: float = 10.0) -> int | None:
        """SIGTERM the child (graceful shutdown); SIGKILL it after ``timeout`` s. Returns the exit status.

        After a graceful shutdown uvicorn re-raises the SIGTERM it caught, so the status is
        ``-signal.SIGTERM`` (``-signal.SIGKILL`` if it had to be killed).
        """
        if self.process is None or self.process.poll() is not None:
            return self.returncode
        self.process.send_signal(signal.SIGTERM)  # Popen signals its own pid only
        deadline = time.monotonic() + timeout
        while self.process.poll() is None and time.monotonic() < deadline:
            await asyncio.sleep(0.02)
        if self.process.poll() is None:
            self.kill()
        return self.returncode

    def kill(self) -> None:
        """SIGKILL the child (simulates a crash) and reap it."""
        if self.process is not None and self.process.poll() is None:
            self.process.kill()
            self.process.wait()

    def _running(self) -> subprocess.Popen[bytes]:
        if self.process is None:
            raise RuntimeError("ServiceProcess.start() was not called")
        return self.process

    async def __aenter__(self) -> Self:
        try:
            return await self.start()
        except BaseException:
            self.log_path.unlink(missing_ok=True)
            raise

    async def __aexit__(
        self, exc_type: type[BaseException] | None, exc: BaseException | None, tb: TracebackType | None
    ) -> None:
        try:
            await self.stop()
            if exc is not None:
                print(f"--- service output ({' '.join(self.command)}) ---\n{self.logs()}", file=sys.stderr)
        finally:
            self.log_path.unlink(missing_ok=True)


class CountedTransport:
    """A socket's transport, with the bytes of each ``write`` call kept (for tests that count writes)."""

    def __init__(self, transport: Any, writes: list[bytes]) -> None:
        self._transport, self.writes = transport, writes

    def write(self, data: bytes) -> None:
        self.writes.append(data)
        self._transport.write(data)

    def __getattr__(self, name: str) -> Any:
        return getattr(self._transport, name)
