"""Log lines: secrets kept out of every one, and the text or JSON format (``SERVICE_LOG_FORMAT``).

Redaction happens at the making of each log record.

Log lines come from the service, Litestar, uvicorn (its access log writes each request's path and
query), httpx2 (``HTTP Request: POST <url>`` at INFO) and the MCP client, through handlers that
a deployment may configure itself (``--log-config``). So redaction does not sit in one handler:
:func:`install_redaction` wraps the record factory, and every record of every logger has its message (and
its traceback text) redacted once, when it is made, before any handler or formatter sees it.

Redacted: credentials in URLs (``scheme://user:password@``), secret-looking query parameters
(``token``, ``access_token``, ``api_key``, ``key``, ``sig``, ...), ``Bearer`` credentials, JWTs,
``sk-`` style API keys, and the exact values the service was configured with (upstream API keys,
JWT and stream-token secrets, MCP header values, passwords in the database and Redis URLs).

Lines about a run carry its fields: those logged inside the run's task through structlog's context
variables (:func:`bind_run`), the others as ``extra`` (:func:`run_fields`). The JSON format
(:mod:`service.log_format`) shows them; it redacts each line once more as a whole
(:func:`redact_event`: extras, and tracebacks, which structlog renders from the exception itself).
"""

from __future__ import annotations

import logging
import re
import threading
from collections.abc import Iterable, MutableMapping
from typing import Any
from urllib.parse import urlsplit

import structlog
from sse_starlette.sse import SendTimeoutError

MASK = "***"

_PATTERNS: tuple[tuple[re.Pattern[str], str], ...] = (
    # scheme://user:password@host -> scheme://***@host
    (re.compile(r"(?P<scheme>\b[a-zA-Z][a-zA-Z0-9+.-]*://)[^\s/?#@]+@"), rf"\g<scheme>{MASK}@"),
    # ?token=... &api_key=... (query strings, form bodies)
    (
        re.compile(
            r"(?P<name>[?&;](?:token|access_token|refresh_token|id_token|api[_-]?key|key|secret|password|"
            r"sig|signature|code)=)[^&#\s\"']+",
            re.IGNORECASE,
        ),
        rf"\g<name>{MASK}",
    ),
    (re.compile(r"(?P<scheme>\b(?:Bearer|Basic)\s+)[A-Za-z0-9._~+/=-]+", re.IGNORECASE), rf"\g<scheme>{MASK}"),
    (re.compile(r"\beyJ[A-Za-z0-9_-]{4,}\.[A-Za-z0-9_-]{4,}\.[A-Za-z0-9_-]*"), MASK),
    (re.compile(r"\bsk-[A-Za-z0-9_-]{8,}"), f"sk-{MASK}"),
)

_MIN_SECRET_CHARS = 6
"""Configured values shorter than this are not masked by value (they would mask ordinary words)."""

_secrets: set[str] = set()
_secret_pattern: re.Pattern[str] | None = None
_lock = threading.Lock()
_installed = False


def redact(text: str) -> str:
    """``text`` with credentials and the configured secrets replaced by ``***``."""
    if _secret_pattern is not None:
        text = _secret_pattern.sub(MASK, text)
    for pattern, replacement in _PATTERNS:
        text = pattern.sub(replacement, text)
    return text


def add_secrets(values: Iterable[str | None]) -> None:
    """Mask these exact values wherever they appear in a log line (of a URL, only its password)."""
    global _secret_pattern
    with _lock:
        for value in values:
            if not value:
                continue
            secret = _url_password(value) if "://" in value else value
            if secret and len(secret) >= _MIN_SECRET_CHARS:
                _secrets.add(secret)
        if _secrets:
            # Longest first, so that a secret containing another is masked whole.
            alternatives = sorted(_secrets, key=len, reverse=True)
            _secret_pattern = re.compile("|".join(re.escape(s) for s in alternatives))


def install_redaction() -> None:
    """Redact every log record made from now on in this process (idempotent)."""
    global _installed
    with _lock:
        if _installed:
            return
        _installed = True
        make_record = logging.getLogRecordFactory()

        def redacting_record(*args: Any, **kwargs: Any) -> logging.LogRecord:
            record = make_record(*args, **kwargs)
            _redact_record(record)
            return record

        logging.setLogRecordFactory(redacting_record)


def _redact_record(record: logging.LogRecord) -> None:
    # Arguments are redacted one by one, not merged into the message: formatters may read them
    # (uvicorn's access formatter unpacks the client, method, path, version and status).
    if isinstance(record.msg, str):
        record.msg = redact(record.msg)
    elif record.msg is not None:
        record.msg = _redacted(record.msg)
    if isinstance(record.args, tuple):
        record.args = tuple(_redacted(arg) for arg in record.args)
    elif isinstance(record.args, dict):
        record.args = {key: _redacted(arg) for key, arg in record.args.items()}
    if record.exc_info and not record.exc_text:
        record.exc_text = redact(logging.Formatter().formatException(record.exc_info))
    if record.stack_info:
        record.stack_info = redact(record.stack_info)


class _Redacted:
    """Stands for a log argument whose ``str`` or ``repr`` held a secret."""

    __slots__ = ("_repr", "_str")

    def __init__(self, text: str, representation: str) -> None:
        self._str, self._repr = text, representation

    def __str__(self) -> str:
        return self._str

    def __repr__(self) -> str:
        return self._repr


def _redacted(arg: object) -> object:
    if arg is None or isinstance(arg, (bool, int, float)):
        return arg
    if isinstance(arg, str):
        return redact(arg)
    text, representation = str(arg), repr(arg)
    clean_text, clean_repr = redact(text), redact(representation)
    if clean_text == text and clean_repr == representation:
        return arg
    return _Redacted(clean_text, clean_repr)


def _url_password(value: str) -> str | None:
    try:
        return urlsplit(value).password
    except ValueError:
        return None


def run_fields(run_id: str, chat_id: str, model: str, subject: str | None) -> dict[str, str]:
    """The fields of every log line about a run (``subject`` empty with auth off)."""
    return {"run_id": run_id, "chat_id": chat_id, "model": model, "subject": subject or ""}


def bind_run(run_id: str, chat_id: str, model: str, subject: str | None) -> None:
    """Give every line logged from now on in this task (and the tasks it starts) the run's fields.

    Call it first thing in the run's own task: a task runs in a copy of its creator's context, so
    the binding ends with the run.
    """
    structlog.contextvars.bind_contextvars(**run_fields(run_id, chat_id, model, subject))


def redact_event(_: object, __: str, event: MutableMapping[str, Any]) -> MutableMapping[str, Any]:
    """A structlog processor: every string value of the line redacted."""
    for key, value in event.items():
        if isinstance(value, str):
            event[key] = redact(value)
    return event


class _DroppedStreamFilter(logging.Filter):
    """Leaves out the ASGI server's traceback for a stream dropped after its send timeout (its WARNING says it)."""

    def filter(self, record: logging.LogRecord) -> bool:
        exc = record.exc_info[1] if record.exc_info else None
        while exc is not None:  # Litestar re-raises it as the cause of "Exception caught after response started"
            if isinstance(exc, SendTimeoutError):
                return False
            exc = exc.__cause__
        return True


_DROPPED_STREAM_FILTER = _DroppedStreamFilter()


def quiet_dropped_streams() -> None:
    """A client that stopped reading is one WARNING line, not uvicorn's "Exception in ASGI application" (idempotent).

    The stream's own WARNING (logger ``service.sse``, in ``service.api.streaming``) names the path and
    the timeout; uvicorn still closes the connection, as it does for any response that ends with an
    exception.
    """
    server_log = logging.getLogger("uvicorn.error")
    if _DROPPED_STREAM_FILTER not in server_log.filters:
        server_log.addFilter(_DROPPED_STREAM_FILTER)
