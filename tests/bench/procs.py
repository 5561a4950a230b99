"""Processes under test: start them pinned to a core, wait for their port, read /proc, stop them.

CPU is read from ``/proc/<pid>/stat`` (``utime + stime``, clock ticks, whole thread group) and,
for finer resolution, from the sum of ``/proc/<pid>/task/*/schedstat`` (nanoseconds on CPU of
the live threads). Memory comes from ``/proc/<pid>/status`` (``VmRSS``, ``VmHWM``); writing ``5``
to ``/proc/<pid>/clear_refs`` resets ``VmHWM`` so that a window's peak can be read exactly.
"""

from __future__ import annotations

import asyncio
import contextlib
import os
import shutil
import signal
import socket
import sys
import time
from pathlib import Path

import msgspec

CLK_TCK = os.sysconf("SC_CLK_TCK")


class CpuSample(msgspec.Struct):
    """CPU used so far by a process."""

    stat_s: float
    """utime + stime from /proc/<pid>/stat, in seconds (10 ms resolution)."""
    sched_s: float
    """Sum of the live threads' run time from /proc/<pid>/task/*/schedstat, in seconds."""


def read_cpu(pid: int) -> CpuSample:
    """CPU time of ``pid`` (all threads)."""
    fields = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()
    stat_s = (int(fields[11]) + int(fields[12])) / CLK_TCK  # utime, stime are fields 14, 15
    sched_ns = 0
    for task in Path(f"/proc/{pid}/task").iterdir():
        with contextlib.suppress(OSError):
            sched_ns += int((task / "schedstat").read_text().split()[0])
    return CpuSample(stat_s, sched_ns / 1e9)


def core_busy_s(cpu: int) -> float:
    """Seconds core ``cpu`` has been busy (all processes), from /proc/stat."""
    for line in Path("/proc/stat").read_text().splitlines():
        if line.startswith(f"cpu{cpu} "):
            ticks = [int(x) for x in line.split()[1:]]
            return (sum(ticks) - ticks[3] - ticks[4]) / CLK_TCK  # minus idle and iowait
    return 0.0


def read_mem_kb(pid: int) -> dict[str, int]:
    """``VmRSS`` and ``VmHWM`` of ``pid`` in KiB."""
    out: dict[str, int] = {}
    for line in Path(f"/proc/{pid}/status").read_text().splitlines():
        key, _, value = line.partition(":")
        if key in ("VmRSS", "VmHWM"):
            out[key] = int(value.split()[0])
    return out


def reset_hwm(pid: int) -> bool:
    """Reset ``VmHWM`` to the current RSS; False when the kernel does not allow it."""
    try:
        Path(f"/proc/{pid}/clear_refs").write_text("5")
    except OSError:
        return False
    return True


def free_port() -> int:
    """A port that is free on 127.0.0.1 right now."""
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return int(sock.getsockname()[1])


def pinned(cpu: int, argv: list[str]) -> list[str]:
    """``argv`` run under ``taskset -c cpu`` (taskset execs, so the pid stays the same)."""
    if shutil.which("taskset"):
        return ["taskset", "-c", str(cpu), *argv]
    return argv


def pin(pid: int, cpu: int) -> None:
    """Pin ``pid`` (and its current threads) to ``cpu``; for when taskset is missing."""
    for task in Path(f"/proc/{pid}/task").iterdir():
        with contextlib.suppress(OSError):
            os.sched_setaffinity(int(task.name), {cpu})


class Server:
    """A server process under test (uvicorn), pinned to one core, logging to a file."""

    def __init__(self, name: str, argv: list[str], port: int, env: dict[str, str], log: Path) -> None:
        self.name, self.argv, self.port, self.env, self.log = name, argv, port, env, log
        self.proc: asyncio.subprocess.Process | None = None

    @property
    def pid(self) -> int:
        """The pid whose /proc entries are read."""
        assert self.proc is not None
        return self.proc.pid

    async def start(self, cpu: int, timeout_s: float = 30.0) -> None:
        """Start pinned to ``cpu`` and wait until the port accepts connections."""
        self.log.parent.mkdir(parents=True, exist_ok=True)
        with self.log.open("wb") as log:
            self.proc = await asyncio.create_subprocess_exec(
                *pinned(cpu, self.argv), env={**os.environ, **self.env}, stdout=log, stderr=log, start_new_session=True
            )
        pin(self.pid, cpu)
        deadline = time.monotonic() + timeout_s
        while time.monotonic() < deadline:
            if self.proc.returncode is not None:
                raise RuntimeError(f"{self.name} exited with {self.proc.returncode}: {self.tail()}")
            with contextlib.suppress(OSError):
                _, writer = await asyncio.open_connection("127.0.0.1", self.port)
                writer.close()
                return
            await asyncio.sleep(0.05)
        await self.stop()
        raise RuntimeError(f"{self.name} did not listen on {self.port} within {timeout_s} s: {self.tail()}")

    async def stop(self) -> None:
        """SIGTERM, then SIGKILL after 8 s; only this process is signalled."""
        if self.proc is None or self.proc.returncode is not None:
            return
        self.proc.send_signal(signal.SIGTERM)
        try:
            await asyncio.wait_for(self.proc.wait(), 8)
        except TimeoutError:
            self.proc.kill()
            await self.proc.wait()

    def tail(self, lines: int = 8) -> str:
        """The last lines of the log, for error messages."""
        try:
            return " | ".join(self.log.read_text(errors="replace").strip().splitlines()[-lines:])
        except OSError:
            return ""


def uvicorn_argv(app: str, port: int, *, factory: bool = False) -> list[str]:
    """The uvicorn command line shared by every target (uvloop + httptools, WS sans-I/O)."""
    argv = [sys.executable, "-m", "uvicorn", app, "--host", "127.0.0.1", "--port", str(port)]
    argv += ["--ws-max-size", "1048576", "--log-level", "warning", "--no-access-log"]
    argv += ["--timeout-graceful-shutdown", "3"]
    return [*argv, "--factory"] if factory else argv
