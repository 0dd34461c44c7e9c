"""Error branches of the agent's wiring, in-process (the real process: tests/test_process.py)."""

from __future__ import annotations

import asyncio
import signal

import pytest
from prometheus_client import CollectorRegistry
from structlog.testing import capture_logs

from agent.config import load
from agent.drain import sockdiag
from agent.main import Agent
from agent.metrics import Metrics
from tests.harness.support import free_port


async def test_without_proc_net_tcp_the_wait_after_the_drain_ends_at_the_grace_budget(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    def no_proc(ports: object, proc_root: str = "/proc") -> bool:
        raise FileNotFoundError(2, "No such file or directory", "/proc/net/tcp")

    monkeypatch.setattr(sockdiag, "app_is_up", no_proc)
    config = load(
        {
            "PRESTOP_HOST": "127.0.0.1",
            "PRESTOP_PORT": str(free_port()),
            "PRESTOP_DRAIN_MODE": "fixed",
            "PRESTOP_DRAIN_SECONDS": "0.2",
            "PRESTOP_GRACE_PERIOD_SECONDS": "2",
            "PRESTOP_APP_SHUTDOWN_SECONDS": "0.5",
            "PRESTOP_MARGIN_SECONDS": "0.5",
        }
    )
    agent = Agent(config, metrics=Metrics(CollectorRegistry()))
    with capture_logs() as logs:
        running = asyncio.create_task(agent.run())
        await asyncio.wait_for(agent.started.wait(), 5)
        agent.handle_signal(signal.SIGTERM)
        assert await asyncio.wait_for(running, 5) == 0
    [final] = [e for e in logs if e["event"] == "shutdown_complete"]
    wait = final["steps"][-1]
    assert (wait["name"], wait["outcome"]) == ("final_scrape", "grace")
    assert wait["started_seconds"] + wait["duration_seconds"] == pytest.approx(1.5, abs=0.1)
    [warning] = [e for e in logs if e["event"] == "app_exit_not_observable"]
    assert "/proc/net/tcp" in warning["error"]
    assert logs[-1] is final


async def test_background_tasks_stop_before_the_session_they_use_closes(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    # The client view's keep-hot loop reads the Eureka servers over the agent's HTTP session:
    # it must be stopped while that session is still open, not after (a request in flight on a
    # closed session raises instead of being cancelled).
    from agent.registry.view import ClientView

    stopped_with_session_closed: list[bool] = []
    keep_hot = ClientView.keep_hot

    async def observed(view: ClientView) -> None:
        try:
            await keep_hot(view)
        finally:
            stopped_with_session_closed.append(view._http.session.closed)

    monkeypatch.setattr(ClientView, "keep_hot", observed)
    closed = free_port()  # the servers refuse: keep_hot keeps trying, mark_down fails fast
    config = load(
        {
            "PRESTOP_HOST": "127.0.0.1",
            "PRESTOP_PORT": str(free_port()),
            "PRESTOP_APP_PORT": str(free_port()),  # nothing listens: the app counts as exited
            "PRESTOP_DRAIN_MODE": "fixed",
            "PRESTOP_DRAIN_SECONDS": "0.1",
            "PRESTOP_REGISTRY": "eureka",
            "PRESTOP_EUREKA_URLS": f"http://127.0.0.1:{closed}/eureka/",
            "PRESTOP_EUREKA_APP": "orders",
            "PRESTOP_EUREKA_INSTANCE_ID": "10.1.2.3:orders:8080",
            "PRESTOP_REGISTRY_TIMEOUT_SECONDS": "0.3",
        }
    )
    agent = Agent(config, metrics=Metrics(CollectorRegistry()))
    running = asyncio.create_task(agent.run())
    await asyncio.wait_for(agent.started.wait(), 5)
    agent.handle_signal(signal.SIGTERM)
    assert await asyncio.wait_for(running, 10) == 0
    assert stopped_with_session_closed == [False]
