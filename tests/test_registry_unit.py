"""Error branches of the registry backends, against small fake Eureka servers (aiohttp).

What the real server does is covered by tests/test_registry_eureka.py; here the fakes produce
what a real server rarely does on demand: several matches, 5xx, hangs, TLS, odd credentials.
"""

from __future__ import annotations

import asyncio
import base64
import dataclasses
import json
import re
import ssl
import time
from collections.abc import AsyncIterator, Awaitable, Callable
from pathlib import Path
from typing import Any
from urllib.parse import quote

import aiohttp
import pytest
import pytest_asyncio
import yarl
from aiohttp import web
from aiohttp.test_utils import TestServer
from prometheus_client import CollectorRegistry
from structlog.testing import capture_logs

from agent.cli import _check_client_view
from agent.config import load
from agent.http import MAX_ANSWER_BYTES, AppHealth, Http, RequestFailed, Server, parse_json
from agent.lifecycle import Propagation
from agent.metrics import Metrics
from agent.registry import HealthState, HealthWatch, RegistryError, RegistryHealth, open_registry
from agent.registry.eureka import EurekaRegistry
from agent.registry.register import RegisterRegistry
from agent.registry.view import KEEP_HOT_WARN_AFTER, ClientView
from agent.registry.wire import REPLICATION_HEADER
from tests.harness.tcpproxy import SpreadingProxy

APP = "DEMO-APP"
POD_IP = "10.1.2.3"
PORT = 8080
SECRET = "p@ss:w/rd%+$"


def instance(
    instance_id: str, ip: str = POD_IP, port: int | dict[str, Any] = PORT, **extra: Any
) -> dict[str, Any]:
    return {
        "instanceId": instance_id,
        "app": APP,
        "ipAddr": ip,
        "port": port if isinstance(port, dict) else {"$": port, "@enabled": "true"},
        "status": "UP",
        "overriddenStatus": "UNKNOWN",
        "lastDirtyTimestamp": "1700000000123",
        # Every Eureka server stamps its copy of a registration; one stamp means one peer.
        "leaseInfo": {"registrationTimestamp": 1700000000000},
        **extra,
    }


class FakeEureka:
    """Enough of Eureka's REST API for the backends; ``fail`` hooks make it misbehave."""

    def __init__(self, instances: list[dict[str, Any]]) -> None:
        self.instances = {i["instanceId"]: i for i in instances}
        self.requests: list[web.Request] = []
        self.statuses: list[int] = []  # answer these codes first, in order, then behave
        self.delay = 0.0
        self.registered: list[dict[str, Any]] = []
        self.delete_delay = 0.0  # a slow registry: applies a DELETE this long after it came
        self.put_answer_delay = 0.0  # applies a status PUT at once, answers this much later
        app = web.Application(middlewares=[self._record])
        app.router.add_get("/eureka/apps/{app}", self._app)
        app.router.add_get("/eureka/apps/{app}/{id}", self._instance)
        app.router.add_put("/eureka/apps/{app}/{id}/status", self._status)
        app.router.add_delete("/eureka/apps/{app}/{id}/status", self._delete_status)
        app.router.add_post("/eureka/apps/{app}", self._register)
        app.router.add_put("/eureka/apps/{app}/{id}", self._renew)
        app.router.add_delete("/eureka/apps/{app}/{id}", self._cancel)
        self.app = app

    @web.middleware
    async def _record(self, request: web.Request, handler: Any) -> web.StreamResponse:
        self.requests.append(request)
        if self.delay:
            await asyncio.sleep(self.delay)
        if self.statuses:
            return web.Response(status=self.statuses.pop(0), text="busy")
        return await handler(request)

    async def _app(self, request: web.Request) -> web.Response:
        return web.json_response(
            {"application": {"name": APP, "instance": list(self.instances.values())}}
        )

    async def _instance(self, request: web.Request) -> web.Response:
        found = self.instances.get(request.match_info["id"])
        if found is None:
            return web.Response(status=404)
        return web.json_response({"instance": found})

    async def _status(self, request: web.Request) -> web.Response:
        found = self.instances.get(request.match_info["id"])
        if found is None:
            return web.Response(status=404)
        found["status"] = found["overriddenStatus"] = request.query["value"]
        await asyncio.sleep(self.put_answer_delay)
        return web.Response(status=200)

    async def _delete_status(self, request: web.Request) -> web.Response:
        found = self.instances[request.match_info["id"]]

        def apply() -> None:
            found["status"], found["overriddenStatus"] = "UNKNOWN", "UNKNOWN"

        if not self.delete_delay:
            apply()
            return web.Response(status=200)
        # Applied after the delay even when the caller has given up and hung up (as a servlet
        # container does: the request is already being processed).
        asyncio.get_running_loop().call_later(self.delete_delay, apply)
        await asyncio.sleep(self.delete_delay)
        return web.Response(status=200)

    async def _register(self, request: web.Request) -> web.Response:
        registered = (await request.json())["instance"]
        self.registered.append(registered)
        self.instances[registered["instanceId"]] = registered
        return web.Response(status=204)

    async def _renew(self, request: web.Request) -> web.Response:
        return web.Response(status=200 if request.match_info["id"] in self.instances else 404)

    async def _cancel(self, request: web.Request) -> web.Response:
        return web.Response(
            status=200 if self.instances.pop(request.match_info["id"], None) else 404
        )


Serve = Callable[..., Awaitable[tuple[FakeEureka, str]]]


@pytest_asyncio.fixture
async def serve() -> AsyncIterator[Serve]:
    servers: list[TestServer] = []

    async def start(
        instances: list[dict[str, Any]], *, ssl_context: ssl.SSLContext | None = None
    ) -> tuple[FakeEureka, str]:
        fake = FakeEureka(instances)
        server = TestServer(fake.app, host="127.0.0.1")
        await server.start_server(ssl=ssl_context)
        servers.append(server)
        scheme = "https" if ssl_context else "http"
        return fake, f"{scheme}://127.0.0.1:{server.port}/eureka/"

    yield start
    for server in servers:
        await server.close()


@pytest_asyncio.fixture
async def session() -> AsyncIterator[aiohttp.ClientSession]:
    async with aiohttp.ClientSession() as s:
        yield s


def config(urls: list[str], **env: str) -> Any:
    return load(
        {
            "PRESTOP_REGISTRY": "eureka",
            "PRESTOP_EUREKA_URLS": ",".join(urls),
            "PRESTOP_EUREKA_APP": APP.lower(),
            "POD_IP": POD_IP,
            "PRESTOP_APP_PORT": str(PORT),
            "PRESTOP_REGISTRY_TIMEOUT_SECONDS": "1.5",
            **env,
        }
    )


def dead_url() -> str:
    from tests.harness.support import free_port

    return f"http://127.0.0.1:{free_port()}/eureka/"


# ------------------------------------------------------------------------------ instance lookup


async def test_discovers_the_instance_by_ip_and_port(
    serve: Serve, session: aiohttp.ClientSession
) -> None:
    fake, url = await serve([instance("a"), instance("b", port=9090), instance("c", ip="10.9.9.9")])
    registry = EurekaRegistry(config([url]), session)
    said = await registry.mark_down()
    assert said[url]["result"] == "ok"
    assert fake.instances["a"]["status"] == "DOWN"
    put = [r for r in fake.requests if r.method == "PUT"]
    assert [str(r.rel_url) for r in put] == [
        f"/eureka/apps/{APP}/a/status?value=DOWN&lastDirtyTimestamp=1700000000123"
    ]
    assert put[0].headers["Accept"] == "application/json"
    assert all(REPLICATION_HEADER not in r.headers for r in fake.requests)
    assert (await registry.verify()) == {url: "DOWN"}


async def test_no_instance_matches(serve: Serve, session: aiohttp.ClientSession) -> None:
    # Issue 21 item 24: the reason reaches /status, which answers anyone: other pods' ids and
    # addresses are counted, not listed; what sits at this pod's own address is shown.
    _, url = await serve(
        [instance("other", ip="10.9.9.9"), instance("other-2", ip="10.9.9.8"), instance("mine")]
    )
    registry = EurekaRegistry(config([url], PRESTOP_APP_PORT="9000"), session)
    with pytest.raises(
        RegistryError,
        match=re.escape(
            "no instance of DEMO-APP has ipAddr 10.1.2.3 and port 9000"
            " (listed: 2 at other addresses; at 10.1.2.3: mine (port 8080, securePort None))"
        ),
    ):
        await registry.mark_down()
    health = await registry.check_health()
    assert health.state is HealthState.NOT_FOUND
    assert "10.9.9" not in health.reason and "other" not in health.reason.replace(
        "other addresses", ""
    ), health.reason


async def test_addresses_are_compared_as_addresses_not_text(
    serve: Serve, session: aiohttp.ClientSession
) -> None:
    # Issue 21 item 5: the downward API writes fd00:77::5, Java's Eureka client fd00:77:0:0:0:0:0:5.
    listed = instance("v6", ip="fd00:77:0:0:0:0:0:5")
    fake, url = await serve([listed, instance("v4")])
    cfg = config([url], POD_IP="fd00:77::5")
    said = await EurekaRegistry(cfg, session).mark_down()
    assert said[url]["result"] == "ok" and fake.instances["v6"]["status"] == "DOWN"
    assert ClientView(cfg, session)._is_ours(listed)


async def test_an_instance_id_of_any_length_is_marked_whole(
    serve: Serve, session: aiohttp.ClientSession
) -> None:
    # Issue 21 item 14: an id over 200 characters was adopted cut short ("...") and never marked.
    long_id = "pod-" + "x" * 250
    fake, url = await serve([instance(long_id)])
    said = await EurekaRegistry(config([url]), session).mark_down()
    assert said[url]["result"] == "ok" and fake.instances[long_id]["status"] == "DOWN"


async def test_an_https_only_instance_is_found_by_its_secure_port(
    serve: Serve, session: aiohttp.ClientSession
) -> None:
    # Issue 21 item 15: port disabled, securePort enabled (server.ssl on, non-secure port off).
    tls = instance(
        "tls",
        port={"$": 8080, "@enabled": "false"},
        securePort={"$": 8443, "@enabled": "true"},
    )
    fake, url = await serve([tls])
    cfg = config([url], PRESTOP_APP_PORT="8443")
    said = await EurekaRegistry(cfg, session).mark_down()
    assert said[url]["result"] == "ok" and fake.instances["tls"]["status"] == "DOWN"
    assert ClientView(cfg, session)._is_ours(tls)


async def test_several_instances_match(serve: Serve, session: aiohttp.ClientSession) -> None:
    _, url = await serve([instance("a"), instance("b")])
    with pytest.raises(
        RegistryError, match=r"several instances .*: a, b; set PRESTOP_EUREKA_INSTANCE_ID"
    ):
        await EurekaRegistry(config([url]), session).mark_down()


async def test_the_configured_id_is_used_and_percent_encoded(
    serve: Serve, session: aiohttp.ClientSession
) -> None:
    fake, url = await serve([instance("pod-0 x/y")])
    registry = EurekaRegistry(config([url], PRESTOP_EUREKA_INSTANCE_ID="pod-0 x/y"), session)
    fake.instances["pod-0%20x%2Fy"] = fake.instances["pod-0 x/y"]  # aiohttp decodes %20 only
    await registry.mark_down()
    assert any(
        r.raw_path.startswith(f"/eureka/apps/{APP}/pod-0%20x%2Fy/status") for r in fake.requests
    )


# ------------------------------------------------------------------------------ failing servers


async def test_one_peer_failing_does_not_stop_the_others(
    serve: Serve, session: aiohttp.ClientSession
) -> None:
    _, url = await serve([instance("a")])
    broken, broken_url = await serve([instance("a")])
    broken.statuses = [500] * 100
    dead = dead_url()
    registry = EurekaRegistry(
        config([dead, broken_url, url], PRESTOP_EUREKA_INSTANCE_ID="a"), session
    )
    said = await registry.mark_down()
    assert said[url]["result"] == "ok"
    assert said[broken_url]["result"] == "failed" and said[broken_url]["http_status"] == 500
    assert said[dead]["result"] == "failed" and "Cannot connect" in said[dead]["error"]
    verified = await registry.verify()
    assert verified[url] == "DOWN"
    assert dead not in verified  # only servers that answered are read back


async def test_5xx_then_success_is_retried(serve: Serve, session: aiohttp.ClientSession) -> None:
    fake, url = await serve([instance("a")])
    fake.statuses = [503, 502]
    said = await EurekaRegistry(config([url], PRESTOP_EUREKA_INSTANCE_ID="a"), session).mark_down()
    assert said[url] == {
        "result": "ok",
        "attempts": 3,
        "http_status": 200,
        "lastDirtyTimestamp": "1700000000123",
    }


async def test_4xx_is_not_retried_and_names_the_server(
    serve: Serve, session: aiohttp.ClientSession
) -> None:
    fake, url = await serve([instance("a")])
    with pytest.raises(
        RegistryError, match=rf"{re.escape(url)}: instance not registered on this server"
    ):
        await EurekaRegistry(config([url], PRESTOP_EUREKA_INSTANCE_ID="gone"), session).mark_down()
    assert len(fake.requests) == 1


async def test_a_hanging_server_times_out_within_the_deadline(
    serve: Serve, session: aiohttp.ClientSession
) -> None:
    fake, url = await serve([instance("a")])
    fake.delay = 10
    registry = EurekaRegistry(config([url], PRESTOP_EUREKA_INSTANCE_ID="a"), session)
    loop = asyncio.get_running_loop()
    started = loop.time()
    with pytest.raises(RegistryError, match=r"no answer within 0\.[0-9]+s \(after 2 attempts\)"):
        await registry.mark_down()
    # 60 % of the 1.5 s deadline for the PUTs: our own error comes before main's timeout.
    assert loop.time() - started < 1.5 * 0.6 + 0.2


async def test_verify_fails_when_no_server_shows_the_status(
    serve: Serve, session: aiohttp.ClientSession
) -> None:
    fake, url = await serve([instance("a")])
    registry = EurekaRegistry(config([url], PRESTOP_EUREKA_INSTANCE_ID="a"), session)
    await registry.mark_down()
    fake.instances["a"]["status"] = "UP"  # say a server that lost the override
    with pytest.raises(RegistryError, match=re.escape(f"no server shows DOWN: {url}: UP")):
        await registry.verify()


# ------------------------------------------------------------------------------ credentials, TLS


async def test_percent_encoded_credentials_are_sent_as_basic_auth_and_never_shown(
    serve: Serve, session: aiohttp.ClientSession
) -> None:
    fake, url = await serve([instance("a")])
    encoded = "p%40ss%3Aw%2Frd%25%2B%24"
    with_auth = url.replace("http://", f"http://us%20er:{encoded}@")
    dead = dead_url().replace("http://", f"http://user:{encoded}@")
    registry = EurekaRegistry(config([with_auth, dead], PRESTOP_EUREKA_INSTANCE_ID="a"), session)
    with capture_logs() as logs:
        said = await registry.mark_down()
        described = await registry.describe()
    expected = base64.b64encode(f"us er:{SECRET}".encode()).decode()
    assert {r.headers["Authorization"] for r in fake.requests} == {f"Basic {expected}"}
    shown = json.dumps([said, described, logs], default=str)
    for secret in (SECRET, encoded, expected, "p@ss"):
        assert secret not in shown
    assert "us%20er:***@127.0.0.1" in shown

    # And in errors: every server failing.
    fake.statuses = [500] * 100
    bad = EurekaRegistry(
        config([with_auth], PRESTOP_EUREKA_INSTANCE_ID="a", PRESTOP_REGISTRY_TIMEOUT_SECONDS="0.5"),
        session,
    )
    with capture_logs() as logs, pytest.raises(RegistryError) as error:
        await bad.mark_down()
    for secret in (SECRET, encoded, expected):
        assert secret not in str(error.value) and secret not in json.dumps(logs, default=str)


def test_server_parse_keeps_the_path_and_drops_the_userinfo() -> None:
    server = Server.parse("https://u:p%40@eureka-0.eureka:8761/eureka/")
    assert server.base == "https://eureka-0.eureka:8761/eureka/"
    assert server.shown == "https://u:***@eureka-0.eureka:8761/eureka/"
    assert server.authorization == "Basic " + base64.b64encode(b"u:p@").decode()
    assert "p@" not in repr(server)


async def test_https_with_a_private_ca(
    serve: Serve, session: aiohttp.ClientSession, certificate: tuple[Path, Path]
) -> None:
    cert, key = certificate
    context = ssl.create_default_context(ssl.Purpose.CLIENT_AUTH)
    context.load_cert_chain(cert, key)
    _, url = await serve([instance("a")], ssl_context=context)
    trusted = EurekaRegistry(
        config([url], PRESTOP_EUREKA_INSTANCE_ID="a", PRESTOP_EUREKA_CA_FILE=str(cert)), session
    )
    assert (await trusted.mark_down())[url]["result"] == "ok"
    untrusted = EurekaRegistry(config([url], PRESTOP_EUREKA_INSTANCE_ID="a"), session)
    with pytest.raises(RegistryError, match=r"TLS: .*certificate"):
        await untrusted.mark_down()


# ------------------------------------------------------------------------------ start-up override


async def test_startup_clears_a_stale_override_once(
    serve: Serve, session: aiohttp.ClientSession
) -> None:
    fake, url = await serve([instance("a", status="DOWN", overriddenStatus="DOWN")])
    registry = EurekaRegistry(config([url]), session)
    with capture_logs() as logs:
        await asyncio.wait_for(registry.run(), 5)
    deletes = [r for r in fake.requests if r.method == "DELETE"]
    assert [str(r.rel_url) for r in deletes] == [
        f"/eureka/apps/{APP}/a/status?lastDirtyTimestamp=1700000000123"
    ]
    [cleared] = [e for e in logs if e["event"] == "eureka_stale_override_cleared"]
    assert cleared["overrides"] == {url: "DOWN"} and cleared["results"] == {url: "cleared"}


async def test_a_restarted_agent_keeps_its_own_pods_override(
    serve: Serve, session: aiohttp.ClientSession
) -> None:
    # Issue 21 item 7: SIGKILL mid-drain and a restart; the agent cleared its own pod's DOWN
    # override as if a previous pod had left it, putting the terminating pod back in service.
    now = int(time.time() * 1000)
    ours = instance(
        "ours",
        status="DOWN",
        overriddenStatus="DOWN",
        lastUpdatedTimestamp=str(now - 8_000),  # the override, 8 s into this termination
        leaseInfo={"registrationTimestamp": now - 3_600_000},  # the app registered an hour ago
    )
    fake, url = await serve([ours])
    with capture_logs() as logs:
        await asyncio.wait_for(
            EurekaRegistry(config([url], PRESTOP_EUREKA_INSTANCE_ID="ours"), session).run(), 5
        )
    assert not [r for r in fake.requests if r.method == "DELETE"]
    assert fake.instances["ours"]["overriddenStatus"] == "DOWN"
    assert [e["event"] for e in logs if e["event"].startswith("eureka_")] == [
        "eureka_own_override_kept"
    ]

    # A previous pod's override, carried into this pod's new registration (both stamped at
    # once), or one set long ago, is stale: cleared as before.
    for stamps in ((now - 2_000, now - 2_000), (now - 3_600_000, now - 7_200_000)):
        updated, registered = stamps
        fake.instances["ours"].update(
            status="DOWN",
            overriddenStatus="DOWN",
            lastUpdatedTimestamp=updated,
            leaseInfo={"registrationTimestamp": registered},
        )
        await asyncio.wait_for(
            EurekaRegistry(config([url], PRESTOP_EUREKA_INSTANCE_ID="ours"), session).run(), 5
        )
        assert fake.instances["ours"]["overriddenStatus"] == "UNKNOWN", stamps


async def test_the_pods_deletion_timestamp_decides_whose_override_it_is(
    serve: Serve, session: aiohttp.ClientSession
) -> None:
    # Issue 21 item 7, with the Kubernetes API: a pod being deleted keeps its override whatever
    # the stamps say; a pod the API says is not being deleted has no override of its own.
    now = int(time.time() * 1000)
    carried = {  # both stamped at once: a previous pod's override, by the stamps alone
        "lastUpdatedTimestamp": now - 2_000,
        "leaseInfo": {"registrationTimestamp": now - 2_000},
    }
    fake, url = await serve([instance("ours", status="DOWN", overriddenStatus="DOWN", **carried)])
    with capture_logs() as logs:
        await asyncio.wait_for(
            EurekaRegistry(config([url], PRESTOP_EUREKA_INSTANCE_ID="ours"), session).run(
                pod_terminating=True
            ),
            5,
        )
    assert not [r for r in fake.requests if r.method == "DELETE"]
    assert fake.instances["ours"]["overriddenStatus"] == "DOWN"
    [kept] = [e for e in logs if e["event"].startswith("eureka_")]
    assert kept["event"] == "eureka_own_override_kept"
    assert "metadata.deletionTimestamp" in kept["reason"]

    # Set 8 s ago, an hour after the app registered: this pod's own by the stamps, but the API
    # says the pod is not being deleted (its previous agent got a SIGTERM or a /prestop without
    # a deletion): kept, it would hold a serving pod out of service. Cleared.
    fake.instances["ours"].update(
        lastUpdatedTimestamp=str(now - 8_000),
        leaseInfo={"registrationTimestamp": now - 3_600_000},
    )
    with capture_logs() as logs:
        await asyncio.wait_for(
            EurekaRegistry(config([url], PRESTOP_EUREKA_INSTANCE_ID="ours"), session).run(
                pod_terminating=False
            ),
            5,
        )
    assert fake.instances["ours"]["overriddenStatus"] == "UNKNOWN"
    assert [e["event"] for e in logs if e["event"].startswith("eureka_")] == [
        "eureka_stale_override_cleared"
    ]


async def test_register_mode_in_a_pod_being_deleted_registers_down(
    serve: Serve, session: aiohttp.ClientSession
) -> None:
    # A restarted agent in a terminating pod registering the app UP would put it back in
    # service for every client that had dropped it.
    fake, url = await serve([])
    cfg = load(
        {
            "PRESTOP_REGISTRY": "register",
            "PRESTOP_EUREKA_URLS": url,
            "PRESTOP_EUREKA_APP": "py-app",
            "POD_IP": POD_IP,
            "PRESTOP_APP_PORT": "9000",
            "PRESTOP_EUREKA_RENEWAL_SECONDS": "0.1",
        }
    )
    registry = open_registry(cfg, session)
    with capture_logs() as logs:
        task = asyncio.create_task(registry.run(pod_terminating=True))
        try:
            await asyncio.sleep(0.35)  # registered, then renewed
        finally:
            await registry.finalize()
            await asyncio.wait_for(task, 2)
    assert fake.registered and {r["status"] for r in fake.registered} == {"DOWN"}
    renewals = [r for r in fake.requests if r.method == "PUT" and "status" not in r.path]
    assert renewals and {r.query.get("status") for r in renewals} == {"DOWN"}
    assert [e["event"] for e in logs if e["log_level"] == "warning"] == [
        "eureka_registered_out_of_service"
    ]


async def test_startup_never_clears_the_override_of_a_started_shutdown(
    serve: Serve, session: aiohttp.ClientSession
) -> None:
    fake, url = await serve([])
    registry = EurekaRegistry(config([url], PRESTOP_EUREKA_INSTANCE_ID="a"), session)
    task = asyncio.create_task(registry.run())
    await asyncio.sleep(0.1)  # run() waits for the app to register
    fake.instances["a"] = instance("a")
    await registry.mark_down()
    await asyncio.wait_for(task, 3)
    assert not [r for r in fake.requests if r.method == "DELETE"]
    assert fake.instances["a"]["status"] == "DOWN"


# ------------------------------------------------------------------------------ actuator, register


async def test_a_late_cleanup_delete_never_outlives_the_mark_down(
    serve: Serve, session: aiohttp.ClientSession
) -> None:
    # Issue 21 item 6: a stale override and a slow registry: the clean-up's DELETEs, retried
    # after client-side timeouts, landed after the hook's PUT; the hook said ok while the
    # instance ended UNKNOWN (back in service at the app's next renewal).
    stale = instance("pod-1", status="DOWN", overriddenStatus="DOWN")
    fake, url = await serve([stale])
    fake.delete_delay = 0.8  # > one request's timeout (1.5 s / 3): every DELETE "times out"
    registry = EurekaRegistry(config([url]), session)
    cleanup = asyncio.create_task(registry.run())
    try:
        await asyncio.sleep(0.2)  # the clean-up's first DELETE is on its way
        assert any(r.method == "DELETE" for r in fake.requests)
        await registry.mark_down()
        said = await registry.verify()
        assert said[url] == "DOWN", said
        await asyncio.sleep(1.5)  # every DELETE sent has been applied by now
        assert fake.instances["pod-1"]["overriddenStatus"] == "DOWN", said
        assert fake.instances["pod-1"]["status"] == "DOWN"
    finally:
        cleanup.cancel()
        await asyncio.gather(cleanup, return_exceptions=True)
        await registry.close()


async def test_a_cleanup_delete_landing_after_the_read_back_is_undone_too(
    serve: Serve, session: aiohttp.ClientSession
) -> None:
    # The fence above lasted until the read-back's deadline only. A server may apply a DELETE
    # whose answer never came much later (a GC pause, a frozen peer): Eureka removes the
    # override whatever its timestamps, and the app's next renewal puts the pod back in
    # service. Here the DELETE lands about a second after the read-back ended.
    fake, url = await serve([instance("pod-1", status="DOWN", overriddenStatus="DOWN")])
    fake.delete_delay = 2.5  # applied 2.5 s after it came; the read-back ends 1.55 s in
    registry = EurekaRegistry(config([url]), session)
    loop = asyncio.get_running_loop()
    cleanup = asyncio.create_task(registry.run())
    try:
        with capture_logs() as logs:
            async with asyncio.timeout(5):  # until the clean-up's DELETE is on its way
                while not [r for r in fake.requests if r.method == "DELETE"]:
                    await asyncio.sleep(0.01)
            sent = loop.time()
            await registry.mark_down()
            assert (await registry.verify())[url] == "DOWN"
            assert loop.time() - sent < 2.5, "the read-back outlasted the DELETE: no late case"
            async with asyncio.timeout(10):
                while not [e for e in logs if e["event"] == "eureka_override_restored"]:
                    await asyncio.sleep(0.05)
            await asyncio.sleep(0.2)  # the PUT's answer
        assert fake.instances["pod-1"]["overriddenStatus"] == "DOWN"
        assert fake.instances["pod-1"]["status"] == "DOWN"
        [restored] = [e for e in logs if e["event"] == "eureka_override_restored"]
        assert restored["result"] == "ok" and "after the read-back" in restored["reason"]
    finally:
        cleanup.cancel()
        await asyncio.gather(cleanup, return_exceptions=True)
        await registry.close()
    assert registry._fence is not None and registry._fence.done()  # close() ends the fence


async def test_actuator_unreachable_names_the_endpoint_without_credentials(
    session: aiohttp.ClientSession,
) -> None:
    url = (
        dead_url()
        .replace("http://", "http://admin:s3cret@")
        .replace("/eureka/", "/actuator/serviceregistry?token=t0k")
    )
    cfg = load(
        {
            "PRESTOP_REGISTRY": "actuator",
            "PRESTOP_ACTUATOR_URL": url,
            "PRESTOP_REGISTRY_TIMEOUT_SECONDS": "0.5",
        }
    )
    registry = open_registry(cfg, session)
    with pytest.raises(RegistryError) as error:
        await registry.mark_down()
    assert (
        "admin:***@" in str(error.value)
        and "s3cret" not in str(error.value)
        and "t0k" not in str(error.value)
    )


async def test_register_registers_renews_marks_and_cancels(
    serve: Serve, session: aiohttp.ClientSession
) -> None:
    fake, url = await serve([])
    with_auth = url.replace("http://", "http://u:p%2B1@")
    cfg = load(
        {
            "PRESTOP_REGISTRY": "register",
            "PRESTOP_EUREKA_URLS": with_auth,
            "PRESTOP_EUREKA_APP": "py-app",
            "POD_IP": POD_IP,
            "POD_NAME": "py-app-0",
            "PRESTOP_APP_PORT": "9000",
            "PRESTOP_EUREKA_RENEWAL_SECONDS": "0.1",
            "PRESTOP_REGISTRY_TIMEOUT_SECONDS": "1",
        }
    )
    registry = open_registry(cfg, session)
    assert isinstance(registry, RegisterRegistry)
    task = asyncio.create_task(registry.run())
    await asyncio.sleep(0.35)
    registered = fake.instances[f"{POD_IP}:py-app:9000"]
    assert registered["status"] == "UP" and registered["metadata"]["pod"] == "py-app-0"
    assert registered["ipAddr"] == POD_IP and registered["port"]["$"] == 9000
    renewals = [r for r in fake.requests if r.method == "PUT" and "status" not in r.path]
    assert len(renewals) >= 2
    auth = base64.b64encode(b"u:p+1").decode()
    assert {r.headers.get("Authorization") for r in fake.requests} == {f"Basic {auth}"}
    assert {r.headers.get("Connection", "keep-alive").lower() for r in fake.requests} == {
        "keep-alive"
    }

    await registry.mark_down()
    assert (await registry.verify())[with_auth.replace("p%2B1", "***")] == "DOWN"
    await registry.finalize()
    await asyncio.wait_for(task, 2)
    assert f"{POD_IP}:py-app:9000" not in fake.instances
    await asyncio.sleep(0.25)  # no renewal after the cancel would register it again
    assert f"{POD_IP}:py-app:9000" not in fake.instances
    await registry.close()


async def test_register_publishes_the_pod_address_and_paths_never_secrets(
    serve: Serve, session: aiohttp.ClientSession
) -> None:
    """Issue 21 item 1: every Eureka client, the dashboard and Spring Boot Admin read the
    registration; it carries what a Spring Boot instance publishes, never the agent's private
    health URL (its password, its query token, its loopback host)."""
    fake, url = await serve([])
    cfg = load(
        {
            "PRESTOP_REGISTRY": "register",
            "PRESTOP_EUREKA_URLS": url,
            "PRESTOP_EUREKA_APP": "py-app",
            "POD_IP": "fd00:77::5",
            "PRESTOP_APP_PORT": "9000",
            "PRESTOP_APP_HEALTH_URL": "http://probe:pa55word@127.0.0.1:9001/manage/health?token=t0k3n",
            "PRESTOP_EUREKA_RENEWAL_SECONDS": "0.1",
        }
    )
    registry = open_registry(cfg, session)
    task = asyncio.create_task(registry.run())
    try:
        await asyncio.sleep(0.3)
    finally:
        await registry.finalize()
        await asyncio.wait_for(task, 2)
    registrations = [r for r in fake.requests if r.method == "POST"]
    assert registrations
    registered = fake.registered[-1]
    published = json.dumps(registered)
    for secret in ("pa55word", "t0k3n", "probe", "127.0.0.1", "?"):
        assert secret not in published, published
    assert registered["healthCheckUrl"] == "http://[fd00:77::5]:9001/manage/health"
    assert registered["statusPageUrl"] == "http://[fd00:77::5]:9001/actuator/info"
    assert registered["homePageUrl"] == "http://[fd00:77::5]:9000/"


# ------------------------------------------------------------------------------------- health


class ScriptedRegistry:
    """A backend whose health checks answer from a script (the watch's logic is under test)."""

    name = "eureka"

    def __init__(self, *answers: RegistryHealth | BaseException | float) -> None:
        self.answers = list(answers)

    async def check_health(self) -> RegistryHealth:
        answer = self.answers.pop(0)
        if isinstance(answer, float):
            await asyncio.sleep(answer)  # hangs past the watch's timeout
        if isinstance(answer, BaseException):
            raise answer
        assert isinstance(answer, RegistryHealth)
        return answer


async def test_health_watch_logs_changes_of_state_only() -> None:
    down = RegistryHealth(HealthState.UNREACHABLE, "no server answered: a: refused")
    down_again = RegistryHealth(HealthState.UNREACHABLE, "no server answered: a: timed out")
    missing = RegistryHealth(HealthState.NOT_FOUND, "DEMO-APP/x is not listed")
    found = RegistryHealth(HealthState.FOUND, "DEMO-APP/x listed by 1 of 1 server(s)")
    script = [down, down_again, down, missing, missing, found, found, found, missing]
    metrics = Metrics(CollectorRegistry())
    watch = HealthWatch(
        ScriptedRegistry(*script),  # type: ignore[arg-type]
        metrics,
        interval_seconds=30,
        timeout_seconds=1,
    )
    assert watch.report()["state"] == "not checked yet"
    ready = []
    with capture_logs() as logs:
        for _ in script:
            await watch.check()
            ready.append(
                metrics.collectors.get_sample_value("prestop_registry_ready", {"backend": "eureka"})
            )
    changes = [e for e in logs if e["event"] == "registry_health_changed"]
    assert [(e["state"], e["previous"], e["log_level"]) for e in changes] == [
        ("unreachable", None, "warning"),
        ("not_found", "unreachable", "warning"),
        ("found", "not_found", "info"),
        ("not_found", "found", "warning"),
    ]
    assert changes[0]["reason"] == "no server answered: a: refused"
    assert ready == [0, 0, 0, 0, 0, 1, 1, 1, 0]
    report = watch.report()
    assert report["state"] == "not_found" and report["ready"] is False
    assert report["reason"] == "DEMO-APP/x is not listed"
    assert report["checks"] == len(script) and report["checked_at"].endswith("Z")


async def test_health_watch_turns_a_hang_or_a_bug_into_unreachable() -> None:
    metrics = Metrics(CollectorRegistry())
    found = RegistryHealth(HealthState.FOUND, "listed")
    watch = HealthWatch(
        ScriptedRegistry(found, 5.0, found, RuntimeError("boom")),  # type: ignore[arg-type]
        metrics,
        interval_seconds=30,
        timeout_seconds=0.2,
    )
    with capture_logs() as logs:
        assert (await watch.check()).ready
        hung = await watch.check()
        assert (await watch.check()).ready
        bug = await watch.check()
    assert (hung.state, hung.reason) == (HealthState.UNREACHABLE, "no answer within 0.2s")
    assert bug.state is HealthState.UNREACHABLE and "RuntimeError: boom" in bug.reason
    assert len([e for e in logs if e["event"] == "registry_health_changed"]) == 4


async def test_actuator_health_tells_a_missing_endpoint_from_a_dead_app(
    session: aiohttp.ClientSession,
) -> None:
    async def registration(request: web.Request) -> web.Response:
        return web.json_response({"status": "UP"})

    app = web.Application()
    app.router.add_get("/actuator/serviceregistry", registration)
    server = TestServer(app, host="127.0.0.1")
    await server.start_server()
    try:
        base = f"http://127.0.0.1:{server.port}"

        async def health(url: str) -> RegistryHealth:
            env = {"PRESTOP_REGISTRY": "actuator", "PRESTOP_ACTUATOR_URL": url}
            return await open_registry(load(env), session).check_health()

        found = await health(f"{base}/actuator/serviceregistry")
        missing = await health(f"{base}/actuator/nothing-here")
        dead = await health(dead_url())
    finally:
        await server.close()
    assert found.state is HealthState.FOUND and "'status': 'UP'" in found.reason
    assert missing.state is HealthState.NOT_FOUND and "HTTP 404" in missing.reason
    assert dead.state is HealthState.UNREACHABLE


# ------------------------------------------------------------------ untrusted answers (issue 9)


async def test_an_unusable_host_beside_a_good_server_does_not_hide_its_success(
    serve: Serve, session: aiohttp.ClientSession
) -> None:
    # Issue 9: "http://a..b/" beside a good server turned a successful mark-down into a 500
    # (`unexpected UnicodeError` from the resolver). Config now refuses such a host; the request
    # layer still turns whatever a new caller might pass it into that server's failure.
    _, url = await serve([instance("a")])
    good = config([url], PRESTOP_EUREKA_INSTANCE_ID="a")
    bad = "http://a..b:8761/eureka/"
    registry = EurekaRegistry(dataclasses.replace(good, eureka_urls=(bad, url)), session)
    said = await registry.mark_down()
    assert said[url]["result"] == "ok"
    assert said[bad]["result"] == "failed"
    assert "UnicodeError" in said[bad]["error"] or "Cannot connect" in said[bad]["error"]
    assert (await registry.verify())[url] == "DOWN"


async def test_the_app_health_check_reports_any_failure_as_not_ready(
    session: aiohttp.ClientSession,
) -> None:
    # Issue 9: as PRESTOP_APP_HEALTH_URL, such a host made every /ready a 500 with a traceback.
    health = AppHealth("http://a..b:8080/health", session, cache_seconds=0.0)
    healthy, reason = await health.check()
    assert not healthy and reason.startswith("app health unreachable: ")


async def test_a_dirty_timestamp_of_the_wrong_type_never_reaches_the_url(
    serve: Serve, session: aiohttp.ClientSession
) -> None:
    fake, url = await serve([instance("a", lastDirtyTimestamp={"nested": ["x y"]})])
    said = await EurekaRegistry(config([url], PRESTOP_EUREKA_INSTANCE_ID="a"), session).mark_down()
    assert said[url]["result"] == "ok" and said[url]["lastDirtyTimestamp"] is None
    put = next(r for r in fake.requests if r.method == "PUT")
    assert "lastDirtyTimestamp" not in put.query


@pytest.mark.parametrize(
    ("body", "reason"),
    [
        (b"[" * 100_000 + b"]" * 100_000, "nested too deeply"),
        (b'{"a": "\x80\x81"}', "not UTF-8"),
        (b'{"instance": {"a": ', "not JSON"),
    ],
)
def test_parse_json_turns_every_decoding_failure_into_a_reason(body: bytes, reason: str) -> None:
    with pytest.raises(RequestFailed, match=reason):
        parse_json(body)


async def test_an_answer_over_the_cap_is_refused_before_it_is_held(
    session: aiohttp.ClientSession,
) -> None:
    async def endless(request: web.Request) -> web.StreamResponse:
        response = web.StreamResponse()
        await response.prepare(request)
        for _ in range(1000):
            await response.write(b" " * 65536)
        return response

    async def promised(request: web.Request) -> web.Response:
        return web.Response(body=b"{}", headers={"Content-Length": "4294967296"})

    app = web.Application()
    app.router.add_get("/endless/", endless)
    app.router.add_get("/promised/", promised)
    async with TestServer(app) as server:
        http = Http(session, timeout=5.0)
        for path in ("endless", "promised"):
            target = Server.parse(str(server.make_url(f"/{path}/")))
            with pytest.raises(RequestFailed, match=f"answer larger than {MAX_ANSWER_BYTES} bytes"):
                await http.request(target, "GET", "")


async def test_fields_of_the_wrong_type_are_shown_by_type_never_printed(
    serve: Serve, session: aiohttp.ClientSession
) -> None:
    nested: Any = "DOWN"
    for _ in range(500):
        nested = [nested]
    fake, url = await serve([instance("a")])
    registry = EurekaRegistry(config([url], PRESTOP_EUREKA_INSTANCE_ID="a"), session)
    await registry.mark_down()
    fake.instances["a"]["status"] = nested  # the server now answers with a nested status
    with pytest.raises(RegistryError, match=r"no server shows DOWN: .*: <a JSON list>"):
        await registry.verify()
    described = await registry.describe()
    assert described["servers"][url]["status"] == "<a JSON list>"


# ------------------------------------------------------------- the client-facing view (error paths)


async def _warm_view(url_list: list[str], session: aiohttp.ClientSession) -> ClientView:
    """A view read as the agent reads it just before the PUT: the peers behind each URL known."""
    view = ClientView(config(url_list, PRESTOP_DRAIN_POLL_SECONDS="0.01"), session)
    await view.warm()
    return view


async def _watch(
    url_list: list[str],
    session: aiohttp.ClientSession,
    *,
    view: ClientView | None = None,
    remark: Callable[[Server], Awaitable[str]] | None = None,
    unmarked: tuple[str, ...] = (),
    seconds: float = 5.0,
) -> Propagation:
    """Watch until every server showed the change, or for ``seconds`` (then cancelled)."""
    view = view or await _warm_view(url_list, session)
    seen = Propagation(registry=True, client_refresh=6.5, server_cache=3.0)
    loop = asyncio.get_running_loop()
    started = loop.time()
    task = view.watch(seen, lambda: loop.time() - started, remark=remark, unmarked=unmarked)
    done, _ = await asyncio.wait({task}, timeout=seconds)
    if not done:
        task.cancel()
        await asyncio.gather(task, return_exceptions=True)
    return seen


async def test_a_view_that_keeps_failing_is_assumed_and_still_read(
    serve: Serve, session: aiohttp.ClientSession
) -> None:
    fake, url = await serve([instance("pod-1")])
    view = await _warm_view([url], session)  # before the PUT: one peer, read
    fake.requests.clear()
    fake.statuses = [503] * 1000
    seen = await _watch([url], session, view=view, seconds=1.5)
    assert seen.visible_to_clients is None
    assert list(seen.unobservable) == [url]
    # the server cache's bound (3 s from the PUT), not "now" (5 s)
    assert seen.floor(elapsed=5.0) == 3.0 + 6.5
    # lost after 3 reads at once, then read again about a second later: not given up on
    assert 4 <= len(fake.requests) < 10


async def test_a_server_back_from_a_loss_still_up_gets_the_change_again(
    serve: Serve, session: aiohttp.ClientSession
) -> None:
    fake, url = await serve([instance("pod-1")])
    view = await _warm_view([url], session)  # before the PUT: one peer, read
    fake.statuses = [503] * 3
    remarked: list[Server] = []

    async def remark(server: Server) -> str:
        remarked.append(server)
        fake.instances["pod-1"]["status"] = "DOWN"
        return "ok"

    with capture_logs() as logs:
        seen = await _watch([url], session, view=view, remark=remark)
    assert [s.shown for s in remarked] == [url]
    assert seen.servers[url] is not None  # then seen DOWN: the watch ended
    assert seen.unobservable == {}
    # lost with the 3 s bound assumed: seeing it later does not lower that
    assert seen.floor(elapsed=5.0) == 3.0 + 6.5
    events = [e["event"] for e in logs]
    assert "eureka_view_lost" in events and "eureka_remarked" in events


async def test_a_server_the_put_did_not_reach_gets_it_on_its_first_up_answer(
    serve: Serve, session: aiohttp.ClientSession
) -> None:
    fake, url = await serve([instance("pod-1")])
    remarked: list[str] = []

    async def remark(server: Server) -> str:
        remarked.append(server.shown)
        fake.instances["pod-1"]["status"] = "DOWN"
        return "ok"

    seen = await _watch([url], session, remark=remark, unmarked=(url,))
    assert remarked == [url]
    assert seen.visible_to_clients is not None


async def test_the_registry_puts_the_change_again_on_one_server(
    serve: Serve, session: aiohttp.ClientSession
) -> None:
    fake, url = await serve([instance("pod-1")])
    registry = EurekaRegistry(config([url], PRESTOP_EUREKA_INSTANCE_ID="pod-1"), session)
    assert await registry.remark(Server.parse(url)) == "ok"
    assert fake.instances["pod-1"]["overriddenStatus"] == "DOWN"
    fake.statuses = [404]
    assert (await registry.remark(Server.parse(url))).startswith("failed: ")


async def test_a_server_not_read_before_the_put_counts_as_assumed(
    serve: Serve, session: aiohttp.ClientSession
) -> None:
    # Its key may be cold (a restarted peer): a change it shows first is not a measurement.
    fake, url = await serve([instance("pod-1", status="DOWN")])
    view = ClientView(config([url], PRESTOP_DRAIN_POLL_SECONDS="0.01"), session)
    fake.statuses = [503]
    await view.warm()
    seen = await _watch([url], session, view=view)
    assert seen.servers[url] is not None
    assert seen.floor(elapsed=1.0) == 3.0 + 6.5  # not the 0.0 + 6.5 its answer alone gives
    await view.warm()  # read this time: the next drain measures it
    seen = await _watch([url], session, view=view)
    assert seen.floor(elapsed=1.0) == pytest.approx(seen.servers[url] + 6.5)


async def test_keep_hot_failures_warn_after_a_few_in_a_row_and_show_in_status(
    serve: Serve, session: aiohttp.ClientSession
) -> None:
    fake, url = await serve([instance("pod-1")])
    view = ClientView(config([url]), session)
    fake.statuses = [503] * KEEP_HOT_WARN_AFTER
    with capture_logs() as logs:
        for _ in range(KEEP_HOT_WARN_AFTER - 1):
            await view._keep_one(Server.parse(url))
        assert [e for e in logs if e["log_level"] == "warning"] == []
        await view._keep_one(Server.parse(url))
        [warning] = [e for e in logs if e["log_level"] == "warning"]
        assert warning["event"] == "eureka_view_key_cold" and "HTTP 503" in warning["error"]
        assert view.report()[url]["key"] == "cold"
        assert view.report()[url]["failures_in_a_row"] == KEEP_HOT_WARN_AFTER
        await view._keep_one(Server.parse(url))
    assert view.report()[url]["key"] == "warm"
    # The key's recovery is said (the peers found behind the URL may be said after it).
    assert [e["event"] for e in logs][-2:] == ["eureka_view_key_warm", "eureka_view_peers"]


async def test_an_instance_the_view_never_listed_is_not_taken_as_gone(
    serve: Serve, session: aiohttp.ClientSession
) -> None:
    # Listed under another address: absence there proves nothing about what clients see.
    _, url = await serve([instance("pod-1", ip="10.9.9.9")])
    seen = await _watch([url], session)
    assert seen.visible_to_clients is None
    assert "not listed" in seen.unobservable[url]


async def test_the_view_showing_the_status_is_recorded_per_server(
    serve: Serve, session: aiohttp.ClientSession
) -> None:
    slow, lagging = await serve([instance("pod-1")])
    _, prompt = await serve([instance("pod-1", status="OUT_OF_SERVICE")])
    watching = asyncio.create_task(_watch([lagging, prompt], session))
    await asyncio.sleep(0.3)
    assert not watching.done()  # one server still shows UP to its clients: the watch goes on
    slow.instances["pod-1"]["status"] = "DOWN"
    seen = await watching
    assert seen.servers[prompt] is not None and seen.servers[prompt] < 0.2
    # changed 0.3 s after the test began waiting; the watch's clock started a little later
    assert seen.servers[lagging] is not None and seen.servers[lagging] >= 0.25
    assert seen.visible_to_clients == seen.servers[lagging]
    assert seen.floor(elapsed=5.0) == pytest.approx(seen.servers[lagging] + 6.5)


@pytest_asyncio.fixture
async def garbage_server() -> AsyncIterator[str]:
    """A server that answers every request with a malformed HTTP head (aiohttp's client then
    raises ClientResponseError, whose text quotes the request's full URL)."""

    async def answer(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        await reader.readuntil(b"\r\n\r\n")
        writer.write(b"HTTP/1.1 200 OK\r\nContent-Length: nope\r\n\r\n")
        await writer.drain()
        writer.close()

    server = await asyncio.start_server(answer, "127.0.0.1", 0)
    yield f"127.0.0.1:{server.sockets[0].getsockname()[1]}"
    server.close()
    await server.wait_closed()


async def test_client_errors_never_show_the_query_token(
    garbage_server: str, session: aiohttp.ClientSession
) -> None:
    # Issue 21 item 4: the token reached /ready, /status, the 500, the logs and check.
    health = AppHealth(f"http://{garbage_server}/actuator/health?token=t0k3n-q", session)
    healthy, reason = await health.check()
    assert not healthy and "ClientResponseError" in reason, reason
    assert "t0k3n-q" not in reason and "health?***" in reason, reason
    cfg = load(
        {
            "PRESTOP_REGISTRY": "actuator",
            "PRESTOP_ACTUATOR_URL": f"http://{garbage_server}/actuator/serviceregistry?k=t0k3n-q",
            "PRESTOP_REGISTRY_TIMEOUT_SECONDS": "0.5",
        }
    )
    registry = open_registry(cfg, session)
    with pytest.raises(RegistryError) as error:
        await registry.mark_down()
    assert "t0k3n-q" not in str(error.value), error.value
    health_now = await registry.check_health()
    assert "t0k3n-q" not in health_now.reason, health_now.reason


@pytest_asyncio.fixture
async def echo_server() -> AsyncIterator[tuple[str, list[int]]]:
    """A server that answers every request with ``statuses[0]`` and the request's own head as
    the body (some proxies and frameworks echo the request in their error pages)."""
    statuses = [401]

    async def echo(request: web.Request) -> web.Response:
        head = f"{request.method} {request.path_qs}\n" + "".join(
            f"{k}: {v}\n" for k, v in request.headers.items()
        )
        return web.Response(status=statuses[0], text=head)

    app = web.Application()
    app.router.add_route("*", "/{tail:.*}", echo)
    server = TestServer(app, host="127.0.0.1")
    await server.start_server()
    yield f"127.0.0.1:{server.port}", statuses
    await server.close()


@pytest.mark.parametrize("status", [401, 500])
async def test_an_error_answer_echoing_the_request_never_shows_its_credentials(
    echo_server: tuple[str, list[int]], session: aiohttp.ClientSession, status: int
) -> None:
    # Issue 21 item 8: 120 bytes of the body were quoted; a registry echoing the request in a
    # 401 gave away most of the Basic header (and the query token of an actuator URL).
    where, statuses = echo_server
    statuses[0] = status
    basic = base64.b64encode(b"admin:" + SECRET.encode()).decode()
    env = {"PRESTOP_EUREKA_INSTANCE_ID": "i-1", "PRESTOP_REGISTRY_TIMEOUT_SECONDS": "0.5"}
    password = quote(SECRET, safe="")
    eureka = EurekaRegistry(config([f"http://admin:{password}@{where}/eureka/"], **env), session)
    actuator = open_registry(
        load(
            {
                "PRESTOP_REGISTRY": "actuator",
                "PRESTOP_ACTUATOR_URL": f"http://admin:{password}@{where}/sr?token=t0k3n-q",
                "PRESTOP_REGISTRY_TIMEOUT_SECONDS": "0.5",
            }
        ),
        session,
    )
    for registry in (eureka, actuator):
        with pytest.raises(RegistryError) as error:
            await registry.mark_down()
        health = await registry.check_health()
        for text in (str(error.value), health.reason):
            assert f"HTTP {status}" in text, text
            for secret in (basic[:8], basic[-8:], "t0k3n-q", SECRET, password):
                assert secret not in text, text
            # An answer about credentials is about what the agent sent: none of it is quoted
            # (not even redacted: a scheme the redaction does not know would show whole).
            assert ("Host: 127.0.0.1" not in text) is (status == 401), text


ANSWERS = {
    "401": (401, "text/plain", b"Unauthorized"),
    "302": (302, "text/html", b"<a href='/login'>moved</a>"),
    "xml": (200, "application/xml", b"<application><name>DEMO-APP</name></application>"),
}


@pytest.mark.parametrize("answer", ANSWERS)
def test_check_names_what_a_server_answered_instead_of_calling_it_unreachable(
    answer: str, capsys: pytest.CaptureFixture[str]
) -> None:
    # Issue 21 item 12: a server that answered 401, a 3xx or XML was "NOT reachable" (exit 1).
    import http.server
    import threading

    from agent import cli

    status, content_type, body = ANSWERS[answer]

    class Handler(http.server.BaseHTTPRequestHandler):
        def do_GET(self) -> None:
            self.send_response(status)
            self.send_header("Content-Type", content_type)
            self.send_header("Location", "/login")
            self.send_header("Content-Length", str(len(body)))
            self.end_headers()
            self.wfile.write(body)

        def log_message(self, *args: Any) -> None:
            pass

    server = http.server.ThreadingHTTPServer(("127.0.0.1", 0), Handler)
    threading.Thread(target=server.serve_forever, daemon=True).start()
    url = f"http://127.0.0.1:{server.server_address[1]}/eureka/"
    try:
        for env in ({}, {"PRESTOP_EUREKA_INSTANCE_ID": "i-1"}):  # found by address, or by id
            code = cli.check(config([url], **env))
            out = capsys.readouterr().out
            assert code == cli.EXIT_INSTANCE_NOT_FOUND, out
            assert "NOT reachable" not in out and "server reachable" in out, out
            assert f"answered: HTTP {status}" in out or "answered: the answer is not JSON" in out
    finally:
        server.shutdown()


async def test_a_put_that_timed_out_but_was_applied_is_read_back_not_reported_failed(
    serve: Serve, session: aiohttp.ClientSession
) -> None:
    # Issue 21 item 13: "could not mark" although the registry showed DOWN.
    fake, url = await serve([instance("a")])
    fake.put_answer_delay = 5.0  # applied at once, answered after every client timeout
    registry = EurekaRegistry(config([url], PRESTOP_EUREKA_INSTANCE_ID="a"), session)
    said = await registry.mark_down()
    assert said[url]["result"] == "ok" and said[url]["confirmed_by"] == "read_back", said
    assert "no answer within" in said[url]["error"]  # what happened is still said
    assert (await registry.verify()) == {url: "DOWN"}


async def _two_peers(serve: Serve) -> tuple[FakeEureka, FakeEureka, list[tuple[str, int]]]:
    """Two peers for one proxy address: each stamps its own copy of the registration."""
    early, early_url = await serve([instance("pod-1", leaseInfo={"registrationTimestamp": 100})])
    late, late_url = await serve([instance("pod-1", leaseInfo={"registrationTimestamp": 350})])
    return early, late, [("127.0.0.1", yarl.URL(u).port or 0) for u in (early_url, late_url)]


async def test_one_url_in_front_of_several_peers_falls_back_to_the_assumed_bound(
    serve: Serve, session: aiohttp.ClientSession
) -> None:
    early, late, targets = await _two_peers(serve)
    with SpreadingProxy(targets) as proxy:
        view = ClientView(config([proxy.url()], PRESTOP_DRAIN_POLL_SECONDS="0.01"), session)
        with capture_logs() as logs:
            await view._keep_one(Server.parse(proxy.url()))
        assert len(set(proxy.connections)) == 2  # fresh connections reached both peers
        assert view.report()[proxy.url()]["peers"] == "several"
        assert view.report()[proxy.url()]["floor"].startswith("assumed: several Eureka peers")
        [said] = [e for e in logs if e["event"] == "eureka_view_peers"]
        assert said["log_level"] == "warning"
        early.instances["pod-1"]["status"] = late.instances["pod-1"]["status"] = "DOWN"
        seen = await _watch([proxy.url()], session, view=view)
    assert seen.servers[proxy.url()] is not None  # the peer it reached showed the change...
    assert seen.floor(elapsed=1.0) == 3.0 + 6.5  # ...but the other may be slower: assumed
    assert seen.visible_to_clients is None and seen.censored() == "unobservable"


async def test_one_server_at_its_url_is_measured(
    serve: Serve, session: aiohttp.ClientSession
) -> None:
    fake, url = await serve([instance("pod-1", leaseInfo={"registrationTimestamp": 100})])
    with SpreadingProxy([("127.0.0.1", yarl.URL(url).port or 0)]) as proxy:
        view = ClientView(config([proxy.url()], PRESTOP_DRAIN_POLL_SECONDS="0.01"), session)
        await view._keep_one(Server.parse(proxy.url()))
        assert len(proxy.connections) > 1  # fresh connections, one server
        assert view.report()[proxy.url()]["peers"] == "one"
        fake.instances["pod-1"]["status"] = "DOWN"
        seen = await _watch([proxy.url()], session, view=view)
    assert seen.floor(elapsed=1.0) == pytest.approx(seen.servers[proxy.url()] + 6.5)


async def test_peers_not_known_yet_at_the_trigger_are_found_before_the_put(
    serve: Serve, session: aiohttp.ClientSession
) -> None:
    # A pod deleted before its first keep-hot pass found the instance (it registered after the
    # agent started): the read before the PUT finds the peers, or the URL counts as assumed.
    early, late, targets = await _two_peers(serve)
    with SpreadingProxy(targets) as proxy:
        view = ClientView(config([proxy.url()], PRESTOP_DRAIN_POLL_SECONDS="0.01"), session)
        assert view.report()[proxy.url()]["peers"] == "unknown"
        await view.warm()
        assert view.report()[proxy.url()]["peers"] == "several"
        early.instances["pod-1"]["status"] = late.instances["pod-1"]["status"] = "DOWN"
        seen = await _watch([proxy.url()], session, view=view)
    assert seen.floor(elapsed=1.0) == 3.0 + 6.5  # one peer's answer does not stand for both


async def test_a_url_whose_peers_stay_unknown_counts_as_assumed(
    serve: Serve, session: aiohttp.ClientSession
) -> None:
    # No registration stamp to tell the peers apart: one peer's answer cannot be trusted alone.
    fake, url = await serve([instance("pod-1", leaseInfo={})])
    view = ClientView(config([url], PRESTOP_DRAIN_POLL_SECONDS="0.01"), session)
    await view.warm()
    assert view.report()[url]["peers"] == "unknown"
    assert view.report()[url]["floor"].startswith("assumed: the peers behind this URL")
    fake.instances["pod-1"]["status"] = "DOWN"
    seen = await _watch([url], session, view=view)
    assert seen.servers[url] is not None
    assert seen.floor(elapsed=1.0) == 3.0 + 6.5


async def test_check_says_how_the_floor_counts_each_url(
    serve: Serve, session: aiohttp.ClientSession, capsys: pytest.CaptureFixture[str]
) -> None:
    _, one = await serve([instance("pod-1", leaseInfo={"registrationTimestamp": 100})])
    _, other = await serve([instance("pod-1", leaseInfo={"registrationTimestamp": 350})])
    ports = [("127.0.0.1", yarl.URL(u).port or 0) for u in (one, other)]
    with SpreadingProxy(ports) as proxy:
        await _check_client_view(config([one, proxy.url()]), session)
    printed = capsys.readouterr().out
    assert f"{one}: measured: one Eureka server answers at this URL" in printed
    assert f"{proxy.url()}: assumed: several Eureka peers answer at this URL" in printed
