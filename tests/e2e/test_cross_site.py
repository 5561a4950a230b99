"""A page on another origin cannot create chats with a form (Chromium; the service refuses non-JSON bodies)."""

from __future__ import annotations

import asyncio
from collections.abc import AsyncIterator
from typing import Any

import httpx
import pytest
import pytest_asyncio
from playwright.async_api import Page

from tests.support.live_server import ServiceProcess, serve

pytestmark = [pytest.mark.browser, pytest.mark.xdist_group("browser"), pytest.mark.asyncio(loop_scope="module")]


def attacker_page(target: str) -> bytes:
    # text/plain sends `{"system": "pwned", "x": "="}`: a body that parses as JSON, with no CORS preflight.
    return f"""<!doctype html><html><body>
<form id="f" method="post" enctype="text/plain" action="{target}/v1/chats">
<input name='{{"system": "pwned", "x": "' value='"}}'></form>
<script>document.getElementById("f").submit()</script></body></html>""".encode()


@pytest_asyncio.fixture(loop_scope="module")
async def attacker(service: ServiceProcess) -> AsyncIterator[str]:
    page = attacker_page(service.url)

    async def app(scope: dict[str, Any], receive: Any, send: Any) -> None:
        if scope["type"] != "http":
            return
        await send({"type": "http.response.start", "status": 200, "headers": [(b"content-type", b"text/html")]})
        await send({"type": "http.response.body", "body": page})

    async with serve(app, lifespan="off") as url:
        yield url.replace("127.0.0.1", "localhost")  # another origin than the service's


async def test_a_cross_site_text_plain_form_creates_no_chat(page: Page, attacker: str, api: httpx.AsyncClient) -> None:
    before = {c["id"] for c in (await api.get("/v1/chats", params={"limit": 100})).json()["items"]}
    async with page.expect_response(lambda r: r.url.endswith("/v1/chats") and r.request.method == "POST") as posted:
        await page.goto(attacker)
    response = await posted.value
    assert response.status == 415
    await asyncio.sleep(0)  # nothing else is pending: the form posted once
    after = (await api.get("/v1/chats", params={"limit": 100})).json()["items"]
    assert {c["id"] for c in after} == before
    assert all(c["system"] != "pwned" for c in after)
