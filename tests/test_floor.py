"""The propagation floor: how long registry clients may still send, and the drain's end rule
around it. Pure logic on a synthetic clock (no sockets); the configuration's warning when the
floor can outlast the drain's maximum."""

from __future__ import annotations

import ipaddress
import json
import urllib.request
from collections.abc import Callable

import pytest
from prometheus_client import CollectorRegistry

from agent.config import ConfigError, load
from agent.drain.sockdiag import Poll
from agent.lifecycle import Propagation
from agent.metrics import Metrics
from tests.support import AgentProcess, free_port
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
    # b not yet visible: at least its assumed bound, and never earlier than now
    assert seen.floor(elapsed=1.0) == 3.0 + 6.5
    assert seen.floor(elapsed=5.0) == 5.0 + 6.5
    seen.seen("b", 2.2)
    assert seen.visible_to_clients == 2.2
    assert seen.floor(elapsed=9.0) == pytest.approx(2.2 + 6.5)


def test_a_server_lost_before_it_showed_the_status_counts_as_assumed() -> None:
    seen = propagation()
    seen.watch("a")
    seen.watch("b")
    seen.seen("a", 0.1)
    seen.lost("b", "connection refused")
    assert seen.visible_to_clients is None  # not measured for every server
    assert seen.floor(elapsed=20.0) == 3.0 + 6.5
    assert seen.as_dict()["unobservable"] == {"b": "connection refused"}


def test_the_first_sighting_counts_and_a_later_loss_does_not_undo_it() -> None:
    seen = propagation()
    seen.watch("a")
    seen.seen("a", 1.0)
    seen.seen("a", 2.0)
    seen.lost("a", "gone")
    assert seen.visible_to_clients == 1.0


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
    rules = verdict(floor_seconds=4.0)
    rules.observe(Poll(106.0, (sample(received_ms=0, sent_ms=0),)))  # a request at 106
    rules.observe(Poll(108.0, ()))
    assert rules.verdict(108.0) is None
    rules.observe(Poll(109.0, ()))
    assert rules.verdict(109.0) == "quiet"


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
    assert config.worst_case_floor() == 95.0
    assert config.drain_limit == 19.0
    warning = config.floor_warning()
    assert warning is not None
    assert "server cache 30s + client refresh 65s = 95s > drain maximum 19s" in warning
    # 95 + registry 5 + app shutdown 5 + margin 1
    assert "PRESTOP_GRACE_PERIOD_SECONDS to 106" in warning
    assert "PRESTOP_EUREKA_CLIENT_REFRESH_SECONDS" in warning


def test_a_grace_period_that_covers_the_floor_does_not_warn() -> None:
    config = load({**EUREKA, "PRESTOP_GRACE_PERIOD_SECONDS": "106"})
    assert config.floor_warning() is None
    scaled = load(
        {
            **EUREKA,
            "PRESTOP_EUREKA_CLIENT_REFRESH_SECONDS": "6.5",
            "PRESTOP_EUREKA_SERVER_CACHE_SECONDS": "3",
        }
    )
    assert scaled.worst_case_floor() == 9.5
    assert scaled.floor_warning() is None


def test_no_registry_means_the_minimum_is_the_floor() -> None:
    config = load({"PRESTOP_DRAIN_MIN_SECONDS": "4"})
    assert config.worst_case_floor() == 4.0
    assert config.floor_warning() is None


def test_bad_refresh_values_are_named() -> None:
    with pytest.raises(ConfigError, match="PRESTOP_EUREKA_CLIENT_REFRESH_SECONDS='-1'"):
        load({**EUREKA, "PRESTOP_EUREKA_CLIENT_REFRESH_SECONDS": "-1"})
    with pytest.raises(ConfigError, match="PRESTOP_EUREKA_SERVER_CACHE_SECONDS='x'"):
        load({**EUREKA, "PRESTOP_EUREKA_SERVER_CACHE_SECONDS": "x"})


def test_the_floor_and_max_gauges_are_declared_with_the_other_metrics() -> None:
    metrics = Metrics(CollectorRegistry())
    metrics.drain_floor.set(95)
    metrics.drain_max.set(19)
    metrics.registry_propagation.observe(2.5)
    read = metrics.registry.get_sample_value
    assert read("prestop_drain_floor_seconds") == 95
    assert read("prestop_drain_max_seconds") == 19
    assert read("prestop_registry_propagation_seconds_count") == 1


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
    assert "= 95s > drain maximum 19s" in warnings[0]["detail"]
    assert warnings[0]["level"] == "warning"
    assert "prestop_drain_floor_seconds 95.0" in metrics
    assert "prestop_drain_max_seconds 19.0" in metrics
    drain = status["drain"]
    assert (drain["floor_seconds"], drain["max_seconds"]) == (95.0, 19.0)
    assert "PassiveOpens" in drain["sees"] and "TIME_WAIT" in drain["sees"]
    assert drain["floor_warning"] == warnings[0]["detail"]
