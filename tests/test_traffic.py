"""The traffic-aware drain: its rules on synthetic polls, then the real agent watching real TCP
traffic to a real HTTP app on loopback."""

from __future__ import annotations

import asyncio
import ipaddress
import re
import socket
import time
from collections.abc import AsyncIterator, Callable
from typing import Any

import aiohttp
import pytest
from aiohttp import web

from agent.drain.sockdiag import Poll, SocketSample
from agent.drain.traffic import TrafficVerdict
from tests.harness.agent_process import AgentProcess
from tests.harness.support import free_port

POLL = 0.2
QUIET = 1.5
MIN = 1.0


# --- the rules, on synthetic polls ---------------------------------------------------------------


def sample(
    *,
    received_ms: int | None = 10_000,
    sent_ms: int | None = 10_000,
    peer: str = "10.0.0.7",
    received_bytes: int | None = 100,
    acked_bytes: int | None = 2_000,
    receive_queue: int = 0,
    send_queue: int = 0,
    state: str = "ESTABLISHED",
) -> SocketSample:
    return SocketSample(
        local_port=8080,
        peer=ipaddress.ip_address(peer),
        peer_port=40000,
        state=state,
        receive_queue=receive_queue,
        send_queue=send_queue,
        last_data_received_ms=received_ms,
        last_data_sent_ms=sent_ms,
        bytes_received=received_bytes,
        bytes_acked=acked_bytes,
    )


def verdict(**overrides: Any) -> TrafficVerdict:
    settings: dict[str, Any] = {
        "trigger_at": 100.0,
        "started_at": 100.0,
        "min_seconds": 2.0,
        "quiet_seconds": 3.0,
        "limit_seconds": 20.0,
    }
    settings.update(overrides)
    return TrafficVerdict(**settings)


def test_idle_keepalive_connections_end_the_drain_at_max_of_min_and_quiet() -> None:
    rules = verdict()
    for now in (100.0, 101.0, 102.0, 102.9):
        rules.observe(Poll(now, tuple(sample(received_ms=60_000) for _ in range(50))))
        assert rules.verdict(now) is None
    rules.observe(Poll(103.0, (sample(received_ms=63_000),)))
    assert rules.verdict(103.0) == "quiet"
    assert rules.last_data_after_trigger == 0.0


def test_data_after_the_trigger_restarts_the_quiet_period() -> None:
    rules = verdict()
    rules.observe(Poll(105.0, (sample(received_ms=500, sent_ms=499),)))  # data at 104.5
    assert rules.last_data_at == pytest.approx(104.5)
    rules.observe(Poll(107.4, (sample(received_ms=2_900, sent_ms=2_899),)))
    assert rules.verdict(107.4) is None
    rules.observe(Poll(107.5, (sample(received_ms=3_000, sent_ms=2_999),)))
    assert rules.verdict(107.5) == "quiet"
    assert rules.last_data_after_trigger == pytest.approx(4.5)


def test_a_request_read_but_not_answered_holds_the_drain() -> None:
    rules = verdict()
    # Request arrived 5 s ago, the last response went out 9 s ago: the app is still working.
    rules.observe(Poll(110.0, (sample(received_ms=5_000, sent_ms=9_000),)))
    assert rules.in_flight == 1
    assert rules.verdict(110.0) is None
    rules.observe(Poll(111.0, (sample(received_ms=6_000, sent_ms=10),)))  # answered
    assert rules.verdict(111.0) == "quiet"


@pytest.mark.parametrize(("receive_queue", "send_queue"), [(10, 0), (0, 4096)])
def test_unread_or_unacknowledged_bytes_hold_the_drain(receive_queue: int, send_queue: int) -> None:
    # By its timestamps this connection was answered (last data went out after the last data
    # came in): only the queues say that a request is still in flight.
    answered = {"received_ms": 9_000, "sent_ms": 8_000}
    rules = verdict()
    rules.observe(Poll(110.0, (sample(**answered),)))
    assert (rules.in_flight, rules.verdict(110.0)) == (0, "quiet")  # the same, queues empty
    rules = verdict()
    busy = sample(**answered, receive_queue=receive_queue, send_queue=send_queue)
    rules.observe(Poll(110.0, (busy,)))
    assert rules.in_flight == 1
    assert rules.verdict(110.0) is None


def test_a_first_request_never_answered_holds_the_drain() -> None:
    rules = verdict()
    # Connection and request came in the same jiffy, so the two times agree; nothing went back.
    rules.observe(Poll(110.0, (sample(received_ms=9_000, sent_ms=9_000, acked_bytes=0),)))
    assert rules.in_flight == 1


def test_a_connection_that_never_received_data_is_not_in_flight() -> None:
    rules = verdict()
    rules.observe(Poll(110.0, (sample(received_ms=9_000, sent_ms=9_500, received_bytes=0),)))
    assert rules.in_flight == 0


def test_ignored_peers_do_not_count() -> None:
    rules = verdict(ignore=(ipaddress.ip_network("10.0.0.0/24"),))
    for now in (100.0, 101.0, 102.0, 103.0):
        rules.observe(Poll(now, (sample(received_ms=0, sent_ms=5_000, peer="10.0.0.9"),)))
    assert rules.connections == 0
    assert rules.verdict(103.0) == "quiet"


def test_the_limit_ends_the_drain_whatever_the_traffic() -> None:
    rules = verdict()
    rules.observe(Poll(119.9, (sample(received_ms=0),)))
    assert rules.verdict(119.9) is None
    assert rules.verdict(120.0) == "max"


def test_without_timestamps_open_connections_count_as_traffic() -> None:
    rules = verdict(timestamps=False)
    rules.observe(Poll(104.0, (sample(received_ms=None, sent_ms=None),)))
    assert rules.verdict(104.0) is None
    rules.observe(Poll(106.9, ()))
    assert rules.verdict(106.9) is None
    rules.observe(Poll(107.0, ()))
    assert rules.verdict(107.0) == "quiet"
    assert rules.last_data_after_trigger is None


def test_the_next_look_comes_no_later_than_the_next_bound() -> None:
    rules = verdict()
    rules.observe(Poll(100.0, ()))
    assert rules.next_look_in(100.0, 0.2) == pytest.approx(0.2)
    assert rules.next_look_in(102.95, 0.2) == pytest.approx(0.05)
    assert rules.next_look_in(119.999, 0.2) == pytest.approx(0.01)


# Pinned connections: trigger at 100, floor 5 s (at 105), quiet 3 s, min 2 s, max 20 s.


def pinned_rules() -> TrafficVerdict:
    return verdict(floor_seconds=5.0)


def test_a_connection_carrying_requests_after_the_floor_holds_the_drain_until_it_closes() -> None:
    rules = pinned_rules()
    # A caller pinned through a Service, one request every 4 s (slower than the quiet period):
    # its connection received data at 105.5, after every router had dropped the pod.
    rules.observe(Poll(106.0, (sample(received_ms=500, sent_ms=499),)))
    assert (rules.pinned, rules.verdict(106.0)) == (1, None)
    rules.observe(Poll(109.0, (sample(received_ms=3_500, sent_ms=3_499),)))
    assert rules.quiet_since == pytest.approx(105.5)  # quiet for 3.5 s: not what holds it
    assert (rules.pinned, rules.verdict(109.0)) == (1, None)
    assert rules.snapshot()["pinned"] == 1
    # The app answered its next request with Connection: close (maxKeepAliveRequests), the
    # caller reconnected through the Service's current rules: elsewhere.
    rules.observe(Poll(109.6, (sample(received_ms=0, sent_ms=0, state="CLOSE_WAIT"),)))
    assert rules.pinned == 0
    assert rules.verdict(109.6) is None  # that last request restarted the quiet period
    rules.observe(Poll(112.6, ()))
    assert rules.verdict(112.6) == "quiet"


def test_a_pinned_connection_that_never_closes_holds_the_drain_to_its_maximum() -> None:
    rules = pinned_rules()
    rules.observe(Poll(119.9, (sample(received_ms=4_000, sent_ms=3_999),)))  # data at 115.9
    assert rules.verdict(119.9) is None
    assert rules.verdict(120.0) == "max"
    assert rules.snapshot()["pinned"] == 1


def test_connections_idle_since_the_floor_do_not_hold_the_drain() -> None:
    rules = pinned_rules()
    # Last data at 104.9, before the floor: an Eureka caller's pooled connection its load
    # balancer no longer picks, or a pinned caller that stopped. Nothing routes to it any more.
    rules.observe(Poll(107.9, (sample(received_ms=3_000, sent_ms=2_999),)))
    assert (rules.pinned, rules.verdict(107.9)) == (0, "quiet")


def test_a_connection_that_never_received_data_is_not_pinned() -> None:
    # Opened after the floor (its "last data" is its age), never asked anything.
    rules = pinned_rules()
    rules.observe(Poll(108.5, (sample(received_ms=500, sent_ms=500, received_bytes=0),)))
    assert rules.pinned == 0
    rules.observe(Poll(111.0, (sample(received_ms=3_000, sent_ms=3_000, received_bytes=0),)))
    assert (rules.pinned, rules.verdict(111.0)) == (0, "quiet")


def test_without_a_floor_no_connection_counts_as_pinned() -> None:
    # No propagation source: nothing says when routing stopped, so a connection used after the
    # trigger is traffic (the quiet period), not pinned.
    rules = verdict()
    rules.observe(Poll(104.5, (sample(received_ms=3_000, sent_ms=2_999),)))  # data at 101.5
    assert (rules.pinned, rules.verdict(104.5)) == (0, "quiet")


def test_ignored_peers_are_never_pinned() -> None:
    rules = verdict(floor_seconds=5.0, ignore=(ipaddress.ip_network("10.0.0.0/24"),))
    rules.observe(Poll(108.0, (sample(received_ms=100, sent_ms=99, peer="10.0.0.9"),)))
    assert (rules.pinned, rules.verdict(108.0)) == (0, "quiet")


# --- the real agent, a real app, real traffic ---------------------------------------------------


class App:
    """A real aiohttp app on 127.0.0.1 and ::1, one free port: the pod's main container."""

    def __init__(self) -> None:
        self.port = free_port()
        self.runner: web.AppRunner | None = None

    async def start(self) -> None:
        async def hello(request: web.Request) -> web.Response:
            return web.Response(text="hello")

        async def slow(request: web.Request) -> web.Response:
            await asyncio.sleep(float(request.query.get("seconds", "4")))
            return web.Response(text="slow")

        async def stream(request: web.Request) -> web.Response:
            received = 0
            async for chunk in request.content.iter_any():
                received += len(chunk)
            return web.Response(text=str(received))

        app = web.Application()
        app.router.add_get("/hello", hello)
        app.router.add_get("/slow", slow)
        app.router.add_post("/stream", stream)
        self.runner = web.AppRunner(app, handle_signals=False, access_log=None)
        await self.runner.setup()
        await web.TCPSite(self.runner, "127.0.0.1", self.port).start()
        await web.TCPSite(self.runner, "::1", self.port).start()

    async def stop(self) -> None:
        if self.runner is not None:
            await self.runner.cleanup()


@pytest.fixture
async def app() -> AsyncIterator[App]:
    served = App()
    await served.start()
    yield served
    await served.stop()


@pytest.fixture
def traffic_agent(new_agent: Callable[..., AgentProcess]) -> Callable[..., AgentProcess]:
    def start(app: App, **env: str) -> AgentProcess:
        return new_agent(
            {
                "PRESTOP_DRAIN_MODE": "traffic",
                "PRESTOP_APP_PORTS": str(app.port),
                "PRESTOP_DRAIN_MIN_SECONDS": str(MIN),
                "PRESTOP_DRAIN_QUIET_SECONDS": str(QUIET),
                "PRESTOP_DRAIN_POLL_SECONDS": str(POLL),
                "PRESTOP_DRAIN_MAX_SECONDS": "8",
                # These tests share the machine's network namespace, whose count of accepted
                # connections moves with everything else running here; the pod-namespace
                # behaviour is tested in test_connection_per_request.py.
                "PRESTOP_DRAIN_COUNT_ACCEPTS": "false",
                **env,
            }
        ).run()

    return start


async def _prestop(agent: AgentProcess) -> tuple[float, float, dict[str, Any]]:
    """Call /prestop; (sent, answered, body)."""
    async with aiohttp.ClientSession() as session:
        sent = time.monotonic()
        async with session.get(f"{agent.url}/prestop") as response:
            body = await response.json()
            assert response.status == 200, body
            return sent, time.monotonic(), body


async def _steady_clients(
    url: str, stop_at: float, *, clients: int = 4, interval: float = 0.05, local: str | None = None
) -> float:
    """Keep-alive clients sending requests at a steady rate until ``stop_at``; return the time
    the last request was sent. The connections stay open (idle) afterwards until cancelled."""
    connector = aiohttp.TCPConnector(local_addr=(local, 0) if local else None)
    session = aiohttp.ClientSession(connector=connector)
    last_sent = 0.0

    async def client() -> None:
        nonlocal last_sent
        while time.monotonic() < stop_at:
            last_sent = max(last_sent, time.monotonic())
            async with session.get(url) as response:
                await response.read()
            await asyncio.sleep(interval)

    try:
        await asyncio.gather(*(client() for _ in range(clients)))
        return last_sent
    finally:
        _IDLE_SESSIONS.append(session)


_IDLE_SESSIONS: list[aiohttp.ClientSession] = []


@pytest.fixture(autouse=True)
async def _close_idle_sessions() -> AsyncIterator[None]:
    yield
    while _IDLE_SESSIONS:
        await _IDLE_SESSIONS.pop().close()


async def test_steady_keepalive_traffic_ends_the_drain_after_last_request_plus_quiet(
    app: App, traffic_agent: Any
) -> None:
    agent = traffic_agent(app)
    hook = asyncio.create_task(_prestop(agent))
    await asyncio.sleep(0.05)
    last_request = await _steady_clients(
        f"http://127.0.0.1:{app.port}/hello", time.monotonic() + 3.0
    )
    sent, answered, body = await hook
    assert last_request - sent >= 2.8
    assert last_request + QUIET <= answered <= last_request + QUIET + 2 * POLL
    assert body["drain_ended_by"] == "quiet"
    drain = body["steps"][-1]
    assert drain["source"] == "netlink"
    assert drain["last_data_seconds"] == pytest.approx(last_request - sent, abs=0.1)
    async with aiohttp.ClientSession() as session, session.get(f"{agent.url}/metrics") as page:
        metrics = await page.text()
    assert 'prestop_drains_total{reason="quiet"} 1.0' in metrics
    assert "prestop_drain_last_data_after_trigger_seconds_count 1.0" in metrics
    assert "prestop_watched_connections 4.0" in metrics  # the 4 clients, idle, still connected
    assert 'prestop_drain_watch_source{source="netlink"} 1.0' in metrics
    assert 'prestop_drain_watch_source{source="proc"} 0.0' in metrics
    since = re.search(r"^prestop_drain_seconds_since_last_data (\S+)$", metrics, re.MULTILINE)
    assert since is not None and QUIET <= float(since.group(1)) <= QUIET + 2 * POLL


async def test_idle_keepalive_connections_do_not_hold_the_drain(
    app: App, traffic_agent: Any
) -> None:
    agent = traffic_agent(app)
    connector = aiohttp.TCPConnector(limit=0)
    async with aiohttp.ClientSession(connector=connector) as session:

        async def one_request() -> None:
            async with session.get(f"http://127.0.0.1:{app.port}/slow?seconds=0.3") as response:
                await response.read()

        await asyncio.gather(*(one_request() for _ in range(50)))  # 50 pooled connections
        assert len(connector._conns[next(iter(connector._conns))]) == 50
        await asyncio.sleep(0.3)
        sent, answered, body = await _prestop(agent)
    expected = max(MIN, QUIET)
    assert expected <= answered - sent <= expected + 2 * POLL
    assert body["drain_ended_by"] == "quiet"
    assert body["steps"][-1]["peak_connections"] == 50


async def test_a_never_ending_stream_holds_the_drain_until_the_maximum(
    app: App, traffic_agent: Any
) -> None:
    agent = traffic_agent(app, PRESTOP_DRAIN_MAX_SECONDS="4")
    stop = asyncio.Event()

    async def body() -> AsyncIterator[bytes]:
        while not stop.is_set():
            yield b"x" * 512
            await asyncio.sleep(0.05)

    async with aiohttp.ClientSession() as session:
        streaming = asyncio.create_task(
            session.post(f"http://127.0.0.1:{app.port}/stream", data=body())
        )
        await asyncio.sleep(0.3)
        sent, answered, answer = await _prestop(agent)
        stop.set()
        (await streaming).close()
    assert 4.0 - POLL <= answered - sent <= 4.0 + POLL + 0.1
    assert answer["drain_ended_by"] == "max"


async def test_a_slow_request_in_flight_holds_the_drain_until_answered(
    app: App, traffic_agent: Any
) -> None:
    agent = traffic_agent(app)
    async with aiohttp.ClientSession() as session:
        hook = asyncio.create_task(_prestop(agent))
        await asyncio.sleep(0.2)
        async with session.get(f"http://127.0.0.1:{app.port}/slow?seconds=4") as response:
            assert await response.text() == "slow"
        slow_answered = time.monotonic()
        _, answered, body = await hook
    assert answered >= slow_answered
    assert answered - slow_answered <= 2 * POLL
    assert body["drain_ended_by"] == "quiet"


async def test_traffic_from_an_ignored_cidr_does_not_hold_the_drain(
    app: App, traffic_agent: Any
) -> None:
    agent = traffic_agent(app, PRESTOP_DRAIN_IGNORE_CIDRS="127.0.0.2/32")
    hook = asyncio.create_task(_prestop(agent))
    probes = asyncio.create_task(
        _steady_clients(
            f"http://127.0.0.1:{app.port}/hello", time.monotonic() + 6.0, local="127.0.0.2"
        )
    )
    sent, answered, body = await hook
    assert not probes.done(), "the ignored traffic was still flowing when the drain ended"
    await probes
    assert max(MIN, QUIET) <= answered - sent <= max(MIN, QUIET) + 2 * POLL
    assert body["drain_ended_by"] == "quiet"


async def test_ipv6_traffic_holds_the_drain(app: App, traffic_agent: Any) -> None:
    agent = traffic_agent(app)
    hook = asyncio.create_task(_prestop(agent))
    await asyncio.sleep(0.05)
    last_request = await _steady_clients(f"http://[::1]:{app.port}/hello", time.monotonic() + 2.5)
    _, answered, body = await hook
    assert last_request + QUIET <= answered <= last_request + QUIET + 2 * POLL
    assert body["drain_ended_by"] == "quiet"


async def test_the_proc_fallback_ends_on_zero_connections(app: App, traffic_agent: Any) -> None:
    agent = traffic_agent(app, PRESTOP_DRAIN_SOURCE="proc")
    async with aiohttp.ClientSession() as session:
        async with session.get(f"{agent.url}/status") as response:
            assert (await response.json())["drain"]["source"] == "proc"
        async with session.get(f"{agent.url}/metrics") as page:
            metrics = await page.text()
    # Known from start-up, before any drain: what the /proc-fallback alert fires on.
    assert 'prestop_drain_watch_source{source="proc"} 1.0' in metrics
    assert 'prestop_drain_watch_source{source="netlink"} 0.0' in metrics
    # The setting beside it: chosen, not auto's fallback, so PrestopDrainOnProcFallback is silent.
    (info,) = [line for line in metrics.splitlines() if line.startswith("prestop_info{")]
    assert 'drain_source="proc"' in info, info
    held = []
    for _ in range(5):
        conn = socket.create_connection(("127.0.0.1", app.port))
        conn.sendall(b"GET /hello HTTP/1.1\r\nHost: app\r\n\r\n")
        held.append(conn)
    await asyncio.sleep(0.2)
    hook = asyncio.create_task(_prestop(agent))
    await asyncio.sleep(2.0)
    assert not hook.done(), "open connections hold the /proc drain"
    for conn in held:
        conn.close()
    closed = time.monotonic()
    _, answered, body = await hook
    assert closed + QUIET - POLL <= answered <= closed + QUIET + 2 * POLL
    assert body["drain_ended_by"] == "quiet"
    assert body["steps"][-1]["source"] == "proc"
    assert await _since_last_data(agent) == "NaN", "/proc cannot time data"
    events = agent.log_events()
    watching = next(e for e in events if e["event"] == "drain_watching")
    assert watching["source"] == "proc"


async def _since_last_data(agent: AgentProcess) -> str:
    async with aiohttp.ClientSession() as session, session.get(f"{agent.url}/metrics") as page:
        metrics = await page.text()
    since = re.search(r"^prestop_drain_seconds_since_last_data (\S+)$", metrics, re.MULTILINE)
    assert since is not None, metrics
    return since.group(1)


async def test_seconds_since_last_data_is_nan_while_no_data_was_ever_seen(
    app: App, traffic_agent: Any
) -> None:
    agent = traffic_agent(app)
    assert await _since_last_data(agent) == "NaN", "before any drain"
    _, _, body = await _prestop(agent)  # nobody talks to the app
    assert body["drain_ended_by"] == "quiet"
    assert await _since_last_data(agent) == "NaN", "not 0: no data was ever seen"
