"""The metrics, checked by the real Prometheus tools: promtool's linter and a scraping server."""

from __future__ import annotations

import shutil
import signal
import socket
import subprocess
import time
import urllib.error
import urllib.parse
import urllib.request
from collections.abc import Callable
from pathlib import Path

import pytest

from tests.harness.agent_process import AgentProcess
from tests.harness.prometheus import PrometheusServer
from tests.harness.support import skip_or_fail


@pytest.fixture
def agent(new_agent: Callable[..., AgentProcess]) -> AgentProcess:
    return new_agent({"PRESTOP_DRAIN_MODE": "fixed", "PRESTOP_DRAIN_SECONDS": "0.5"}).run()


def _need(tool: str) -> str:
    path = shutil.which(tool)
    if path is None:
        skip_or_fail(f"{tool} is not installed (apt-get install prometheus)")
    return path  # type: ignore[return-value]


def _get(url: str) -> tuple[int, bytes]:
    try:
        with urllib.request.urlopen(url, timeout=10) as response:
            return response.status, response.read()
    except urllib.error.HTTPError as error:
        return error.code, error.read()


def test_promtool_finds_nothing_to_lint_after_a_termination(agent: AgentProcess) -> None:
    promtool = _need("promtool")
    assert _get(f"{agent.url}/prestop")[0] == 200
    status, exposition = _get(f"{agent.url}/metrics")
    assert status == 200
    checked = subprocess.run(
        [promtool, "check", "metrics"], input=exposition, capture_output=True, timeout=30
    )
    assert checked.returncode == 0, checked.stdout + checked.stderr
    assert checked.stdout.strip() == b"" and checked.stderr.strip() == b""
    text = exposition.decode()
    for sample in (
        'prestop_hook_calls_total{result="ok"} 1.0',
        'prestop_drains_total{reason="fixed"} 1.0',
        'prestop_shutdown_triggers_total{trigger="prestop"} 1.0',
        'prestop_phase{phase="drained"} 1.0',
        "prestop_drain_duration_seconds_count 1.0",
        'prestop_registry_updates_total{backend="none",result="ok"}',
    ):
        if sample.startswith("prestop_registry_updates_total"):
            assert sample not in text, "no registry, no registry update counted"
        else:
            assert sample in text


def _scraping(agent: AgentProcess) -> str:
    """A Prometheus configuration that scrapes ``agent`` every second."""
    return (
        "global: {scrape_interval: 1s, evaluation_interval: 1s}\n"
        "scrape_configs:\n"
        "- job_name: prestop-agent\n"
        f"  static_configs: [{{targets: ['127.0.0.1:{agent.port}']}}]\n"
    )


def _value_of(server: PrometheusServer, expr: str, want: float, within: float) -> None:
    deadline = time.monotonic() + within
    while time.monotonic() < deadline:
        result = server.query(expr)
        if result and float(result[0]["value"][1]) == want:
            return
        time.sleep(0.25)
    raise AssertionError(f"{expr} never became {want} within {within}s\n{server.log_tail()}")


def test_a_real_prometheus_scrapes_the_phase_change(agent: AgentProcess, tmp_path: Path) -> None:
    with PrometheusServer(_need("prometheus"), _scraping(agent), tmp_path) as server:
        _value_of(server, 'prestop_phase{phase="serving"}', 1, within=30)
        _value_of(server, 'up{job="prestop-agent"}', 1, within=5)
        assert _get(f"{agent.url}/prestop")[0] == 200
        _value_of(server, 'prestop_phase{phase="drained"}', 1, within=10)
        _value_of(server, 'sum(prestop_hook_calls_total{result="ok"})', 1, within=5)
        assert server.query("prestop_info")[0]["metric"]["drain_mode"] == "fixed"


def test_a_classic_termination_outcome_reaches_the_tsdb(
    new_agent: Callable[..., AgentProcess], tmp_path: Path
) -> None:
    """Classic sidecar: SIGTERM at the trigger, the app still listening after the drain. The
    agent must stay until Prometheus has scraped the drain's figures, then go by itself."""
    with socket.socket() as app:
        app.bind(("127.0.0.1", 0))
        app.listen()
        agent = new_agent(
            {
                "PRESTOP_DRAIN_MODE": "fixed",
                "PRESTOP_DRAIN_SECONDS": "1.5",
                "PRESTOP_APP_PORT": str(app.getsockname()[1]),
            }
        ).run()
        with PrometheusServer(_need("prometheus"), _scraping(agent), tmp_path) as server:
            _value_of(server, 'up{job="prestop-agent"}', 1, within=30)
            agent.signal(signal.SIGTERM)
            assert agent.proc is not None
            status = agent.proc.wait(timeout=30)  # without a scrape: the 30 s grace budget
            final = agent.log_events()[-1]
            assert status == 0 and final["event"] == "shutdown_complete", agent.log_text()
            assert final["steps"][-1]["outcome"] == "scraped", final
            # The target is gone now; what its last scrape stored is in the TSDB.
            _value_of(server, 'up{job="prestop-agent"}', 0, within=10)
            stored = {
                "drains": 'last_over_time(prestop_drains_total{reason="fixed"}[5m])',
                "drain_seconds": "last_over_time(prestop_drain_duration_seconds_sum[5m])",
                "drained": 'last_over_time(prestop_phase{phase="drained"}[5m])',
                "sigterm": 'last_over_time(prestop_shutdown_triggers_total{trigger="sigterm"}[5m])',
            }
            figures = {name: float(server.query(q)[0]["value"][1]) for name, q in stored.items()}
    print(f"read back from Prometheus' TSDB: {figures}")
    assert figures["drains"] == 1 and figures["drained"] == 1 and figures["sigterm"] == 1
    [drain] = [s for s in final["steps"] if s["name"] == "drain"]
    assert figures["drain_seconds"] == pytest.approx(drain["duration_seconds"], abs=1e-3)
    assert 1.5 <= figures["drain_seconds"] < 2.0
