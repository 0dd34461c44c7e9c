"""The Java fixtures are real: a Eureka server, a Spring Boot app that registers with it, and two
servers that replicate to each other. The other integration tests build on what these prove."""

from __future__ import annotations

import json
import time

import pytest

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
from tests.harness.support import wait_for

pytestmark = [pytest.mark.java, pytest.mark.usefixtures("jvm_logs_on_failure")]


def listed_by_itself(app: DemoApp) -> bool:
    return any(row["instanceId"] == app.instance_id for row in app.discovery())


def test_demo_app_registers_up(eureka_server: EurekaServer, start_demo_app: StartDemoApp) -> None:
    app = start_demo_app(eureka_server)

    [instance] = [
        i
        for i in eureka_instances(eureka_server.url, "DEMO-APP")
        if i["instanceId"] == app.instance_id
    ]
    assert instance["status"] == "UP"
    assert instance["app"] == "DEMO-APP"
    assert instance["ipAddr"] == "127.0.0.1"
    assert instance["port"]["$"] == app.port
    assert instance["leaseInfo"]["renewalIntervalInSecs"] == 1
    assert app.instance_id == f"127.0.0.1:demo-app:{app.port}"

    assert http_get(f"{app.url}hello", accept="text/plain") == (200, "hello\n")
    started = time.monotonic()
    assert http_get(f"{app.url}slow?ms=300", accept="text/plain")[0] == 200
    assert time.monotonic() - started >= 0.3

    wait_for("the app's own discovery client lists it", lambda: listed_by_itself(app), 10)
    [row] = [r for r in app.discovery() if r["instanceId"] == app.instance_id]
    assert row == {
        "instanceId": app.instance_id,
        "host": "127.0.0.1",
        "port": app.port,
        "status": "UP",
    }


def test_status_down_takes_the_app_out_and_keeps_it_out(
    eureka_server: EurekaServer, start_demo_app: StartDemoApp
) -> None:
    app = start_demo_app(eureka_server)
    wait_for("the app's own discovery client lists it", lambda: listed_by_itself(app), 10)

    assert eureka_set_status(eureka_server.url, app.app_name, app.instance_id, "DOWN") == 200
    # No response cache in the way: the server answers DOWN at once.
    assert eureka_status(eureka_server.url, app.app_name, app.instance_id) == "DOWN"
    took = wait_for("the app's own discovery client drops it", lambda: not listed_by_itself(app), 5)
    print(f"dropped from the app's own discovery after {took:.2f} s")

    # The app keeps renewing its lease every second; the override survives every renewal.
    def renewed_at() -> int:
        [i] = [
            i
            for i in eureka_instances(eureka_server.url, app.app_name)
            if i["instanceId"] == app.instance_id
        ]
        return int(i["leaseInfo"]["lastRenewalTimestamp"])

    first_renewal = renewed_at()
    for _ in range(8):
        time.sleep(0.5)
        assert eureka_status(eureka_server.url, app.app_name, app.instance_id) == "DOWN"
        assert not listed_by_itself(app)
    assert renewed_at() > first_renewal, "the app stopped renewing its lease"


def test_actuator_serviceregistry_marks_the_app_down(
    eureka_server: EurekaServer, start_demo_app: StartDemoApp
) -> None:
    app = start_demo_app(eureka_server)
    status, body = http_request(
        "POST",
        f"{app.url}actuator/serviceregistry",
        body=json.dumps({"status": "DOWN"}).encode(),
        headers={"Content-Type": "application/json"},
    )
    assert status == 200, body
    wait_for(
        "the server shows DOWN",
        lambda: eureka_status(eureka_server.url, app.app_name, app.instance_id) == "DOWN",
        5,
    )
    status, body = http_get(f"{app.url}actuator/serviceregistry")
    assert status == 200
    assert json.loads(body)["status"] == "DOWN"


def test_peers_replicate_a_status_change(
    eureka_peers: tuple[EurekaServer, EurekaServer], start_demo_app: StartDemoApp
) -> None:
    a, b = eureka_peers
    app = start_demo_app([a, b])  # returns once both list it UP

    assert eureka_set_status(a.url, app.app_name, app.instance_id, "OUT_OF_SERVICE") == 200
    took = wait_for(
        "peer B shows OUT_OF_SERVICE",
        lambda: eureka_status(b.url, app.app_name, app.instance_id) == "OUT_OF_SERVICE",
        5,
        interval=0.02,
    )
    print(f"replicated to the peer after {took:.2f} s")
    [on_b] = [
        i for i in eureka_instances(b.url, app.app_name) if i["instanceId"] == app.instance_id
    ]
    assert on_b["overriddenStatus"] == "OUT_OF_SERVICE"


def test_a_restarted_peer_learns_the_status_from_the_other(
    eureka_peers: tuple[EurekaServer, EurekaServer], start_demo_app: StartDemoApp
) -> None:
    a, b = eureka_peers
    app = start_demo_app([a, b])

    b.stop()
    assert not b.running()
    assert eureka_set_status(a.url, app.app_name, app.instance_id, "DOWN") == 200
    assert eureka_status(a.url, app.app_name, app.instance_id) == "DOWN"

    b.start()
    wait_for(
        "the restarted peer shows DOWN",
        lambda: eureka_status(b.url, app.app_name, app.instance_id) == "DOWN",
        10,
    )
