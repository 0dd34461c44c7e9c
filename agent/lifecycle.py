"""The phase machine SERVING -> DRAINING -> DRAINED, and the record of one termination.

Pure logic: no sockets, no files, no logging. Time comes from injected clocks so the tests can
drive it, and whoever needs to react to a phase change (metrics, logs) subscribes a callback.
Handlers and signal handlers only call :meth:`Lifecycle.start` and await
:meth:`Lifecycle.wait_drained`; the shutdown coroutine in ``main`` is the only one that advances
the steps.
"""

from __future__ import annotations

import asyncio
import datetime
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from enum import StrEnum
from typing import Any

from agent.propagation import Floor, PropagationSource


class Phase(StrEnum):
    SERVING = "serving"
    """Ready; nothing has asked the pod to stop."""
    DRAINING = "draining"
    """A trigger arrived: /ready answers 503, the registry is told, traffic is drained."""
    DRAINED = "drained"
    """The drain is over; /prestop callers have their answer and the app may get SIGTERM."""


class Trigger(StrEnum):
    PRESTOP = "prestop"
    """The app container's preStop httpGet hook called /prestop."""
    SIGTERM = "sigterm"
    """The kubelet signalled the agent (classic sidecar: at the start of the termination)."""
    SIGINT = "sigint"
    """A person pressed Ctrl-C."""


@dataclass(slots=True)
class Step:
    """One step of the shutdown sequence, timed relative to the trigger."""

    name: str
    started: float
    """Seconds after the trigger at which the step began."""
    duration: float | None = None
    """Seconds the step took; None while it runs."""
    outcome: str | None = None
    """How it ended: ``ok``, ``failed``, ``skipped``, or the drain's end reason."""
    detail: dict[str, Any] = field(default_factory=dict)

    def as_dict(self) -> dict[str, Any]:
        return {
            "name": self.name,
            "started_seconds": round(self.started, 4),
            "duration_seconds": None if self.duration is None else round(self.duration, 4),
            "outcome": self.outcome,
            **self.detail,
        }


@dataclass(frozen=True, slots=True)
class FloorSource:
    """One way callers find the pod, as the propagation floor counts it (the floor is the latest
    over every source). Each source module builds its own from the configuration (Eureka's:
    :func:`agent.registry.view.floor_source`); nothing else knows a source's figures."""

    name: str
    """The source, as logs, /status and ``check`` name it (``eureka``)."""
    watched: bool
    """Whether the moment its routers can see the change is observed (then measured), or only
    assumed from ``blind_seconds``."""
    blind_seconds: float
    """What it assumes when it cannot observe: seconds after the change reached it until its
    routers can see the change."""
    refresh_seconds: float
    """Its routers' bound: seconds they may keep routing to the pod after they can see the
    change."""
    figures: str
    """Its two bounds in words, with their values, for warnings (``Eureka server cache 30s +
    client refresh 70s``)."""
    watching: str
    """How the moment its routers can see the change is known (watched, or assumed and why),
    for ``check``."""
    remedy: str
    """How to lower its bounds: which settings of its routers, and the agent's variables that
    must follow."""
    registry: bool = False
    """Whether it is the registry's view, which the mark-down changes and :class:`Propagation`
    records (at most one source is); the others have their own runtime record."""

    @property
    def worst_case(self) -> float:
        """Seconds after the change before which its routers may still send, at worst."""
        return self.blind_seconds + self.refresh_seconds

    def propagation(self) -> Propagation:
        """The record the drain fills in as this registry's view is observed."""
        return Propagation(
            registry=True, client_refresh=self.refresh_seconds, server_cache=self.blind_seconds
        )


@dataclass(slots=True)
class Propagation:
    """How far the mark-down has reached the registry's clients, and the drain floor it implies.

    Eureka clients route from caches: the server's read-only response cache (the client-facing
    view), then each client's registry fetch and its load balancer's cache. The agent can watch
    the first stage (a registry backend reports, per server, every answer of its cached view);
    the other two are bounded only by configuration (``client_refresh``). The drain may not end
    before every client can have dropped the instance: ``floor()``. Times are seconds after the
    trigger. Pure data and rules: the registry backend writes it, the drain reads it.

    The floor never decreases as answers arrive: every rule below only takes the later of what
    it knew and what it learns, so no answer, failure or recovery can make clients that could
    still route a moment ago stop counting.
    """

    registry: bool
    """False with ``PRESTOP_REGISTRY=none``: nothing to propagate, no floor beyond the minimum."""
    client_refresh: float
    """PRESTOP_EUREKA_CLIENT_REFRESH_SECONDS: client fetch interval + load-balancer cache TTL."""
    server_cache: float
    """PRESTOP_EUREKA_SERVER_CACHE_SECONDS: assumed for a server whose view is not observed."""
    assumed_from: float = 0.0
    """When the change reached the servers (the end of the PUT phase): a server's cache tick can
    come up to ``server_cache`` after that, so the assumed bound counts from here, not from the
    trigger (mark-down retries and replication batching come first)."""
    servers: dict[str, float | None] = field(default_factory=dict)
    """Watched servers: when their client-facing view first showed the new status (None: not
    yet). Empty: the view is not observable, the server cache's bound is assumed."""
    unobservable: dict[str, str] = field(default_factory=dict)
    """Servers whose view cannot be read now, and why: the bound is assumed for them (they are
    still polled and leave this list when they answer again)."""
    assumed: dict[str, str] = field(default_factory=dict)
    """Servers whose answers cannot stand for every client (one URL in front of several peers),
    and why: their stage is never shorter than the assumed bound."""
    held: dict[str, float] = field(default_factory=dict)
    """Per server, the latest instant known to need covering: its last answer still showing the
    instance as before, or when it was lost (with the bound then assumed). Never lowered."""
    failures: dict[str, int] = field(default_factory=dict)
    """Failed reads in a row, per server."""
    max_failures: int = 3
    """After this many failed reads in a row a server counts as lost (unobservable)."""
    name: str = "eureka"
    """The source's name (:class:`agent.propagation.PropagationSource`)."""

    def watch(self, server: str, *, assumed: str | None = None) -> None:
        """A server whose view is being watched; ``assumed``: why its answers cannot stand for
        every client (its stage is then at least the assumed bound)."""
        self.servers.setdefault(server, None)
        if assumed is not None:
            self.assumed[server] = assumed

    def still_up(self, server: str, after_trigger: float) -> bool:
        """The server's view still showed the instance as before, ``after_trigger`` seconds in.
        True when the server had been lost and is back (still showing the old status: it may
        have missed the change and needs it again)."""
        self._hold(server, after_trigger)
        self.failures[server] = 0
        return self.unobservable.pop(server, None) is not None

    def seen(self, server: str, after_trigger: float) -> None:
        """The server's client-facing view showed the new status ``after_trigger`` seconds in."""
        if self.servers.get(server) is None:
            self.servers[server] = max(0.0, after_trigger)
        self.failures[server] = 0
        self.unobservable.pop(server, None)

    def failed(self, server: str, reason: str, after_trigger: float) -> bool:
        """A read of the server's view failed; True when that made it lost (``max_failures`` in
        a row)."""
        count = self.failures.get(server, 0) + 1
        self.failures[server] = count
        if count < self.max_failures or server in self.unobservable:
            return False
        self.lost(server, reason, after_trigger)
        return True

    def lost(self, server: str, reason: str, after_trigger: float | None = None) -> None:
        """The server's view could not be read (any more) ``after_trigger`` seconds in (None:
        from the start); its stage is assumed, and counts at least from then: it may have served
        the old status to its clients until that instant."""
        if self.servers.get(server) is not None:
            return  # its change was already seen: nothing left to measure there
        self.unobservable[server] = reason
        # What the floor said for it a moment ago (the bound, or now while it still answered):
        # whatever it answers next, it never counts for less.
        self._hold(server, max(self.bound, after_trigger or 0.0))

    def _hold(self, server: str, at: float) -> None:
        self.held[server] = max(self.held.get(server, 0.0), at)

    @property
    def bound(self) -> float:
        """Seconds after the trigger by which a server's cache has shown the change, assumed."""
        return self.assumed_from + self.server_cache

    def stage(self, server: str, elapsed: float) -> float:
        """Seconds after the trigger until which ``server`` may still serve the old status to its
        clients, as known at ``elapsed``."""
        held = self.held.get(server, 0.0)
        seen = self.servers.get(server)
        if seen is not None:
            # Seen after a loss: when it changed meanwhile is unknown (a restarted server's cold
            # key shows the change at once), so what was held stands.
            stage = max(seen, held)
        elif server in self.unobservable:
            stage = max(self.bound, held)
        else:
            # Still answering with the old status: it holds the floor open, following a cache
            # slower than configured rather than assuming it away.
            stage = max(elapsed, held)
        if server in self.assumed:
            stage = max(stage, self.bound)
        return stage

    @property
    def visible_to_clients(self) -> float | None:
        """When the slowest watched server showed the status to clients; None until all have,
        or when some server was not observed (lost now, or its answers stand for one peer)."""
        if not self.servers or self.unobservable or self.assumed:
            return None
        if any(seen is None for seen in self.servers.values()):
            return None
        return max(self.stage(server, 0.0) for server in self.servers)

    def censored(self) -> str | None:
        """Why the propagation cannot be recorded as measured (None when it can, or when there
        was nothing to measure): ``unobservable`` (a server could not be read or stands for
        several peers) or ``not_visible`` (a server still showed the old status)."""
        if not self.registry or not self.servers or self.visible_to_clients is not None:
            return None
        if self.unobservable or self.assumed:
            return "unobservable"
        return "not_visible"

    def floor(self, elapsed: float) -> float:
        """Seconds after the trigger before which the drain may not end, as known at
        ``elapsed`` seconds after the trigger.

        Per server: when its view showed the status (measured), or now while it still shows the
        old one, or the assumed bound while it cannot be read; never earlier than the last
        answer still showing the old status. The slowest server + client refresh. Nothing
        watched: the assumed bound.
        """
        if not self.registry:
            return 0.0
        if not self.servers:
            return self.bound + self.client_refresh
        return max(self.stage(server, elapsed) for server in self.servers) + self.client_refresh

    def reached(self, elapsed: float) -> bool:
        """Whether a drain ending at ``elapsed`` has held until the floor."""
        return elapsed + 1e-9 >= self.floor(elapsed)

    # --- as a propagation source (agent.propagation.PropagationSource) ---------------------------

    @property
    def active(self) -> bool:
        return self.registry

    @property
    def visible_at(self) -> float | None:
        return self.visible_to_clients

    @property
    def bound_seconds(self) -> float:
        return self.client_refresh

    @property
    def assumption(self) -> str | None:
        """The server cache's bound, when some server's view is not (or cannot be) observed."""
        if not self.registry:
            return None
        bound = f"server cache {self.server_cache:g}s from {self.assumed_from:.4g}s"
        if not self.servers:
            return f"{bound} (no server's view is watched)"
        blind = {**self.assumed, **self.unobservable}
        if not blind:
            return None
        return f"{bound} for " + ", ".join(f"{name} ({why})" for name, why in blind.items())

    def as_dict(self) -> dict[str, Any]:
        return {
            "visible_to_clients_seconds": _rounded(self.visible_to_clients),
            "servers": {name: _rounded(seen) for name, seen in self.servers.items()},
            "unobservable": dict(self.unobservable),
            "assumed": dict(self.assumed),
            "last_old_status_seconds": {name: _rounded(at) for name, at in self.held.items()},
            "assumed_from_seconds": round(self.assumed_from, 4),
            "client_refresh_seconds": self.client_refresh,
        }


def _rounded(value: float | None) -> float | None:
    return None if value is None else round(value, 4)


@dataclass(frozen=True, slots=True)
class GracePeriod:
    """The grace period the termination is planned with, and where it came from."""

    seconds: float
    source: str
    """``PRESTOP_GRACE_PERIOD_SECONDS`` (the configured one), or
    ``metadata.deletionGracePeriodSeconds`` when the pod's deletion gave less (``kubectl delete
    --grace-period``, an eviction, a node shutdown)."""
    configured_seconds: float
    """What PRESTOP_GRACE_PERIOD_SECONDS says, for comparison."""
    note: str | None = None
    """Why the pod's own figure could not be read, or was not used (None: nothing to say)."""

    @property
    def shortened(self) -> bool:
        return self.seconds < self.configured_seconds

    def as_dict(self) -> dict[str, Any]:
        return {
            "grace_period_seconds": self.seconds,
            "grace_period_from": self.source,
            "configured_grace_period_seconds": self.configured_seconds,
            "grace_period_note": self.note,
        }


PhaseListener = Callable[[Phase, "Lifecycle"], None]

# Hooks are retried and several may be configured, so a few joins are normal; a flood of calls
# must not grow every answer (which carries the list) without bound.
MAX_JOINED_SHOWN = 100


class Lifecycle:
    """The state of one agent process's termination; one instance per process."""

    def __init__(
        self,
        *,
        clock: Callable[[], float] = time.monotonic,
        wall_clock: Callable[[], float] = time.time,
    ) -> None:
        self._clock = clock
        self._wall_clock = wall_clock
        self._listeners: list[PhaseListener] = []
        self._triggered = asyncio.Event()
        self._drained = asyncio.Event()
        self.phase = Phase.SERVING
        self.trigger: Trigger | None = None
        self.triggered_at: float | None = None
        """Clock reading at the first trigger."""
        self.triggered_wall: float | None = None
        """Wall-clock time of the first trigger, for humans."""
        self.joined: list[tuple[Trigger, float]] = []
        """Later triggers that joined the running sequence, with their offset in seconds (the
        first ``MAX_JOINED_SHOWN``; ``joined_total`` counts them all)."""
        self.joined_total = 0
        self.steps: list[Step] = []
        self.failure: str | None = None
        """Why the termination is reported as failed (the hook then answers 500)."""
        self.finished_at: float | None = None
        self.propagation: Propagation | None = None
        """How far the mark-down has reached the registry's clients (None: no registry). The
        registry's propagation source; the floor counts it with ``sources``."""
        self.sources: list[PropagationSource] = []
        """The other ways callers find the pod (EndpointSlices), each a propagation source."""
        self.grace: GracePeriod | None = None
        """The grace period this termination is planned with (set at the trigger, once the pod's
        own figure was read or could not be); the Events read it from here."""
        self.listener_failures: list[str] = []
        """Phase listeners that raised (their failure does not stop the phase change)."""

    # --- observing ------------------------------------------------------------------------------

    def subscribe(self, listener: PhaseListener) -> None:
        """Call ``listener(phase, lifecycle)`` on every phase change (and once now)."""
        self._listeners.append(listener)
        listener(self.phase, self)

    def elapsed(self) -> float:
        """Seconds since the first trigger; 0 before it."""
        return 0.0 if self.triggered_at is None else self._clock() - self.triggered_at

    def _settled(self) -> float:
        """Now, or when the termination finished: its answer does not change after that."""
        return self.elapsed() if self.finished_at is None else self.finished_at

    def floor(self) -> Floor:
        """The drain's floor: the latest over the registry's source and every other source.
        Without a registry its record is no source at all (not one named after a registry that
        is not there)."""
        registry = (
            () if self.propagation is None or not self.propagation.registry else (self.propagation,)
        )
        return Floor((*registry, *self.sources))

    @property
    def drain_step(self) -> Step | None:
        return next((step for step in self.steps if step.name == "drain"), None)

    # --- advancing ------------------------------------------------------------------------------

    def start(self, trigger: Trigger) -> bool:
        """Start the shutdown, or join the one already under way. True when this call started it."""
        if self.trigger is not None:
            if self.phase is Phase.DRAINING:  # after the drain there is nothing left to join
                self.joined_total += 1
                if len(self.joined) < MAX_JOINED_SHOWN:
                    self.joined.append((trigger, self.elapsed()))
            return False
        self.trigger = trigger
        self.triggered_at = self._clock()
        self.triggered_wall = self._wall_clock()
        # Released before the listeners run: whatever they do, the shutdown sequence starts.
        self._triggered.set()
        self._set_phase(Phase.DRAINING)
        return True

    def begin(self, name: str) -> Step:
        """Record that a step starts now."""
        if self.triggered_at is None:
            raise RuntimeError("a step cannot begin before the shutdown was triggered")
        step = Step(name=name, started=self.elapsed())
        self.steps.append(step)
        return step

    def end(self, step: Step, outcome: str, **detail: Any) -> None:
        """Record that a step ended now, how, and anything worth showing about it."""
        step.duration = self.elapsed() - step.started
        step.outcome = outcome
        step.detail.update(detail)

    def fail(self, reason: str) -> None:
        """Mark the termination as failed; the first reason is kept, later ones are appended."""
        self.failure = reason if self.failure is None else f"{self.failure}; {reason}"

    def finish(self) -> None:
        """The drain is over: release every waiter."""
        if self.phase is Phase.DRAINED:
            return
        if self.phase is not Phase.DRAINING:
            raise RuntimeError(f"cannot finish from phase {self.phase}")
        self.finished_at = self.elapsed()
        self._set_phase(Phase.DRAINED)
        self._drained.set()

    def _set_phase(self, phase: Phase) -> None:
        self.phase = phase
        for listener in self._listeners:
            # Observers (metrics, logs) must not be able to stop the termination they observe:
            # a failing one is counted, and the others still run.
            try:
                listener(phase, self)
            except Exception as exc:
                self.listener_failures.append(f"{type(exc).__name__}: {exc}")

    # --- waiting --------------------------------------------------------------------------------

    async def wait_triggered(self) -> None:
        await self._triggered.wait()

    async def wait_drained(self) -> None:
        await self._drained.wait()

    # --- reporting ------------------------------------------------------------------------------

    def report(self) -> dict[str, Any]:
        """The timeline as JSON-ready data: the /prestop answer, /status and the final log event."""
        drain = self.drain_step
        return {
            "phase": str(self.phase),
            "trigger": None if self.trigger is None else str(self.trigger),
            "triggered_at": iso_time(self.triggered_wall),
            "joined": [
                {"trigger": str(trigger), "after_seconds": round(offset, 4)}
                for trigger, offset in self.joined
            ],
            "joined_total": self.joined_total,
            "steps": [step.as_dict() for step in self.steps],
            "drain_ended_by": None if drain is None else drain.outcome,
            "visible_to_clients_seconds": None
            if self.propagation is None
            else _rounded(self.propagation.visible_to_clients),
            "propagation": None if self.propagation is None else self.propagation.as_dict(),
            "floor": None if self.triggered_at is None else self.floor().as_dict(self._settled()),
            **({} if self.grace is None else self.grace.as_dict()),
            "duration_seconds": None if self.finished_at is None else round(self.finished_at, 4),
            "ok": self.failure is None,
            "error": self.failure,
        }


def iso_time(timestamp: float | None) -> str | None:
    """A wall-clock time as ISO 8601 UTC with milliseconds, for humans and log pipelines."""
    if timestamp is None:
        return None
    moment = datetime.datetime.fromtimestamp(timestamp, tz=datetime.UTC)
    return moment.isoformat(timespec="milliseconds").replace("+00:00", "Z")
