"""Every metric the agent exports, declared once on an injectable ``CollectorRegistry``.

Names are a contract (dashboards and alerts use them): prefix ``prestop_``, base units, counters
end in ``_total`` (prometheus-client appends it). Tests build ``Metrics(CollectorRegistry())`` and
read values back with ``metrics.collectors.get_sample_value``. (Prometheus' registry is called
``collectors`` here: in the agent, "registry" is the service registry the instance leaves.)
"""

from __future__ import annotations

import math

from prometheus_client import (
    CollectorRegistry,
    Counter,
    Gauge,
    Histogram,
    Info,
    generate_latest,
)
from prometheus_client.gc_collector import GCCollector
from prometheus_client.platform_collector import PlatformCollector
from prometheus_client.process_collector import ProcessCollector

from agent import __version__
from agent.lifecycle import Lifecycle, Phase, Trigger

# Registry round trips are milliseconds on a healthy cluster and seconds when a peer hangs.
REGISTRY_BUCKETS = (0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1, 2.5, 5, 10, 30)
# Drains last from a few seconds to the grace period (tens of seconds, rarely minutes).
DRAIN_BUCKETS = (0.5, 1, 2, 3, 5, 7.5, 10, 15, 20, 30, 45, 60, 90, 120, 300)

CONTENT_TYPE = "text/plain; version=0.0.4; charset=utf-8"


class Metrics:
    """The agent's metrics. One instance per process, on its own ``CollectorRegistry``."""

    def __init__(self, collectors: CollectorRegistry | None = None) -> None:
        # Every metric's declaration, one after the other (so one long function, which
        # tests/test_code_shape.py allows): the names are a contract, read in one place.
        self.collectors = collectors if collectors is not None else CollectorRegistry()
        ProcessCollector(registry=self.collectors)
        PlatformCollector(registry=self.collectors)
        GCCollector(registry=self.collectors)
        r = self.collectors
        self.info = Info(
            "prestop",
            "The agent's version and settings: labels version, drain_mode, drain_source"
            " (PRESTOP_DRAIN_SOURCE as set: auto, netlink or proc) and registry.",
            registry=r,
        )
        self.phase = Gauge(
            "prestop_phase",
            "1 for the current shutdown phase, 0 for the others.",
            ["phase"],
            registry=r,
        )
        self.shutdown_triggers = Counter(
            "prestop_shutdown_triggers",
            "Shutdowns by what started them (prestop, sigterm, sigint).",
            ["trigger"],
            registry=r,
        )
        self.hook_calls = Counter(
            "prestop_hook_calls",
            "Calls to /prestop by result (ok, failed, unauthorized, forbidden).",
            ["result"],
            registry=r,
        )
        self.registry_updates = Counter(
            "prestop_registry_updates",
            "Attempts to take the instance out of the registry, by backend and result.",
            ["backend", "result"],
            registry=r,
        )
        self.registry_update_duration = Histogram(
            "prestop_registry_update_duration_seconds",
            "Time the registry step took, retries included.",
            ["backend"],
            buckets=REGISTRY_BUCKETS,
            registry=r,
        )
        self.registry_ready = Gauge(
            "prestop_registry_ready",
            "1 when the last registry health check found the instance, 0 when the servers were"
            " unreachable or the instance was not there. Checked from start-up until the"
            " shutdown begins; absent without a registry.",
            ["backend"],
            registry=r,
        )
        self.drains = Counter(
            "prestop_drains",
            "Drains by how they ended: quiet (traffic stopped after the floor), max (the"
            " maximum, traffic still arriving), max_before_floor (the maximum, before the"
            " propagation floor: callers' caches may still list the pod), fixed.",
            ["reason"],
            registry=r,
        )
        self.drain_duration = Histogram(
            "prestop_drain_duration_seconds",
            "Time the drain step kept the app serving.",
            buckets=DRAIN_BUCKETS,
            registry=r,
        )
        self.drain_watch_source = Gauge(
            "prestop_drain_watch_source",
            "1 for the way the traffic drain sees the app's sockets (netlink, or the proc"
            " fallback that cannot time connections), 0 for the other.",
            ["source"],
            registry=r,
        )
        self.watched_connections = Gauge(
            "prestop_watched_connections",
            "TCP connections on the app's ports at the last look (traffic drain).",
            registry=r,
        )
        self.seconds_since_last_data = Gauge(
            "prestop_drain_seconds_since_last_data",
            "Seconds since data last arrived on a watched connection (traffic drain); NaN"
            " until the drain has seen data (none yet, or the /proc fallback, which cannot"
            " time data).",
            registry=r,
        )
        self.seconds_since_last_data.set(math.nan)
        self.last_data_after_trigger = Histogram(
            "prestop_drain_last_data_after_trigger_seconds",
            "Time from the shutdown trigger to the last data the agent saw reach the app"
            " (traffic drain). Not the registry's propagation delay: callers slower than the"
            " drain are not in it; prestop_registry_propagation_seconds plus the clients'"
            " refresh is.",
            buckets=DRAIN_BUCKETS,
            registry=r,
        )
        self.registry_propagation = Histogram(
            "prestop_registry_propagation_seconds",
            "Time from the shutdown trigger until the registry servers' client-facing view"
            " (Eureka's response cache) showed the instance's new status, slowest server.",
            buckets=DRAIN_BUCKETS,
            registry=r,
        )
        self.registry_propagation_censored = Counter(
            "prestop_registry_propagation_censored",
            "Drains that ended before prestop_registry_propagation_seconds could be measured,"
            " by why: not_visible (a server's client-facing view still showed the old status"
            " when the drain ended: the propagation took longer than the drain) or"
            " unobservable (a server could not be read, or one URL stands for several peers)."
            " The slowest propagations are exactly these: size the drain with them counted.",
            ["reason"],
            registry=r,
        )
        self.drain_floor = Gauge(
            "prestop_drain_floor_seconds",
            "Seconds after the trigger before which the drain may not end: registry"
            " propagation (server cache bound + client refresh) at worst as configured, the"
            " actual floor once a drain knows it; the drain minimum with no registry.",
            registry=r,
        )
        self.drain_max = Gauge(
            "prestop_drain_max_seconds",
            "The drain's effective maximum, seconds: it ends then whatever callers do.",
            registry=r,
        )
        self.log_lines_dropped = Counter(
            "prestop_log_lines_dropped",
            "Log lines not written: the log stream's reader fell behind by more than the"
            " agent's queue holds, or the stream is closed or broken. Logging never blocks or"
            " stops the agent.",
            registry=r,
        )
        self.kube_events_posted = Counter(
            "prestop_kube_events_posted",
            "Kubernetes Events the agent posted on its pod, by the Event's reason"
            " (PrestopDraining, PrestopDrained, PrestopFloorNotReached, PrestopRegistryFailed,"
            " PrestopHookRefused).",
            ["reason"],
            registry=r,
        )
        self.kube_events_failed = Counter(
            "prestop_kube_events_failed",
            "Kubernetes Events the agent could not post, by the Event's reason: the API server"
            " refused or did not answer (the Role lacks create on events.k8s.io events, say), or"
            " the queue was full. Never a delay to the drain: the log says why.",
            ["reason"],
            registry=r,
        )
        # Every series an alert or dashboard counts with increase() exists at 0 from start-up: a
        # pod terminates once, and a counter born at 1 shows no increase at all.
        for phase in Phase:
            self.phase.labels(phase=str(phase))
        for trigger in Trigger:
            self.shutdown_triggers.labels(trigger=str(trigger))
        for reason in ("quiet", "max", "max_before_floor", "fixed"):
            self.drains.labels(reason=reason)
        for reason in ("not_visible", "unobservable"):
            self.registry_propagation_censored.labels(reason=reason)
        for result in ("ok", "failed", "unauthorized", "forbidden"):
            self.hook_calls.labels(result=result)

    def kube_events(self, reasons: tuple[str, ...]) -> None:
        """Start the Events' counters at 0 for every reason (when Events are posted at all)."""
        for reason in reasons:
            self.kube_events_posted.labels(reason=reason)
            self.kube_events_failed.labels(reason=reason)

    def describe(self, **settings: str) -> None:
        """Set ``prestop_info`` (version plus the settings that shape the termination)."""
        self.info.info({"version": __version__, **settings})

    def registry_backend(self, backend: str) -> None:
        """Start the registry step's counters at 0 for the backend in use (``none`` has none)."""
        if backend != "none":
            for result in ("ok", "failed"):
                self.registry_updates.labels(backend=backend, result=result)
            self.registry_update_duration.labels(backend=backend)

    def watching(self, source: str) -> None:
        """Record the socket source the traffic drain uses: ``netlink`` or ``proc``."""
        for each in ("netlink", "proc"):
            self.drain_watch_source.labels(source=each).set(1 if each == source else 0)

    def track(self, lifecycle: Lifecycle) -> None:
        """Follow the lifecycle's phase changes in ``prestop_phase``."""
        lifecycle.subscribe(self._on_phase)

    def _on_phase(self, phase: Phase, lifecycle: Lifecycle) -> None:
        for each in Phase:
            self.phase.labels(phase=str(each)).set(1 if each is phase else 0)
        if phase is Phase.DRAINING and lifecycle.trigger is not None:
            self.shutdown_triggers.labels(trigger=str(lifecycle.trigger)).inc()

    def exposition(self) -> bytes:
        return generate_latest(self.collectors)
