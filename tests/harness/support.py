"""Small helpers every part of the harness and most tests use: a free port, polling with a
deadline, the skip that CI turns into a failure, and lines for the run's summary."""

from __future__ import annotations

import os
import socket
import time
from collections.abc import Callable

import pytest

SUMMARY_LINES = pytest.StashKey[list[str]]()
"""Lines a fixture wants at the end of the run (tests/conftest.py prints them, from every xdist
worker): what a passing run would otherwise keep in captured output, e.g. the cluster's set-up
and teardown times."""


def summary_line(config: pytest.Config, line: str) -> None:
    """Print ``line`` in the run's summary, under "prestop-agent suite"."""
    config.stash.setdefault(SUMMARY_LINES, []).append(line)


def skip_or_fail(reason: str) -> None:
    """Skip locally when a tool is missing; under CI=true every such skip is a failure."""
    if os.environ.get("CI", "").lower() == "true":
        pytest.fail(f"required for CI: {reason}")
    pytest.skip(reason)


def wait_for(what: str, check: Callable[[], bool], timeout: float, interval: float = 0.05) -> float:
    """Poll ``check`` until it holds (fail the test after ``timeout``); return how long it took."""
    started = time.monotonic()
    while not check():
        if time.monotonic() - started > timeout:
            pytest.fail(f"not within {timeout} s: {what}")
        time.sleep(interval)
    return time.monotonic() - started


def free_port(host: str = "127.0.0.1") -> int:
    """A TCP port nobody listens on right now."""
    family = socket.AF_INET6 if ":" in host else socket.AF_INET
    with socket.socket(family, socket.SOCK_STREAM) as sock:
        sock.bind((host, 0))
        return sock.getsockname()[1]
