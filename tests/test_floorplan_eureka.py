"""What ``prestop-agent check`` proposes to bring the propagation floor under a target, done to a
real Eureka server and a real Spring Cloud caller (the demo app: Eureka client + Spring Cloud
LoadBalancer, tests/fixtures/demo-app): the last request the caller routes to an instance comes
no later than the proposal's floor after the instance is marked DOWN, and the caller's registry
fetches arrive at the server at the rate the proposal states as its cost.

From Spring Cloud's defaults (floor 30 + 30 + 35 = 95 s) to a target of 9 s, each proposal
(keep the server's read-only cache: 3 + 3 + 3 s; turn it off: 0 + 4 + 4 s) is set on the server
and the caller exactly as ``check`` prints it. The caller's fetches go through a counting TCP
proxy on loopback in front of the server.
"""

from __future__ import annotations

import contextlib
import re
import socket
import threading
import time
from collections.abc import Iterator
from pathlib import Path

import pytest

from agent import floorplan
from tests.harness.javaapps import EurekaServer, StartDemoApp, eureka_set_status
from tests.harness.support import free_port, wait_for
from tests.test_spring_caller import _records

TARGET_SECONDS = 9.0
PROPOSALS = floorplan.proposals(floorplan.stages_of(30, 65), TARGET_SECONDS)
CALL_INTERVAL_MS = 100
# What the caller's own timing adds to a stage bound on a loaded 2-core machine: its 100 ms tick,
# the LoadBalancer and HTTP call, JVM pauses.
SLACK_SECONDS = 1.5

pytestmark = [pytest.mark.java, pytest.mark.usefixtures("need_java", "jvm_logs_on_failure")]

# A registry fetch as the Eureka client sends it: the full registry or the delta.
FETCH = re.compile(rb"GET /eureka/apps/(?:delta)?[ ?]")


class CountingProxy:
    """Loopback TCP proxy to ``upstream``; counts the registry fetches passing through."""

    def __init__(self, upstream: tuple[str, int]) -> None:
        self.upstream = upstream
        self.listener = socket.create_server(("127.0.0.1", 0))
        self.port = self.listener.getsockname()[1]
        self.fetches: list[float] = []  # monotonic time of each fetch
        self._lock = threading.Lock()
        threading.Thread(target=self._accept, daemon=True).start()

    @property
    def url(self) -> str:
        return f"http://127.0.0.1:{self.port}/eureka/"

    def _accept(self) -> None:
        while True:
            try:
                client, _ = self.listener.accept()
            except OSError:
                return
            server = socket.create_connection(self.upstream)
            threading.Thread(target=self._pipe, args=(client, server, True), daemon=True).start()
            threading.Thread(target=self._pipe, args=(server, client, False), daemon=True).start()

    def _pipe(self, source: socket.socket, sink: socket.socket, requests: bool) -> None:
        tail = b""
        try:
            while data := source.recv(65536):
                if requests:
                    seen = tail + data
                    found = len(FETCH.findall(seen)) - len(FETCH.findall(tail))
                    with self._lock:
                        self.fetches += [time.monotonic()] * found
                    tail = seen[-40:]
                sink.sendall(data)
        except OSError:
            pass
        finally:
            for end in (source, sink):
                with contextlib.suppress(OSError):
                    end.shutdown(socket.SHUT_RDWR)

    def fetches_between(self, start: float, end: float) -> int:
        with self._lock:
            return sum(1 for at in self.fetches if start <= at < end)

    def close(self) -> None:
        self.listener.close()


@pytest.fixture(params=PROPOSALS, ids=lambda p: "read-only-cache" if p.read_only_cache else "off")
def proposed_server(
    request: pytest.FixtureRequest, eureka_jar: Path, java_log_dir: Path
) -> Iterator[tuple[floorplan.Proposal, EurekaServer]]:
    proposal: floorplan.Proposal = request.param
    name = "eureka-proposal-" + ("cached" if proposal.read_only_cache else "uncached")
    server = EurekaServer(eureka_jar, java_log_dir, name, "127.0.0.1", free_port())
    server.app.args += [f"--{setting}" for setting in proposal.server_properties()]
    try:
        server.start()
        yield proposal, server
    finally:
        server.stop()


def test_the_proposed_settings_give_the_floor_and_the_cost_check_predicts(
    proposed_server: tuple[floorplan.Proposal, EurekaServer], start_demo_app: StartDemoApp
) -> None:
    proposal, server = proposed_server
    stages = proposal.stages
    assert len(PROPOSALS) == 2 and stages.floor <= TARGET_SECONDS
    client = [f"--{setting}" for setting in proposal.client_properties()]
    proxy = CountingProxy((server.host, server.port))
    try:
        replica = start_demo_app(server, app_name="TARGET", extra_args=client)
        caller = start_demo_app(
            proxy.url,
            app_name="TARGET",
            extra_args=[
                *client,
                "--demo.caller.target=TARGET",
                f"--demo.caller.interval-ms={CALL_INTERVAL_MS}",
            ],
        )

        def routes_to(instance: str) -> bool:
            since = int((time.time() - 2) * 1000)
            return any(r["target"] == instance for r in _records(caller, since))

        wait_for("the caller routes to the replica", lambda: routes_to(replica.instance_id), 60)

        # The cost: registry fetches per second from this one client, over several intervals.
        window = 5 * stages.client_fetch
        started = time.monotonic()
        time.sleep(window)
        fetched = proxy.fetches_between(started, started + window)
        rate = fetched / window
        print(
            f"{'read-only cache' if proposal.read_only_cache else 'no read-only cache'}:"
            f" {fetched} registry fetches in {window:g}s = {rate:.3f}/s,"
            f" predicted {stages.fetches_per_second:.3f}/s"
        )
        assert abs(fetched - window * stages.fetches_per_second) <= 1, fetched

        # The floor: mark the replica DOWN as the agent would; the caller's last request to it.
        marked_at = time.time()
        assert eureka_set_status(server.url, "TARGET", replica.instance_id, "DOWN") == 200
        time.sleep(stages.floor + SLACK_SECONDS + 2)
        after = _records(caller, int(marked_at * 1000))
        to_replica = [r["sentMs"] / 1000 - marked_at for r in after
                      if r["target"] == replica.instance_id]  # fmt: skip
        elsewhere = [r for r in after if r["target"] == caller.instance_id and r["outcome"] == "ok"]
        assert to_replica, "the caller stopped routing to the replica at once: nothing measured"
        last = max(to_replica)
        print(
            f"  the caller's last request to the DOWN replica: {last:.2f}s after the mark-down;"
            f" predicted floor {stages.floor:g}s"
        )
        assert last <= stages.floor + SLACK_SECONDS
        assert elsewhere, "the caller kept working on the other replica"
        final = [r for r in after if r["sentMs"] / 1000 - marked_at > stages.floor + SLACK_SECONDS]
        assert final and all(r["target"] != replica.instance_id for r in final)
    finally:
        proxy.close()
