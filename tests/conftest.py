"""Shared fixtures: where the real Redis and PostgreSQL servers are.

``SERVICE_TEST_REDIS_URL`` / ``SERVICE_TEST_DATABASE_URL`` name them; when
unset, the local defaults are tried. A test that needs a server that does not
answer is skipped with the reason, except under CI (``CI=true``), where it fails.

The collection checks of ``tests.support.collection`` (unique node ids, ``xdist_group`` that takes
effect) run in every process that collects; ``pytester`` is there to test them.
"""

from __future__ import annotations

import os
import socket
from urllib.parse import urlsplit

import pytest

REDIS_DEFAULT = "redis://127.0.0.1:6379/0"
POSTGRES_DEFAULT = "postgresql+asyncpg://postgres@127.0.0.1:5432/test"

pytest_plugins = ("pytester", "tests.support.collection")


def _reachable(url: str) -> bool:
    parts = urlsplit(url)
    try:
        with socket.create_connection((parts.hostname or "127.0.0.1", parts.port or 0), timeout=0.5):
            return True
    except OSError:
        return False


def _server_url(variable: str, default: str) -> str:
    url = os.environ.get(variable, default)
    if _reachable(url):
        return url
    reason = f"{variable} ({url}) does not answer"
    if os.environ.get("CI") == "true":
        pytest.fail(f"{reason}; CI requires it", pytrace=False)
    pytest.skip(reason)


@pytest.fixture(scope="session")
def redis_url() -> str:
    """URL of the real Redis server for tests (each test uses its own key prefix)."""
    return _server_url("SERVICE_TEST_REDIS_URL", REDIS_DEFAULT)


@pytest.fixture(scope="session")
def postgres_url() -> str:
    """URL of the real PostgreSQL server for tests (each test uses its own schema)."""
    return _server_url("SERVICE_TEST_DATABASE_URL", POSTGRES_DEFAULT)
