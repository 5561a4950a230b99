"""Node.js packages of the suite: each directory under ``tests/e2e`` pins its own in a lock file.

``npm ci`` installs a directory's packages from its lock file the first time a test needs them (and
again when the lock file changes); nothing is fetched while a test talks to the service. One install
at a time per directory, whatever the xdist worker: on a fresh clone two workers' ``npm ci`` of one
directory raced (``ENOTEMPTY``, then a half-installed ``node_modules``).
"""

from __future__ import annotations

import fcntl
import hashlib
import os
import shutil
import subprocess
import tempfile
from pathlib import Path

import pytest


def run(command: list[str], cwd: Path, timeout: float, env: dict[str, str] | None = None) -> str:
    """Run ``command``; its stdout, or a failed assertion with both of its outputs."""
    result = subprocess.run(  # noqa: S603 - fixed commands
        command, cwd=cwd, capture_output=True, text=True, timeout=timeout, env=env, check=False
    )
    assert result.returncode == 0, (
        f"{' '.join(command)} failed ({result.returncode}):\n{result.stdout}\n{result.stderr}"
    )
    return result.stdout


def node_tools(purpose: str) -> tuple[str, str]:
    """``node`` and ``npm``; without them the test skips, except under CI, where it fails."""
    node, npm = shutil.which("node"), shutil.which("npm")
    if node is None or npm is None:
        reason = f"node and npm are needed for {purpose}"
        if os.environ.get("CI") == "true":
            pytest.fail(f"{reason}; CI requires them", pytrace=False)
        pytest.skip(reason)
    return node, npm


def npm_ci(directory: Path, npm: str) -> None:
    """Install ``directory``'s locked packages unless ``node_modules`` already matches its lock file."""
    lock = directory / "package-lock.json"
    stamp = directory / "node_modules" / ".package-lock.json"
    key = hashlib.sha256(str(directory.resolve()).encode()).hexdigest()[:16]
    with (Path(tempfile.gettempdir()) / f"npm-ci-{key}.lock").open("w") as held:
        fcntl.flock(held, fcntl.LOCK_EX)  # released when the file closes
        if not stamp.exists() or stamp.stat().st_mtime < lock.stat().st_mtime:
            run([npm, "ci", "--no-audit", "--no-fund"], directory, 240)
