"""visible_to_clients against a real Eureka server, with its read-only response cache on (update
interval 3 s) and off, for DOWN and OUT_OF_SERVICE, checked against what a real Eureka client
(the demo app's DiscoveryClient, fetching every second) reports.

The agent runs as a real process with the traffic drain on the demo app's port; the test calls
/prestop and, meanwhile, asks the demo app every 50 ms whether its own DiscoveryClient still
lists itself UP.
"""

from __future__ import annotations

import threading
import time
from collections.abc import Callable
from typing import Any

import pytest

from tests.harness.agent_process import AgentProcess
from tests.harness.javaapps import CACHED_EUREKA_UPDATE_SECONDS, DemoApp, EurekaServer, StartDemoApp
from tests.harness.support import wait_for
from tests.test_registry_eureka import prestop

POLL = 0.2
CACHE_SECONDS = CACHED_EUREKA_UPDATE_SECONDS
CLIENT_FETCH_SECONDS = 1.0  # the demo app's registry-fetch-interval-seconds
# PRESTOP_EUREKA_CLIENT_REFRESH_SECONDS for these tests: the client's fetch interval plus its own
# request (the client schedules its next fetch after the last one ends, so on a loaded machine its
# period is longer than the interval), as the shipped default adds a margin to Spring's timings.
REFRESH = CLIENT_FETCH_SECONDS + 0.5

java = [pytest.mark.java, pytest.mark.usefixtures("need_java", "jvm_logs_on_failure")]


def _client_sees_it_gone(app: DemoApp) -> bool:
    listed = {row["instanceId"]: row["status"] for row in app.discovery()}
    return listed.get(app.instance_id) != "UP"


def _terminate(
    app: DemoApp, server: EurekaServer, status: str, new_agent: Callable[..., AgentProcess]
) -> tuple[dict[str, Any], float]:
    """Run one termination; return the agent's answer and when (seconds after the call) the demo
    app's DiscoveryClient first stopped listing itself UP."""
    agent = new_agent(
        {
            "PRESTOP_REGISTRY": "eureka",
            "PRESTOP_EUREKA_URLS": server.url,
            "PRESTOP_EUREKA_APP": app.app_name,
            "PRESTOP_EUREKA_INSTANCE_ID": app.instance_id,
            "PRESTOP_EUREKA_STATUS": status,
            "PRESTOP_EUREKA_CLIENT_REFRESH_SECONDS": str(REFRESH),
            "PRESTOP_EUREKA_SERVER_CACHE_SECONDS": str(CACHE_SECONDS),
            "PRESTOP_REGISTRY_TIMEOUT_SECONDS": "3",
            "PRESTOP_DRAIN_MODE": "traffic",
            "PRESTOP_APP_PORTS": str(app.port),
            "PRESTOP_DRAIN_POLL_SECONDS": str(POLL),
            "PRESTOP_DRAIN_MIN_SECONDS": "0.5",
            "PRESTOP_DRAIN_QUIET_SECONDS": "0.5",
            "PRESTOP_DRAIN_COUNT_ACCEPTS": "false",  # the machine's namespace, see test_traffic
            # The test's own /discovery polling is not a caller: ignored, it cannot hold the
            # drain, so the drain's length shows the floor alone.
            "PRESTOP_DRAIN_IGNORE_CIDRS": "127.0.0.0/8",
        }
    ).run()
    wait_for("the DiscoveryClient lists the app UP", lambda: not _client_sees_it_gone(app), 30)
    time.sleep(1.0)  # the agent has fetched its key at start-up; let a cache refresh go by
    client_gone_at: list[float] = []
    stop = threading.Event()

    def watch_client() -> None:
        while not stop.is_set():
            if _client_sees_it_gone(app):
                client_gone_at.append(time.monotonic() - called)
                return
            time.sleep(0.05)

    watcher = threading.Thread(target=watch_client)
    # Just after a cache tick (the timer runs at wall-clock multiples of its interval, drifting
    # a few ms per tick): the change then waits almost a whole interval in the server's cache,
    # so a view read on a cold key (DOWN at once) differs from the clients' by seconds, every run.
    time.sleep((0.15 - time.time()) % CACHE_SECONDS)
    called = time.monotonic()
    watcher.start()
    try:
        code, body = prestop(agent)
    finally:
        stop.set()
        watcher.join()
    assert code == 200, body
    assert client_gone_at, "the demo app's DiscoveryClient still lists itself UP"
    return body, client_gone_at[0]


@pytest.mark.parametrize("status", ["DOWN", "OUT_OF_SERVICE"])
@pytest.mark.parametrize("cache", ["on", "off"])
@pytest.mark.usefixtures(*java[1].args)
@pytest.mark.java
def test_visible_to_clients_matches_a_real_discovery_client(
    cache: str,
    status: str,
    request: pytest.FixtureRequest,
    start_demo_app: StartDemoApp,
    new_agent: Callable[..., AgentProcess],
) -> None:
    server: EurekaServer = request.getfixturevalue(
        "cached_eureka_server" if cache == "on" else "eureka_server"
    )
    app = start_demo_app(server, app_name=f"PROPAGATION-{cache}-{status}".replace("_", "-"))
    body, client_gone = _terminate(app, server, status, new_agent)
    visible = body["visible_to_clients_seconds"]
    mark = next(step for step in body["steps"] if step["name"] == "mark_down")
    drain = next(step for step in body["steps"] if step["name"] == "drain")
    print(
        f"cache {cache}, {status}: visible_to_clients {visible}s after the trigger (mark-down"
        f" took {mark['duration_seconds']}s); DiscoveryClient saw it {client_gone:.3f}s after"
        f" the call; drain {drain['duration_seconds']}s, floor {drain['floor_seconds']}s"
    )
    assert visible is not None, body
    marked = mark["started_seconds"] + mark["duration_seconds"]
    if cache == "on":
        assert 0 <= visible - marked <= CACHE_SECONDS + POLL
    else:
        assert 0 <= visible - marked <= POLL + 0.1  # one poll, plus the request itself
    # The real client can only see it after the server's view shows it, and at most one fetch
    # interval (plus its own request and our 50 ms look) later.
    assert visible - 0.1 <= client_gone <= visible + CLIENT_FETCH_SECONDS + 0.5
    # The floor: visible + client refresh; the drain did not end before it.
    assert drain["floor_seconds"] == pytest.approx(visible + REFRESH, abs=1e-3)
    assert body["duration_seconds"] >= visible + REFRESH
