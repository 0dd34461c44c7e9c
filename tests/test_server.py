"""The HTTP handlers over real loopback HTTP, with the lifecycle driven by the test."""

from __future__ import annotations

import asyncio
from collections.abc import AsyncIterator, Callable, Coroutine
from typing import Any

import aiohttp
import pytest
from aiohttp import web
from aiohttp.test_utils import TestClient, TestServer
from prometheus_client import CollectorRegistry
from structlog.testing import capture_logs

from agent.config import Config, load
from agent.http import AppHealth
from agent.lifecycle import Lifecycle, Phase, Trigger
from agent.metrics import Metrics
from agent.server import TOKEN_HEADER, PendingAnswers, make_app

TOKEN = "tok-3f9a1c"

ClientFactory = Callable[..., Coroutine[Any, Any, TestClient]]


@pytest.fixture
async def make_client() -> AsyncIterator[ClientFactory]:
    clients: list[TestClient] = []

    async def factory(
        config: Config | None = None,
        lifecycle: Lifecycle | None = None,
        metrics: Metrics | None = None,
        **kwargs: Any,
    ) -> TestClient:
        app = make_app(
            config or load({}),
            lifecycle or Lifecycle(),
            metrics or Metrics(CollectorRegistry()),
            **kwargs,
        )
        client = TestClient(TestServer(app, host="127.0.0.1"))
        await client.start_server()
        clients.append(client)
        return client

    yield factory
    for client in clients:
        await client.close()


async def test_ready_flips_to_503_at_the_trigger(make_client: ClientFactory) -> None:
    lifecycle = Lifecycle()
    client = await make_client(lifecycle=lifecycle)
    assert (await client.get("/ready")).status == 200
    lifecycle.start(Trigger.SIGTERM)
    response = await client.get("/ready")
    assert response.status == 503
    assert await response.json() == {"ready": False, "reason": "shutdown draining"}
    live = await client.get("/live")
    assert live.status == 200 and (await live.json())["phase"] == "draining"


async def test_prestop_callers_join_one_sequence_and_share_its_answer(
    make_client: ClientFactory,
) -> None:
    lifecycle = Lifecycle()
    pending = PendingAnswers()
    metrics = Metrics(CollectorRegistry())
    client = await make_client(lifecycle=lifecycle, metrics=metrics, pending=pending)
    calls = [
        asyncio.create_task(client.request(method, "/prestop")) for method in ["GET", "POST"] * 10
    ]
    async with asyncio.timeout(5):
        while pending.count < 20:
            await asyncio.sleep(0.01)
    assert lifecycle.phase is Phase.DRAINING and lifecycle.trigger is Trigger.PRESTOP
    assert len(lifecycle.joined) == 19
    assert not any(call.done() for call in calls), "nobody is answered before the drain ends"
    step = lifecycle.begin("drain")
    lifecycle.end(step, "fixed")
    lifecycle.finish()
    responses = await asyncio.gather(*calls)
    bodies = [await response.json() for response in responses]
    assert {response.status for response in responses} == {200}
    assert all(body == bodies[0] for body in bodies)
    assert bodies[0]["phase"] == "drained" and bodies[0]["drain_ended_by"] == "fixed"
    await asyncio.wait_for(pending.wait_idle(), timeout=1)
    assert metrics.collectors.get_sample_value("prestop_hook_calls_total", {"result": "ok"}) == 20
    # Hooks are delivered at least once: a late repeat is answered at once.
    late = await asyncio.wait_for(client.get("/prestop"), timeout=1)
    assert late.status == 200 and (await late.json()) == bodies[0]


async def test_prestop_answers_500_with_the_reason_when_a_step_failed(
    make_client: ClientFactory,
) -> None:
    lifecycle = Lifecycle()
    client = await make_client(lifecycle=lifecycle)
    lifecycle.start(Trigger.SIGTERM)
    lifecycle.fail("registry eureka: no server reachable")
    lifecycle.finish()
    response = await client.post("/prestop")
    assert response.status == 500
    body = await response.json()
    assert body["ok"] is False and body["error"] == "registry eureka: no server reachable"


async def test_a_wrong_or_missing_token_is_refused_and_starts_nothing(
    make_client: ClientFactory,
) -> None:
    lifecycle = Lifecycle()
    metrics = Metrics(CollectorRegistry())
    client = await make_client(
        config=load({"PRESTOP_TOKEN": TOKEN}), lifecycle=lifecycle, metrics=metrics
    )
    with capture_logs() as logs:
        missing = await client.get("/prestop")
        wrong = await client.post("/prestop", headers={TOKEN_HEADER: TOKEN + "x"})
    assert (missing.status, wrong.status) == (401, 401)
    assert TOKEN_HEADER in (await missing.json())["error"]
    assert lifecycle.phase is Phase.SERVING and lifecycle.trigger is None
    assert (await client.get("/ready")).status == 200
    assert (
        metrics.collectors.get_sample_value("prestop_hook_calls_total", {"result": "unauthorized"})
        == 2
    )
    assert TOKEN not in repr(logs)
    assert [entry["event"] for entry in logs] == ["prestop_refused", "prestop_refused"]

    accepted = asyncio.create_task(client.get("/prestop", headers={TOKEN_HEADER: TOKEN}))
    async with asyncio.timeout(5):
        while lifecycle.trigger is None:
            await asyncio.sleep(0.01)
    lifecycle.finish()
    assert (await accepted).status == 200


async def test_a_source_outside_the_allowed_cidrs_is_refused(make_client: ClientFactory) -> None:
    lifecycle = Lifecycle()
    metrics = Metrics(CollectorRegistry())
    client = await make_client(
        config=load({"PRESTOP_ALLOW_CIDRS": "10.0.0.0/8,fd00::/8"}),
        lifecycle=lifecycle,
        metrics=metrics,
    )
    response = await client.get("/prestop")
    assert response.status == 403
    assert "127.0.0.1 is not allowed" in (await response.json())["error"]
    assert lifecycle.trigger is None
    assert (
        metrics.collectors.get_sample_value("prestop_hook_calls_total", {"result": "forbidden"})
        == 1
    )


async def test_an_allowed_source_with_the_token_gets_through(make_client: ClientFactory) -> None:
    lifecycle = Lifecycle()
    config = load({"PRESTOP_ALLOW_CIDRS": "127.0.0.0/8", "PRESTOP_TOKEN": TOKEN})
    client = await make_client(config=config, lifecycle=lifecycle)
    call = asyncio.create_task(client.get("/prestop", headers={TOKEN_HEADER: TOKEN}))
    async with asyncio.timeout(5):
        while lifecycle.trigger is None:
            await asyncio.sleep(0.01)
    lifecycle.finish()
    assert (await call).status == 200


async def test_unknown_paths_and_methods_answer_json(make_client: ClientFactory) -> None:
    client = await make_client()
    missing = await client.get("/nope")
    assert missing.status == 404 and await missing.json() == {"error": "Not Found"}
    wrong = await client.put("/prestop")
    assert wrong.status == 405
    assert await wrong.json() == {"error": "Method Not Allowed"}
    assert set(wrong.headers["Allow"].split(",")) == {"GET", "POST"}


async def test_a_handler_bug_answers_500_json_without_traceback(
    make_client: ClientFactory,
) -> None:
    def broken() -> dict[str, Any]:
        raise KeyError("boom")

    client = await make_client(status_extra=broken)
    with capture_logs() as logs:
        response = await client.get("/status")
    assert response.status == 500
    assert await response.json() == {"error": "internal error"}
    assert logs[0]["event"] == "handler_failed" and logs[0]["path"] == "/status"


async def test_status_shows_lifecycle_and_redacted_config(make_client: ClientFactory) -> None:
    config = load(
        {
            "PRESTOP_TOKEN": TOKEN,
            "PRESTOP_EUREKA_URLS": "http://admin:pa55word@eureka:8761/eureka/",
        }
    )
    client = await make_client(config=config, status_extra=lambda: {"version": "x"})
    response = await client.get("/status")
    text = await response.text()
    assert TOKEN not in text and "pa55word" not in text
    body = await response.json()
    assert body["lifecycle"]["phase"] == "serving"
    assert body["config"]["token"] == "***"
    assert body["config"]["eureka_urls"] == ["http://admin:***@eureka:8761/eureka/"]
    assert body["version"] == "x"


async def test_metrics_are_prometheus_text_with_process_collectors(
    make_client: ClientFactory,
) -> None:
    lifecycle = Lifecycle()
    metrics = Metrics(CollectorRegistry())
    metrics.track(lifecycle)
    metrics.describe(drain_mode="fixed", registry="none", pod="p", namespace="n")
    client = await make_client(lifecycle=lifecycle, metrics=metrics)
    lifecycle.start(Trigger.SIGTERM)
    response = await client.get("/metrics")
    assert response.headers["Content-Type"].startswith("text/plain; version=0.0.4")
    text = await response.text()
    assert 'prestop_phase{phase="draining"} 1.0' in text
    assert 'prestop_phase{phase="serving"} 0.0' in text
    assert 'prestop_shutdown_triggers_total{trigger="sigterm"} 1.0' in text
    assert "prestop_info{" in text and 'drain_mode="fixed"' in text
    assert "process_resident_memory_bytes" in text
    assert "python_info" in text


@pytest.fixture
async def fake_app() -> AsyncIterator[tuple[str, dict[str, Any]]]:
    """A real HTTP app whose health answer the test sets, counting the checks it gets."""
    state: dict[str, Any] = {"status": 200, "hits": 0, "delay": 0.0}

    async def health(request: web.Request) -> web.Response:
        state["hits"] += 1
        await asyncio.sleep(state["delay"])
        return web.json_response({"status": "UP"}, status=state["status"])

    app = web.Application()
    app.router.add_get("/actuator/health", health)
    server = TestServer(app, host="127.0.0.1")
    await server.start_server()
    yield str(server.make_url("/actuator/health")), state
    await server.close()


async def test_ready_requires_the_app_to_be_healthy(
    make_client: ClientFactory, fake_app: tuple[str, dict[str, Any]]
) -> None:
    url, state = fake_app
    async with aiohttp.ClientSession() as session:
        health = AppHealth(url, session, cache_seconds=0.0, timeout_seconds=0.3)
        client = await make_client(config=load({"PRESTOP_APP_HEALTH_URL": url}), health=health)
        assert (await client.get("/ready")).status == 200
        state["status"] = 503
        response = await client.get("/ready")
        assert response.status == 503
        assert (await response.json())["reason"] == "app health answered 503"
        state["status"], state["delay"] = 200, 1.0
        slow = await client.get("/ready")
        assert slow.status == 503
        assert "no answer within 0.3s" in (await slow.json())["reason"]


async def test_a_probe_storm_reaches_the_app_once_per_cache_period(
    make_client: ClientFactory, fake_app: tuple[str, dict[str, Any]]
) -> None:
    url, state = fake_app
    async with aiohttp.ClientSession() as session:
        health = AppHealth(url, session, cache_seconds=60.0)
        client = await make_client(health=health)
        responses = await asyncio.gather(*(client.get("/ready") for _ in range(30)))
        assert {response.status for response in responses} == {200}
        assert state["hits"] == 1


async def test_ready_reports_an_unreachable_app(make_client: ClientFactory) -> None:
    async with aiohttp.ClientSession() as session:
        health = AppHealth("http://127.0.0.1:1/health", session, cache_seconds=0.0)
        client = await make_client(health=health)
        response = await client.get("/ready")
        assert response.status == 503
        assert (await response.json())["reason"].startswith("app health unreachable")
