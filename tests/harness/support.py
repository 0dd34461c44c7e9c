"""Helpers shared by the test suite."""

from __future__ import annotations

import json
import os
import signal
import socket
import subprocess
import sys
import time
import urllib.error
import urllib.parse
import urllib.request
from collections.abc import Callable
from pathlib import Path
from typing import Any

import pytest


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


class AgentProcess:
    """The real ``prestop-agent`` as a child process on a free loopback port, logs to a file."""

    def __init__(self, env: dict[str, str], log_path: Path, *, port: int | None = None) -> None:
        self.port = port or free_port()
        self.url = f"http://127.0.0.1:{self.port}"
        self.log_path = log_path
        self._env = {
            "PATH": os.environ.get("PATH", "/usr/bin:/bin"),
            "PRESTOP_HOST": "127.0.0.1",
            "PRESTOP_PORT": str(self.port),
            "PRESTOP_LOG_FORMAT": "json",
            # A port nothing listens on, unless the test says otherwise: after a classic
            # termination the agent waits for the app's listener to go, and port 8080 may be
            # someone else's on a shared machine.
            "PRESTOP_APP_PORT": str(free_port()),
            **env,
        }
        self.proc: subprocess.Popen[bytes] | None = None

    def start(self, preexec_fn: Callable[[], object] | None = None) -> float:
        """Start the process (``preexec_fn`` runs in the child first: resource limits);
        return the monotonic time it was started at."""
        log = self.log_path.open("wb")
        started = time.monotonic()
        self.proc = subprocess.Popen(
            [sys.executable, "-m", "agent.cli"],
            env=self._env,
            stdout=log,
            stderr=subprocess.STDOUT,
            preexec_fn=preexec_fn,
        )
        log.close()
        return started

    def wait_ready(self, timeout: float = 10.0) -> float:
        """Poll /ready until 200; return the monotonic time it first answered 200."""
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            assert self.proc is not None and self.proc.poll() is None, self.log_text()
            try:
                with urllib.request.urlopen(f"{self.url}/ready", timeout=1) as response:
                    if response.status == 200:
                        return time.monotonic()
            except (OSError, urllib.error.HTTPError):
                pass
            time.sleep(0.005)
        raise AssertionError(f"agent not ready within {timeout}s:\n{self.log_text()}")

    def run(self) -> AgentProcess:
        """Start it and wait until /ready answers 200."""
        self.start()
        self.wait_ready()
        return self

    def signal(self, signum: int) -> None:
        assert self.proc is not None
        self.proc.send_signal(signum)

    def log_text(self) -> str:
        return self.log_path.read_text(errors="replace") if self.log_path.exists() else ""

    def log_events(self) -> list[dict[str, Any]]:
        """Every log line, parsed: the test fails if one is not JSON."""
        return [json.loads(line) for line in self.log_text().splitlines() if line.strip()]

    def stop(self) -> None:
        if self.proc is not None and self.proc.poll() is None:
            self.proc.kill()
            self.proc.wait(timeout=10)


class PrometheusServer:
    """A real Prometheus on a free loopback port, with the given configuration, logging to a file
    in ``workdir``; use it as a context manager (stopped with SIGTERM on exit)."""

    def __init__(self, binary: str, config: str, workdir: Path) -> None:
        self.port = free_port()
        self.url = f"http://127.0.0.1:{self.port}"
        self.log_path = workdir / "prometheus.log"
        config_path = workdir / "prometheus.yml"
        config_path.write_text(config)
        self._command = [
            binary,
            f"--config.file={config_path}",
            f"--storage.tsdb.path={workdir / 'prometheus-data'}",
            f"--web.listen-address=127.0.0.1:{self.port}",
        ]
        self.proc: subprocess.Popen[bytes] | None = None

    def __enter__(self) -> PrometheusServer:
        with self.log_path.open("wb") as log:
            self.proc = subprocess.Popen(self._command, stdout=log, stderr=subprocess.STDOUT)
        return self

    def __exit__(self, *exc_info: object) -> None:
        assert self.proc is not None
        self.proc.send_signal(signal.SIGTERM)
        self.proc.wait(timeout=20)

    def query(self, expr: str) -> list[dict[str, Any]]:
        """The instant query's result vector; [] while the server is not up yet."""
        url = f"{self.url}/api/v1/query?{urllib.parse.urlencode({'query': expr})}"
        try:
            with urllib.request.urlopen(url, timeout=10) as response:
                body = json.loads(response.read())
        except urllib.error.HTTPError as error:
            if error.code == 503:  # still starting (TSDB not ready): slow on a loaded machine
                return []
            raise AssertionError(f"{expr}: {error.code} {error.read()!r}") from None
        except OSError:
            return []
        assert body["status"] == "success", body
        return body["data"]["result"]

    def log_tail(self) -> str:
        return self.log_path.read_text(errors="replace")[-2000:]
