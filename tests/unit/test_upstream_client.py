"""``UpstreamClient`` builds the same HTTP requests as the openai SDK's ``AsyncOpenAI``, from a template.

The SDK's own client is the reference: for every request the cached path builds, method, URL, headers
(in order), body and extensions must equal what ``AsyncOpenAI._build_request`` makes from the same
options, also for retries (``x-stainless-retry-count``), a per-request timeout, and once the upstream
has set a cookie (then the SDK builds it). ``stream_post`` sends what the SDK's ``post`` sends, through the
SDK's retries, and ``UpstreamHttpClient``'s direct send answers as httpx2's ``send`` does.
"""

from __future__ import annotations

import datetime
import logging
from typing import Any

import httpx2
import openai
import pytest
from openai._models import FinalRequestOptions

from service.engine.providers import UpstreamClient, UpstreamHttpClient
from tests.support.log_records import recorded

BASE_URL = "http://127.0.0.1:9/v1"


def clients(**kwargs: Any) -> tuple[openai.AsyncOpenAI, UpstreamClient]:
    reference = openai.AsyncOpenAI(base_url=BASE_URL, api_key="k", **kwargs)
    return reference, UpstreamClient(base_url=BASE_URL, api_key="k", **kwargs)


def options(content: bytes, **extra: Any) -> FinalRequestOptions:
    return FinalRequestOptions.construct(method="post", url="/chat/completions", content=content, **extra)


def same(a: httpx2.Request, b: httpx2.Request) -> None:
    assert (a.method, str(a.url), a.headers.raw, a.content, a.extensions) == (
        b.method,
        str(b.url),
        b.headers.raw,
        b.content,
        b.extensions,
    )


@pytest.mark.parametrize("kwargs", [{}, {"timeout": 12.5}, {"default_headers": {"x-team": "a"}}])
def test_cached_requests_equal_the_sdks(kwargs: dict[str, Any]) -> None:
    reference, client = clients(**kwargs)
    bodies = [b'{"model":"m","messages":[]}', b'{"model":"m","messages":[{"role":"user","content":"hi"}]}', b"{}"]
    for retries in (0, 1, 0, 2):
        for body in bodies:
            same(
                reference._build_request(options(body), retries_taken=retries),
                client._build_request(options(body), retries_taken=retries),
            )
    assert len(client._templates) == 3  # one per retry count, whatever the body
    per_request = options(b"{}", timeout=httpx2.Timeout(3.0))
    same(reference._build_request(per_request), client._build_request(per_request))
    same(reference._build_request(per_request), client._build_request(per_request))


def test_what_a_template_cannot_stand_for_is_built_by_the_sdk() -> None:
    reference, client = clients()
    client._build_request(options(b"{}"))  # a template exists
    with_headers = options(b"{}", headers={"x-extra": "1"})
    same(reference._build_request(with_headers), client._build_request(with_headers))
    as_json = FinalRequestOptions.construct(method="post", url="/chat/completions", json_data={"model": "m"})
    same(reference._build_request(as_json), client._build_request(as_json))
    for c in (reference, client):
        c._client.cookies.set("session", "abc", domain="127.0.0.1")
    cookie = client._build_request(options(b"{}"))
    same(reference._build_request(options(b"{}")), cookie)
    assert cookie.headers["cookie"] == "session=abc"


class Recorder(httpx2.AsyncBaseTransport):
    """Answers each request with the next of ``answers`` (status, headers), recording what was sent."""

    def __init__(self, *answers: tuple[int, list[tuple[str, str]]]) -> None:
        self.answers = list(answers)
        self.sent: list[httpx2.Request] = []

    async def handle_async_request(self, request: httpx2.Request) -> httpx2.Response:
        self.sent.append(request)
        status, headers = self.answers.pop(0) if self.answers else (200, [])
        return httpx2.Response(status, headers=headers, stream=httpx2.ByteStream(b"data: [DONE]\n\n"))


def upstream_client(transport: Recorder, http_client: type[httpx2.AsyncClient], **kwargs: Any) -> UpstreamClient:
    return UpstreamClient(base_url=BASE_URL, api_key="k", http_client=http_client(transport=transport), **kwargs)


def wire(request: httpx2.Request) -> tuple[object, ...]:
    return request.method, str(request.url), request.headers.raw, request.content, request.extensions


async def test_stream_post_sends_what_post_sends_and_keeps_the_sdks_retries() -> None:
    body = b'{"model":"m","messages":[]}'
    answers = [(503, []), (429, [("retry-after-ms", "1")]), (200, [])]
    by_post, by_stream_post = Recorder(*answers), Recorder(*answers)
    client = upstream_client(by_post, openai.DefaultAsyncHttpxClient, max_retries=2)
    fast = upstream_client(by_stream_post, UpstreamHttpClient, max_retries=2)
    for _ in range(2):  # the second time from the templates
        response = await client.post(
            "/chat/completions", cast_to=httpx2.Response, content=body, options={"idempotency_key": "r-0"}, stream=True
        )
        fast_response = await fast.stream_post("/chat/completions", body, "r-0")
        assert (fast_response.status_code, fast_response.request) == (200, by_stream_post.sent[-1])
        await response.aclose()
        await fast_response.aclose()
        by_post.answers, by_stream_post.answers = list(answers), list(answers)
    assert [r.headers["x-stainless-retry-count"] for r in by_stream_post.sent] == ["0", "1", "2"] * 2
    assert [wire(r) for r in by_stream_post.sent] == [wire(r) for r in by_post.sent]
    by_stream_post.answers = [(500, [])] * 3
    with pytest.raises(openai.APIStatusError) as failed:  # the SDK's typed error, after its retries
        await fast.stream_post("/chat/completions", body, "r-1")
    assert (failed.value.status_code, len(by_stream_post.sent)) == (500, 9)


async def test_the_direct_send_answers_as_httpx2s_send(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(logging.getLogger("httpx2"), "level", logging.INFO)
    cookie, redirect = ("set-cookie", "session=abc; Path=/"), ("location", f"{BASE_URL}/elsewhere")
    answers = [(200, [cookie]), (307, [redirect]), (200, [])]
    results: list[tuple[object, ...]] = []
    for http_client in (httpx2.AsyncClient, UpstreamHttpClient):
        transport = Recorder(*answers)
        client = http_client(transport=transport, follow_redirects=True)
        with recorded("httpx2") as lines:
            first = await client.send(client.build_request("POST", f"{BASE_URL}/a", content=b"{}"), stream=True)
            await first.aclose()
            redirected = await client.send(client.build_request("POST", f"{BASE_URL}/b", content=b"{}"))
        results.append(
            (
                first.request is transport.sent[0],
                first.elapsed > datetime.timedelta(0),
                first.default_encoding,
                dict(client.cookies),
                [str(r.url) for r in transport.sent],
                redirected.status_code,
                redirected.read(),
                [r.status_code for r in redirected.history],
                lines.messages(),
            )
        )
    assert results[0] == results[1]
    assert results[1][3:5] == ({"session": "abc"}, [f"{BASE_URL}/a", f"{BASE_URL}/b", f"{BASE_URL}/elsewhere"])
