"""A real Prometheus server: the scrapes, rules and dashboard queries of k8s/monitoring/ run
against it."""

from __future__ import annotations

import json
import signal
import subprocess
import urllib.error
import urllib.parse
import urllib.request
from pathlib import Path
from typing import Any

from tests.harness.support import free_port


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
