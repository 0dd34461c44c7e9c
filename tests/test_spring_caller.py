"""A real Spring Cloud caller against a terminating replica: zero failed requests.

Timings scaled 10x down from Spring Cloud's defaults: the Eureka server's read-only response cache
refreshes every 3 s, the caller's Eureka client fetches every 3 s, its LoadBalancer caches the
instance list for 3.5 s, so ``PRESTOP_EUREKA_CLIENT_REFRESH_SECONDS=6.5``.

Two replicas of TARGET run: the terminating one (A, with the agent watching its port) and a stable
one (B), which is also the caller (the demo app with ``demo.caller.target=TARGET``): Spring Cloud
LoadBalancer, round robin over A and B, over a pooled keep-alive HTTP client. Each termination:
/prestop on A's agent (as the kubelet's preStop hook), then SIGTERM to A the moment it answers (as
the kubelet does), then the caller's records are read back: every request must have succeeded.
"""

from __future__ import annotations

import json
import threading
import time
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import pytest

from tests.harness.agent_process import AgentProcess
from tests.harness.javaapps import (
    CACHED_EUREKA_UPDATE_SECONDS,
    DemoApp,
    EurekaServer,
    StartDemoApp,
    http_get,
    http_request,
)
from tests.harness.support import free_port, wait_for
from tests.test_registry_eureka import prestop

CACHE_SECONDS = CACHED_EUREKA_UPDATE_SECONDS
FETCH_SECONDS = 3
LB_TTL = "3500ms"
REFRESH = 6.5
POLL = 0.2
QUIET = 2.0
TERMINATIONS = 5

pytestmark = [pytest.mark.java, pytest.mark.usefixtures("need_java", "jvm_logs_on_failure")]


SCALED_CLIENT = [
    f"--eureka.client.registry-fetch-interval-seconds={FETCH_SECONDS}",
    f"--spring.cloud.loadbalancer.cache.ttl={LB_TTL}",
]


def _records(caller: DemoApp, since_ms: int) -> list[dict[str, Any]]:
    status, body = http_get(f"{caller.url}caller/records?since={since_ms}", timeout=5)
    assert status == 200, body
    return json.loads(body)


def _set_interval(caller: DemoApp, ms: int) -> None:
    assert http_request("POST", f"{caller.url}caller/interval?ms={ms}", body=b"")[0] == 200


def _terminate_once(
    cached_eureka_server: EurekaServer,
    start_demo_app: StartDemoApp,
    new_agent: Callable[..., AgentProcess],
    caller: DemoApp,
) -> dict[str, Any]:
    """Start replica A, let the caller reach it, terminate it; what happened, as figures."""
    replica = start_demo_app(cached_eureka_server, app_name="TARGET", extra_args=SCALED_CLIENT)
    agent = new_agent(
        {
            "PRESTOP_REGISTRY": "eureka",
            "PRESTOP_EUREKA_URLS": cached_eureka_server.url,
            "PRESTOP_EUREKA_APP": "TARGET",
            "PRESTOP_EUREKA_INSTANCE_ID": replica.instance_id,
            "PRESTOP_EUREKA_CLIENT_REFRESH_SECONDS": str(REFRESH),
            "PRESTOP_EUREKA_SERVER_CACHE_SECONDS": str(CACHE_SECONDS),
            "PRESTOP_REGISTRY_TIMEOUT_SECONDS": "3",
            "PRESTOP_DRAIN_MODE": "traffic",
            "PRESTOP_APP_PORTS": str(replica.port),
            "PRESTOP_DRAIN_POLL_SECONDS": str(POLL),
            "PRESTOP_DRAIN_MIN_SECONDS": "0.5",
            "PRESTOP_DRAIN_QUIET_SECONDS": str(QUIET),
            "PRESTOP_DRAIN_MAX_SECONDS": "20",
            "PRESTOP_DRAIN_COUNT_ACCEPTS": "false",  # the machine's namespace, see test_traffic
        }
    ).run()
    started_ms = int(time.time() * 1000)
    wait_for(
        "the caller reaches replica A",
        lambda: any(
            r["target"] == replica.instance_id and r["outcome"] == "ok"
            for r in _records(caller, started_ms)
        ),
        60,
        interval=0.5,
    )
    called_wall = time.time()
    called = time.monotonic()
    code, body = prestop(agent)
    answered = time.monotonic() - called
    stopping = threading.Thread(target=replica.stop)  # SIGTERM now, as the kubelet does
    stopping.start()
    # Long enough for every cache to have dropped A even had the drain been too short.
    time.sleep(CACHE_SECONDS + FETCH_SECONDS + 3.5 + 2)
    stopping.join()
    agent.stop()
    calls = _records(caller, int(called_wall * 1000) - 1000)
    to_replica = [r for r in calls if r["target"] == replica.instance_id]
    last_to_replica = max((r["sentMs"] / 1000 - called_wall for r in to_replica), default=None)
    drain = next(step for step in body["steps"] if step["name"] == "drain")
    return {
        "code": code,
        "answered": answered,
        "floor": drain["floor_seconds"],
        "visible": body["visible_to_clients_seconds"],
        "reason": drain["outcome"],
        "calls": len(calls),
        "to_replica": len(to_replica),
        "last_to_replica": last_to_replica,
        "failures": [r for r in calls if r["outcome"] != "ok"],
        "body": body,
    }


@pytest.fixture(scope="module")
def caller_b(
    cached_eureka_server: EurekaServer, demo_app_jar: Path, java_log_dir: Path
) -> Iterator[DemoApp]:
    """Replica B of TARGET, which is also the caller (module-scoped: reused by both tests)."""
    port = free_port()
    app = DemoApp(
        demo_app_jar,
        java_log_dir,
        [cached_eureka_server.url],
        "TARGET",
        "127.0.0.1",
        port,
        f"127.0.0.1:target:{port}",
        None,
        [*SCALED_CLIENT, "--demo.caller.target=TARGET", "--demo.caller.interval-ms=2000"],
    )
    try:
        app.start()
        yield app
    finally:
        app.stop()


def test_a_slow_spring_caller_gets_no_failure_in_five_terminations(
    cached_eureka_server: EurekaServer,
    start_demo_app: StartDemoApp,
    new_agent: Callable[..., AgentProcess],
    caller_b: DemoApp,
) -> None:
    # Round robin over A and B every 2 s: one request every 4 s to the terminating replica.
    _set_interval(caller_b, 2000)
    runs = []
    for run in range(TERMINATIONS):
        result = _terminate_once(cached_eureka_server, start_demo_app, new_agent, caller_b)
        bound = result["floor"] + QUIET + 2 * POLL
        print(
            f"slow caller, termination {run + 1}: {len(result['failures'])} failed of"
            f" {result['calls']} ({result['to_replica']} to A, last"
            f" {result['last_to_replica']:.2f}s after the call); visible_to_clients"
            f" {result['visible']}s, floor {result['floor']}s, answered {result['answered']:.2f}s"
            f" (bound {bound:.2f}s), ended by {result['reason']}"
        )
        runs.append((result, bound))
    for result, bound in runs:
        assert result["code"] == 200, result["body"]
        assert result["failures"] == []
        assert result["answered"] <= bound
        assert result["answered"] >= result["floor"]


def test_a_busy_pooled_caller_gets_no_failure(
    cached_eureka_server: EurekaServer,
    start_demo_app: StartDemoApp,
    new_agent: Callable[..., AgentProcess],
    caller_b: DemoApp,
) -> None:
    _set_interval(caller_b, 25)  # 40 requests a second, half of them to A
    try:
        result = _terminate_once(cached_eureka_server, start_demo_app, new_agent, caller_b)
    finally:
        _set_interval(caller_b, 2000)
    bound = max(result["floor"], result["last_to_replica"] + QUIET) + 2 * POLL
    print(
        f"busy caller: {len(result['failures'])} failed of {result['calls']}"
        f" ({result['to_replica']} to A, last {result['last_to_replica']:.2f}s after the call);"
        f" visible_to_clients {result['visible']}s, floor {result['floor']}s, answered"
        f" {result['answered']:.2f}s (bound {bound:.2f}s), ended by {result['reason']}"
    )
    assert result["code"] == 200, result["body"]
    assert result["failures"] == []
    assert result["answered"] <= bound
