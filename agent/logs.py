"""Logging: structlog's production recipe, with aiohttp's stdlib logs rendered the same way.

One JSON object per line when stderr is not a TTY (what a log pipeline reads from a container),
coloured console lines for a person at a terminal. Modules do ``log = structlog.get_logger()`` at
import time; :func:`configure` decides where it goes. Tests use ``structlog.testing.capture_logs``.
"""

from __future__ import annotations

import logging
import sys
from typing import Any, TextIO

import structlog
from aiohttp import web
from aiohttp.abc import AbstractAccessLogger
from aiohttp.http_exceptions import HttpProcessingError

# Kubelet probes and Prometheus scrapes arrive every few seconds; at info level they would drown
# the few lines that matter during a termination.
QUIET_PATHS = frozenset({"/ready", "/live", "/metrics"})

access_log = structlog.get_logger("prestop.access")


def configure(log_format: str = "auto", level: str = "info", stream: TextIO | None = None) -> None:
    """Route structlog and the stdlib loggers (aiohttp's) to ``stream`` in one format."""
    stream = stream if stream is not None else sys.stderr
    as_json = log_format == "json" or (log_format == "auto" and not stream.isatty())
    numeric_level = logging.getLevelNamesMapping()[level.upper()]
    shared: list[Any] = [
        structlog.contextvars.merge_contextvars,
        structlog.processors.add_log_level,
        structlog.processors.TimeStamper(fmt="iso", utc=True),
    ]
    renderer: Any = (
        structlog.processors.JSONRenderer()
        if as_json
        else structlog.dev.ConsoleRenderer(colors=stream.isatty())
    )
    # In JSON, an exception becomes one string field of the event: never a raw multi-line dump.
    exceptions = [structlog.processors.format_exc_info] if as_json else []
    structlog.configure(
        processors=[*shared, structlog.processors.StackInfoRenderer(), *exceptions, renderer],
        wrapper_class=structlog.make_filtering_bound_logger(numeric_level),
        logger_factory=structlog.PrintLoggerFactory(stream),
        cache_logger_on_first_use=True,
    )

    handler = logging.StreamHandler(stream)
    handler.setFormatter(
        structlog.stdlib.ProcessorFormatter(
            foreign_pre_chain=[*shared, structlog.stdlib.add_logger_name, *exceptions],
            processors=[structlog.stdlib.ProcessorFormatter.remove_processors_meta, renderer],
        )
    )
    handler.addFilter(_quiet_bad_requests)
    root = logging.getLogger()
    root.handlers[:] = [handler]
    root.setLevel(numeric_level)


def _quiet_bad_requests(record: logging.LogRecord) -> bool:
    """A malformed request is the client's problem: one warning line, not an error traceback."""
    if record.exc_info and isinstance(record.exc_info[1], HttpProcessingError):
        error = record.exc_info[1]
        record.msg = f"{record.getMessage()}: bad request: {error.message}"
        record.args = None
        record.exc_info = None
        record.exc_text = None
        record.levelno, record.levelname = logging.WARNING, "WARNING"
    return True


class AccessLogger(AbstractAccessLogger):
    """aiohttp's access log as structured events."""

    def log(self, request: web.BaseRequest, response: web.StreamResponse, time: float) -> None:
        # /ready's 503 is its normal answer during a drain (probes keep coming): not news.
        expected = response.status < 500 or (request.path == "/ready" and response.status == 503)
        quiet = request.path in QUIET_PATHS and expected
        emit = access_log.debug if quiet else access_log.info
        emit(
            "http_request",
            method=request.method,
            path=request.path,
            status=response.status,
            duration_seconds=round(time, 4),
            remote=request.remote,
            # Tells a kubelet hook (kube-lifecycle/1.34) or probe (kube-probe/1.34) from a person.
            user_agent=request.headers.get("User-Agent", ""),
        )

    @property
    def enabled(self) -> bool:
        return True
