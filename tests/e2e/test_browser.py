"""The demo page and native EventSource in a real browser (Debian chromium via Playwright).

The service runs in a subprocess with the demo model (``SERVICE_DEMO_TOKEN_DELAY_MS`` = 60 ms between
chunks, see ``conftest.py``); what the page shows is compared with what the service stored
(``GET /v1/chats/{id}``). The S3 test puts a small TCP proxy between the browser and the service that
cuts the event stream five times mid-run.
"""

from __future__ import annotations

import asyncio
import json
import re
from typing import Any

import httpx
import pytest
from playwright.async_api import Page, Request, WebSocket, expect

from tests.support.live_server import REPO_ROOT, ServiceProcess

pytestmark = [
    pytest.mark.browser,
    pytest.mark.xdist_group("browser"),
    pytest.mark.asyncio(loop_scope="module"),
]

TRANSPORTS = [pytest.param("sse", id="eventsource"), pytest.param("ws", id="websocket")]
ARTIFACTS = REPO_ROOT / "artifacts"
LONG_MESSAGE = " ".join(f"word{i}" for i in range(40))  # the demo echoes it: ~50 chunks, ~3 s
RELOAD_MESSAGE = " ".join(f"word{i}" for i in range(80))  # ~90 chunks, ~5 s: room for a slow reload


# --- helpers -------------------------------------------------------------------------------------


async def open_page(page: Page, service: ServiceProcess) -> None:
    await page.goto(f"{service.url}/")
    await expect(page.locator("body")).to_have_attribute("data-ready", "true")


async def send(page: Page, message: str, transport: str = "sse") -> None:
    await page.get_by_test_id("transport").select_option(transport)
    await page.get_by_test_id("message").fill(message)
    await page.get_by_test_id("send").click()


async def current_chat(page: Page) -> str:
    chat_id = await page.evaluate("sessionStorage.getItem('chat.current')")
    assert isinstance(chat_id, str)
    return chat_id


async def last_run_id(page: Page) -> str:
    run_id = await page.locator("article.assistant").last.get_attribute("data-run-id")
    assert run_id
    return run_id


async def stored_turn(api: httpx.AsyncClient, chat_id: str, run_id: str) -> list[dict[str, Any]]:
    """The stored assistant messages of one run, oldest first."""
    response = await api.get(f"/v1/chats/{chat_id}")
    response.raise_for_status()
    return [m for m in response.json()["messages"] if m["run_id"] == run_id and m["role"] == "assistant"]


async def stored_text(api: httpx.AsyncClient, chat_id: str, run_id: str) -> str:
    return "".join(m["content"] or "" for m in await stored_turn(api, chat_id, run_id))


async def wait_for_words(page: Page, count: int) -> None:
    """Wait until the current answer shows at least ``count`` words (it is mid-stream then)."""
    await page.wait_for_function(
        "n => (document.querySelector('[data-testid=answer]')?.textContent || '').split(' ').length > n", arg=count
    )


# --- the demo page -------------------------------------------------------------------------------


@pytest.mark.parametrize("transport", TRANSPORTS)
async def test_full_answer_equals_stored_message(
    page: Page, service: ServiceProcess, api: httpx.AsyncClient, transport: str
) -> None:
    await open_page(page, service)
    await send(page, "Tell me about streaming, token by token please", transport)

    status, answer = page.get_by_test_id("status"), page.get_by_test_id("answer")
    await wait_for_words(page, 2)
    partial = await answer.text_content()
    await expect(status).to_have_text("completed")

    text = await answer.text_content()
    assert partial
    assert text
    assert text.startswith(partial)
    assert len(partial) < len(text)  # seen mid-stream: it streamed
    chat_id, run_id = await current_chat(page), await last_run_id(page)
    assert text == await stored_text(api, chat_id, run_id)
    assert text.endswith("You said: Tell me about streaming, token by token please")
    assert (await api.get(f"/v1/runs/{run_id}")).json()["status"] == "completed"


@pytest.mark.parametrize("transport", TRANSPORTS)
async def test_reload_mid_answer_shows_complete_text_once(
    page: Page, service: ServiceProcess, api: httpx.AsyncClient, transport: str
) -> None:
    resumes: list[int] = []  # the `after` each resume asked for

    def on_request(request: Request) -> None:
        if match := re.search(r"/v1/runs/[^/]+/events\?after=(\d+)", request.url):
            resumes.append(int(match.group(1)))

    def on_websocket(socket: WebSocket) -> None:
        def on_frame(payload: str | bytes) -> None:
            frame = json.loads(payload)
            if frame.get("type") == "run.resume":
                resumes.append(frame["after"])

        socket.on("framesent", on_frame)

    page.on("request", on_request)
    page.on("websocket", on_websocket)
    await open_page(page, service)
    await send(page, RELOAD_MESSAGE, transport)
    await wait_for_words(page, 8)
    resumes.clear()

    await page.reload()
    await expect(page.locator("body")).to_have_attribute("data-ready", "true")
    await expect(page.get_by_test_id("status")).to_have_text("running")  # resumed, not finished yet
    await expect(page.get_by_test_id("status")).to_have_text("completed")

    assert resumes, "the page did not resume the run"
    assert resumes[0] > 1, f"the page did not resume after what it had rendered: {resumes}"
    text = await page.get_by_test_id("answer").text_content()
    chat_id, run_id = await current_chat(page), await last_run_id(page)
    assert text == await stored_text(api, chat_id, run_id)
    assert text is not None
    assert text.count("You said:") == 1
    assert text.count("word79") == 1
    await expect(page.locator("article.assistant")).to_have_count(1)
    await expect(page.locator("article.user")).to_have_count(1)


@pytest.mark.parametrize("transport", TRANSPORTS)
async def test_stop_cancels_the_run(
    page: Page, service: ServiceProcess, api: httpx.AsyncClient, transport: str
) -> None:
    await open_page(page, service)
    await send(page, LONG_MESSAGE, transport)
    await wait_for_words(page, 3)
    await page.get_by_test_id("stop").click()

    await expect(page.get_by_test_id("status")).to_have_text("cancelled")
    await expect(page.get_by_test_id("stop")).to_be_disabled()
    chat_id, run_id = await current_chat(page), await last_run_id(page)
    assert (await api.get(f"/v1/runs/{run_id}")).json()["status"] == "cancelled"
    [partial] = await stored_turn(api, chat_id, run_id)
    assert partial["status"] == "cancelled"
    text = await page.get_by_test_id("answer").text_content()
    assert text == partial["content"]
    assert "word39" not in text


async def test_model_output_is_shown_as_text_never_as_html(page: Page, service: ServiceProcess) -> None:
    """ACCEPTANCE X5: markup in model text (the demo echoes it, split across chunks) stays text."""
    payload = (
        "<img src=x onerror=window.__xss=1> <script>window.__xss=2</script> "
        "<a href=javascript:window.__xss=3>link</a> ![i](http://198.51.100.7/pixel.png) <b>bo</b>ld"
    )
    requested: list[str] = []
    page.on("request", lambda request: requested.append(request.url))
    await open_page(page, service)
    await send(page, payload)
    await expect(page.get_by_test_id("status")).to_have_text("completed")

    for when in ("streamed", "re-rendered from the store after a reload"):
        answer = page.get_by_test_id("answer")
        await expect(answer).to_contain_text(f"You said: {payload}")
        for tag in ("img", "script", "a", "b"):
            await expect(answer.locator(tag)).to_have_count(0)
        assert await page.evaluate("document.querySelectorAll('img').length") == 0, when
        assert await page.evaluate("typeof window.__xss") == "undefined", when
        await page.reload()
        await expect(page.locator("body")).to_have_attribute("data-ready", "true")
    host = service.url.removeprefix("http://")
    assert [u for u in requested if u.split("/")[2] != host] == []  # nothing fetched from another host


async def test_tool_calls_reasoning_refusal_and_structured_output(
    page: Page, service: ServiceProcess, api: httpx.AsyncClient
) -> None:
    await open_page(page, service)

    await send(page, "What time is it?")
    tools = page.get_by_test_id("tool-calls")
    await expect(tools.locator(".tool-name")).to_have_text("clock")
    await expect(tools.locator(".tool-args")).to_have_text('{"timezone": "UTC"}')
    await expect(tools.locator(".tool-result")).to_contain_text('"timezone":"UTC"')
    await expect(page.get_by_test_id("status")).to_have_text("completed")
    await expect(page.get_by_test_id("answer")).to_contain_text("The tool answered:")

    await send(page, "think about it")
    await expect(page.get_by_test_id("reasoning")).to_contain_text("The user wants me to think.")
    await expect(page.get_by_test_id("status")).to_have_text("completed")

    await send(page, "please refuse this")
    await expect(page.get_by_test_id("refusal")).to_have_text("I can't help with that request.")
    await expect(page.get_by_test_id("status")).to_have_text("completed")

    schema = {
        "type": "object",
        "properties": {"city": {"type": "string"}, "population": {"type": "integer"}, "districts": {"type": "array"}},
        "required": ["city", "population", "districts"],
    }
    await page.locator("details.options summary").click()
    await page.get_by_test_id("schema").fill(json.dumps(schema))
    await send(page, "Describe a city")
    output = page.get_by_test_id("output")
    await expect(output).to_have_attribute("data-final", "false")  # partial objects are growing
    ARTIFACTS.mkdir(exist_ok=True)
    await page.screenshot(path=ARTIFACTS / "page-mid-stream.png")
    await expect(output).to_have_attribute("data-final", "true")
    await expect(page.get_by_test_id("status")).to_have_text("completed")

    chat_id, run_id = await current_chat(page), await last_run_id(page)
    [message] = await stored_turn(api, chat_id, run_id)
    assert json.loads(await output.locator("pre").text_content() or "") == message["output"]
    assert set(message["output"]) == {"city", "population", "districts"}


@pytest.mark.parametrize("transport", TRANSPORTS)
async def test_errors_are_shown(page: Page, service: ServiceProcess, transport: str) -> None:
    await open_page(page, service)
    await page.locator("details.options summary").click()
    # Not a valid JSON schema: 400 on HTTP, an `error` frame on the WebSocket.
    await page.get_by_test_id("schema").fill('{"type": "nonsense"}')
    await send(page, "hello", transport)
    await expect(page.get_by_test_id("error")).to_contain_text("invalid_request")
    await expect(page.get_by_test_id("status")).to_have_text("failed")
    await expect(page.get_by_test_id("send")).to_be_enabled()

    # A valid schema the demo's answer breaks (it answers 42): the run ends with run.failed.
    schema = {"type": "object", "properties": {"n": {"type": "integer", "maximum": 10}}, "required": ["n"]}
    await page.get_by_test_id("schema").fill(json.dumps(schema))
    await send(page, "a small number", transport)
    await expect(page.get_by_test_id("run-error")).to_contain_text("invalid_output: structured output")
    await expect(page.get_by_test_id("error")).to_contain_text("invalid_output")
    await expect(page.get_by_test_id("status")).to_have_text("failed")


# --- S3: native EventSource through server-side cuts ---------------------------------------------


class CuttingProxy:
    """A TCP proxy on 127.0.0.1 in front of the service that cuts event streams.

    Each connection carries one request (the proxy forwards it with ``Connection: close``). The
    first ``cuts`` responses to ``GET /v1/runs/{id}/events`` are cut after ``cut_after`` bytes: the
    proxy closes both sockets, as a server or a middlebox dropping the stream would. It records
    every request's target, headers and response status.
    """

    def __init__(self, upstream_port: int, *, cuts: int, cut_after: int) -> None:
        self.upstream_port = upstream_port
        self.cuts_left = cuts
        self.cut_after = cut_after
        self.requests: list[dict[str, Any]] = []
        self.server: asyncio.Server | None = None

    @property
    def url(self) -> str:
        assert self.server is not None
        return f"http://127.0.0.1:{self.server.sockets[0].getsockname()[1]}"

    def event_requests(self) -> list[dict[str, Any]]:
        return [r for r in self.requests if "/events" in r["target"]]

    async def __aenter__(self) -> CuttingProxy:
        self.server = await asyncio.start_server(self._handle, "127.0.0.1", 0)
        return self

    async def __aexit__(self, *exc: object) -> None:
        assert self.server is not None
        self.server.close()
        await self.server.wait_closed()

    async def _handle(self, client_reader: asyncio.StreamReader, client_writer: asyncio.StreamWriter) -> None:
        try:
            head = await client_reader.readuntil(b"\r\n\r\n")
        except (asyncio.IncompleteReadError, ConnectionError):
            client_writer.close()
            return
        request_line, *lines = head.decode("latin-1").rstrip("\r\n").split("\r\n")
        headers = {k.strip().lower(): v.strip() for k, v in (line.split(":", 1) for line in lines)}
        record = {"target": request_line.split(" ")[1], "headers": headers, "status": None, "cut": False}
        self.requests.append(record)
        body = await client_reader.readexactly(int(headers.get("content-length", "0")))
        forwarded = [line for line in lines if not line.lower().startswith(("connection:", "keep-alive:"))]
        upstream_head = "\r\n".join([request_line, *forwarded, "Connection: close", "", ""]).encode("latin-1")
        up_reader, up_writer = await asyncio.open_connection("127.0.0.1", self.upstream_port)
        up_writer.write(upstream_head + body)
        budget = self.cut_after if "/events" in record["target"] and self.cuts_left > 0 else None
        try:
            while chunk := await up_reader.read(65536):
                if record["status"] is None:
                    record["status"] = int(chunk.split(b" ", 2)[1])
                if budget is not None and len(chunk) >= budget:
                    client_writer.write(chunk[:budget])
                    await client_writer.drain()
                    record["cut"] = True
                    self.cuts_left -= 1
                    break
                if budget is not None:
                    budget -= len(chunk)
                client_writer.write(chunk)
                await client_writer.drain()
        except ConnectionError:
            pass
        finally:
            up_writer.close()
            client_writer.close()


S3_PAGE_SCRIPT = """
url => {
  const answer = document.createElement("pre");
  answer.id = "answer";
  document.body.replaceChildren(answer);
  const s3 = (window.s3 = { ids: [], errors: [], es: new EventSource(url) });
  s3.es.onmessage = (message) => {
    s3.ids.push(Number(message.lastEventId));
    const event = JSON.parse(message.data);
    if (event.type === "text.delta") answer.append(event.delta);
  };
  // Deliberately no close() on the terminal event: the stream's end makes EventSource reconnect,
  // and that reconnect must get 204, which ends it for good (readyState CLOSED).
  s3.es.onerror = () => s3.errors.push({ lastId: s3.ids.at(-1) ?? null, readyState: s3.es.readyState });
}
"""


async def test_s3_native_eventsource_survives_five_server_cuts(
    page: Page, service: ServiceProcess, api: httpx.AsyncClient
) -> None:
    chat = (await api.post("/v1/chats", json={})).json()
    message = " ".join(f"token{i}" for i in range(150))  # ~160 chunks at 60 ms: the run lasts ~10 s
    async with CuttingProxy(service.port, cuts=5, cut_after=1000) as proxy:
        await page.goto(f"{proxy.url}/healthz")  # any same-origin document will do
        run = (await api.post(f"/v1/chats/{chat['id']}/runs", json={"message": message})).json()
        await page.evaluate(S3_PAGE_SCRIPT, run["events_url"])

        await page.wait_for_function("window.s3.es.readyState === EventSource.CLOSED", timeout=60_000)
        requests_when_closed = len(proxy.requests)
        # ACCEPTANCE S3 asks for 0 further requests in 60 s; 6 s (six times the 1 s `retry:`) keeps the
        # suite fast and is already six reconnect intervals.
        await asyncio.sleep(6)
        assert len(proxy.requests) == requests_when_closed

    s3 = await page.evaluate("({ids: window.s3.ids, errors: window.s3.errors, state: window.s3.es.readyState})")
    finished = (await api.get(f"/v1/runs/{run['id']}")).json()
    last_seq = finished["last_seq"]
    streams = proxy.event_requests()

    assert [r["cut"] for r in streams] == [True] * 5 + [False, False]
    assert [r["status"] for r in streams] == [200] * 6 + [204]
    assert "last-event-id" not in streams[0]["headers"]
    received_before = [e["lastId"] for e in s3["errors"]]
    assert [r["headers"].get("last-event-id") for r in streams[1:]] == [str(i) for i in received_before[:6]]
    assert all(i < last_seq for i in received_before[:5]), "every cut must come before the run's end"
    assert s3["ids"] == list(range(1, last_seq + 1)), "gapless and duplicate-free"
    assert s3["state"] == 2  # EventSource.CLOSED
    assert s3["errors"][-1]["readyState"] == 2
    assert await page.locator("#answer").text_content() == await stored_text(api, chat["id"], run["id"])
