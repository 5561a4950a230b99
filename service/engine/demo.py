"""The built-in ``demo`` model: an OpenAI-compatible streaming endpoint inside the process.

It is an ``httpx2`` transport handed to ``AsyncOpenAI``, so the demo goes
through exactly the SDK code path a real upstream does, with no key and no
network. (httpx2's ``ASGITransport`` buffers whole responses, which would
defeat streaming, hence a transport of its own.) Deterministic: the answer
depends only on the request.

- a ``response_format`` JSON schema: a JSON object built from the schema,
  streamed in small, awkwardly split pieces;
- "refuse" in the message: a refusal;
- "time"/"clock" with the ``clock`` tool offered: a ``clock`` tool call, then
  an answer quoting the tool result;
- "calculate …"/"compute …" with ``calculator`` offered: a calculator call;
- "think" in the message: reasoning deltas before the answer;
- otherwise: a short answer that quotes the message.

Every stream ends with a usage chunk and ``[DONE]``.
"""

from __future__ import annotations

import asyncio
import re
import time
from collections.abc import AsyncIterator
from typing import Any, cast

import httpx2
import msgspec

from service.engine.state import output_schema

_json = msgspec.json.Encoder()


class DemoTransport(httpx2.AsyncBaseTransport):
    """Answers ``/v1/chat/completions`` and ``/v1/models`` like an OpenAI-compatible server."""

    def __init__(self, token_delay_s: float) -> None:
        self._delay = token_delay_s

    async def handle_async_request(self, request: httpx2.Request) -> httpx2.Response:  # noqa: D102
        if request.url.path.endswith("/models"):
            body = {"object": "list", "data": [{"id": "demo", "object": "model", "owned_by": "service"}]}
            return httpx2.Response(200, json=body)
        if not request.url.path.endswith("/chat/completions"):
            return httpx2.Response(404, json={"error": {"message": "not found"}})
        payload: dict[str, Any] = msgspec.json.decode(await request.aread())
        deltas = plan_answer(payload)
        if not payload.get("stream"):
            return httpx2.Response(200, json=_completion(payload, deltas))
        stream = _SseStream(payload, deltas, self._delay)
        return httpx2.Response(200, headers={"content-type": "text/event-stream"}, stream=stream)


class _SseStream(httpx2.AsyncByteStream):
    def __init__(self, payload: dict[str, Any], deltas: list[dict[str, Any]], delay: float) -> None:
        self._payload = payload
        self._deltas = deltas
        self._delay = delay

    async def __aiter__(self) -> AsyncIterator[bytes]:
        created = int(time.time())
        base = {"id": "chatcmpl-demo", "object": "chat.completion.chunk", "created": created, "model": "demo"}
        for delta in self._deltas:
            finish = delta.pop("finish_reason", None)
            yield _frame({**base, "choices": [{"index": 0, "delta": delta, "finish_reason": finish}]})
            if self._delay:
                await asyncio.sleep(self._delay)
        prompt = sum(len(str(m.get("content") or "").split()) for m in self._payload.get("messages", []))
        completion = len(self._deltas)
        usage = {"prompt_tokens": prompt, "completion_tokens": completion, "total_tokens": prompt + completion}
        yield _frame({**base, "choices": [], "usage": usage})
        yield b"data: [DONE]\n\n"


def _frame(obj: object) -> bytes:
    return b"data: " + _json.encode(obj) + b"\n\n"


def _completion(payload: dict[str, Any], deltas: list[dict[str, Any]]) -> dict[str, Any]:
    text = "".join(d.get("content") or "" for d in deltas)
    return {
        "id": "chatcmpl-demo",
        "object": "chat.completion",
        "created": int(time.time()),
        "model": "demo",
        "choices": [{"index": 0, "message": {"role": "assistant", "content": text}, "finish_reason": "stop"}],
    }


def plan_answer(payload: dict[str, Any]) -> list[dict[str, Any]]:
    """The deltas (plus their finish reasons) the demo model streams for a request."""
    messages: list[dict[str, Any]] = payload.get("messages") or []
    last = messages[-1] if messages else {"role": "user", "content": ""}
    tools: list[dict[str, Any]] = payload.get("tools") or []
    offered: set[str] = {t["function"]["name"] for t in tools if t.get("type") == "function"}
    text = _text_of(last.get("content"))
    lowered = text.lower()
    schema = output_schema(payload.get("response_format"))
    if last.get("role") == "tool":
        results = [_text_of(m.get("content")) for m in _trailing_tool_messages(messages)]
        return [*_words(f"The tool answered: {'; '.join(results)}."), {"finish_reason": "stop"}]
    if schema is not None:
        document = _json.encode(sample_from_schema(schema, [_SAMPLE_NODES])).decode()[:_SAMPLE_CHARS]
        step = max(7, len(document) // _SAMPLE_DELTAS)  # at most ~_SAMPLE_DELTAS events, whatever the schema
        return [{"content": document[i : i + step]} for i in range(0, len(document), step)] + [
            {"finish_reason": "stop"}
        ]
    if "refuse" in lowered:
        return [{"refusal": w} for w in _split_words("I can't help with that request.")] + [{"finish_reason": "stop"}]
    call = _tool_call_for(lowered, text, offered)
    if call is not None:
        return call
    deltas: list[dict[str, Any]] = []
    if "think" in lowered:
        deltas += [{"reasoning_content": w} for w in _split_words("The user wants me to think. Let me answer.")]
    answer = f"Hello! I am the demo model, answering offline. You said: {text.strip() or '(nothing)'}"
    return deltas + _words(answer) + [{"finish_reason": "stop"}]


def _tool_call_for(lowered: str, text: str, offered: set[str]) -> list[dict[str, Any]] | None:
    if "calculator" in offered and (match := re.search(r"(?:calculate|compute)\s+(.+)", text, re.IGNORECASE)):
        name, arguments = "calculator", _json.encode({"expression": match.group(1).strip(" ?.")}).decode()
    elif "clock" in offered and ("time" in lowered or "clock" in lowered):
        name, arguments = "clock", '{"timezone": "UTC"}'
    else:
        return None
    head = {"tool_calls": [{"index": 0, "id": "call_demo_0", "type": "function", "function": {"name": name}}]}
    pieces = [arguments[i : i + 4] for i in range(0, len(arguments), 4)]
    tail = [{"tool_calls": [{"index": 0, "function": {"arguments": p}}]} for p in pieces]
    return [head, *tail, {"finish_reason": "tool_calls"}]


def _trailing_tool_messages(messages: list[dict[str, Any]]) -> list[dict[str, Any]]:
    tail: list[dict[str, Any]] = []
    for message in reversed(messages):
        if message.get("role") != "tool":
            break
        tail.append(message)
    return list(reversed(tail))


def _text_of(content: object) -> str:
    if isinstance(content, str):
        return content
    if isinstance(content, list):
        return " ".join(str(p.get("text", "")) for p in content if isinstance(p, dict))  # type: ignore[misc]
    return ""


def _split_words(text: str) -> list[str]:
    return re.findall(r"\S+\s*", text)


def _words(text: str) -> list[dict[str, Any]]:
    return [{"content": w} for w in _split_words(text)]


_SAMPLE_NODES = 2_000
"""Values the demo builds for one schema at most (arrays stop growing past it)."""
_SAMPLE_ITEMS = 50
"""Items per array at most (``minItems`` beyond it is not met: the run then fails as invalid output)."""
_SAMPLE_CHARS = 65_536
_SAMPLE_DELTAS = 500


def sample_from_schema(schema: dict[str, Any], budget: list[int] | None = None) -> Any:
    """A deterministic value that satisfies a (simple) JSON schema, of at most ``budget[0]`` values."""
    budget = [_SAMPLE_NODES] if budget is None else budget
    budget[0] -= 1
    if "enum" in schema:
        return schema["enum"][0]
    if "const" in schema:
        return schema["const"]
    kind: Any = schema.get("type")
    if isinstance(kind, list):
        kinds = cast("list[str]", kind)
        kind = next((k for k in kinds if k != "null"), "null")
    match kind:
        case "object":
            props: dict[str, Any] = schema.get("properties") or {}
            return {name: sample_from_schema(sub, budget) for name, sub in props.items()}
        case "array":
            count = min(_SAMPLE_ITEMS, max(2, int(schema.get("minItems", 0))))
            return [sample_from_schema(schema.get("items") or {}, budget) for _ in range(count) if budget[0] > 0]
        case "string":
            return "demo"
        case "integer":
            return max(42, int(schema.get("minimum", 0)))
        case "number":
            return 3.5
        case "boolean":
            return True
        case _:
            return None
