"""The demo page against a service with auth on, in Chromium: a pasted token, stream tokens, its CSP.

The service runs with ``SERVICE_AUTH=jwt`` (HS256 under a test secret); the token is made here with
PyJWT. What the page sends is recorded from the browser's side (every request and WebSocket URL,
every console message), so a bearer token in a URL or a script the CSP refused fails the test.
"""

from __future__ import annotations

from collections.abc import AsyncIterator
from urllib.parse import parse_qsl, urlsplit

import httpx
import pytest
import pytest_asyncio
from playwright.async_api import Page, expect

from tests.e2e.conftest import DEMO_TOKEN_DELAY_MS, SSE_RETRY_MS
from tests.e2e.test_browser import TRANSPORTS, CuttingProxy, current_chat, last_run_id, send
from tests.support.auth import AUDIENCE, ISSUER, SECRET, hs256
from tests.support.live_server import ServiceProcess

pytestmark = [pytest.mark.browser, pytest.mark.xdist_group("browser"), pytest.mark.asyncio(loop_scope="module")]

STREAM_TOKEN_TTL_S = 1


@pytest_asyncio.fixture(scope="module", loop_scope="module")
async def service(tmp_path_factory: pytest.TempPathFactory) -> AsyncIterator[ServiceProcess]:
    database = tmp_path_factory.mktemp("page-auth") / "chats.db"
    env = {
        "SERVICE_DATABASE_URL": f"sqlite+aiosqlite:///{database}",
        "SERVICE_DEMO_TOKEN_DELAY_MS": str(DEMO_TOKEN_DELAY_MS),
        "SERVICE_SSE_RETRY_MS": str(SSE_RETRY_MS),
        "SERVICE_LOG_LEVEL": "warning",
        "SERVICE_AUTH": "jwt",
        "SERVICE_JWT_SECRET": SECRET,
        "SERVICE_JWT_AUDIENCE": AUDIENCE,
        "SERVICE_JWT_ISSUER": ISSUER,
        "SERVICE_STREAM_TOKEN_TTL_S": str(STREAM_TOKEN_TTL_S),
    }
    async with ServiceProcess(env, startup_timeout=60) as proc:
        yield proc


class Seen:
    """What the page asked for and what the console said."""

    def __init__(self, page: Page) -> None:
        self.urls: list[str] = []
        self.console: list[str] = []
        page.on("request", lambda request: self.urls.append(request.url))
        page.on("websocket", lambda ws: self.urls.append(ws.url))
        page.on("console", lambda message: self.console.append(f"{message.type}: {message.text}"))


async def paste_token(page: Page, token: str) -> None:
    if await page.get_by_test_id("access").get_attribute("open") is None:
        await page.get_by_test_id("access-summary").click()
    await page.get_by_test_id("token").fill(token)
    await page.get_by_test_id("token").press("Enter")  # the page reloads
    await expect(page.get_by_test_id("access-summary")).to_have_text("Access token (set)")
    await expect(page.locator("body")).to_have_attribute("data-ready", "true")


@pytest.mark.parametrize("transport", TRANSPORTS)
async def test_the_page_works_with_auth_on_through_stream_tokens(
    page: Page, service: ServiceProcess, transport: str
) -> None:
    seen = Seen(page)
    bearer = hs256("alice")
    response = await page.goto(f"{service.url}/")
    assert response is not None
    csp = response.headers["content-security-policy"]
    assert "script-src 'self'" in csp
    assert "unsafe-inline" not in csp
    await expect(page.locator("body")).to_have_attribute("data-ready", "true")
    # Without a token the page says what it needs and opens the token field.
    await expect(page.get_by_test_id("error")).to_contain_text("needs an access token")
    await expect(page.get_by_test_id("access")).to_have_attribute("open", "")

    await paste_token(page, bearer)
    await send(page, "Tell me about streaming with a token", transport)
    await expect(page.get_by_test_id("status")).to_have_text("completed")

    answer = await page.get_by_test_id("answer").text_content()
    chat_id, run_id = await current_chat(page), await last_run_id(page)
    headers = {"authorization": f"Bearer {bearer}"}
    async with httpx.AsyncClient(base_url=service.url, headers=headers) as api:
        chat = (await api.get(f"/v1/chats/{chat_id}")).json()
    stored = "".join(m["content"] or "" for m in chat["messages"] if m["run_id"] == run_id and m["role"] == "assistant")
    assert answer == stored
    assert answer.endswith("You said: Tell me about streaming with a token")

    streams = [u for u in seen.urls if "/events?" in u or u.startswith("ws://")]
    assert streams, seen.urls
    assert all("token=" in u for u in streams), streams  # stream tokens, minted for them
    assert not [u for u in seen.urls if bearer in u]  # the bearer token never in a URL
    host = service.url.removeprefix("http://")
    assert all(u.split("/")[2] == host for u in seen.urls), seen.urls  # nothing from another host
    assert not [m for m in seen.console if "Content Security Policy" in m or "Refused to" in m], seen.console


async def test_eventsource_reconnects_with_a_fresh_stream_token(page: Page, service: ServiceProcess) -> None:
    """Stream tokens live 1 s here; each cut comes later than that, so a reconnect must mint anew."""
    message = " ".join(f"token{i}" for i in range(100))  # ~110 chunks at 60 ms: about 7 s
    async with CuttingProxy(service.port, cuts=2, cut_after=6000) as proxy:
        await page.goto(f"{proxy.url}/")
        await paste_token(page, hs256("bob"))
        await send(page, message, "sse")
        await expect(page.get_by_test_id("status")).to_have_text("completed", timeout=30_000)
        streams = proxy.event_requests()

    assert [r["cut"] for r in streams][:3] == [True, True, False], streams
    assert all(r["status"] == 200 for r in streams), streams
    tokens = [_query(r["target"])["token"] for r in streams]
    assert len(set(tokens)) == len(tokens)  # one stream token per connection
    text = await page.get_by_test_id("answer").text_content()
    assert text is not None
    assert text.endswith(f"You said: {message}")


def _query(target: str) -> dict[str, str]:
    return dict(parse_qsl(urlsplit(target).query))
