"""Browser fixtures: the real service in a subprocess and Debian's chromium driven by Playwright.

Nothing is downloaded: the browser is ``/usr/bin/chromium`` (``apt-get install chromium``), never
``playwright install``. Without it the browser tests skip with that reason, except under CI
(``CI=true``), where they fail.

The service and the browser are started once per module (start-up costs seconds); each test gets a
fresh browser context, so its sessionStorage is its own. Every async fixture here runs on the
module's event loop (``loop_scope="module"``), the loop the browser belongs to.
"""

from __future__ import annotations

import os
from collections.abc import AsyncIterator
from pathlib import Path

import httpx
import pytest
import pytest_asyncio
from playwright.async_api import Browser, Page, async_playwright, expect

from tests.support.live_server import ServiceProcess

CHROMIUM = Path("/usr/bin/chromium")
CHROMIUM_ARGS = [
    "--no-sandbox",
    "--disable-gpu",
    "--disable-background-networking",
    "--disable-component-update",
    "--disable-sync",
    "--no-first-run",
    "--disable-quic",
]
DEMO_TOKEN_DELAY_MS = 60
"""Slow enough to reload or stop mid-answer, fast enough that a short answer takes about a second."""
EXPECT_TIMEOUT_MS = 15_000
"""How long `expect(...)` polls: longer than the slowest demo answer (~5 s) with room for a busy machine."""
SSE_RETRY_MS = 1000
"""The lowest ``retry:`` the service accepts; keeps EventSource reconnects (S3) to a second each."""


expect.set_options(timeout=EXPECT_TIMEOUT_MS)


def pytest_configure(config: pytest.Config) -> None:
    # xdist registers this marker itself; under `-p no:xdist` --strict-markers would reject it.
    config.addinivalue_line("markers", "xdist_group(name): run the group's tests on one xdist worker")


@pytest.fixture(scope="session")
def chromium_path() -> Path:
    """Debian's chromium, or a skip (a failure under CI=true) naming what is missing."""
    if CHROMIUM.exists():
        return CHROMIUM
    reason = f"{CHROMIUM} is missing (apt-get install chromium); Playwright browsers are never downloaded"
    if os.environ.get("CI") == "true":
        pytest.fail(f"{reason}; CI requires it", pytrace=False)
    pytest.skip(reason)


@pytest_asyncio.fixture(scope="module", loop_scope="module")
async def service(tmp_path_factory: pytest.TempPathFactory) -> AsyncIterator[ServiceProcess]:
    """The service under uvicorn in a subprocess, with the demo model and its own SQLite file."""
    database = tmp_path_factory.mktemp("browser") / "chats.db"
    env = {
        "SERVICE_DATABASE_URL": f"sqlite+aiosqlite:///{database}",
        "SERVICE_DEMO_TOKEN_DELAY_MS": str(DEMO_TOKEN_DELAY_MS),
        "SERVICE_SSE_RETRY_MS": str(SSE_RETRY_MS),
        "SERVICE_LOG_LEVEL": "warning",
    }
    async with ServiceProcess(env, startup_timeout=60) as proc:
        yield proc


@pytest_asyncio.fixture(scope="module", loop_scope="module")
async def browser(chromium_path: Path) -> AsyncIterator[Browser]:
    """Headless Debian chromium."""
    async with async_playwright() as playwright:
        browser = await playwright.chromium.launch(executable_path=str(chromium_path), args=CHROMIUM_ARGS)
        try:
            yield browser
        finally:
            await browser.close()


@pytest_asyncio.fixture(loop_scope="module")
async def page(browser: Browser) -> AsyncIterator[Page]:
    """A page in a fresh context; an uncaught script error in it fails the test."""
    context = await browser.new_context(viewport={"width": 1100, "height": 760})
    page = await context.new_page()
    page.set_default_timeout(20_000)
    errors: list[str] = []
    page.on("pageerror", lambda exc: errors.append(str(exc)))
    try:
        yield page
    finally:
        await context.close()
    assert errors == [], f"uncaught errors in the page: {errors}"


@pytest_asyncio.fixture(loop_scope="module")
async def api(service: ServiceProcess) -> AsyncIterator[httpx.AsyncClient]:
    """An HTTP client for the service's API (to read what was stored)."""
    async with httpx.AsyncClient(base_url=service.url, timeout=10) as client:
        yield client
