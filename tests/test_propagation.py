"""The propagation floor as the latest over its sources (agent.propagation), with an injected
clock: the Eureka view (agent.lifecycle.Propagation) as one source among others."""

from __future__ import annotations

import time
from dataclasses import dataclass
from typing import Any

import pytest
from prometheus_client import CollectorRegistry

from agent.config import load
from agent.drain.sockdiag import Poll
from agent.drain.traffic import traffic_drain
from agent.lifecycle import Lifecycle, Propagation, Trigger
from agent.metrics import Metrics
from agent.propagation import Floor, PropagationSource, figures_of


@dataclass
class FixedSource:
    """A source that saw its change at ``seen`` (None: never) and assumes ``assumed_at`` when it
    cannot observe: the smallest implementation of the interface, for the floor's own rules."""

    name: str
    bound_seconds: float
    seen: float | None = None
    assumed_at: float | None = None
    active: bool = True

    @property
    def visible_at(self) -> float | None:
        return self.seen

    @property
    def assumption(self) -> str | None:
        return None if self.assumed_at is None else f"visible by {self.assumed_at:g}s"

    def floor(self, elapsed: float) -> float:
        if self.seen is not None:
            return self.seen + self.bound_seconds
        if self.assumed_at is not None:
            return self.assumed_at + self.bound_seconds
        return elapsed + self.bound_seconds

    def as_dict(self) -> dict[str, Any]:
        return {}


def eureka(**kwargs: Any) -> Propagation:
    return Propagation(registry=True, client_refresh=65.0, server_cache=30.0, **kwargs)


def test_eureka_view_is_a_source_with_its_figures() -> None:
    view = eureka()
    assert isinstance(view, PropagationSource)
    view.watch("http://a/eureka")
    view.seen("http://a/eureka", 12.5)
    assert figures_of(view, 20.0) == {
        "active": True,
        "visible_at_seconds": 12.5,
        "bound_seconds": 65.0,
        "assumption": None,
        "floor_seconds": 77.5,
    }


def test_eureka_view_says_what_it_assumes_when_blind() -> None:
    unwatched = eureka(assumed_from=1.5)
    assert unwatched.assumption == "server cache 30s from 1.5s (no server's view is watched)"
    assert unwatched.floor(0.0) == pytest.approx(96.5)
    lost = eureka()
    lost.watch("http://a/eureka")
    lost.watch("http://b/eureka")
    lost.lost("http://b/eureka", "connection refused")
    assert lost.assumption == "server cache 30s from 0s for http://b/eureka (connection refused)"
    assert Propagation(registry=False, client_refresh=65.0, server_cache=30.0).assumption is None


def test_floor_is_the_latest_active_source() -> None:
    view = eureka()
    view.watch("a")
    view.seen("a", 2.0)  # floor 67
    slices = FixedSource("endpointslices", bound_seconds=5.0, seen=0.4)  # floor 5.4
    floor = Floor((view, slices))
    assert floor.at(10.0) == pytest.approx(67.0)
    assert floor.latest(10.0) == "eureka"
    assert not floor.reached(66.9)
    assert floor.reached(67.0)
    # A later source sets the floor, whichever it is: no source's bound is the floor's default.
    late = FixedSource("consul", bound_seconds=10.0, assumed_at=70.0)
    assert Floor((view, slices, late)).at(10.0) == pytest.approx(80.0)
    assert Floor((view, slices, late)).latest(10.0) == "consul"


def test_inactive_sources_do_not_count() -> None:
    none = Propagation(registry=False, client_refresh=65.0, server_cache=30.0)
    unselected = FixedSource("endpointslices", bound_seconds=5.0, active=False)
    floor = Floor((none, unselected))
    assert floor.at(3.0) == 0.0
    assert floor.latest(3.0) is None
    assert floor.reached(0.0)
    shown = floor.as_dict(3.0)
    assert shown["sources"]["endpointslices"]["floor_seconds"] is None
    assert shown["sources"]["eureka"]["active"] is False
    assert Floor(()).at(1.0) == 0.0


def test_an_unobserved_source_holds_the_floor_open() -> None:
    waiting = FixedSource("endpointslices", bound_seconds=5.0)
    floor = Floor((waiting,))
    assert floor.at(1.0) == pytest.approx(6.0)
    assert floor.at(30.0) == pytest.approx(35.0)
    assert not floor.reached(30.0)


def test_source_names_are_distinct() -> None:
    with pytest.raises(ValueError, match="distinct names"):
        Floor((FixedSource("eureka", 1.0), eureka()))


def test_report_shows_each_sources_figures_beside_the_existing_keys() -> None:
    now = [100.0]
    lifecycle = Lifecycle(clock=lambda: now[0], wall_clock=lambda: 0.0)
    assert lifecycle.report()["floor"] is None  # before the trigger
    lifecycle.start(Trigger.PRESTOP)
    lifecycle.propagation = eureka()
    lifecycle.propagation.watch("a")
    lifecycle.sources.append(FixedSource("endpointslices", bound_seconds=5.0, seen=0.5))
    now[0] = 101.0
    report = lifecycle.report()
    assert "propagation" in report and "visible_to_clients_seconds" in report
    assert report["floor"]["latest"] == "eureka"  # a.k.a. still showing UP at 1 s
    assert report["floor"]["floor_seconds"] == pytest.approx(66.0)
    assert report["floor"]["sources"]["endpointslices"]["floor_seconds"] == pytest.approx(5.5)
    lifecycle.propagation.seen("a", 1.0)
    lifecycle.finish()
    now[0] = 500.0  # the answer is that of the finished termination, not of now
    assert lifecycle.report()["floor"]["floor_seconds"] == pytest.approx(66.0)


class _Quiet:
    """A socket watcher that never sees a connection: the drain ends on its floor alone."""

    source = "netlink"

    def poll(self) -> Poll:
        return Poll(time.monotonic(), ())

    def close(self) -> None:
        return None


async def test_the_traffic_drain_waits_for_a_source_other_than_the_registry() -> None:
    config = load(
        {
            "PRESTOP_DRAIN_MIN_SECONDS": "0",
            "PRESTOP_DRAIN_QUIET_SECONDS": "0.05",
            "PRESTOP_DRAIN_POLL_SECONDS": "0.02",
        }
    )
    metrics = Metrics(CollectorRegistry())
    lifecycle = Lifecycle()
    lifecycle.start(Trigger.PRESTOP)
    lifecycle.propagation = Propagation(registry=False, client_refresh=65.0, server_cache=30.0)
    lifecycle.sources.append(FixedSource("endpointslices", bound_seconds=0.3, seen=0.1))
    outcome = await traffic_drain(
        config,
        limit=10.0,
        lifecycle=lifecycle,
        metrics=metrics,
        open_watcher=lambda *a, **k: _Quiet(),
    )
    assert outcome.reason == "quiet"
    assert lifecycle.elapsed() >= 0.4  # held to the slices' floor, with no registry at all
    assert outcome.detail["floor_seconds"] == pytest.approx(0.4)
    assert metrics.collectors.get_sample_value("prestop_drain_floor_seconds") == pytest.approx(0.4)
