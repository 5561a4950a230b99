"""Redaction of log lines: the patterns, configured values, and records as formatters read them."""

from __future__ import annotations

import asyncio
import json
import logging

import pytest
import structlog
from uvicorn.logging import AccessFormatter

from service import logs
from service.log_format import json_formatter
from service.logs import add_secrets, bind_run, install_redaction, redact


@pytest.mark.parametrize(
    ("line", "expected"),
    [
        pytest.param("GET /x?token=abc.def&after=3 HTTP/1.1", "GET /x?token=***&after=3 HTTP/1.1", id="query-token"),
        pytest.param("url=https://u:p4ss@host/v1?api-key=k", "url=https://***@host/v1?api-key=***", id="url"),
        pytest.param("redis://:hunter2@127.0.0.1:6379/0", "redis://***@127.0.0.1:6379/0", id="url-password-only"),
        pytest.param("Authorization: Bearer abc.def-ghi", "Authorization: Bearer ***", id="bearer"),
        pytest.param("key sk-proj-0123456789abcdef", "key sk-***", id="sk-key"),
        pytest.param("jwt eyJhbGciOi.eyJzdWIiOi.c2ln", "jwt ***", id="jwt"),
        pytest.param(
            "at 12:00 about http://host/path?after=3", "at 12:00 about http://host/path?after=3", id="untouched"
        ),
    ],
)
def test_patterns(line: str, expected: str) -> None:
    assert redact(line) == expected


def test_configured_values_are_masked_by_value(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(logs, "_secrets", set())
    monkeypatch.setattr(logs, "_secret_pattern", None)
    add_secrets(["plain-key-123", "short", None, "postgresql://app:db-pass-42@db/chat", "https://host/no-password"])
    assert redact("sent plain-key-123 and db-pass-42, kept short") == "sent *** and ***, kept short"
    assert redact("https://host/no-password") == "https://host/no-password"  # only a URL's password


def test_records_are_redacted_when_made_and_keep_their_arguments() -> None:
    install_redaction()
    install_redaction()  # idempotent: one wrapper
    record = logging.getLogger("uvicorn.access").makeRecord(
        "uvicorn.access",
        logging.INFO,
        __file__,
        1,
        '%s - "%s %s HTTP/%s" %d',
        ("127.0.0.1:5000", "GET", "/v1/runs/r1/events?token=eyJa.eyJb.c2ln", "1.1", 200),
        None,
    )
    # uvicorn's access formatter unpacks the arguments: they stay five, each redacted.
    line = AccessFormatter(fmt="%(message)s", use_colors=False).format(record)
    assert line == '127.0.0.1:5000 - "GET /v1/runs/r1/events?token=*** HTTP/1.1" 200'


def test_an_argument_whose_text_holds_a_secret_is_replaced_in_str_and_repr() -> None:
    install_redaction()

    class Url:
        def __str__(self) -> str:
            return "http://u:pw@h/x"

        def __repr__(self) -> str:
            return "Url('http://u:pw@h/x')"

    record = logging.getLogger("t").makeRecord("t", logging.INFO, __file__, 1, "%s %r", (Url(), Url()), None)
    assert record.getMessage() == "http://***@h/x Url('http://***@h/x')"


def test_tracebacks_are_redacted() -> None:
    install_redaction()
    try:
        raise ValueError("could not reach https://u:pw@host")
    except ValueError as exc:
        record = logging.getLogger("t").makeRecord(
            "t", logging.ERROR, __file__, 1, "failed", None, (type(exc), exc, exc.__traceback__)
        )
    assert "https://***@host" in logging.Formatter().format(record)
    assert "pw@" not in logging.Formatter().format(record)


def test_json_lines_are_redacted_whole_and_carry_the_run_context(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(logs, "_secrets", set())
    monkeypatch.setattr(logs, "_secret_pattern", None)
    install_redaction()
    add_secrets(["configured-key-Hq27Xw"])

    async def logged_in_a_run() -> str:  # a task of its own, as a run is
        bind_run("r1", "c1", "openai/m", None)
        try:
            raise ValueError("upstream said configured-key-Hq27Xw is wrong")
        except ValueError as exc:
            record = logging.getLogger("t").makeRecord(
                "t",
                logging.WARNING,
                __file__,
                1,
                "tool %s raised",
                ("x",),
                (type(exc), exc, exc.__traceback__),
                extra={"detail": "sent Bearer abc.def"},
            )
        return json_formatter().format(record)

    line = json.loads(asyncio.run(logged_in_a_run()))
    assert "ValueError: upstream said *** is wrong" in line.pop("exception")
    assert line.pop("timestamp")
    assert line == {
        "event": "tool x raised",
        "run_id": "r1",
        "chat_id": "c1",
        "model": "openai/m",
        "subject": "",
        "detail": "sent Bearer ***",
        "level": "warning",
        "logger": "t",
    }
    assert structlog.contextvars.get_contextvars() == {}  # the binding ended with the run's task
