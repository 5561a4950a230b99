"""The JSON log format (``SERVICE_LOG_FORMAT=json``): Litestar's structlog plugin.

Every line of the service, Litestar, uvicorn (its server and access logs) and the libraries is one
JSON object: ``event`` (the message), ``level``, ``logger``, ``timestamp``, and the fields the line
carries (a run's: ``run_id``, ``chat_id``, ``model``, ``subject``; see :mod:`service.logs`).
"""

from __future__ import annotations

import logging
from typing import Any, Literal

import structlog
from litestar.logging.config import LoggingConfig, StructlogEventFilter, StructLoggingConfig
from litestar.plugins.structlog import StructlogConfig, StructlogPlugin

from service.logs import redact_event

LogFormat = Literal["text", "json"]
_UVICORN_LOGGERS = ("uvicorn", "uvicorn.access")
"""uvicorn's loggers with handlers of their own (``uvicorn.error`` propagates to ``uvicorn``)."""


_SHARED: list[Any] = [
    structlog.contextvars.merge_contextvars,
    structlog.stdlib.add_log_level,
    structlog.stdlib.add_logger_name,
    structlog.processors.TimeStamper(fmt="iso", utc=True),
]
"""What every line gets: the context's fields (a run's), level, logger name, time (UTC)."""


def json_formatter() -> structlog.stdlib.ProcessorFormatter:
    """The formatter of every line: one JSON object, redacted (extras and tracebacks included)."""
    return structlog.stdlib.ProcessorFormatter(
        foreign_pre_chain=[*_SHARED, structlog.stdlib.ExtraAdder(), StructlogEventFilter(["color_message"])],
        processors=[
            structlog.stdlib.ProcessorFormatter.remove_processors_meta,
            structlog.processors.format_exc_info,
            redact_event,
            structlog.processors.JSONRenderer(),
        ],
    )


def logging_plugins(log_format: LogFormat, level: str) -> list[StructlogPlugin]:
    """Litestar's structlog plugin for the JSON format; none for the text format (Litestar's ``LoggingConfig``).

    Records are formatted where they are logged (the queue handler carries the formatter), so the
    run's context variables are there to be read; a thread writes the lines. uvicorn's loggers are
    taken over while they have handlers (``--no-access-log`` leaves the access log without any).
    """
    if log_format != "json":
        return []
    stdlib = LoggingConfig(root={"level": level.upper(), "handlers": ["queue_listener"]})
    stdlib.formatters = {"standard": {"()": json_formatter}, "message": {"format": "%(message)s"}}
    stdlib.handlers["queue_listener"]["formatter"] = "standard"
    stdlib.handlers["console"]["formatter"] = "message"  # the queue handler's output, as it is
    for name in _UVICORN_LOGGERS:
        if logging.getLogger(name).handlers:
            stdlib.loggers[name] = {"handlers": ["queue_listener"], "propagate": False}
    logging.captureWarnings(True)
    structured = StructLoggingConfig(
        processors=[*_SHARED, structlog.stdlib.ProcessorFormatter.wrap_for_formatter],
        logger_factory=structlog.stdlib.LoggerFactory(),
        wrapper_class=structlog.stdlib.BoundLogger,
        standard_lib_logging_config=stdlib,
        pretty_print_tty=False,
    )
    return [StructlogPlugin(StructlogConfig(structlog_logging_config=structured, enable_middleware_logging=False))]
