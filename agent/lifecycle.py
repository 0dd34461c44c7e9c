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

    # --- observing ------------------------------------------------------------------------------

    def subscribe(self, listener: PhaseListener) -> None:
        """Call ``listener(phase, lifecycle)`` on every phase change (and once now)."""
        self._listeners.append(listener)
        listener(self.phase, self)

    def elapsed(self) -> float:
        """Seconds since the first trigger; 0 before it."""
        return 0.0 if self.triggered_at is None else self._clock() - self.triggered_at

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
        self._set_phase(Phase.DRAINING)
        self._triggered.set()
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
            listener(phase, self)

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
