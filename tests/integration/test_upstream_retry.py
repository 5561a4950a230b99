"""An upstream error the SDK retries leaves nothing behind: the answer, and the next run on the pooled
connection, arrive byte for byte (the SDK closes a response it retries without reading its body)."""

from __future__ import annotations

from typing import Any

import pytest

from tests.integration.conftest import ServiceFactory, text_of
from tests.support.upstream import finish, status, text

ANSWER = "The quick brown fox jumps over the lazy dog"
NEXT = "and the next answer on the same connection"
FAILURES = [
    pytest.param(status(500, body=b'{"error": {"message": "boom"}}'), id="500-no-trailing-newline"),
    pytest.param(status(500, body=b'{"error": {"message": "boom"}}\n'), id="500-trailing-newline"),
    pytest.param(status(429, {"retry-after": "1"}), id="429-retry-after"),
    pytest.param(status(503, {"retry-after-ms": "20"}, body=b"data: not an event\n\n"), id="503-sse-looking-body"),
]


async def stored_answer(service: Any, chat: str) -> str:
    messages = (await service.http.get(f"/v1/chats/{chat}")).json()["messages"]
    return str(messages[-1]["content"])


@pytest.mark.parametrize("failure", FAILURES)
async def test_a_retried_upstream_error_leaves_both_answers_intact(make_service: ServiceFactory, failure: Any) -> None:
    service = await make_service(upstream_max_retries=2)
    service.upstream.enqueue(failure)
    service.upstream.enqueue(text(ANSWER, pieces=6), finish())
    service.upstream.enqueue(text(NEXT, pieces=5), finish())
    chat = await service.create_chat()

    first = await service.stream_run(chat, "hi")
    assert [e["type"] for e in first][-1] == "run.completed"
    assert text_of(first) == ANSWER
    assert await stored_answer(service, chat) == ANSWER

    second = await service.stream_run(chat, "again")
    assert text_of(second) == NEXT
    assert await stored_answer(service, chat) == NEXT
    assert len(service.upstream.requests) == 3  # one failure, its retry, the next run
