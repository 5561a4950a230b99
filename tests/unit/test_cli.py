"""The command line: ``--help`` lists every setting with its default; ``check-config`` and ``migrate`` exit."""

from __future__ import annotations

import os
import sqlite3
import subprocess
import sys
from pathlib import Path

from service.settings import Settings


def cli(*args: str, cwd: Path, **env: str) -> subprocess.CompletedProcess[str]:
    clean = {key: value for key, value in os.environ.items() if not key.startswith("SERVICE_")}
    return subprocess.run(  # noqa: S603 - this interpreter, fixed arguments
        [sys.executable, "-m", "service", *args],
        cwd=cwd,
        env={**clean, **env},
        capture_output=True,
        text=True,
        timeout=60,
    )


def test_help_lists_every_setting_with_its_default_and_starts_nothing(tmp_path: Path) -> None:
    result = cli("--help", cwd=tmp_path)
    assert result.returncode == 0, result.stderr
    for command in ("serve", "migrate", "check-config", "token"):
        assert command in result.stdout
    for name in Settings.__struct_fields__:
        assert f"SERVICE_{name.upper()}=" in result.stdout, name
    assert "SERVICE_PORT=8000" in result.stdout
    assert "SERVICE_WS_FRAMES_PER_S=500.0\n      Sustained client frames per second per socket." in result.stdout
    assert list(tmp_path.iterdir()) == []  # no server started, no ./service.db made


def test_check_config_names_a_bad_setting_and_exits_1(tmp_path: Path) -> None:
    bad = cli("check-config", cwd=tmp_path, SERVICE_PORT="many")
    assert (bad.returncode, bad.stdout) == (1, "")
    assert "SERVICE_PORT" in bad.stderr
    good = cli("check-config", cwd=tmp_path, SERVICE_DATABASE_URL="postgresql+asyncpg://u:hunter2@db/chat")
    assert good.returncode == 0, good.stderr
    assert "settings are valid" in good.stdout
    assert "hunter2" not in good.stdout
    assert list(tmp_path.iterdir()) == []


def test_migrate_creates_the_schema_and_exits(tmp_path: Path) -> None:
    database = tmp_path / "chat.db"
    result = cli("migrate", cwd=tmp_path, SERVICE_DATABASE_URL=f"sqlite+aiosqlite:///{database}")
    assert result.returncode == 0, result.stderr
    with sqlite3.connect(database) as connection:
        tables = {row[0] for row in connection.execute("SELECT name FROM sqlite_master WHERE type = 'table'")}
    assert {"chats", "messages"} <= tables


def test_the_console_script_is_installed() -> None:
    script = Path(sys.executable).parent / "chat-service"
    assert script.exists()
    result = subprocess.run([str(script), "--help"], capture_output=True, text=True, timeout=60, check=False)  # noqa: S603
    assert result.returncode == 0 and "check-config" in result.stdout
