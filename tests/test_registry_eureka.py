"""The registry backends against real parts: a Spring Cloud Eureka server (one, or two
replicating peers), the Spring Boot demo app, and plain aiohttp apps started by the test.

The agent runs as a real process (``AgentProcess``); each test calls ``/prestop`` as the kubelet
would and reads the result back from the Eureka server.
"""

from __future__ import annotations

import asyncio
import json
import re
import subprocess
import sys
import threading
import time
import urllib.error
import urllib.request
from collections.abc import Callable
from typing import Any

import pytest
from aiohttp import web

from tests.harness.agent_process import AgentProcess
from tests.harness.javaapps import (
    DemoApp,
    EurekaServer,
    StartDemoApp,
    eureka_instances,
    eureka_set_status,
    eureka_status,
    http_get,
    http_request,
)
from tests.harness.support import free_port, wait_for

java = [pytest.mark.java, pytest.mark.usefixtures("need_java", "jvm_logs_on_failure")]
# The demo app renews its lease every second (tests/fixtures/demo-app).
RENEWAL_SECONDS = 1.0


def prestop(agent: AgentProcess, timeout: float = 30.0) -> tuple[int, dict[str, Any]]:
    """GET /prestop as the kubelet does: blocks until the drain is over."""
    try:
        with urllib.request.urlopen(f"{agent.url}/prestop", timeout=timeout) as response:
            return response.status, json.loads(response.read())
    except urllib.error.HTTPError as err:
        return err.code, json.loads(err.read())


def events(agent: AgentProcess, name: str) -> list[dict[str, Any]]:
    return [e for e in agent.log_events() if e.get("event") == name]


@pytest.fixture
def start_agent(new_agent: Callable[..., AgentProcess]) -> Callable[..., AgentProcess]:
    def start(env: dict[str, str]) -> AgentProcess:
        return new_agent(
            {
                "PRESTOP_DRAIN_MODE": "fixed",
                "PRESTOP_DRAIN_SECONDS": "0.5",
                "PRESTOP_REGISTRY_TIMEOUT_SECONDS": "3",
                "PRESTOP_LOG_LEVEL": "debug",
                **env,
            }
        ).run()

    return start


def eureka_env(app: DemoApp, urls: list[str], **extra: str) -> dict[str, str]:
    return {
        "PRESTOP_REGISTRY": "eureka",
        "PRESTOP_EUREKA_URLS": ",".join(urls),
        "PRESTOP_EUREKA_APP": app.app_name,
        "POD_IP": app.ip,
        "PRESTOP_APP_PORT": str(app.port),
        **extra,
    }


class BackgroundApp:
    """An aiohttp app served from its own thread and loop, so the test can stay synchronous."""

    def __init__(self, app: web.Application, host: str = "127.0.0.1") -> None:
        self.port = free_port(host)
        self.url = f"http://{host}:{self.port}"
        self._app, self._host = app, host
        self._loop = asyncio.new_event_loop()
        self._runner = web.AppRunner(app)
        self._thread = threading.Thread(target=self._loop.run_forever, daemon=True)

    def __enter__(self) -> BackgroundApp:
        self._thread.start()
        asyncio.run_coroutine_threadsafe(self._start(), self._loop).result(10)
        return self

    async def _start(self) -> None:
        await self._runner.setup()
        await web.TCPSite(self._runner, self._host, self.port).start()

    def __exit__(self, *exc: object) -> None:
        asyncio.run_coroutine_threadsafe(self._runner.cleanup(), self._loop).result(10)
        self._loop.call_soon_threadsafe(self._loop.stop)
        self._thread.join(10)
        self._loop.close()


# --------------------------------------------------------------------------------------- eureka


@pytest.mark.parametrize("status", ["DOWN", "OUT_OF_SERVICE"])
@pytest.mark.java
@pytest.mark.usefixtures("need_java", "jvm_logs_on_failure")
def test_eureka_marks_the_instance_found_by_ip_and_port(
    status: str,
    eureka_server: EurekaServer,
    start_demo_app: StartDemoApp,
    start_agent: Callable[..., AgentProcess],
) -> None:
    app = start_demo_app(eureka_server)
    wait_for("listed by its own client", lambda: bool(listed_by_itself(app)), 15)
    agent = start_agent(eureka_env(app, [eureka_server.url], PRESTOP_EUREKA_STATUS=status))

    code, answer = prestop(agent)

    assert code == 200, answer
    assert eureka_status(eureka_server.url, app.app_name, app.instance_id) == status
    discovered = events(agent, "eureka_instance_discovered")
    assert discovered, agent.log_text()
    assert {e["instance_id"] for e in discovered} == {app.instance_id}, agent.log_text()
    [marked] = events(agent, "eureka_marked")
    assert marked["servers"][eureka_server.url]["result"] == "ok"
    # The app keeps renewing as UP; the override keeps it out through every renewal.
    first = renewed_at(eureka_server, app)
    deadline = time.monotonic() + 3.5 * RENEWAL_SECONDS
    while time.monotonic() < deadline:
        assert eureka_status(eureka_server.url, app.app_name, app.instance_id) == status
        time.sleep(0.2)
    assert renewed_at(eureka_server, app) >= first + 3000 * RENEWAL_SECONDS - 500, "no renewals"
    # The app's own discovery client, fetching every second, stops listing it.
    wait_for("dropped by its own client", lambda: not listed_by_itself(app), 5)


def run_check(env: dict[str, str]) -> subprocess.CompletedProcess[str]:
    """``prestop-agent check``, as an operator runs it in the pod."""
    return subprocess.run(
        [sys.executable, "-m", "agent.cli", "check"],
        env={"PATH": "/usr/bin:/bin", "PRESTOP_LOG_FORMAT": "json", **env},
        capture_output=True,
        text=True,
        timeout=60,
    )


@pytest.mark.java
@pytest.mark.usefixtures("need_java", "jvm_logs_on_failure")
def test_check_tells_server_down_from_instance_not_registered_from_found(
    eureka_server: EurekaServer, start_demo_app: StartDemoApp
) -> None:
    app = start_demo_app(eureka_server)
    url = eureka_server.url.replace("http://", "http://admin:s3cret@")
    found = run_check(eureka_env(app, [url]))
    assert found.returncode == 0, found.stdout + found.stderr
    assert (
        f"Registry eureka: instance found: {app.app_name}/{app.instance_id} listed by 1 of 1"
        in (found.stdout)
    )
    assert f'"instance_id": "{app.instance_id}"' in found.stdout
    assert "s3cret" not in found.stdout + found.stderr

    # The server answers, but nothing is registered at this port (the app is not up yet, or
    # PRESTOP_APP_PORT / POD_IP are wrong): exit 3, and what is listed at the pod's address
    # instead (other pods' instances only counted: the reason is in the open /status too).
    absent = run_check(eureka_env(app, [url], PRESTOP_APP_PORT=str(free_port())))
    assert absent.returncode == 3, absent.stdout + absent.stderr
    assert "Registry eureka: server reachable, but the instance is NOT found" in absent.stdout
    assert f": {app.instance_id} (port {app.port}" in absent.stdout
    by_id = run_check(eureka_env(app, [url], PRESTOP_EUREKA_INSTANCE_ID="no-such-id"))
    assert by_id.returncode == 3
    assert f"{app.app_name}/no-such-id is not listed" in by_id.stdout

    dead = f"http://127.0.0.1:{free_port()}/eureka/"
    down = run_check(eureka_env(app, [dead], PRESTOP_REGISTRY_TIMEOUT_SECONDS="1"))
    assert down.returncode == 1
    assert "Registry eureka: server NOT reachable: no server answered GET apps/" in down.stdout
    for done in (found, absent, by_id, down):
        assert "Traceback" not in done.stdout + done.stderr


def agent_status(agent: AgentProcess) -> dict[str, Any]:
    status, body = http_get(f"{agent.url}/status")
    assert status == 200, body
    return json.loads(body)


def registry_ready(agent: AgentProcess, backend: str = "eureka") -> float | None:
    _, page = http_get(f"{agent.url}/metrics", accept="text/plain")
    found = re.search(rf'^prestop_registry_ready{{backend="{backend}"}} (\S+)$', page, re.MULTILINE)
    return None if found is None else float(found.group(1))


def ready_status(agent: AgentProcess) -> int:
    return http_get(f"{agent.url}/ready")[0]


@pytest.mark.java
@pytest.mark.usefixtures("need_java", "jvm_logs_on_failure")
def test_registry_health_from_start_up_not_registered_then_found(
    eureka_server: EurekaServer,
    start_demo_app: StartDemoApp,
    start_agent: Callable[..., AgentProcess],
) -> None:
    port = free_port()
    env = {
        "PRESTOP_REGISTRY": "eureka",
        "PRESTOP_EUREKA_URLS": eureka_server.url,
        "PRESTOP_EUREKA_APP": "health-app",
        "POD_IP": "127.0.0.1",
        "PRESTOP_APP_PORT": str(port),
        "PRESTOP_REGISTRY_CHECK_SECONDS": "0.5",
    }
    agent = start_agent(env)  # before the app, as in a pod whose app boots slower
    wait_for("first check", lambda: agent_status(agent)["registry"]["checks"] >= 1, 10)
    missing = agent_status(agent)["registry"]
    assert missing["state"] == "not_found" and missing["ready"] is False, missing
    assert "no instance of HEALTH-APP has ipAddr 127.0.0.1" in missing["reason"]
    assert registry_ready(agent) == 0
    assert ready_status(agent) == 200, "/ready does not depend on the registry"

    app = start_demo_app(eureka_server, app_name="health-app", port=port)
    wait_for("found", lambda: agent_status(agent)["registry"]["state"] == "found", 40)
    found = agent_status(agent)["registry"]
    assert found["reason"].startswith(f"HEALTH-APP/{app.instance_id} listed by 1 of 1 server(s)")
    assert registry_ready(agent) == 1
    checks = found["checks"]
    wait_for("more checks", lambda: agent_status(agent)["registry"]["checks"] >= checks + 3, 10)

    changes = events(agent, "registry_health_changed")
    assert [(e["state"], e["level"]) for e in changes] == [
        ("not_found", "warning"),
        ("found", "info"),
    ], "one line per change, not one per check"
    assert changes[1]["previous"] == "not_found"
    assert ready_status(agent) == 200


@pytest.mark.java
@pytest.mark.usefixtures("need_java", "jvm_logs_on_failure")
def test_registry_health_server_down_warns_at_once_and_keeps_ready(
    eureka_peers: tuple[EurekaServer, EurekaServer],
    start_demo_app: StartDemoApp,
    start_agent: Callable[..., AgentProcess],
) -> None:
    a, _ = eureka_peers
    app = start_demo_app(a)
    agent = start_agent(eureka_env(app, [a.url], PRESTOP_REGISTRY_CHECK_SECONDS="0.5"))
    wait_for("found", lambda: agent_status(agent)["registry"]["state"] == "found", 10)
    a.stop()  # the one Eureka server goes away
    wait_for("unreachable", lambda: agent_status(agent)["registry"]["state"] == "unreachable", 15)
    down = agent_status(agent)["registry"]
    assert down["reason"].startswith("no server answered: "), down
    assert a.url in down["reason"]
    assert registry_ready(agent) == 0
    assert ready_status(agent) == 200, "a Eureka outage must not take the pod out of Service"
    changes = events(agent, "registry_health_changed")
    assert [(e["state"], e["level"]) for e in changes] == [
        ("found", "info"),
        ("unreachable", "warning"),
    ]


def listed_by_itself(app: DemoApp) -> list[dict[str, Any]]:
    return [r for r in app.discovery() if r["instanceId"] == app.instance_id]


def renewed_at(server: EurekaServer, app: DemoApp) -> int:
    """The lease's last renewal, read from the registry itself (``GET apps/{APP}`` comes from
    the server's response cache, which a renewal does not invalidate)."""
    status, body = http_get(f"{server.url}apps/{app.app_name}/{app.instance_id}")
    assert status == 200, body
    return int(json.loads(body)["instance"]["leaseInfo"]["lastRenewalTimestamp"])


@pytest.mark.java
@pytest.mark.usefixtures("need_java", "jvm_logs_on_failure")
def test_eureka_peers_both_show_the_status_and_one_peer_is_enough(
    eureka_peers: tuple[EurekaServer, EurekaServer],
    start_demo_app: StartDemoApp,
    start_agent: Callable[..., AgentProcess],
) -> None:
    a, b = eureka_peers
    app = start_demo_app([a, b])
    first = start_agent(eureka_env(app, [a.url, b.url]))
    assert prestop(first)[0] == 200
    assert eureka_status(a.url, app.app_name, app.instance_id) == "DOWN"
    assert eureka_status(b.url, app.app_name, app.instance_id) == "DOWN"

    # Back to UP (a new pod would clear it the same way), then lose a peer.
    for server in (a, b):
        urllib.request.urlopen(
            urllib.request.Request(
                f"{server.url}apps/{app.app_name}/{app.instance_id}/status", method="DELETE"
            ),
            timeout=5,
        ).close()
    app.wait_status("UP", timeout=15)
    b.stop()
    second = start_agent(eureka_env(app, [b.url, a.url]))
    code, answer = prestop(second)
    assert code == 200, answer
    assert eureka_status(a.url, app.app_name, app.instance_id) == "DOWN"
    [marked] = events(second, "eureka_marked")
    assert marked["servers"][a.url]["result"] == "ok"
    assert marked["servers"][b.url]["result"] == "failed"


def test_eureka_all_servers_unreachable_still_drains_and_answers_500(
    start_agent: Callable[..., AgentProcess],
) -> None:
    dead = [f"http://127.0.0.1:{free_port()}/eureka/", f"http://127.0.0.2:{free_port()}/eureka/"]
    agent = start_agent(
        {
            "PRESTOP_REGISTRY": "eureka",
            "PRESTOP_EUREKA_URLS": ",".join(dead),
            "PRESTOP_EUREKA_APP": "DEMO-APP",
            "PRESTOP_EUREKA_INSTANCE_ID": "10.0.0.1:demo-app:8080",
            "PRESTOP_REGISTRY_TIMEOUT_SECONDS": "2",
            "PRESTOP_DRAIN_SECONDS": "1",
        }
    )
    started = time.monotonic()
    code, answer = prestop(agent)
    took = time.monotonic() - started
    assert code == 500
    text = json.dumps(answer)
    assert "could not mark DEMO-APP/10.0.0.1:demo-app:8080 DOWN on any server" in text
    assert "127.0.0.2" in text
    # Registry budget (2 s) + the whole drain (1 s) + slack: the drain was not skipped.
    assert 1.0 <= took < 2 + 1 + 1.0, took
    [drain] = [step for step in answer["steps"] if step["name"] == "drain"]
    assert drain["duration_seconds"] >= 0.95


def register_again(eureka_url: str, app: DemoApp) -> None:
    """Register the app's instance again, as the next pod's app with the same instance id does
    at its start: the server carries an existing override into the new registration."""
    status, body = http_get(f"{eureka_url}apps/{app.app_name}/{app.instance_id}")
    assert status == 200, body
    answer = http_request(
        "POST",
        f"{eureka_url}apps/{app.app_name}",
        body=body.encode(),
        headers={"Content-Type": "application/json"},
    )
    assert answer[0] == 204, answer


def previous_pods_override(eureka_url: str, app: DemoApp) -> None:
    """A previous pod with the same instance id was marked DOWN and then SIGKILLed; this pod's
    app registered after that."""
    assert eureka_set_status(eureka_url, app.app_name, app.instance_id, "DOWN") == 200
    time.sleep(1.5)  # the new registration comes later than the override (lastUpdatedTimestamp)
    register_again(eureka_url, app)
    assert eureka_status(eureka_url, app.app_name, app.instance_id) == "DOWN"


@pytest.mark.java
@pytest.mark.usefixtures("need_java", "jvm_logs_on_failure")
def test_eureka_clears_a_stale_override_at_start_up(
    eureka_server: EurekaServer,
    start_demo_app: StartDemoApp,
    start_agent: Callable[..., AgentProcess],
) -> None:
    app = start_demo_app(eureka_server, app_name="STALE-APP")
    previous_pods_override(eureka_server.url, app)

    agent = start_agent(eureka_env(app, [eureka_server.url]))

    app.wait_status("UP", timeout=10)
    [cleared] = events(agent, "eureka_stale_override_cleared")
    assert cleared["overrides"] == {eureka_server.url: "DOWN"}
    assert cleared["results"] == {eureka_server.url: "cleared"}


@pytest.mark.java
@pytest.mark.usefixtures("need_java", "jvm_logs_on_failure")
def test_eureka_keeps_a_stale_override_when_told(
    eureka_server: EurekaServer,
    start_demo_app: StartDemoApp,
    start_agent: Callable[..., AgentProcess],
) -> None:
    app = start_demo_app(eureka_server, app_name="KEEP-APP")
    previous_pods_override(eureka_server.url, app)
    agent = start_agent(eureka_env(app, [eureka_server.url], PRESTOP_EUREKA_KEEP_OVERRIDE="true"))
    wait_for(
        "the kept override is logged", lambda: bool(events(agent, "eureka_stale_override_kept")), 10
    )
    time.sleep(2 * RENEWAL_SECONDS)
    assert eureka_status(eureka_server.url, app.app_name, app.instance_id) == "DOWN"


@pytest.mark.java
@pytest.mark.usefixtures("need_java", "jvm_logs_on_failure")
def test_a_restarted_agent_keeps_its_own_pods_override(
    eureka_server: EurekaServer,
    start_demo_app: StartDemoApp,
    start_agent: Callable[..., AgentProcess],
) -> None:
    # Issue 21 item 7: the agent was SIGKILLed mid-drain and restarted in the terminating pod;
    # it cleared its own DOWN override as if a previous pod had left it.
    app = start_demo_app(eureka_server, app_name="OWN-APP")
    time.sleep(1.5)  # this pod's mark-down comes well after its app registered
    assert eureka_set_status(eureka_server.url, app.app_name, app.instance_id, "DOWN") == 200
    agent = start_agent(eureka_env(app, [eureka_server.url]))
    wait_for(
        "the own override is kept", lambda: bool(events(agent, "eureka_own_override_kept")), 10
    )
    time.sleep(2 * RENEWAL_SECONDS)
    assert eureka_status(eureka_server.url, app.app_name, app.instance_id) == "DOWN"
    assert not events(agent, "eureka_stale_override_cleared")


# ------------------------------------------------------------------------------------- actuator


@pytest.mark.java
@pytest.mark.usefixtures("need_java", "jvm_logs_on_failure")
def test_actuator_spring_boot_3_marks_the_demo_app_down(
    eureka_server: EurekaServer,
    start_demo_app: StartDemoApp,
    start_agent: Callable[..., AgentProcess],
) -> None:
    app = start_demo_app(eureka_server, app_name="ACTUATOR-APP")
    agent = start_agent(
        {
            "PRESTOP_REGISTRY": "actuator",
            "PRESTOP_ACTUATOR_URL": f"{app.url}actuator/serviceregistry",
        }
    )
    code, answer = prestop(agent)
    assert code == 200, answer
    wait_for(
        "the server shows DOWN",
        lambda: eureka_status(eureka_server.url, app.app_name, app.instance_id) == "DOWN",
        5,
    )


def test_actuator_spring_boot_1_text_form(start_agent: Callable[..., AgentProcess]) -> None:
    received: list[tuple[str, str]] = []
    state = {"status": "UP"}

    async def instance_status(request: web.Request) -> web.Response:
        if request.method == "POST":
            received.append((request.content_type, await request.text()))
            state["status"] = await request.text()
            return web.Response(status=200)
        return web.json_response({"status": state["status"], "overriddenStatus": "UNKNOWN"})

    app = web.Application()
    app.router.add_route("*", "/service-registry/instance-status", instance_status)
    with BackgroundApp(app) as server:
        agent = start_agent(
            {
                "PRESTOP_REGISTRY": "actuator",
                "PRESTOP_ACTUATOR_URL": f"{server.url}/service-registry/instance-status",
                "PRESTOP_EUREKA_STATUS": "OUT_OF_SERVICE",
            }
        )
        code, answer = prestop(agent)
    assert code == 200, answer
    assert received == [("text/plain", "OUT_OF_SERVICE")]


# ------------------------------------------------------------------------------------- register


class PlainApp:
    """A Python service with no Eureka client: /health answers 200 or 503 as the test says."""

    def __init__(self) -> None:
        self.healthy = True
        self.app = web.Application()
        self.app.router.add_get("/health", self._health)

    async def _health(self, request: web.Request) -> web.Response:
        return web.Response(status=200 if self.healthy else 503, text="ok")


@pytest.mark.java
@pytest.mark.usefixtures("need_java", "jvm_logs_on_failure")
def test_register_on_behalf_up_down_and_gone(
    eureka_server: EurekaServer, start_agent: Callable[..., AgentProcess]
) -> None:
    plain = PlainApp()
    with BackgroundApp(plain.app) as server:
        instance_id = f"127.0.0.1:py-app:{server.port}"
        agent = start_agent(
            {
                "PRESTOP_REGISTRY": "register",
                "PRESTOP_EUREKA_URLS": eureka_server.url,
                "PRESTOP_EUREKA_APP": "py-app",
                "POD_IP": "127.0.0.1",
                "POD_NAME": "py-app-0",
                "PRESTOP_APP_PORT": str(server.port),
                # The agent's private way to the app: credentials and a token (issue 21 item 1).
                "PRESTOP_APP_HEALTH_URL": f"http://probe:pa55@127.0.0.1:{server.port}/health"
                "?token=t0k3n",
                "PRESTOP_EUREKA_RENEWAL_SECONDS": "0.5",
                "PRESTOP_EUREKA_LEASE_SECONDS": "5",
                "PRESTOP_DRAIN_SECONDS": "1.5",
                "PRESTOP_REGISTRY_CHECK_SECONDS": "0.3",
            }
        )

        def status() -> str | None:
            return eureka_status(eureka_server.url, "PY-APP", instance_id)

        wait_for("registered UP", lambda: status() == "UP", 10)
        [instance] = [
            i
            for i in eureka_instances(eureka_server.url, "PY-APP")
            if i["instanceId"] == instance_id
        ]
        assert instance["ipAddr"] == "127.0.0.1"
        assert instance["port"]["$"] == server.port
        # What every Eureka client, the dashboard and Spring Boot Admin read: no secret of it.
        assert instance["healthCheckUrl"] == f"{server.url}/health"
        assert instance["statusPageUrl"] == f"{server.url}/actuator/info"
        assert not {"pa55", "t0k3n", "probe"} & set(re.findall(r"\w+", json.dumps(instance)))
        assert instance["metadata"]["pod"] == "py-app-0"

        wait_for("health: found", lambda: agent_status(agent)["registry"]["state"] == "found", 5)
        plain.healthy = False
        wait_for("reported DOWN while unhealthy", lambda: status() == "DOWN", 5)
        wait_for("health: not UP", lambda: agent_status(agent)["registry"]["ready"] is False, 5)
        assert "not registered UP" in agent_status(agent)["registry"]["reason"]
        assert registry_ready(agent, "register") == 0
        plain.healthy = True
        wait_for("UP again once healthy", lambda: status() == "UP", 5)
        wait_for("health: found again", lambda: registry_ready(agent, "register") == 1, 5)

        result: dict[str, Any] = {}
        caller = threading.Thread(target=lambda: result.update(answer=prestop(agent)))
        caller.start()
        wait_for("DOWN during the drain", lambda: status() == "DOWN", 1.5)
        caller.join(30)
        assert result["answer"][0] == 200, result
        wait_for("gone after the drain", lambda: status() is None, 5)
