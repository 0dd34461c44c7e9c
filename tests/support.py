"""Helpers shared by the test suite."""

from __future__ import annotations

import os
import socket

import pytest


def skip_or_fail(reason: str) -> None:
    """Skip locally when a tool is missing; under CI=true every such skip is a failure."""
    if os.environ.get("CI", "").lower() == "true":
        pytest.fail(f"required for CI: {reason}")
    pytest.skip(reason)


def free_port(host: str = "127.0.0.1") -> int:
    """A TCP port nobody listens on right now."""
    family = socket.AF_INET6 if ":" in host else socket.AF_INET
    with socket.socket(family, socket.SOCK_STREAM) as sock:
        sock.bind((host, 0))
        return sock.getsockname()[1]
