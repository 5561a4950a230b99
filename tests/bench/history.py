"""CPU per run as a chat grows: ``uv run python -m tests.bench.history [--runs 700]`` (``just bench-history``).

The service (``python -m service`` on a free 127.0.0.1 port, a fresh SQLite file, the demo model with
no token delay) answers runs one after the other in one chat, over SSE (``POST .../runs/stream``);
every 100 runs it prints the service process's CPU per run for the chat's length at the time. The
scenarios of ``just bench`` start every run on a fresh chat, so they do not show what a run's start
costs per message of history (decision 78). ``--profile FILE`` samples the last 200 runs with py-spy
(raw folded stacks).
"""

from __future__ import annotations

import argparse
import os
import socket
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import httpx

ROOT = Path(__file__).resolve().parents[2]


def _free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return int(sock.getsockname()[1])


def _cpu_s(pid: int) -> float:
    fields = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()
    return (int(fields[11]) + int(fields[12])) / os.sysconf("SC_CLK_TCK")


def main() -> None:
    """Run the chat and print the figures."""
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--runs", type=int, default=700, help="runs in the chat (two messages each)")
    parser.add_argument("--profile", type=Path, help="py-spy's folded stacks of the last 200 runs go here")
    args = parser.parse_args()
    port = _free_port()
    with tempfile.TemporaryDirectory() as tmp:
        env = {
            **os.environ,
            "SERVICE_PORT": str(port),
            "SERVICE_DATABASE_URL": f"sqlite:///{tmp}/chats.db",
            "SERVICE_DEMO_TOKEN_DELAY_MS": "0",
            "SERVICE_LOG_LEVEL": "warning",
        }
        service = subprocess.Popen([sys.executable, "-m", "service"], cwd=ROOT, env=env, stdout=subprocess.DEVNULL)
        try:
            _chat(service.pid, f"http://127.0.0.1:{port}", args.runs, args.profile)
        finally:
            service.terminate()
            service.wait(10)


def _chat(pid: int, url: str, runs: int, profile: Path | None) -> None:
    with httpx.Client(base_url=url, timeout=30) as client:
        deadline = time.monotonic() + 30
        while True:
            try:
                client.get("/healthz").raise_for_status()
                break
            except httpx.HTTPError:
                if time.monotonic() > deadline:
                    raise
                time.sleep(0.1)
        chat = client.post("/v1/chats", json={}).json()["id"]
        spy: subprocess.Popen[bytes] | None = None
        started = _cpu_s(pid)
        for run in range(runs):
            if profile is not None and run == max(0, runs - 200):
                argv = ["py-spy", "record", "-p", str(pid), "-r", "200", "-f", "raw", "-o", str(profile)]
                spy = subprocess.Popen(argv)  # noqa: S603 - our own argv, py-spy from the PATH
                time.sleep(1)
            answer = client.post(f"/v1/chats/{chat}/runs/stream", json={"message": f"question {run} " * 5})
            if "run.completed" not in answer.text:
                raise SystemExit(f"run {run} did not complete: {answer.text[-300:]}")
            if (run + 1) % 100 == 0:
                now = _cpu_s(pid)
                print(
                    f"messages {2 * (run - 99)}-{2 * (run + 1)}: {(now - started) * 10:.2f} ms CPU per run", flush=True
                )
                started = now
        if spy is not None:
            spy.send_signal(2)
            spy.wait(30)
        stored = len(client.get(f"/v1/chats/{chat}").json()["messages"])
        if stored != 2 * runs:
            raise SystemExit(f"the chat holds {stored} messages, not {2 * runs}")


if __name__ == "__main__":
    main()
