"""Issue 17 item 4: chats and runs take the common sampling parameters, and the upstream gets them as sent.

``temperature``, ``top_p``, ``max_tokens``, ``stop`` and ``seed`` are validated (400 / an ``error`` frame
naming the field), stored with the chat, overridden one by one by a run's own, and written into the
upstream's request body unchanged, over HTTP and over the WebSocket. Those never set are not sent.
"""

from __future__ import annotations

import json
from typing import Any

import pytest
import websockets

from tests.integration.conftest import Service

SAMPLING = ("temperature", "top_p", "max_tokens", "stop", "seed")
CHAT = {"temperature": 0.25, "top_p": 0.5, "max_tokens": 64, "stop": ["END", "##"], "seed": 1234567890123}
RUN = {"temperature": 1.75, "stop": "STOP"}


def sent(service: Service, n: int) -> dict[str, Any]:
    """The sampling parameters in the upstream's ``n``-th chat request body."""
    body = service.upstream.requests[n].body
    return {name: body[name] for name in SAMPLING if name in body}


async def test_a_chats_parameters_are_stored_and_sent_as_given(service: Service) -> None:
    chat = await service.create_chat(**CHAT)
    stored = (await service.http.get(f"/v1/chats/{chat}")).json()
    assert {name: stored[name] for name in SAMPLING} == CHAT

    await service.stream_run(chat, "hi")
    await service.ws_run(chat, "again")
    assert sent(service, 0) == sent(service, 1) == CHAT


async def test_a_runs_parameters_override_the_chats_one_by_one_on_both_transports(service: Service) -> None:
    chat = await service.create_chat(**CHAT)
    await service.stream_run(chat, {"message": "hi", **RUN})
    await service.ws_run(chat, "again", **RUN)
    await service.stream_run(chat, {"message": "and the chat's", "temperature": None})
    assert sent(service, 0) == sent(service, 1) == {**CHAT, **RUN}
    assert sent(service, 2) == CHAT  # null is "not set": the chat's value goes


async def test_parameters_never_set_are_not_sent(service: Service) -> None:
    chat = await service.create_chat()
    stored = (await service.http.get(f"/v1/chats/{chat}")).json()
    assert {name: stored[name] for name in SAMPLING} == dict.fromkeys(SAMPLING)
    await service.stream_run(chat, "hi")
    await service.ws_run(chat, "hi", seed=0, max_tokens=1)
    assert sent(service, 0) == {}
    assert sent(service, 1) == {"seed": 0, "max_tokens": 1}


INVALID = [
    ({"temperature": 3}, "temperature"),
    ({"temperature": -0.1}, "temperature"),
    ({"top_p": 0}, "top_p"),
    ({"top_p": 1.5}, "top_p"),
    ({"max_tokens": 0}, "max_tokens"),
    ({"max_tokens": 10_000_000}, "max_tokens"),
    ({"max_tokens": 1.5}, "max_tokens"),
    ({"stop": ["a", "b", "c", "d", "e"]}, "stop"),
    ({"stop": [""]}, "stop[0]"),
    ({"stop": 5}, "stop"),
    ({"seed": "x"}, "seed"),
]


@pytest.mark.parametrize(("values", "field"), INVALID, ids=[json.dumps(v) for v, _ in INVALID])
async def test_an_invalid_value_is_refused_naming_the_field(
    service: Service, values: dict[str, Any], field: str
) -> None:
    chat = await service.create_chat()
    errors = []
    for path, body in [("/v1/chats", values), (f"/v1/chats/{chat}/runs", {"message": "hi", **values})]:
        response = await service.http.post(path, json=body)
        assert response.status_code == 400, response.text
        errors.append(response.json()["error"])
    async with websockets.connect(service.ws_url) as ws:
        frame = {"type": "run.create", "client_ref": "w", "chat_id": chat, "message": "hi", **values}
        await ws.send(json.dumps(frame))
        errors.append(json.loads(await ws.recv()))
    assert errors[2]["type"] == "error"
    assert [(e["code"], e["detail"]["field"]) for e in errors] == [("invalid_request", field)] * 2 + [
        ("invalid_frame", field)
    ]
    for error in errors:
        assert "unknown field" not in error["message"]  # the value is refused, not the parameter
    assert service.upstream.requests == []


async def test_the_edges_of_the_ranges_are_accepted(service: Service) -> None:
    edges = {"temperature": 2, "top_p": 1, "max_tokens": 1_000_000, "stop": ["a", "b", "c", "d"], "seed": -(2**63)}
    chat = await service.create_chat(temperature=0, max_tokens=1, seed=2**63 - 1)
    await service.stream_run(chat, {"message": "hi", **edges})
    assert sent(service, 0) == edges
