"""Logging: structlog's production recipe, with aiohttp's stdlib logs rendered the same way.

One JSON object per line when stderr is not a TTY (what a log pipeline reads from a container),
coloured console lines for a person at a terminal. Modules do ``log = structlog.get_logger()`` at
import time; :func:`configure` decides where it goes. Tests use ``structlog.testing.capture_logs``.
"""

from __future__ import annotations

import contextlib
import logging
import os
import queue
import sys
import threading
import time
from collections.abc import Callable
from typing import Any, TextIO

import structlog
from aiohttp import web
from aiohttp.abc import AbstractAccessLogger
from aiohttp.http_exceptions import HttpProcessingError

from agent.http import redact_urls_in

# Kubelet probes and Prometheus scrapes arrive every few seconds; at info level they would drown
# the few lines that matter during a termination.
QUIET_PATHS = frozenset({"/ready", "/live", "/metrics"})

access_log = structlog.get_logger("prestop.access")

# Lines waiting for a slow reader of the log stream. Beyond this many, new lines are dropped (and
# counted): memory stays bounded and the event loop never waits for a reader.
MAX_PENDING_LINES = 10_000


class LogOutput:
    """The log stream as the agent writes to it: never blocking, never raising.

    A log line must never be able to affect the shutdown. Writing straight to stderr does both:
    a pipe whose reader exited raises ``BrokenPipeError`` inside whatever logged (a phase
    listener in the middle of the trigger, say), and a pipe nobody reads blocks the event loop
    once its 64 KiB buffer is full (probes then go unanswered). So the agent's threads only put
    lines in a bounded queue, and one daemon thread writes them to the stream's file descriptor.
    A line that finds the queue full, or a stream that is closed or broken, is dropped and
    counted (``prestop_log_lines_dropped_total``).
    """

    def __init__(self, stream: TextIO | None, max_pending: int = MAX_PENDING_LINES) -> None:
        self._fd: int | None = None
        self._tty = False
        self._in_memory: TextIO | None = None
        """A stream without a file descriptor (a test's capture, a StringIO): written to
        directly, it cannot block."""
        try:
            if stream is not None:
                self._tty = stream.isatty()
                self._fd = stream.fileno()
        except (OSError, ValueError):  # closed (2>&-), or not a real file
            self._fd = None
            if stream is not None and not getattr(stream, "closed", False):
                self._in_memory = stream
        self._pending: queue.Queue[str] = queue.Queue(maxsize=max_pending)
        self.dropped = 0
        self.on_drop: Callable[[], None] | None = None
        """Called once per dropped line (the agent counts them in its metrics)."""
        self.broken: str | None = None
        """Why the stream can no longer be written to (its reader is gone), once it is."""
        self._writer = threading.Thread(target=self._write_lines, name="log-writer", daemon=True)
        self._direct = False
        """No writer thread (none could start: memory or thread limits): each line is written
        by its caller, errors still caught; only a stalled reader can then slow the agent."""
        if self._fd is not None:
            try:
                self._writer.start()
            except RuntimeError:
                self._direct = True

    def isatty(self) -> bool:
        return self._tty

    def write(self, text: str) -> int:
        if self._in_memory is not None:
            try:
                self._in_memory.write(text)
            except (OSError, ValueError):  # closed meanwhile
                self._drop()
            return len(text)
        if self._fd is None or self.broken is not None:
            self._drop()
            return len(text)
        if self._direct:
            self._write(text)
            return len(text)
        try:
            self._pending.put_nowait(text)
        except queue.Full:
            self._drop()
        return len(text)

    def flush(self) -> None:
        """Nothing to do here: the writer thread writes each line as it comes."""

    def drain(self, timeout: float) -> bool:
        """Wait up to ``timeout`` seconds for the pending lines to be written (at exit); True
        when they were."""
        deadline = time.monotonic() + timeout
        while self._pending.unfinished_tasks and self.broken is None and self._fd is not None:
            if time.monotonic() >= deadline:
                return False
            time.sleep(0.01)
        return True

    def _drop(self) -> None:
        self.dropped += 1
        if self.on_drop is not None:
            # A counter that fails must not fail the caller.
            with contextlib.suppress(Exception):
                self.on_drop()

    def _write_lines(self) -> None:
        while True:
            text = self._pending.get()
            try:
                self._write(text)
            finally:
                self._pending.task_done()

    def _write(self, text: str) -> None:
        if self.broken is not None or self._fd is None:
            self._drop()
            return
        data = text.encode("utf-8", "backslashreplace")
        try:
            while data:
                written = os.write(self._fd, data)
                data = data[written:]
        except OSError as exc:  # EPIPE (the reader exited), EBADF, ENOSPC...
            self.broken = f"{type(exc).__name__}: {exc.strerror or exc}"
            self._drop()


# The same line this many times within REPEAT_WINDOW_SECONDS is enough; later ones are counted
# and the count is carried by the first line of that kind let through once the window is over.
# Under descriptor exhaustion asyncio logs "socket.accept() out of system resource" for every
# pending connection: thousands of lines (megabytes) a second, burying the termination's own.
REPEAT_WINDOW_SECONDS = 10.0
REPEATS_SHOWN = 20


class RepeatLimit:
    """Per kind of line (event name, or a stdlib message's first line): at most REPEATS_SHOWN
    per window; the rest are dropped and counted, and the count is summarised."""

    def __init__(self, clock: Callable[[], float] = time.monotonic) -> None:
        self._clock = clock
        self._lock = threading.Lock()
        self._windows: dict[str, tuple[float, int, int]] = {}
        """key -> (window start, lines shown in it, lines suppressed in it)"""

    def admit(self, key: str) -> tuple[bool, int]:
        """(show this line?, how many of its kind were suppressed in the window before)."""
        now = self._clock()
        with self._lock:
            start, shown, suppressed = self._windows.get(key, (now, 0, 0))
            if now - start >= REPEAT_WINDOW_SECONDS:
                self._windows[key] = (now, 1, 0)
                return True, suppressed
            if shown < REPEATS_SHOWN:
                self._windows[key] = (start, shown + 1, suppressed)
                return True, 0
            self._windows[key] = (start, shown, suppressed + 1)
            if len(self._windows) > 10_000:  # bounded, whatever the keys
                self._windows.clear()
            return False, 0


_repeats = RepeatLimit()


def _limit_repeats(_: Any, __: str, event_dict: dict[str, Any]) -> dict[str, Any]:
    """structlog's side of :class:`RepeatLimit`."""
    # An access line's kind is its path and status too: one noisy path cannot hide another.
    kind = (event_dict.get("event"), event_dict.get("path"), event_dict.get("status"))
    key = " ".join(str(part) for part in kind if part is not None)[:200]
    show, suppressed = _repeats.admit(key)
    if not show:
        raise structlog.DropEvent
    if suppressed:
        event_dict["repeats_suppressed"] = suppressed
    return event_dict


def _limit_stdlib_repeats(record: logging.LogRecord) -> bool:
    """The stdlib's side (asyncio's and aiohttp's lines)."""
    key = f"{record.name}: {str(record.msg).splitlines()[0] if record.msg else ''}"[:200]
    show, suppressed = _repeats.admit(key)
    if show and suppressed:
        record.msg = (
            f"{record.msg} ({suppressed} more like this in the last {REPEAT_WINDOW_SECONDS:g}s)"
        )
    return show


_output: LogOutput | None = None


def output() -> LogOutput | None:
    """The log output :func:`configure` set up (None before it ran)."""
    return _output


def write_pending(timeout: float) -> None:
    """Before the process exits: give the queued lines up to ``timeout`` seconds to be written."""
    if _output is not None:
        _output.drain(timeout)


def configure(log_format: str = "auto", level: str = "info", stream: TextIO | None = None) -> None:
    """Route structlog and the stdlib loggers (aiohttp's) to ``stream`` (stderr by default; a
    closed stderr discards the lines) in one format, through a :class:`LogOutput`."""
    global _output
    stream = LogOutput(stream if stream is not None else sys.stderr)
    _output = stream
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
        processors=[
            _limit_repeats,
            *shared,
            structlog.processors.StackInfoRenderer(),
            *exceptions,
            _redact_urls,
            renderer,
        ],
        wrapper_class=structlog.make_filtering_bound_logger(numeric_level),
        logger_factory=structlog.WriteLoggerFactory(stream),  # type: ignore[arg-type]
        cache_logger_on_first_use=True,
    )

    handler = logging.StreamHandler(stream)  # type: ignore[arg-type]
    handler.setFormatter(
        structlog.stdlib.ProcessorFormatter(
            foreign_pre_chain=[*shared, structlog.stdlib.add_logger_name, *exceptions],
            processors=[
                structlog.stdlib.ProcessorFormatter.remove_processors_meta,
                _redact_urls,
                renderer,
            ],
        )
    )
    handler.addFilter(_quiet_bad_requests)
    handler.addFilter(_limit_stdlib_repeats)
    root = logging.getLogger()
    root.handlers[:] = [handler]
    root.setLevel(numeric_level)


def _redact_urls(_: Any, __: str, event_dict: dict[str, Any]) -> dict[str, Any]:
    """Last line of defence: a URL in any text field (an exception's message quoting a request's
    URL, say) loses its password and query string before the line is written."""
    for key, value in event_dict.items():
        if isinstance(value, str) and "://" in value:
            event_dict[key] = redact_urls_in(value)
    return event_dict


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
