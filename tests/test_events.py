"""Events on the pod (agent.events): the Event's shape, the bounded queue, the failure count, the
refused-hook rate limit, the client's POST against a TLS server on loopback that answers as the
API server does, and the agent's wiring (an in-process agent posting to that server). What the
real API server accepts and shows is tests/kube/test_events.py's to prove."""

from __future__ import annotations

import asyncio
import functools
import json
import signal
import ssl
from collections.abc import AsyncIterator, Mapping
from pathlib import Path
from typing import Any

import aiohttp
import pytest
from aiohttp import web
from prometheus_client import CollectorRegistry
from structlog.testing import capture_logs

from agent import events, main
from agent.config import load
from agent.events import (
    DRAINED,
    DRAINING,
    FLOOR_NOT_REACHED,
    HOOK_REFUSED,
    REGISTRY_FAILED,
    EventRecorder,
    PodEvent,
    clipped,
    event_body,
)
from agent.kube import InCluster, KubeClient, KubeError
from agent.lifecycle import GracePeriod, Lifecycle, Trigger
from agent.main import Agent
from agent.metrics import Metrics
from agent.plan import ShutdownPlan
from tests.harness.support import free_port


class FakeClient:
    """Records the Events; fails or hangs on demand (the error branches)."""

    def __init__(self, *, fail: str | None = None, uid: str | None = "uid-1") -> None:
        self.posted: list[Mapping[str, Any]] = []
        self.fail = fail
        self.uid = uid
        self.release = asyncio.Event()
        self.release.set()

    async def create_event(self, namespace: str, body: Mapping[str, Any]) -> dict[str, Any]:
        await self.release.wait()
        if self.fail is not None:
            raise KubeError(self.fail)
        self.posted.append(body)
        return dict(body)

    async def get_pod(self, namespace: str, name: str) -> dict[str, Any]:
        if self.uid is None:
            raise KubeError("get pod: HTTP 403")
        return {"metadata": {"name": name, "uid": self.uid}}


def recorder(client: FakeClient | None, **kwargs: Any) -> tuple[EventRecorder, Metrics]:
    metrics = Metrics(CollectorRegistry())
    made = EventRecorder(client, metrics, pod="orders-0", namespace="shop", **kwargs)
    return made, metrics


def counted(metrics: Metrics, name: str, reason: str) -> float | None:
    return metrics.collectors.get_sample_value(
        f"prestop_kube_events_{name}_total", {"reason": reason}
    )


async def test_the_event_is_an_events_k8s_io_v1_event_on_the_pod() -> None:
    event = PodEvent(DRAINING, "Draining", "started", False, 1_733_400_000.123456)
    body = event_body(event, pod="orders-0", namespace="shop", uid="u-1")
    assert body == {
        "apiVersion": "events.k8s.io/v1",
        "kind": "Event",
        "metadata": {"generateName": "orders-0.prestop-", "namespace": "shop"},
        "eventTime": "2024-12-05T12:00:00.123456Z",
        "reportingController": "prestop-agent",
        "reportingInstance": "orders-0",
        "action": "Draining",
        "reason": "PrestopDraining",
        "note": "started",
        "type": "Normal",
        "regarding": {
            "apiVersion": "v1",
            "kind": "Pod",
            "name": "orders-0",
            "namespace": "shop",
            "uid": "u-1",
        },
    }
    warning = event_body(
        PodEvent(HOOK_REFUSED, "RefuseHook", "x", True, 0.0), pod="p", namespace="n"
    )
    assert warning["type"] == "Warning" and "uid" not in warning["regarding"]


def test_a_long_note_is_cut_to_the_apis_1024_bytes_never_inside_a_character() -> None:
    assert clipped("short") == "short"
    long = "é" * 600  # 1200 bytes
    cut = clipped(long)
    assert len(cut.encode()) <= 1024 and cut.endswith("…") and cut.startswith("é" * 500)
    assert len(clipped("a" * 1024).encode()) == 1024


async def test_events_are_posted_in_order_with_the_pods_uid_and_counted() -> None:
    client = FakeClient()
    made, metrics = recorder(client)
    task = asyncio.create_task(made.run())
    made.record(DRAINING, "Draining", "one")
    made.record(DRAINED, "Drained", "two")
    assert await made.flush(5.0)
    task.cancel()
    assert [(b["reason"], b["note"]) for b in client.posted] == [
        (DRAINING, "one"),
        (DRAINED, "two"),
    ]
    assert all(b["regarding"]["uid"] == "uid-1" for b in client.posted)
    assert counted(metrics, "posted", DRAINING) == 1 and counted(metrics, "posted", DRAINED) == 1
    # Every reason's series exists from the start (an alert counts with increase()).
    assert counted(metrics, "failed", HOOK_REFUSED) == 0


async def test_without_the_pods_uid_the_events_still_go_out() -> None:
    client = FakeClient(uid=None)
    made, _ = recorder(client)
    task = asyncio.create_task(made.run())
    with capture_logs() as logged:
        made.record(DRAINING, "Draining", "one")
        assert await made.flush(5.0)
    task.cancel()
    assert "uid" not in client.posted[0]["regarding"]
    assert [e["event"] for e in logged] == ["kube_pod_uid_unknown", "kube_event_posted"]


async def test_a_failure_to_post_is_one_warning_then_debug_and_a_count_never_a_raise() -> None:
    client = FakeClient(
        fail="create event: HTTP 403, the ServiceAccount may not do this: its Role needs"
        " apiGroups [events.k8s.io], resources [events], verbs [create]"
    )
    made, metrics = recorder(client)
    task = asyncio.create_task(made.run())
    with capture_logs() as logged:
        made.record(DRAINING, "Draining", "one")
        made.record(DRAINED, "Drained", "two")
        made.record(DRAINED, "Drained", "three")
        assert await made.flush(5.0)
    assert not task.done(), "the posting goes on after a failure"
    task.cancel()
    failed = [e for e in logged if e["event"] == "kube_event_failed"]
    assert [e["log_level"] for e in failed] == ["warning", "debug", "debug"]
    assert "verbs [create]" in failed[0]["error"]
    assert counted(metrics, "failed", DRAINING) == 1 and counted(metrics, "failed", DRAINED) == 2
    assert counted(metrics, "posted", DRAINED) == 0


async def test_the_queue_is_bounded_and_recording_never_waits_for_the_api_server() -> None:
    client = FakeClient()
    client.release.clear()  # the API server does not answer
    made, metrics = recorder(client, capacity=2)
    task = asyncio.create_task(made.run())
    await asyncio.sleep(0)  # the task reads the uid and waits on the queue
    with capture_logs() as logged:
        for number in range(5):
            # Synchronous: returns at once whatever the API server does.
            made.record(DRAINED, "Drained", str(number))
            await asyncio.sleep(0)
        # One Event is being posted (hangs), two wait in the queue, the other two are dropped.
        assert not await made.flush(0.2), "the flush is bounded"
    assert counted(metrics, "failed", DRAINED) == 2
    full = [e for e in logged if e["event"] == "kube_event_failed"]
    assert "queue of 2 Events is full" in full[0]["error"]
    client.release.set()
    assert await made.flush(5.0)
    task.cancel()
    assert [b["note"] for b in client.posted] == ["0", "1", "2"]


async def test_refused_hooks_are_one_event_per_ten_seconds() -> None:
    now = [100.0]
    client = FakeClient()
    made, _ = recorder(client, clock=lambda: now[0])
    task = asyncio.create_task(made.run())
    for at in (100.0, 101.0, 105.0, 109.9, 110.0, 125.0):
        now[0] = at
        made.hook_refused(401, "missing or wrong X-Prestop-Token header", "10.0.0.7")
    assert await made.flush(5.0)
    task.cancel()
    notes = [b["note"] for b in client.posted]
    assert [b["reason"] for b in client.posted] == [HOOK_REFUSED] * 3
    assert all(b["type"] == "Warning" for b in client.posted)
    assert notes[0].startswith("/prestop answered HTTP 401 to 10.0.0.7: missing or wrong")
    assert "more refused" not in notes[0]
    assert "(3 more refused since the last such Event)" in notes[1]
    assert "more refused" not in notes[2]


@pytest.mark.parametrize(
    ("client", "pod", "namespace", "why"),
    [
        (None, "orders-0", "shop", "not in a cluster (KUBERNETES_SERVICE_HOST unset)"),
        (FakeClient(), "", "shop", "POD_NAME unset"),
        (FakeClient(), "orders-0", "", "POD_NAMESPACE unset"),
    ],
)
async def test_disabled_without_a_cluster_or_the_pods_name(
    client: FakeClient | None, pod: str, namespace: str, why: str
) -> None:
    metrics = Metrics(CollectorRegistry())
    with capture_logs() as logged:
        made = EventRecorder(client, metrics, pod=pod, namespace=namespace)
        made.record(DRAINING, "Draining", "one")
        made.hook_refused(401, "no", None)
        await made.run()  # returns at once
        assert await made.flush()
    assert not made.enabled
    assert logged == [{"event": "kube_events_disabled", "reason": why, "log_level": "info"}]
    assert client is None or client.posted == []
    assert counted(metrics, "failed", DRAINING) is None


def test_the_notes_carry_the_plans_and_the_drains_figures() -> None:
    config = load(
        {
            "PRESTOP_DRAIN_MODE": "traffic",
            "PRESTOP_REGISTRY": "eureka",
            "PRESTOP_EUREKA_URLS": "http://eureka:8761/eureka/",
            "PRESTOP_EUREKA_APP": "orders",
            "POD_IP": "10.1.2.3",
            "PRESTOP_GRACE_PERIOD_SECONDS": "120",
        }
    )
    plan = ShutdownPlan.of(config)
    draining = events.draining_note(plan, Trigger.PRESTOP)
    assert draining.startswith("Draining, started by the preStop hook (/prestop)")
    for figure in ("drain traffic", f"at most {plan.budget.drain:g}s", "grace period 120s"):
        assert figure in draining, draining
    assert f"propagation floor at worst {plan.worst_case_floor():g}s (eureka at worst" in draining
    assert "configured" not in draining
    # The pod's deletion gave less: the note says the grace period in effect and where from.
    grace = GracePeriod(10.0, "metadata.deletionGracePeriodSeconds", 120.0)
    shortened = events.draining_note(plan.with_grace(grace), Trigger.PRESTOP, grace)
    assert (
        "grace period 10s (from the pod's metadata.deletionGracePeriodSeconds, less than the"
        " configured 120s)" in shortened
    ), shortened

    now = [0.0]
    lifecycle = Lifecycle(clock=lambda: now[0])
    lifecycle.start(Trigger.SIGTERM)
    lifecycle.propagation = plan.propagation()
    lifecycle.propagation.assumed_from = 0.5
    now[0] = 1.0
    step = lifecycle.begin("drain")
    now[0] = 80.0
    sources = lifecycle.floor().as_dict(80.0)["sources"]
    lifecycle.end(
        step, "max_before_floor", floor_seconds=100.5, floor_reached=False, floor_sources=sources
    )
    drained = events.drained_note(plan, lifecycle)
    assert drained.startswith("Drained: held the app serving 79.0s (80.0s after the trigger)")
    assert "ended by its maximum, before the propagation floor" in drained
    assert "floor 100.5s NOT reached" in drained
    # No server watched: the server cache's bound assumed from the end of the PUTs, + refresh.
    assert "eureka: assumed: server cache 30s from 0.5s (no server's view is watched)" in drained
    assert "+ 70s bound, floor 100.5s" in drained
    short = events.floor_not_reached_note(plan, lifecycle)
    assert short.startswith("The drain ended at its maximum 80.0s after the trigger, before the")
    assert "(100.5s)" in short and len(short.encode()) > 0


# --- the client's POST, against a TLS server on loopback --------------------------------------


@pytest.fixture
def account(tmp_path: Path, certificate: tuple[Path, Path]) -> Path:
    (tmp_path / "token").write_text("the-token\n")
    (tmp_path / "ca.crt").write_bytes(certificate[0].read_bytes())
    return tmp_path


class ApiServer:
    """Answers as the API server: records every Event POSTed, the pod on GET; ``status`` (201
    by default) is what the POSTs get."""

    def __init__(self) -> None:
        self.posted: list[tuple[str, str, dict[str, Any]]] = []
        self.status = 201
        self.hang = False
        self.released = asyncio.Event()
        """Set at the end: a hanging answer ends (the server's shutdown does not wait for it)."""
        self.port = 0

    async def create(self, request: web.Request) -> web.Response:
        if self.hang:
            await self.released.wait()
        body = await request.json()
        self.posted.append((request.path, request.headers["Authorization"], body))
        if self.status != 201:
            message = 'events.events.k8s.io is forbidden: User "x" cannot create resource "events"'
            return web.json_response({"kind": "Status", "message": message}, status=self.status)
        return web.json_response(
            {**body, "metadata": {"name": "orders-0.prestop-abcde"}}, status=201
        )

    async def pod(self, request: web.Request) -> web.Response:
        return web.json_response({"kind": "Pod", "metadata": {"uid": "pod-uid-7"}})


@pytest.fixture
async def api_server(certificate: tuple[Path, Path]) -> AsyncIterator[ApiServer]:
    server = ApiServer()
    app = web.Application()
    app.router.add_post("/apis/events.k8s.io/v1/namespaces/{ns}/events", server.create)
    app.router.add_get("/api/v1/namespaces/{ns}/pods/{name}", server.pod)
    runner = web.AppRunner(app)
    await runner.setup()
    context = ssl.create_default_context(ssl.Purpose.CLIENT_AUTH)
    context.load_cert_chain(*certificate)
    site = web.TCPSite(runner, "127.0.0.1", 0, ssl_context=context)
    await site.start()
    server.port = site._server.sockets[0].getsockname()[1]  # type: ignore[union-attr]
    yield server
    server.released.set()
    await runner.cleanup()


async def test_create_event_posts_to_the_events_api(api_server: ApiServer, account: Path) -> None:
    async with aiohttp.ClientSession() as session:
        client = KubeClient(InCluster("127.0.0.1", api_server.port, account), session)
        body = event_body(PodEvent(DRAINED, "Drained", "n", False, 0.0), pod="p", namespace="shop")
        created = await client.create_event("shop", body)
    assert created["metadata"]["name"] == "orders-0.prestop-abcde"
    assert api_server.posted == [
        ("/apis/events.k8s.io/v1/namespaces/shop/events", "Bearer the-token", body)
    ]


@pytest.mark.parametrize(
    ("status", "expected"),
    [
        (403, r"HTTP 403, .*its Role needs apiGroups \[events.k8s.io\], resources \[events\],"
              r" verbs \[create\] \(events.events.k8s.io is forbidden"),
        (401, "create event: HTTP 401, the API server refused the token"),
        (422, "create event: HTTP 422"),
    ],
)  # fmt: skip
async def test_create_event_refusals_are_named(
    api_server: ApiServer, account: Path, status: int, expected: str
) -> None:
    api_server.status = status
    async with aiohttp.ClientSession() as session:
        client = KubeClient(InCluster("127.0.0.1", api_server.port, account), session)
        with pytest.raises(KubeError, match=expected):
            await client.create_event("shop", {"kind": "Event"})


async def test_create_event_is_bounded(api_server: ApiServer, account: Path) -> None:
    api_server.hang = True
    async with aiohttp.ClientSession() as session:
        client = KubeClient(InCluster("127.0.0.1", api_server.port, account), session, timeout=0.3)
        with pytest.raises(KubeError, match=r"create event: no answer within 0\.3s"):
            await client.create_event("shop", {"kind": "Event"})


# --- the agent's wiring ----------------------------------------------------------------------


async def _terminate(
    api_server: ApiServer,
    account: Path,
    monkeypatch: pytest.MonkeyPatch,
    expect: int = 200,
    **env: str,
) -> tuple[Agent, list[dict[str, Any]], float]:
    """An agent in a 'cluster' (the loopback API server): a refused /prestop, then the real one
    (answered ``expect``), then SIGTERM; (the agent, its logs, how long the hook was held)."""
    monkeypatch.setattr(main, "InCluster", functools.partial(InCluster, folder=account))
    port = free_port()
    config = load(
        {
            "PRESTOP_HOST": "127.0.0.1",
            "PRESTOP_PORT": str(port),
            "PRESTOP_APP_PORT": str(free_port()),  # nothing listens: the app counts as exited
            "PRESTOP_DRAIN_MODE": "fixed",
            "PRESTOP_DRAIN_SECONDS": "0.3",
            "PRESTOP_TOKEN": "s3cret",
            "POD_NAME": "orders-0",
            "POD_NAMESPACE": "shop",
            "KUBERNETES_SERVICE_HOST": "127.0.0.1",
            "KUBERNETES_SERVICE_PORT": str(api_server.port),
            **env,
        }
    )
    agent = Agent(config, metrics=Metrics(CollectorRegistry()))
    with capture_logs() as logged:
        running = asyncio.create_task(agent.run())
        await asyncio.wait_for(agent.started.wait(), 5)
        url = f"http://127.0.0.1:{port}/prestop"
        async with aiohttp.ClientSession() as session:
            async with session.get(url) as refused:
                assert refused.status == 401
            async with session.get(url, headers={"X-Prestop-Token": "s3cret"}) as answer:
                assert answer.status == expect
                held = (await answer.json())["duration_seconds"]
        agent.handle_signal(signal.SIGTERM)
        assert await asyncio.wait_for(running, 10) == 0
    return agent, logged, held


async def test_the_agent_posts_the_terminations_events(
    api_server: ApiServer, account: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    agent, _, held = await _terminate(api_server, account, monkeypatch)
    bodies = [body for _, _, body in api_server.posted]
    assert [b["reason"] for b in bodies] == [HOOK_REFUSED, DRAINING, DRAINED]
    assert all(b["regarding"]["uid"] == "pod-uid-7" for b in bodies)
    assert "HTTP 401" in bodies[0]["note"] and bodies[0]["type"] == "Warning"
    assert bodies[1]["note"].startswith("Draining, started by the preStop hook (/prestop)")
    assert "drain fixed" in bodies[1]["note"]
    assert "no propagation floor (no registry)" in bodies[1]["note"]
    assert "floor" not in bodies[2]["note"], "no registry, no floor to speak of"
    assert bodies[2]["note"].startswith("Drained: held the app serving 0.3s")
    assert "ended by the fixed drain's length" in bodies[2]["note"]
    assert held >= 0.3
    metrics = agent.metrics
    assert counted(metrics, "posted", DRAINED) == 1 and counted(metrics, "failed", DRAINED) == 0


async def test_a_failed_mark_down_and_a_drain_cut_before_the_floor_are_warnings(
    api_server: ApiServer, account: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    closed = free_port()  # the Eureka server refuses: the mark-down fails fast
    env = {
        "PRESTOP_REGISTRY": "eureka",
        "PRESTOP_EUREKA_URLS": f"http://127.0.0.1:{closed}/eureka/",
        "PRESTOP_EUREKA_APP": "orders",
        "PRESTOP_EUREKA_INSTANCE_ID": "10.1.2.3:orders:8080",
        "PRESTOP_REGISTRY_TIMEOUT_SECONDS": "0.3",
        # A floor of at least 5 s that the 0.3 s fixed drain cannot reach.
        "PRESTOP_EUREKA_CLIENT_REFRESH_SECONDS": "5",
        "PRESTOP_EUREKA_SERVER_CACHE_SECONDS": "0",
    }
    # The hook answers 500 after a failed mark-down.
    await _terminate(api_server, account, monkeypatch, expect=500, **env)
    posted = {body["reason"]: body for _, _, body in api_server.posted}
    assert list(posted) == [HOOK_REFUSED, DRAINING, REGISTRY_FAILED, FLOOR_NOT_REACHED, DRAINED]
    failed, short = posted[REGISTRY_FAILED], posted[FLOOR_NOT_REACHED]
    assert failed["type"] == short["type"] == "Warning"
    assert failed["note"].startswith("Could not take the instance out of the registry: registry")
    assert short["note"].startswith("The drain ended at its maximum 0.")
    assert "no propagation floor" not in posted[DRAINING]["note"]
    assert "before the propagation floor (5." in short["note"]
    assert "floor 5." in posted[DRAINED]["note"] and "NOT reached" in posted[DRAINED]["note"]
    assert "error: registry eureka" in posted[DRAINED]["note"]


async def test_an_api_server_that_never_answers_never_delays_the_drain(
    api_server: ApiServer, account: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    api_server.hang = True
    _, logged, held = await _terminate(api_server, account, monkeypatch)
    # Each post waits up to the client's 5 s deadline: a drain that awaited one would be held
    # at least that long; it is held its 0.3 s (plus whatever a loaded machine adds).
    assert held < 3.0
    [unflushed] = [e for e in logged if e["event"] == "kube_events_not_flushed"]
    assert unflushed["seconds"] == events.FLUSH_SECONDS


async def test_a_refused_post_is_one_warning_and_counted(
    api_server: ApiServer, account: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    api_server.status = 403  # RBAC: the Role lacks create on events
    agent, logged, held = await _terminate(api_server, account, monkeypatch)
    assert held < 3.0
    failed = [e for e in logged if e["event"] == "kube_event_failed"]
    assert failed[0]["log_level"] == "warning" and "verbs [create]" in failed[0]["error"]
    assert {e["log_level"] for e in failed[1:]} == {"debug"}
    failures = {
        reason: counted(agent.metrics, "failed", reason)
        for reason in (HOOK_REFUSED, DRAINING, DRAINED, FLOOR_NOT_REACHED)
    }
    assert failures == {HOOK_REFUSED: 1, DRAINING: 1, DRAINED: 1, FLOOR_NOT_REACHED: 0}
    assert json.dumps(failed[0])  # a log line, not a traceback
