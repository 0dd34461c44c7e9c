"""agent.kube's calls and error branches against a small TLS server on loopback that answers as
the API server does (the shapes are the kube suite's v1.34.2 answers, tests/fixtures/
endpointslices). What the real API server says is the kube suite's to show."""

from __future__ import annotations

import asyncio
import contextlib
import functools
import json
import ssl
import time
from collections.abc import AsyncIterator, Callable
from pathlib import Path
from typing import Any

import aiohttp
import pytest
from aiohttp import web
from aiohttp.test_utils import TestServer
from prometheus_client import CollectorRegistry
from structlog.testing import capture_logs

import agent.kube
import agent.main
from agent.cli import check
from agent.config import load
from agent.endpointslices import EndpointSliceSource, follow
from agent.kube import MAX_ANSWER_BYTES, Gone, InCluster, KubeClient, KubeError
from agent.lifecycle import Lifecycle, Phase, Trigger
from agent.main import GRACE_READ_SECONDS, POD_GRACE, POD_READ_AT_START_SECONDS, Agent
from agent.metrics import Metrics
from agent.plan import ShutdownPlan
from tests.harness.support import free_port
from tests.test_registry_unit import APP, POD_IP, FakeEureka
from tests.test_registry_unit import PORT as EUREKA_PORT
from tests.test_registry_unit import instance as eureka_instance

FIXTURES = Path(__file__).parent / "fixtures" / "endpointslices"
LISTED = json.loads((FIXTURES / "list.json").read_text())
ALL_WATCH_LINES = (FIXTURES / "rollout-watch.jsonl").read_bytes().splitlines(keepends=True)
WATCH_LINES = ALL_WATCH_LINES[:4]

Handler = Callable[[web.Request], Any]


@pytest.fixture
def account(tmp_path: Path, certificate: tuple[Path, Path]) -> Path:
    (tmp_path / "token").write_text("first-token\n")
    (tmp_path / "ca.crt").write_bytes(certificate[0].read_bytes())
    return tmp_path


@pytest.fixture
async def api(
    certificate: tuple[Path, Path], account: Path
) -> AsyncIterator[Callable[[Handler], Any]]:
    """``await api(handler)``: a KubeClient for a server that answers every GET with handler."""
    runners: list[web.AppRunner] = []
    sessions: list[aiohttp.ClientSession] = []

    async def start(handler: Handler, call_seconds: float = 2.0) -> KubeClient:
        app = web.Application()
        app.router.add_get("/{tail:.*}", handler)
        runner = web.AppRunner(app)
        await runner.setup()
        runners.append(runner)
        context = ssl.create_default_context(ssl.Purpose.CLIENT_AUTH)
        context.load_cert_chain(*certificate)
        site = web.TCPSite(runner, "127.0.0.1", 0, ssl_context=context)
        await site.start()
        port = site._server.sockets[0].getsockname()[1]  # type: ignore[union-attr]
        session = aiohttp.ClientSession()
        sessions.append(session)
        return KubeClient(InCluster("127.0.0.1", port, account), session, timeout=call_seconds)

    yield start
    for session in sessions:
        await session.close()
    for runner in runners:
        await runner.cleanup()


async def test_get_pod_reads_the_rotating_token_every_time(
    api: Callable[[Handler], Any], account: Path
) -> None:
    seen: list[tuple[str, str]] = []

    async def pod(request: web.Request) -> web.Response:
        seen.append((request.path, request.headers["Authorization"]))
        return web.json_response({"kind": "Pod", "metadata": {"deletionGracePeriodSeconds": 10}})

    client = await api(pod)
    assert (await client.get_pod("default", "demo-app-1"))["metadata"] == {
        "deletionGracePeriodSeconds": 10
    }
    (account / "token").write_text("rotated-token")
    await client.get_pod("default", "demo-app-1")
    assert seen == [
        ("/api/v1/namespaces/default/pods/demo-app-1", "Bearer first-token"),
        ("/api/v1/namespaces/default/pods/demo-app-1", "Bearer rotated-token"),
    ]


async def test_list_and_watch_endpointslices(api: Callable[[Handler], Any]) -> None:
    queries: list[dict[str, str]] = []

    async def slices(request: web.Request) -> web.StreamResponse:
        queries.append(dict(request.query))
        assert request.path == "/apis/discovery.k8s.io/v1/namespaces/default/endpointslices"
        if "watch" not in request.query:
            return web.json_response(LISTED)
        response = web.StreamResponse()
        await response.prepare(request)
        bookmark = {"type": "BOOKMARK", "object": {"metadata": {"resourceVersion": "9"}}}
        for line in [json.dumps(bookmark).encode() + b"\n", *WATCH_LINES]:
            # Events split across writes, as a chunked stream may deliver them.
            half = len(line) // 2
            await response.write(line[:half])
            await asyncio.sleep(0.01)
            await response.write(line[half:])
        return response

    client = await api(slices)
    items, version = await client.list_endpointslices(
        "default", label_selector="kubernetes.io/service-name=demo-app"
    )
    assert [item["metadata"]["name"] for item in items][:1] == ["demo-app-kxhrt"]
    assert version == LISTED["metadata"]["resourceVersion"]
    events = [
        (kind, item["metadata"]["resourceVersion"])
        async for kind, item in client.watch_endpointslices("default", version, timeout_seconds=5)
    ]
    assert events == [
        (json.loads(line)["type"], json.loads(line)["object"]["metadata"]["resourceVersion"])
        for line in WATCH_LINES
    ]
    assert queries[0] == {"labelSelector": "kubernetes.io/service-name=demo-app"}
    assert queries[1]["resourceVersion"] == version
    assert queries[1]["timeoutSeconds"] == "5"


async def test_a_too_old_version_is_gone(api: Callable[[Handler], Any]) -> None:
    async def expired(request: web.Request) -> web.Response:
        status = {"kind": "Status", "code": 410, "message": "too old resource version: 1 (500)"}
        return web.Response(text=json.dumps({"type": "ERROR", "object": status}) + "\n")

    client = await api(expired)
    with pytest.raises(Gone, match="too old resource version"):
        async for _ in client.watch_endpointslices("default", "1"):
            pass


@pytest.mark.parametrize(
    ("status", "expected"),
    [
        (401, "HTTP 401, the API server refused the token"),
        (403, "HTTP 403, the ServiceAccount may not do this.*cannot list resource"),
        (500, r"HTTP 500 \(endpointslices.discovery.k8s.io is forbidden"),
    ],
)
async def test_refusals_are_named(
    api: Callable[[Handler], Any], status: int, expected: str
) -> None:
    async def refuse(request: web.Request) -> web.Response:
        message = 'endpointslices.discovery.k8s.io is forbidden: cannot list resource "x"'
        return web.json_response({"kind": "Status", "message": message}, status=status)

    client = await api(refuse)
    with pytest.raises(KubeError, match=expected):
        await client.list_endpointslices("default")


async def test_every_call_is_bounded(api: Callable[..., Any]) -> None:
    release = asyncio.Event()

    async def hang(request: web.Request) -> web.Response:
        await release.wait()
        return web.json_response({})

    client = await api(hang, call_seconds=0.3)
    with pytest.raises(KubeError, match=r"no answer within 0\.3s"):
        await client.get_pod("default", "p")
    release.set()


async def test_bad_answers_are_errors_not_tracebacks(api: Callable[[Handler], Any]) -> None:
    answers = iter([b"not json", b"[1]", b"{" + b" " * MAX_ANSWER_BYTES + b"}", b'{"items": 3}'])

    async def odd(request: web.Request) -> web.Response:
        return web.Response(body=next(answers), content_type="application/json")

    client = await api(odd)
    for expected in ("not JSON", "not a JSON object", "larger than", "not a list"):
        with pytest.raises(KubeError, match=expected):
            await client.list_endpointslices("default")


async def test_no_token_or_no_api_server(api: Callable[[Handler], Any], account: Path) -> None:
    async def never(request: web.Request) -> web.Response:
        raise AssertionError("no request without a token")

    client = await api(never)
    (account / "token").unlink()
    with pytest.raises(KubeError, match=r"no ServiceAccount token at .*mount one"):
        await client.get_pod("default", "p")
    async with aiohttp.ClientSession() as session:
        (account / "token").write_text("t")
        away = KubeClient(InCluster("127.0.0.1", 9, account), session, timeout=2.0)
        with pytest.raises(KubeError, match="get pod p: ClientConnectorError"):
            await away.get_pod("default", "p")


async def test_follow_reads_the_slices_into_the_source_and_warns_once(
    api: Callable[[Handler], Any],
) -> None:
    calls: list[str] = []

    async def server(request: web.Request) -> web.StreamResponse:
        calls.append("watch" if "watch" in request.query else "list")
        if calls == ["list"]:
            return web.json_response(LISTED)
        if calls == ["list", "watch"]:
            return web.Response(body=b"".join(ALL_WATCH_LINES))
        message = "endpointslices is forbidden: User cannot list resource"
        return web.json_response({"kind": "Status", "message": message}, status=403)

    client = await api(server)
    source = EndpointSliceSource(pod_ip="10.207.88.6", bound_seconds=5.0)
    pauses: list[float] = []

    async def sleep(seconds: float) -> None:
        pauses.append(seconds)
        if len(pauses) % 4 == 0:
            raise asyncio.CancelledError

    with capture_logs() as logged, pytest.raises(asyncio.CancelledError):
        await follow(client, source, "default", lambda: 1.0, sleep=sleep)
    # list, watch (the rollout: the pod went not ready), watch again: the server now refuses
    # (a 403 stands for RBAC removed), then the list is refused on every retry.
    assert calls[:4] == ["list", "watch", "watch", "list"]
    # It had seen the pod go not ready (1 s after the trigger, by the injected clock): losing
    # the API afterwards keeps that moment instead of the assumed bound.
    assert source.visible_at == pytest.approx(1.0)
    assert source.floor(1.0) == pytest.approx(6.0)
    blind = EndpointSliceSource(pod_ip="10.207.88.6", bound_seconds=5.0)
    with pytest.raises(asyncio.CancelledError):
        await follow(client, blind, "default", lambda: 1.0, sleep=sleep)
    assert blind.blind is not None and "HTTP 403" in blind.blind
    assert blind.floor(1.0) == pytest.approx(blind.assumed_update_seconds + 5.0)
    warnings = [entry for entry in logged if entry["log_level"] == "warning"]
    assert [entry["event"] for entry in warnings] == ["endpointslices_unreadable"]  # not per retry
    assert "list and watch on endpointslices" in warnings[0]["detail"]
    assert pauses == [1.0, 2.0, 5.0, 10.0] * 2


# --- the real grace period, read at the trigger through the client ------------------------------

IN_CLUSTER = {
    "KUBERNETES_SERVICE_HOST": "127.0.0.1",
    "POD_IP": "10.244.0.7",
    "POD_NAME": "orders-1",
    "POD_NAMESPACE": "shop",
    "PRESTOP_GRACE_PERIOD_SECONDS": "60",
}


def triggered_agent(client: KubeClient, **environ: str) -> Agent:
    """An agent in a cluster whose API server is ``client``'s, just triggered (its clock
    stands still: nothing here depends on how fast the machine is)."""
    agent = Agent(
        load({**IN_CLUSTER, **environ}),
        metrics=Metrics(CollectorRegistry()),
        lifecycle=Lifecycle(clock=lambda: 100.0, wall_clock=lambda: 0.0),
    )
    agent.kube, agent.namespace = client, "shop"
    agent.lifecycle.start(Trigger.PRESTOP)
    return agent


def pod_answer(grace: Any) -> Handler:
    async def pod(request: web.Request) -> web.Response:
        assert request.path == "/api/v1/namespaces/shop/pods/orders-1"
        metadata = {"name": "orders-1", "deletionTimestamp": "2026-12-05T22:00:00Z"}
        if grace is not None:
            metadata["deletionGracePeriodSeconds"] = grace
        return web.json_response({"kind": "Pod", "metadata": metadata})

    return pod


async def plan_grace(agent: Agent) -> ShutdownPlan:
    return await agent._plan_grace()


async def test_a_shorter_deletion_grace_period_replans_the_termination(
    api: Callable[[Handler], Any],
) -> None:
    agent = triggered_agent(await api(pod_answer(10)))
    configured = agent.plan
    with capture_logs() as logs:
        plan = await plan_grace(agent)
    assert plan is agent.plan and configured.budget.grace_period == 60.0
    # grace 10 - app shutdown 5 - margin 1 = answers due at 4 s; no registry: the drain has it all
    budget = plan.budget
    assert (budget.grace_period, budget.answer_by, budget.drain, budget.linger_until) == (
        10.0,
        4.0,
        4.0,
        9.0,
    )
    assert plan.drain_limit(0.5) == 3.5
    assert plan.grace_from == POD_GRACE
    said = {"grace_period_seconds": 10.0, "grace_period_from": POD_GRACE}
    assert said.items() <= agent.lifecycle.report().items()  # the answer and /status
    assert said.items() <= agent._status_extra()["plan"].items()
    assert agent.metrics.collectors.get_sample_value("prestop_drain_max_seconds") == 4.0
    [shortened] = [line for line in logs if line["event"] == "grace_period_shortened"]
    assert shortened["configured_grace_period_seconds"] == 60.0
    assert "less than PRESTOP_GRACE_PERIOD_SECONDS=60" in shortened["detail"]
    # The EndpointSlice floor (assumed 10 s + sync 5 s) no longer fits a 4 s drain: said.
    [floor] = [line for line in logs if line["event"] == "drain_floor_exceeds_max"]
    assert "endpointslices" in floor["detail"] or "EndpointSlice" in floor["detail"]
    assert "  (grace period from the pod's metadata.deletionGracePeriodSeconds)" in plan.describe()


@pytest.mark.parametrize(
    ("grace", "note"),
    [
        (90, None),  # longer than configured: the manifests were sized for the configured one
        (60, None),
        (None, "it is not being deleted"),  # a SIGTERM or /prestop without a deletion
        ("10", "is not a whole number"),  # not what the API server sends: not believed
    ],
)
async def test_a_grace_period_not_shorter_keeps_the_plan(
    api: Callable[[Handler], Any], grace: Any, note: str | None
) -> None:
    agent = triggered_agent(await api(pod_answer(grace)))
    configured = agent.plan
    assert await plan_grace(agent) is configured
    assert agent.lifecycle.grace is not None
    assert agent.lifecycle.grace.seconds == 60.0
    assert agent.lifecycle.grace.source == "PRESTOP_GRACE_PERIOD_SECONDS"
    assert (agent.lifecycle.grace.note is None) == (note is None)
    if note is not None:
        assert note in (agent.lifecycle.grace.note or "")


async def test_no_api_access_at_the_trigger_keeps_the_configured_grace_period(
    api: Callable[..., Any],
) -> None:
    async def refuse(request: web.Request) -> web.Response:
        return web.json_response({"kind": "Status", "message": "pods is forbidden"}, status=403)

    release = asyncio.Event()

    async def hang(request: web.Request) -> web.Response:
        await release.wait()
        return web.json_response({})

    for handler, said in ((refuse, "HTTP 403"), (hang, f"within {GRACE_READ_SECONDS:g}s")):
        # The client's own bound is longer than the trigger's read may take: the read's wins.
        agent = triggered_agent(await api(handler, call_seconds=30.0))
        with capture_logs() as logs:
            assert await plan_grace(agent) is agent.plan
        grace = agent.lifecycle.grace
        assert grace is not None and grace.seconds == 60.0 and said in (grace.note or "")
        assert not [line for line in logs if line["log_level"] in ("warning", "error")]
    release.set()


async def test_check_in_a_cluster_reads_the_slices_once(
    api: Callable[[Handler], Any],
    account: Path,
    monkeypatch: pytest.MonkeyPatch,
    capsys: pytest.CaptureFixture[str],
) -> None:
    answers = iter([web.json_response(LISTED), web.json_response({"message": "no"}, status=403)])

    async def listing(request: web.Request) -> web.Response:
        assert request.path == "/apis/discovery.k8s.io/v1/namespaces/shop/endpointslices"
        return next(answers)

    client = await api(listing)
    port = client.cluster.port
    # check builds its own client (in-cluster paths): point it at this server's account.
    monkeypatch.setattr(agent.kube, "InCluster", functools.partial(InCluster, folder=account))
    pod_ip = next(
        address
        for item in LISTED["items"]
        for endpoint in item.get("endpoints") or ()
        for address in endpoint["addresses"]
    )
    environ = {**IN_CLUSTER, "KUBERNETES_SERVICE_PORT": str(port), "POD_IP": pod_ip}
    config = load(environ)
    await asyncio.to_thread(check, config)
    out = capsys.readouterr().out
    assert "Kubernetes: the EndpointSlices of namespace shop are readable; 1 list" in out
    await asyncio.to_thread(check, config)
    out = capsys.readouterr().out
    assert "warning: Kubernetes: the EndpointSlices cannot be read: list endpointslices:" in out
    assert "HTTP 403" in out and "a Role with list and watch on endpointslices" in out


async def test_in_a_cluster_without_a_namespace_the_agent_warns_once_and_assumes(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    # No POD_NAMESPACE and no ServiceAccount mount to read it from: nothing to watch.
    monkeypatch.setattr(agent.main, "InCluster", functools.partial(InCluster, folder=tmp_path))
    environ = {key: value for key, value in IN_CLUSTER.items() if key != "POD_NAMESPACE"}
    clock = [100.0]
    subject = Agent(
        load(environ),
        metrics=Metrics(CollectorRegistry()),
        lifecycle=Lifecycle(clock=lambda: clock[0], wall_clock=lambda: 0.0),
    )
    with capture_logs() as logs:
        async with contextlib.AsyncExitStack() as resources:
            session = await resources.enter_async_context(aiohttp.ClientSession())
            subject._start_kube(resources, session)
    assert subject.kube is not None and subject.namespace is None
    [warning] = [line for line in logs if line["log_level"] == "warning"]
    assert warning["event"] == "endpointslices_unreadable" and "POD_NAMESPACE" in warning["detail"]
    subject.lifecycle.start(Trigger.SIGTERM)
    clock[0] += 1.0
    floor = subject.lifecycle.floor()
    # Assumed: the endpoint not ready 10 s after the trigger, + kube-proxy's sync 5 s.
    assert floor.at(1.0) == 15.0 and floor.latest(1.0) == "endpointslices"
    assert "namespace is not known" in (subject.slices.assumption if subject.slices else "")


# --- a restarted agent in a terminating pod (issue 21 item 7) -----------------------------------


@contextlib.asynccontextmanager
async def started_agent(
    api_port: int, eureka_url: str, **environ: str
) -> AsyncIterator[tuple[Agent, str]]:
    """An agent started in-process as in its pod (API client, registry, listener, the
    registry's start-up upkeep), with the API server on ``api_port``; yields it and its URL."""
    port = free_port()
    subject = Agent(
        load(
            {
                **IN_CLUSTER,
                "KUBERNETES_SERVICE_PORT": str(api_port),
                "POD_IP": POD_IP,
                "PRESTOP_HOST": "127.0.0.1",
                "PRESTOP_PORT": str(port),
                "PRESTOP_REGISTRY": "eureka",
                "PRESTOP_EUREKA_URLS": eureka_url,
                "PRESTOP_EUREKA_APP": APP.lower(),
                "PRESTOP_EUREKA_INSTANCE_ID": "ours",
                "PRESTOP_APP_PORT": str(EUREKA_PORT),
                **environ,
            }
        ),
        metrics=Metrics(CollectorRegistry()),
    )
    async with contextlib.AsyncExitStack() as resources:
        await subject._start(resources)
        yield subject, f"http://127.0.0.1:{port}"


@contextlib.asynccontextmanager
async def overridden_instance(
    updated: int, registered: int
) -> AsyncIterator[tuple[FakeEureka, str]]:
    """A fake Eureka server listing the instance ``ours`` with a DOWN override stamped
    ``updated``, on a lease ``registered`` (milliseconds); yields it and its URL."""
    fake = FakeEureka(
        [
            eureka_instance(
                "ours",
                status="DOWN",
                overriddenStatus="DOWN",
                lastUpdatedTimestamp=updated,
                leaseInfo={"registrationTimestamp": registered},
            )
        ]
    )
    server = TestServer(fake.app, host="127.0.0.1")
    await server.start_server()
    try:
        yield fake, f"http://127.0.0.1:{server.port}/eureka/"
    finally:
        await server.close()


def own_pod(deletion: str | None, release: asyncio.Event | None = None) -> Handler:
    """The API server: the agent's pod (being deleted when ``deletion`` is a timestamp, or
    hanging until ``release``), and no EndpointSlices for this account."""

    async def answer(request: web.Request) -> web.Response:
        if "/endpointslices" in request.path:
            return web.json_response({"kind": "Status", "message": "forbidden"}, status=403)
        assert request.path == "/api/v1/namespaces/shop/pods/orders-1"
        if release is not None:
            await release.wait()
        metadata = {"name": "orders-1", "uid": "c0ffee"}
        if deletion is not None:
            metadata |= {"deletionTimestamp": deletion, "deletionGracePeriodSeconds": 60}
        return web.json_response({"kind": "Pod", "metadata": metadata})

    return answer


async def settled(what: Callable[[], bool]) -> None:
    """Wait (bounded) until the registry's start-up upkeep has done ``what``."""
    async with asyncio.timeout(10):
        while not what():
            await asyncio.sleep(0.02)


def logged(logs: list[dict[str, Any]], event: str) -> list[dict[str, Any]]:
    return [line for line in logs if line["event"] == event]


async def test_a_restarted_agent_in_a_pod_being_deleted_keeps_out_of_service(
    api: Callable[..., Any], account: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    # Issue 21 item 7: killed mid-drain and restarted, the agent cleared its own pod's DOWN
    # override and answered /ready 200. Here the stamps even look like a previous pod's (both
    # at once): only the pod's deletion timestamp can tell, and it does.
    monkeypatch.setattr(agent.main, "InCluster", functools.partial(InCluster, folder=account))
    now = int(time.time() * 1000)
    client = await api(own_pod("2026-12-06T01:00:00Z"))
    with capture_logs() as logs:
        async with (
            overridden_instance(updated=now - 2_000, registered=now - 2_000) as (fake, eureka),
            started_agent(client.cluster.port, eureka) as (subject, url),
            aiohttp.ClientSession() as http,
        ):
            async with http.get(f"{url}/ready") as ready:
                assert ready.status == 503
                reason = (await ready.json())["reason"]
            await settled(lambda: bool(logged(logs, "eureka_own_override_kept")))
            async with http.get(f"{url}/status") as status:
                shown = (await status.json())["kubernetes"]["pod_at_start"]
    assert "metadata.deletionTimestamp 2026-12-06T01:00:00Z" in reason
    assert "restarted during the pod's termination" in reason
    assert shown == {
        "terminating": True,
        "deletion_timestamp": "2026-12-06T01:00:00Z",
        "note": None,
    }
    assert subject.lifecycle.phase is Phase.SERVING  # no drain of its own: the kubelet's hook
    assert not [r for r in fake.requests if r.method == "DELETE"]
    assert fake.instances["ours"]["overriddenStatus"] == "DOWN"
    [said] = logged(logs, "restarted_in_terminating_pod")
    assert said["deletion_timestamp"] == "2026-12-06T01:00:00Z"
    [kept] = logged(logs, "eureka_own_override_kept")
    assert "metadata.deletionTimestamp" in kept["reason"]


async def test_a_pod_not_being_deleted_is_ready_and_clears_an_override(
    api: Callable[..., Any], account: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    # Stamps that say "this pod's own" (set an hour after the registration, 8 s ago), but the
    # API says the pod stays: its previous agent was triggered without a deletion (a SIGTERM, a
    # /prestop by hand). Keeping the override would hold a serving pod out of service.
    monkeypatch.setattr(agent.main, "InCluster", functools.partial(InCluster, folder=account))
    now = int(time.time() * 1000)
    client = await api(own_pod(None))
    with capture_logs() as logs:
        async with (
            overridden_instance(updated=now - 8_000, registered=now - 3_600_000) as (fake, eureka),
            started_agent(client.cluster.port, eureka) as (subject, url),
            aiohttp.ClientSession() as http,
        ):
            async with http.get(f"{url}/ready") as ready:
                assert ready.status == 200
            await settled(lambda: fake.instances["ours"]["overriddenStatus"] == "UNKNOWN")
    assert subject.pod_at_start.as_dict() == {
        "terminating": False,
        "deletion_timestamp": None,
        "note": None,
    }
    assert logged(logs, "eureka_stale_override_cleared")
    assert not logged(logs, "restarted_in_terminating_pod")


async def test_an_api_server_that_hangs_delays_the_start_a_bounded_while(
    api: Callable[..., Any], account: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    # Whether the pod is being deleted is then not known: the registry's stamps decide, as
    # without the API (an override set an hour after the app's registration, 8 s ago: kept).
    monkeypatch.setattr(agent.main, "InCluster", functools.partial(InCluster, folder=account))
    now = int(time.time() * 1000)
    release = asyncio.Event()
    # The client's own bound (30 s) is far above the start-up read's: the read's bound wins.
    client = await api(own_pod("2026-12-06T01:00:00Z", release), call_seconds=30.0)
    try:
        with capture_logs() as logs:
            async with (
                overridden_instance(updated=now - 8_000, registered=now - 3_600_000) as (
                    fake,
                    eureka,
                ),
                started_agent(client.cluster.port, eureka) as (subject, url),
                aiohttp.ClientSession() as http,
            ):
                async with http.get(f"{url}/ready") as ready:
                    assert ready.status == 200
                await settled(lambda: bool(logged(logs, "eureka_own_override_kept")))
    finally:
        release.set()
    assert subject.pod_at_start.terminating is None
    assert f"within {POD_READ_AT_START_SECONDS:g}s" in (subject.pod_at_start.note or "")
    [unread] = logged(logs, "pod_not_read_at_start")
    assert unread["log_level"] == "info" and "timestamps" in unread["detail"]
    assert not [r for r in fake.requests if r.method == "DELETE"]


def test_outside_a_cluster_there_is_no_client_and_no_source() -> None:
    subject = Agent(load({"POD_IP": "10.244.0.7"}), metrics=Metrics(CollectorRegistry()))
    assert subject.kube is None and subject.slices is None and subject.lifecycle.sources == []
    assert subject._status_extra()["kubernetes"] is None
