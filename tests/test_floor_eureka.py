"""The propagation floor against real Eureka servers: two replicating peers, one with the
read-only response cache off (its clients see a change at once), one with it on, refreshed every
3 s (its clients see it up to 3 s later), as Eureka's default 30 s scaled down.

Each case is one of the ways the floor used to come early without saying so: a cold cache key
after a peer restarted, a peer lost while it still served the old status, one address in front
of both peers, and a drain cut at its maximum before the floor.

Eureka's cache timer runs at wall-clock multiples of its interval from the server's start (then
drifts by a few ms per tick), so a test that restarts the cached peer knows when its next tick
comes and can trigger just after one.
"""

from __future__ import annotations

import json
import os
import signal
import threading
import time
import urllib.request
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import pytest

from tests.harness.agent_process import AgentProcess
from tests.harness.javaapps import (
    DemoApp,
    EurekaServer,
    StartDemoApp,
    http_get,
    replicating_pair,
    running,
)
from tests.harness.support import wait_for
from tests.harness.tcpproxy import SpreadingProxy
from tests.test_registry_eureka import prestop

CACHE_SECONDS = 3.0  # the cached peer's response-cache-update-interval
REFRESH = 1.0  # PRESTOP_EUREKA_CLIENT_REFRESH_SECONDS: keeps the drains short
POLL = 0.1

pytestmark = [pytest.mark.java, pytest.mark.usefixtures("need_java", "jvm_logs_on_failure")]


@pytest.fixture(scope="module")
def _mixed_peers(eureka_jar: Path, java_log_dir: Path) -> Iterator[tuple[EurekaServer, ...]]:
    servers = prompt, cached = replicating_pair(eureka_jar, java_log_dir, "eureka-floor")
    prompt.app.args += ["--eureka.server.use-read-only-response-cache=false"]
    cached.app.args += [
        "--eureka.server.use-read-only-response-cache=true",
        f"--eureka.server.response-cache-update-interval-ms={int(CACHE_SECONDS * 1000)}",
    ]
    with running(servers):
        yield servers


@pytest.fixture
def peers(_mixed_peers: tuple[EurekaServer, EurekaServer]) -> tuple[EurekaServer, EurekaServer]:
    """(prompt, cached): both running, the cached one freshly (re)started, so that its cache
    ticks at wall-clock multiples of CACHE_SECONDS."""
    prompt, cached = _mixed_peers
    if not prompt.running():
        prompt.start()
    if cached.running():
        cached.stop()
    cached.start()
    return prompt, cached


def _agent_env(app: DemoApp, urls: list[str], **extra: str) -> dict[str, str]:
    return {
        "PRESTOP_REGISTRY": "eureka",
        "PRESTOP_EUREKA_URLS": ",".join(urls),
        "PRESTOP_EUREKA_APP": app.app_name,
        "PRESTOP_EUREKA_INSTANCE_ID": app.instance_id,
        "PRESTOP_EUREKA_CLIENT_REFRESH_SECONDS": str(REFRESH),
        "PRESTOP_EUREKA_SERVER_CACHE_SECONDS": str(CACHE_SECONDS),
        "PRESTOP_REGISTRY_TIMEOUT_SECONDS": "3",
        "PRESTOP_GRACE_PERIOD_SECONDS": "60",
        "PRESTOP_DRAIN_MODE": "traffic",
        "PRESTOP_APP_PORTS": str(app.port),
        "PRESTOP_DRAIN_POLL_SECONDS": str(POLL),
        "PRESTOP_DRAIN_MIN_SECONDS": "0.5",
        "PRESTOP_DRAIN_QUIET_SECONDS": "0.5",
        "PRESTOP_DRAIN_COUNT_ACCEPTS": "false",  # the machine's namespace, see test_traffic
        **extra,
    }


def _listed_status(server: EurekaServer, app: DemoApp, accept: str) -> str | None:
    """What a client fetching ``apps/{APP}`` with ``accept`` gets from ``server`` for the app
    (the response cache's key for that format)."""
    code, body = http_get(f"{server.url}apps/{app.app_name}", accept=accept)
    if code != 200:
        return None
    if "json" in accept:
        instances = json.loads(body)["application"]["instance"]
        return next((i["status"] for i in instances if i["instanceId"] == app.instance_id), None)
    # XML: the one instance's <status> (the demo app is alone under its name)
    return body.split("<status>", 1)[1].split("</status>", 1)[0] if "<status>" in body else None


def _just_after_a_tick(offset: float = 0.15) -> None:
    """Sleep until ``offset`` s after the cached peer's next cache tick."""
    time.sleep((offset - time.time()) % CACHE_SECONDS)


class ClientWatch:
    """Polls one server's cached view in a client's own format from a thread, recording when
    (monotonic) it first shows the instance out of service."""

    def __init__(self, server: EurekaServer, app: DemoApp, accept: str) -> None:
        self._args = (server, app, accept)
        self.gone_at: float | None = None
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._run, daemon=True)

    def __enter__(self) -> ClientWatch:
        assert _listed_status(*self._args) == "UP"  # and the client's key is in the cache now
        self._thread.start()
        return self

    def __exit__(self, *exc_info: object) -> None:
        # The change reaches this key at the server's next tick, whenever the hook answered.
        self._thread.join(timeout=CACHE_SECONDS + 2)
        self._stop.set()
        self._thread.join(timeout=10)

    def _run(self) -> None:
        while not self._stop.is_set():
            if _listed_status(*self._args) not in ("UP", None):
                self.gone_at = time.monotonic()
                return
            time.sleep(0.02)


def _drain_step(body: dict[str, Any]) -> dict[str, Any]:
    return next(step for step in body["steps"] if step["name"] == "drain")


def test_a_cold_key_after_a_peer_restart_is_warmed_before_the_put(
    peers: tuple[EurekaServer, EurekaServer],
    start_demo_app: StartDemoApp,
    new_agent: Callable[..., AgentProcess],
) -> None:
    prompt, cached = peers
    app = start_demo_app([prompt, cached], app_name="FLOOR-COLD")
    agent = new_agent(_agent_env(app, [cached.url])).run()
    wait_for("the agent's key is hot", lambda: _key(agent, cached) == "warm", 10)
    # The peer restarts: its read-only cache is empty, the agent's next keep-hot pass is 30 s
    # away, and a client's key (XML here) is warm again at its next fetch.
    cached.stop()
    cached.start()
    wait_for("the restarted peer lists the app", lambda: _listed(cached, app), 20)
    _just_after_a_tick()
    with ClientWatch(cached, app, "application/xml") as client:
        called = time.monotonic()
        code, body = prestop(agent)
    assert code == 200, body
    assert client.gone_at is not None, "the client's key never showed the change"
    client_saw = client.gone_at - called
    visible = body["visible_to_clients_seconds"]
    print(f"cold key: client saw it {client_saw:.2f}s after the call, agent {visible}s")
    # The client's key flips at the next tick, ~2.85 s later: the agent's must not have shown
    # it earlier (before the fix it loaded the key fresh and saw DOWN at once).
    assert client_saw > 1.5
    assert visible is not None and visible >= client_saw - 0.3, body
    assert body["duration_seconds"] >= client_saw + REFRESH - 0.3


def test_a_peer_lost_while_it_still_served_up_keeps_the_floor(
    peers: tuple[EurekaServer, EurekaServer],
    start_demo_app: StartDemoApp,
    new_agent: Callable[..., AgentProcess],
) -> None:
    prompt, cached = peers
    app = start_demo_app([prompt, cached], app_name="FLOOR-LOST")
    # The agent assumes 0.5 s of server cache, the peer really takes up to 3 s: it is slower
    # than configured, as an overloaded server is. Clients' refresh is 5 s here, so that an
    # early floor shows as an early answer.
    refresh = 5.0
    agent = new_agent(
        _agent_env(
            app,
            [prompt.url, cached.url],
            PRESTOP_EUREKA_SERVER_CACHE_SECONDS="0.5",
            PRESTOP_EUREKA_CLIENT_REFRESH_SECONDS=str(refresh),
        )
    ).run()
    wait_for("the agent's key is hot", lambda: _key(agent, cached) == "warm", 10)
    # A client's key (XML), in the read-only cache before the change like the agent's.
    assert _listed_status(cached, app, "application/xml") == "UP"
    _just_after_a_tick()
    answer: list[tuple[int, dict[str, Any]]] = []
    hook = threading.Thread(target=lambda: answer.append(prestop(agent)))
    called = time.monotonic()
    hook.start()
    # 2.2 s in: the cached peer still serves UP (its tick comes at ~2.85 s); it stops answering
    # (frozen: connections hang, as on an overloaded or partitioned server).
    time.sleep(2.2 - (time.monotonic() - called))
    assert _listed_status(cached, app, "application/xml") == "UP"
    frozen_at = time.monotonic() - called
    assert cached.app.pid is not None
    os.kill(cached.app.pid, signal.SIGSTOP)
    try:
        wait_for("the agent lost the frozen peer", lambda: _lost(agent), 15)
    finally:
        os.kill(cached.app.pid, signal.SIGCONT)
    hook.join(timeout=60)
    [(code, body)] = answer
    assert code == 200, body
    drain = _drain_step(body)
    print(
        f"lost peer: frozen {frozen_at:.2f}s after the call; floor {drain['floor_seconds']}s,"
        f" answered after {body['duration_seconds']}s; {body['propagation']}"
    )
    # It served UP to its clients until it froze: they may route until then + refresh. The
    # floor used to fall back to 0.5 + 5 s.
    assert drain["floor_seconds"] >= frozen_at + refresh - POLL
    assert body["duration_seconds"] >= frozen_at + refresh - POLL
    assert body["visible_to_clients_seconds"] is None or body["propagation"]["servers"]


def test_a_peer_that_missed_the_put_gets_it_again_when_it_answers(
    peers: tuple[EurekaServer, EurekaServer],
    start_demo_app: StartDemoApp,
    new_agent: Callable[..., AgentProcess],
) -> None:
    prompt, cached = peers
    app = start_demo_app([prompt, cached], app_name="FLOOR-REPUT")
    agent = new_agent(_agent_env(app, [prompt.url, cached.url])).run()
    wait_for("the agent's key is hot", lambda: _key(agent, cached) == "warm", 10)
    assert cached.app.pid is not None
    # Frozen from just before the trigger until 1.6 s after its tick: the agent's read before the
    # PUT and its PUT to it time out (the other peer took the change, so it gives up on this
    # one), and no cache tick falls in the freeze, so when it answers again its clients' view
    # still shows UP.
    _just_after_a_tick(0.05)
    os.kill(cached.app.pid, signal.SIGSTOP)
    answer: list[tuple[int, dict[str, Any]]] = []
    hook = threading.Thread(target=lambda: answer.append(prestop(agent)))
    try:
        hook.start()
        time.sleep(1.55)
    finally:
        os.kill(cached.app.pid, signal.SIGCONT)
    hook.join(timeout=60)
    [(code, body)] = answer
    assert code == 200, body
    mark = next(step for step in body["steps"] if step["name"] == "mark_down")
    assert mark["servers"][cached.url]["result"] == "failed", mark
    remarked = [e for e in agent.log_events() if e.get("event") == "eureka_remarked"]
    print(f"missed PUT: {mark['servers'][cached.url]}; put again: {remarked}")
    assert [(e["server"], e["result"]) for e in remarked] == [(cached.url, "ok")]
    wait_for("the peer shows DOWN", lambda: not _listed(cached, app), 5)


def test_two_peers_behind_one_address_fall_back_to_the_assumed_bound(
    peers: tuple[EurekaServer, EurekaServer],
    start_demo_app: StartDemoApp,
    new_agent: Callable[..., AgentProcess],
) -> None:
    prompt, cached = peers
    app = start_demo_app([prompt, cached], app_name="FLOOR-SERVICE")
    with SpreadingProxy([(prompt.host, prompt.port), (cached.host, cached.port)]) as service:
        agent = new_agent(_agent_env(app, [service.url()])).run()
        wait_for("the agent found two peers", lambda: _peers(agent, service.url()) == "several", 10)
        _just_after_a_tick()
        with ClientWatch(cached, app, "application/xml") as client:
            called = time.monotonic()
            code, body = prestop(agent)
    assert code == 200, body
    assert client.gone_at is not None
    client_saw = client.gone_at - called
    drain = _drain_step(body)
    print(
        f"one address, two peers: the cached peer's clients saw it {client_saw:.2f}s after the"
        f" call; floor {drain['floor_seconds']}s; answered after {body['duration_seconds']}s"
    )
    assert client_saw > 1.5  # the prompt peer showed it at once, the cached one a tick later
    assert body["propagation"]["assumed"], body["propagation"]
    assert body["duration_seconds"] >= client_saw + REFRESH - POLL


def test_a_drain_cut_before_its_floor_says_so(
    peers: tuple[EurekaServer, EurekaServer],
    start_demo_app: StartDemoApp,
    new_agent: Callable[..., AgentProcess],
) -> None:
    prompt, cached = peers
    app = start_demo_app([prompt, cached], app_name="FLOOR-CUT")
    agent = new_agent(_agent_env(app, [cached.url], PRESTOP_DRAIN_MAX_SECONDS="1")).run()
    wait_for("the agent's key is hot", lambda: _key(agent, cached) == "warm", 10)
    _just_after_a_tick()
    code, body = prestop(agent)
    assert code == 200, body
    drain = _drain_step(body)
    assert drain["outcome"] == "max_before_floor" and drain["floor_reached"] is False, drain
    assert body["drain_ended_by"] == "max_before_floor"
    # The agent writes its log lines from a thread of their own (logging never blocks the
    # drain), so the line may land a moment after the answer.
    wait_for(
        "the drain_ended_before_floor log line",
        lambda: any(e.get("event") == "drain_ended_before_floor" for e in agent.log_events()),
        5,
    )
    metrics = _metrics(agent)
    assert 'prestop_registry_propagation_censored_total{reason="not_visible"} 1.0' in metrics
    assert 'prestop_drains_total{reason="max_before_floor"} 1.0' in metrics
    assert "prestop_registry_propagation_seconds_count 0.0" in metrics


# --- reading the agent ------------------------------------------------------------------------


def _status(agent: AgentProcess) -> dict[str, Any]:
    with urllib.request.urlopen(f"{agent.url}/status", timeout=5) as response:
        return dict(json.loads(response.read()))


def _metrics(agent: AgentProcess) -> str:
    with urllib.request.urlopen(f"{agent.url}/metrics", timeout=5) as response:
        return str(response.read().decode())


def _key(agent: AgentProcess, server: EurekaServer) -> str:
    return str(_status(agent)["registry"]["client_view"][server.url]["key"])


def _peers(agent: AgentProcess, url: str) -> str:
    return str(_status(agent)["registry"]["client_view"][url]["peers"])


def _lost(agent: AgentProcess) -> bool:
    return any(e.get("event") == "eureka_view_lost" for e in agent.log_events())


def _listed(server: EurekaServer, app: DemoApp) -> bool:
    """Whether the server's registry lists the app UP, read on the instance endpoint: never
    ``apps/{APP}`` in JSON, the agent's own cache key, which a read here would warm."""
    code, body = http_get(f"{server.url}apps/{app.app_name}/{app.instance_id}")
    return code == 200 and json.loads(body)["instance"]["status"] == "UP"
