"""``UpstreamClient`` builds the same HTTP requests as the openai SDK's ``AsyncOpenAI``, from a template.

The SDK's own client is the reference: for every request the cached path builds, method, URL, headers
(in order), body and extensions must equal what ``AsyncOpenAI._build_request`` makes from the same
options, also for retries (``x-stainless-retry-count``), a per-request timeout, and once the upstream
has set a cookie (then the SDK builds it).
"""

from __future__ import annotations

from typing import Any

import httpx2
import openai
import pytest
from openai._models import FinalRequestOptions

from service.engine.providers import UpstreamClient

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
