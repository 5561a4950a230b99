"""The README's browser example (EventSource, then the WebSocket) on a page of another origin, in Chromium.

The page is the README's block as written, with the service's URL in place of http://127.0.0.1:8000. It works
when its origin is in ``SERVICE_ALLOWED_ORIGINS``, and a page on an origin that is not gets no answer.
"""

from __future__ import annotations

from collections.abc import AsyncIterator
from pathlib import Path
from typing import Any

import pytest
import pytest_asyncio
from playwright.async_api import Browser, Page, expect

from tests.support.live_server import ServiceProcess, serve
from tests.support.readme import readme_block

pytestmark = [pytest.mark.browser, pytest.mark.xdist_group("browser"), pytest.mark.asyncio(loop_scope="module")]


@pytest_asyncio.fixture(loop_scope="module")
async def pages(tmp_path: Path) -> AsyncIterator[tuple[str, str]]:
    """The README page at an allowed origin (``localhost``) and at one that is not (``127.0.0.1``)."""
    page: list[bytes] = []

    async def app(scope: dict[str, Any], receive: Any, send: Any) -> None:
        if scope["type"] != "http":
            return
        await send({"type": "http.response.start", "status": 200, "headers": [(b"content-type", b"text/html")]})
        await send({"type": "http.response.body", "body": page[0]})

    async with serve(app, lifespan="off") as url:
        allowed = url.replace("127.0.0.1", "localhost")
        env = {
            "SERVICE_DATABASE_URL": f"sqlite+aiosqlite:///{tmp_path / 'chats.db'}",
            "SERVICE_DEMO_TOKEN_DELAY_MS": "5",
            "SERVICE_ALLOWED_ORIGINS": allowed,
        }
        async with ServiceProcess(env, startup_timeout=60) as service:
            page.append(readme_block("browser").replace("http://127.0.0.1:8000", service.url).encode())
            yield allowed, url


async def test_the_readme_page_streams_over_eventsource_and_websocket_from_an_allowed_origin(
    page: Page, pages: tuple[str, str]
) -> None:
    allowed, _ = pages
    await page.goto(allowed)
    out = page.locator("#out")
    await expect(out).to_contain_text("The tool answered")  # EventSource: the clock's answer
    await expect(out).to_contain_text("The tool answered: 42.")  # then the WebSocket run: calculate 6*7


async def test_a_page_on_an_origin_not_allowed_gets_no_answer(browser: Browser, pages: tuple[str, str]) -> None:
    _, not_allowed = pages
    context = await browser.new_context()
    try:
        page = await context.new_page()
        async with page.expect_event("pageerror") as failure:
            await page.goto(not_allowed)
        assert "Failed to fetch" in str(await failure.value)
        assert await page.locator("#out").text_content() == ""
    finally:
        await context.close()
