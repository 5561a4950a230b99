"""Multiprocess metrics: the live gauges of a worker that died without stopping are dropped at the next start."""

from __future__ import annotations

import os
import subprocess
from pathlib import Path

import pytest

from service.metrics import forget_dead_workers


def test_live_gauges_of_dead_processes_are_dropped_and_the_rest_kept(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    gone = _reaped_pid()
    files = [
        f"gauge_livesum_{gone}.db",
        f"gauge_livesum_{os.getpid()}.db",
        f"counter_{gone}.db",
        f"gauge_all_{gone}.db",
    ]
    for name in files:
        (tmp_path / name).write_bytes(b"")
    monkeypatch.setenv("PROMETHEUS_MULTIPROC_DIR", str(tmp_path))

    forget_dead_workers()

    # A dead worker's counters and non-live gauges still count (totals survive it); its live gauges do not.
    assert sorted(p.name for p in tmp_path.iterdir()) == sorted(files[1:])


def _reaped_pid() -> int:
    """The pid of a process that has exited and been reaped."""
    process = subprocess.Popen(["true"])  # noqa: S607 - coreutils' true
    process.wait()
    return process.pid
