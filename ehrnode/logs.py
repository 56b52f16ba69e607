"""Structured logs: one JSON object per line on stdout, or readable lines on a terminal.

Every line has ``event`` (a stable name such as ``peer.connected`` or
``block.committed``), ``level``, ``timestamp`` and the context bound with
:mod:`structlog.contextvars` (``node``, ``peer``, ...). Libraries that log
through the standard ``logging`` module (trio-websocket) are routed through
the same renderer, so every line has one format. When stdout is the systemd
journal (``JOURNAL_STREAM`` set), each line starts with a ``<N>`` syslog
priority so ``journalctl -p err`` works.
"""

from __future__ import annotations

import logging
import os
import sys
from typing import Any

import structlog

_PRIORITY = {"debug": 7, "info": 6, "warning": 4, "error": 3, "critical": 2}


def configure(level: str = "info", *, json_output: bool | None = None, stream: Any = None) -> None:
    stream = stream or sys.stdout
    if json_output is None:
        json_output = not (hasattr(stream, "isatty") and stream.isatty())
    journald = bool(os.environ.get("JOURNAL_STREAM"))
    shared: list[Any] = [
        structlog.contextvars.merge_contextvars,
        structlog.processors.add_log_level,
        structlog.processors.TimeStamper(fmt="iso", utc=True),
    ]
    renderer: Any
    if json_output:
        renderer = structlog.processors.JSONRenderer()
        shared.append(structlog.processors.dict_tracebacks)
    else:
        renderer = structlog.dev.ConsoleRenderer(colors=False)

    def render(logger: Any, method: str, event_dict: Any) -> str:
        level_name = event_dict.get("level", "info")
        line = renderer(logger, method, event_dict)
        return f"<{_PRIORITY.get(level_name, 6)}>{line}" if journald else line

    numeric = getattr(logging, level.upper(), logging.INFO)
    structlog.configure(
        processors=[*shared, render],
        wrapper_class=structlog.make_filtering_bound_logger(numeric),
        logger_factory=structlog.PrintLoggerFactory(stream),
        cache_logger_on_first_use=True,
    )
    handler = logging.StreamHandler(stream)
    handler.setFormatter(structlog.stdlib.ProcessorFormatter(
        processors=[structlog.stdlib.ProcessorFormatter.remove_processors_meta, render],
        foreign_pre_chain=[structlog.stdlib.add_log_level, *shared[2:]],
    ))
    root = logging.getLogger()
    root.handlers[:] = [handler]
    # Library chatter (per-frame debug lines) stays out unless asked for.
    root.setLevel(max(numeric, logging.WARNING))


def get_logger(**context: Any) -> Any:
    return structlog.get_logger().bind(**context)
