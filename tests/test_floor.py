"""The propagation floor: how long registry clients may still send, and the drain's end rule
around it. Pure logic on a synthetic clock (no sockets); the configuration's warning when the
floor can outlast the drain's maximum."""

from __future__ import annotations

import asyncio
import ipaddress
import json
import time
import urllib.request
from collections.abc import Callable
from typing import Literal

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st
from prometheus_client import CollectorRegistry
from structlog.testing import capture_logs

from agent.cli import check
from agent.config import ConfigError, load
from agent.drain.sockdiag import Poll
from agent.drain.traffic import traffic_drain
from agent.lifecycle import Lifecycle, Propagation, Trigger
from agent.main import Agent
from agent.metrics import Metrics
from agent.plan import ShutdownPlan
from tests.harness.agent_process import AgentProcess
from tests.harness.support import free_port
from tests.test_traffic import sample, verdict


def propagation(**overrides: object) -> Propagation:
    settings: dict[str, object] = {"registry": True, "client_refresh": 6.5, "server_cache": 3.0}
    settings.update(overrides)
    return Propagation(**settings)  # type: ignore[arg-type]


# --- Propagation.floor ---------------------------------------------------------------------------


def test_no_registry_has_no_floor() -> None:
    assert propagation(registry=False).floor(elapsed=1.0) == 0.0


def test_an_unobserved_view_assumes_the_server_cache_bound() -> None:
    # actuator mode without URLs, or a mark-down that failed: nothing was watched
    assert propagation().floor(elapsed=0.5) == 3.0 + 6.5


def test_a_measured_view_sets_the_floor_at_visible_plus_client_refresh() -> None:
    seen = propagation()
    seen.watch("a")
    seen.watch("b")
    seen.seen("a", 0.4)
    # b still shows the old status: it holds the floor open from now on
    assert seen.floor(elapsed=1.0) == 1.0 + 6.5
    assert seen.floor(elapsed=5.0) == 5.0 + 6.5
    seen.seen("b", 2.2)
    assert seen.visible_to_clients == 2.2
    assert seen.floor(elapsed=9.0) == pytest.approx(2.2 + 6.5)


def test_a_server_lost_before_it_showed_the_status_counts_as_assumed() -> None:
    seen = propagation()
    seen.watch("a")
    seen.watch("b")
    seen.seen("a", 0.1)
    seen.lost("b", "connection refused", 0.5)
    assert seen.visible_to_clients is None  # not measured for every server
    assert seen.floor(elapsed=20.0) == 3.0 + 6.5
    assert seen.as_dict()["unobservable"] == {"b": "connection refused"}
    assert seen.censored() == "unobservable"


def test_a_server_lost_after_serving_the_old_status_late_keeps_the_floor() -> None:
    # The case: a peer served UP until 8 s after the trigger (its cache slower than the
    # assumed 3 s), then refused connections. Its clients could route until 8 + refresh.
    seen = propagation()
    seen.watch("a")
    seen.watch("b")
    seen.seen("a", 0.2)
    for at in (1.0, 4.0, 8.0):
        assert not seen.still_up("b", at)
    before = seen.floor(elapsed=8.0)
    assert before == 8.0 + 6.5
    for n, at in enumerate((8.2, 8.4, 8.6), start=1):
        assert seen.failed("b", "connection refused", at) is (n == 3)
    assert seen.floor(elapsed=8.6) == pytest.approx(8.6 + 6.5)  # counted from the loss
    assert seen.floor(elapsed=30.0) == pytest.approx(8.6 + 6.5)
    # It comes back still UP: it may have missed the change; it holds the floor again.
    assert seen.still_up("b", 12.0)
    assert seen.floor(elapsed=12.0) == 12.0 + 6.5
    seen.seen("b", 13.0)
    assert seen.floor(elapsed=14.0) == 13.0 + 6.5


def test_a_server_seen_after_a_loss_keeps_what_the_loss_held() -> None:
    # Lost at 0.5 s, it answers DOWN at 1.0 s: it may have restarted (a cold key shows the
    # change at once), so when its clients' view changed is unknown: the bound stands.
    seen = propagation(assumed_from=0.3)
    seen.watch("a")
    seen.lost("a", "timeout", 0.5)
    assert seen.floor(elapsed=0.6) == pytest.approx(0.3 + 3.0 + 6.5)
    seen.seen("a", 1.0)
    assert seen.floor(elapsed=1.1) == pytest.approx(0.3 + 3.0 + 6.5)


def test_the_assumed_bound_counts_from_the_end_of_the_put_phase() -> None:
    assert propagation(assumed_from=2.5).floor(elapsed=3.0) == 2.5 + 3.0 + 6.5
    seen = propagation(assumed_from=2.5)
    seen.watch("a")
    seen.lost("a", "not read before the mark-down")
    assert seen.floor(elapsed=3.0) == 2.5 + 3.0 + 6.5


def test_a_url_standing_for_several_peers_is_never_shorter_than_the_bound() -> None:
    seen = propagation()
    seen.watch("lb", assumed="several peers answer at this URL")
    seen.seen("lb", 0.2)
    assert seen.floor(elapsed=1.0) == 3.0 + 6.5
    assert seen.visible_to_clients is None
    assert seen.censored() == "unobservable"


def test_a_drain_that_ends_while_a_server_shows_the_old_status_is_censored() -> None:
    seen = propagation()
    seen.watch("a")
    assert seen.censored() == "not_visible"
    assert not seen.reached(50.0)  # a server still showing UP: the floor is always ahead
    seen.seen("a", 1.0)
    assert seen.censored() is None
    assert seen.reached(7.5) and not seen.reached(7.4)
    assert propagation(registry=False).censored() is None


def test_the_first_sighting_counts_and_a_later_loss_does_not_undo_it() -> None:
    seen = propagation()
    seen.watch("a")
    seen.seen("a", 1.0)
    seen.seen("a", 2.0)
    seen.lost("a", "gone")
    assert seen.visible_to_clients == 1.0


# One server's view, answer by answer: its status, or a failed read.
Answer = Literal["UP", "DOWN", "error"]


@settings(max_examples=400, deadline=None)
@given(
    assumed_from=st.floats(min_value=0.0, max_value=5.0),
    answers=st.lists(
        st.tuples(
            st.integers(min_value=0, max_value=2),  # which server
            st.sampled_from(["UP", "DOWN", "error"]),
            st.floats(min_value=0.0, max_value=3.0),  # seconds since the previous answer
        ),
        max_size=60,
    ),
)
def test_the_floor_never_decreases_and_covers_every_old_status_answer(
    assumed_from: float, answers: list[tuple[int, Answer, float]]
) -> None:
    """Random answer sequences (UP, DOWN, errors, recoveries), fed as the view feeds them: the
    floor never goes down, and never comes before any server's last UP answer + refresh."""
    seen = propagation(assumed_from=assumed_from)
    servers = ["a", "b", "c"]
    for server in servers:
        seen.watch(server)
    now = assumed_from
    last_up: dict[str, float] = {}
    floor = seen.floor(now)
    for index, answer, gap in answers:
        now += gap
        server = servers[index]
        if answer == "UP":
            seen.still_up(server, now)
            last_up[server] = now
        elif answer == "DOWN":
            seen.seen(server, now)
        else:
            seen.failed(server, "refused", now)
        after = seen.floor(now)
        assert after >= floor - 1e-9, (answer, server, now)
        for up_at in last_up.values():
            assert after >= up_at + 6.5 - 1e-9
        floor = after


# --- the end rule with a floor ---------------------------------------------------------------


def test_quiet_does_not_end_the_drain_before_the_floor() -> None:
    rules = verdict(floor_seconds=9.5)  # trigger at 100
    rules.observe(Poll(100.0, (sample(received_ms=50_000),)))  # idle since long before
    rules.observe(Poll(105.0, ()))
    assert rules.verdict(105.0) is None  # min and quiet are met, the floor is not
    rules.observe(Poll(109.4, ()))
    assert rules.verdict(109.4) is None
    rules.observe(Poll(109.5, ()))
    assert rules.verdict(109.5) == "quiet"


def test_traffic_after_the_floor_still_holds_the_drain() -> None:
    rules = verdict(floor_seconds=7.0)  # trigger at 100: the floor is at 107
    rules.observe(Poll(105.0, ()))
    assert rules.verdict(105.0) is None  # min and quiet are met: only the floor holds it
    rules.observe(Poll(106.5, (sample(received_ms=0, sent_ms=0),)))  # a request at 106.5
    rules.observe(Poll(107.0, ()))
    assert rules.verdict(107.0) is None  # the floor is reached; the request holds it still
    rules.observe(Poll(109.4, ()))
    assert rules.verdict(109.4) is None
    rules.observe(Poll(109.5, ()))
    assert rules.verdict(109.5) == "quiet"


def test_the_maximum_ends_the_drain_even_before_the_floor() -> None:
    rules = verdict(floor_seconds=95.0, limit_seconds=24.0)
    rules.observe(Poll(100.0, ()))
    assert rules.verdict(123.9) is None
    assert rules.verdict(124.0) == "max"


def test_the_next_look_comes_at_the_floor() -> None:
    rules = verdict(floor_seconds=9.5)
    rules.observe(Poll(100.0, ()))
    assert rules.next_look_in(109.4, poll_seconds=0.2) == pytest.approx(0.1)


def test_connections_missed_between_polls_count_as_data_now() -> None:
    rules = verdict(ignore=(ipaddress.ip_network("10.9.0.0/16"),))
    rules.observe(Poll(104.0, (), missed=(ipaddress.ip_address("10.0.0.1"),)))
    assert rules.quiet_since == 104.0
    rules.observe(Poll(105.0, (), missed=(ipaddress.ip_address("10.9.0.1"),)))  # ignored peer
    assert rules.quiet_since == 104.0
    rules.observe(Poll(106.0, (), unaccounted_opens=2))
    assert rules.quiet_since == 106.0
    assert (rules.missed, rules.unaccounted_opens) == (1, 2)
    rules.observe(Poll(108.9, ()))
    assert rules.verdict(108.9) is None
    rules.observe(Poll(109.0, ()))
    assert rules.verdict(109.0) == "quiet"


# --- configuration: the worst case, and the warning ----------------------------------------


EUREKA = {
    "PRESTOP_REGISTRY": "eureka",
    "PRESTOP_EUREKA_URLS": "http://127.0.0.1:8761/eureka/",
    "PRESTOP_EUREKA_APP": "orders",
    "POD_IP": "10.0.0.1",
}


def test_the_defaults_with_a_30s_grace_period_warn_with_the_arithmetic() -> None:
    config = load(EUREKA)
    # 30 s server cache + (30 s fetch + 35 s LoadBalancer TTL + 5 s margin)
    assert ShutdownPlan.of(config).worst_case_floor() == 100.0
    assert config.drain_limit == 19.0
    warning = ShutdownPlan.of(config).floor_warning()
    assert warning is not None
    assert "server cache 30s + client refresh 70s = 100s > drain maximum 19s" in warning
    # 100 + registry 5 + app shutdown 5 + margin 1
    assert "PRESTOP_GRACE_PERIOD_SECONDS to 111" in warning
    assert "PRESTOP_EUREKA_CLIENT_REFRESH_SECONDS" in warning


def test_a_fixed_drain_shorter_than_the_floor_warns_too() -> None:
    config = load({**EUREKA, "PRESTOP_DRAIN_MODE": "fixed", "PRESTOP_DRAIN_SECONDS": "10"})
    warning = ShutdownPlan.of(config).floor_warning()
    assert warning is not None
    assert "= 100s > fixed drain 10s" in warning
    assert "PRESTOP_DRAIN_SECONDS to 100" in warning
    assert "PRESTOP_GRACE_PERIOD_SECONDS to 111" in warning
    long_enough = {"PRESTOP_DRAIN_SECONDS": "100", "PRESTOP_GRACE_PERIOD_SECONDS": "111"}
    assert (
        ShutdownPlan.of(
            load({**EUREKA, "PRESTOP_DRAIN_MODE": "fixed", **long_enough})
        ).floor_warning()
        is None
    )


def test_a_grace_period_that_covers_the_floor_does_not_warn() -> None:
    config = load({**EUREKA, "PRESTOP_GRACE_PERIOD_SECONDS": "111"})
    assert ShutdownPlan.of(config).floor_warning() is None
    scaled = load(
        {
            **EUREKA,
            "PRESTOP_EUREKA_CLIENT_REFRESH_SECONDS": "6.5",
            "PRESTOP_EUREKA_SERVER_CACHE_SECONDS": "3",
        }
    )
    assert ShutdownPlan.of(scaled).worst_case_floor() == 9.5
    assert ShutdownPlan.of(scaled).floor_warning() is None


def test_no_registry_means_the_minimum_is_the_floor() -> None:
    config = load({"PRESTOP_DRAIN_MIN_SECONDS": "4"})
    assert ShutdownPlan.of(config).worst_case_floor() == 4.0
    assert ShutdownPlan.of(config).floor_warning() is None


def test_bad_refresh_values_are_named() -> None:
    with pytest.raises(ConfigError, match="PRESTOP_EUREKA_CLIENT_REFRESH_SECONDS='-1'"):
        load({**EUREKA, "PRESTOP_EUREKA_CLIENT_REFRESH_SECONDS": "-1"})
    with pytest.raises(ConfigError, match="PRESTOP_EUREKA_SERVER_CACHE_SECONDS='x'"):
        load({**EUREKA, "PRESTOP_EUREKA_SERVER_CACHE_SECONDS": "x"})


class _Quiet:
    """A socket watcher that never sees a connection."""

    source = "netlink"

    def poll(self) -> Poll:
        return Poll(time.monotonic(), ())

    def close(self) -> None:
        return None


def _slow_to_open(*args: object, **kwargs: object) -> _Quiet:
    time.sleep(0.1)  # a netlink socket on a busy node
    return _Quiet()


async def test_the_drain_exports_the_floor_it_waits_for() -> None:
    config = load(
        {
            **EUREKA,
            "PRESTOP_DRAIN_MIN_SECONDS": "0",
            "PRESTOP_DRAIN_QUIET_SECONDS": "0.05",
            "PRESTOP_DRAIN_POLL_SECONDS": "0.02",
        }
    )
    metrics = Metrics(CollectorRegistry())
    lifecycle = Lifecycle()
    lifecycle.start(Trigger.PRESTOP)
    lifecycle.propagation = propagation(client_refresh=0.3)
    lifecycle.propagation.watch("a")
    lifecycle.propagation.seen("a", 0.1)
    outcome = await traffic_drain(
        config,
        limit=10.0,
        lifecycle=lifecycle,
        metrics=metrics,
        open_watcher=_slow_to_open,
    )
    assert outcome.reason == "quiet"
    # quiet since the trigger, held to the floor: counted from the trigger, not from when the
    # watcher was open
    assert lifecycle.elapsed() >= 0.4
    assert outcome.detail["floor_seconds"] == pytest.approx(0.4)
    # the floor it waited for, not the configured worst case (100 s)
    assert metrics.collectors.get_sample_value("prestop_drain_floor_seconds") == pytest.approx(0.4)


class _Pinned:
    """A socket watcher that sees one caller's kept-alive connection receive a request at every
    poll: a caller pinned to the pod through a Service, whose connection never rotates away."""

    source = "netlink"

    def poll(self) -> Poll:
        return Poll(time.monotonic(), (sample(received_ms=5, sent_ms=4),))

    def close(self) -> None:
        return None


async def test_a_drain_held_to_its_maximum_by_a_pinned_connection_says_so() -> None:
    config = load(
        {
            **EUREKA,
            "PRESTOP_DRAIN_MIN_SECONDS": "0",
            "PRESTOP_DRAIN_QUIET_SECONDS": "0.05",
            "PRESTOP_DRAIN_POLL_SECONDS": "0.02",
        }
    )
    lifecycle = Lifecycle()
    lifecycle.start(Trigger.PRESTOP)
    lifecycle.propagation = propagation(client_refresh=0.1)
    lifecycle.propagation.watch("a")
    lifecycle.propagation.seen("a", 0.0)
    with capture_logs() as logs:
        outcome = await traffic_drain(
            config,
            limit=0.4,
            lifecycle=lifecycle,
            metrics=Metrics(CollectorRegistry()),
            open_watcher=lambda *args, **kwargs: _Pinned(),
        )
    assert (outcome.reason, outcome.detail["pinned"]) == ("max", 1)
    [warning] = [e for e in logs if e["event"] == "drain_ended_with_pinned_connections"]
    assert warning["log_level"] == "warning" and warning["pinned"] == 1
    assert "server.tomcat.max-keep-alive-requests" in warning["reason"]


# --- the real process: one warning at start-up, both gauges exported -----------------------------


def test_start_up_warns_once_and_exports_the_floor_and_the_maximum(
    new_agent: Callable[..., AgentProcess],
) -> None:
    closed = free_port()
    agent = new_agent({**EUREKA, "PRESTOP_EUREKA_URLS": f"http://127.0.0.1:{closed}/eureka/"})
    agent.run()
    with urllib.request.urlopen(f"{agent.url}/metrics", timeout=5) as response:
        metrics = response.read().decode()
    with urllib.request.urlopen(f"{agent.url}/status", timeout=5) as response:
        status = json.loads(response.read())
    warnings = [e for e in agent.log_events() if e.get("event") == "drain_floor_exceeds_max"]
    assert len(warnings) == 1
    assert "= 100s > drain maximum 19s" in warnings[0]["detail"]
    assert warnings[0]["level"] == "warning"
    assert "prestop_drain_floor_seconds 100.0" in metrics
    assert "prestop_drain_max_seconds 19.0" in metrics
    drain = status["drain"]
    assert (drain["floor_seconds"], drain["max_seconds"]) == (100.0, 19.0)
    assert "PassiveOpens" in drain["sees"] and "TIME_WAIT" in drain["sees"]
    assert drain["floor_warning"] == warnings[0]["detail"]
    [view] = status["registry"]["client_view"].values()  # the closed port's view, per URL
    assert view["peers"] == "unknown" and view["floor"].startswith("assumed: ")


# --- the shutdown sequence: where the floor's inputs come from ---------------------------------


class _SlowRegistry:
    """A registry whose PUT phase takes 0.3 s and whose read-back 0.2 s more."""

    name = "actuator"

    async def mark_down(self, started: float | None = None) -> dict[str, object]:
        await asyncio.sleep(0.3)
        return {}

    async def verify(self) -> dict[str, object]:
        await asyncio.sleep(0.2)
        return {}

    async def finalize(self) -> None:
        return None


async def test_the_assumed_bound_counts_from_the_put_and_a_fixed_drain_says_it_ended_early() -> (
    None
):
    config = load(
        {
            "PRESTOP_REGISTRY": "actuator",  # no Eureka URLs: nothing watched, all assumed
            "PRESTOP_DRAIN_MODE": "fixed",
            "PRESTOP_DRAIN_SECONDS": "0.2",
            "PRESTOP_EUREKA_SERVER_CACHE_SECONDS": "1",
            "PRESTOP_EUREKA_CLIENT_REFRESH_SECONDS": "1",
        }
    )
    agent = Agent(config, metrics=Metrics(CollectorRegistry()))
    agent.lifecycle.start(Trigger.PRESTOP)
    with capture_logs() as logs:
        await agent.shutdown(_SlowRegistry())  # type: ignore[arg-type]
    propagation = agent.lifecycle.propagation
    assert propagation is not None
    # the end of the PUT (0.3 s), before the read-back: not the trigger, not the step's end
    assert 0.3 <= propagation.assumed_from < 0.45
    drain = agent.lifecycle.report()["steps"][-1]
    assert drain["floor_seconds"] == pytest.approx(propagation.assumed_from + 2.0, abs=1e-3)
    assert (drain["outcome"], drain["floor_reached"]) == ("fixed", False)
    [warning] = [e for e in logs if e["event"] == "drain_ended_before_floor"]
    assert warning["log_level"] == "warning"


def test_check_warns_about_a_fixed_drain_shorter_than_the_floor(
    capsys: pytest.CaptureFixture[str],
) -> None:
    closed = free_port()
    config = load(
        {
            **EUREKA,
            "PRESTOP_EUREKA_URLS": f"http://127.0.0.1:{closed}/eureka/",
            "PRESTOP_DRAIN_MODE": "fixed",
            "PRESTOP_DRAIN_SECONDS": "10",
            "PRESTOP_REGISTRY_TIMEOUT_SECONDS": "1",
        }
    )
    check(config)  # the registry is unreachable here; the plan is printed first
    printed = capsys.readouterr().out
    assert "WARNING: propagation floor: " in printed
    assert "= 100s > fixed drain 10s" in printed
