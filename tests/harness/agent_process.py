"""The agent as a real process: ``prestop-agent`` (``python -m agent.cli`` of this environment)
on a loopback port, its log in a file."""

from __future__ import annotations

import json
import os
import subprocess
import sys
import time
import urllib.error
import urllib.request
from collections.abc import Callable
from pathlib import Path
from typing import Any

from tests.harness.support import free_port


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

    def wait_ready(self, timeout: float = 30.0) -> float:
        """Poll /ready until 200; return the monotonic time it first answered 200. The bound only
        says when to give up: the agent is ready in well under a second, but eight of them
        starting at once beside a cluster's rollout on two cores have taken over 10 s."""
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
