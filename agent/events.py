"""Kubernetes Events on the pod for its termination (events.k8s.io/v1), as ``kubectl describe
pod`` and ``kubectl get events`` show them.

The kubelet records nothing an operator can see about a preStop hook that answered (whatever the
status): these Events are the termination's trace in the cluster. ``PrestopDraining`` (Normal, at
the trigger: what started it and the plan), ``PrestopDrained`` (Normal: how long the drain held,
why it ended, the floor), and the Warnings ``PrestopFloorNotReached``, ``PrestopRegistryFailed``
and ``PrestopHookRefused``.

Posting never costs the drain anything: :meth:`EventRecorder.record` only puts the Event on a
bounded queue (full: the Event is dropped and counted); one background task posts them, each
call bounded by the API client's deadline. A failure is a log line (the first a warning, later
ones debug) and a count in ``prestop_kube_events_failed_total``. At exit :meth:`flush` gives what
is still queued a short, bounded chance to leave.
"""

from __future__ import annotations

import asyncio
import datetime
import time
from collections.abc import Callable, Mapping
from dataclasses import dataclass
from typing import Any, Protocol

import structlog

from agent.kube import KubeError
from agent.lifecycle import GracePeriod, Lifecycle, Trigger
from agent.metrics import Metrics
from agent.plan import ShutdownPlan

log = structlog.get_logger()

DRAINING = "PrestopDraining"
DRAINED = "PrestopDrained"
FLOOR_NOT_REACHED = "PrestopFloorNotReached"
REGISTRY_FAILED = "PrestopRegistryFailed"
HOOK_REFUSED = "PrestopHookRefused"
REASONS = (DRAINING, DRAINED, FLOOR_NOT_REACHED, REGISTRY_FAILED, HOOK_REFUSED)

REPORTING_CONTROLLER = "prestop-agent"
QUEUE_SIZE = 16
"""Events waiting to be posted. A termination records at most five kinds, and refused hooks are
rate-limited: a full queue means the API server is away, and older Events are the ones to keep."""
NOTE_BYTES = 1024
"""The API server refuses a longer ``note`` (events.k8s.io/v1 validation)."""
FLUSH_SECONDS = 1.0
"""At exit, how long what is still queued may take to leave: well inside the 2 s the kubelet
leaves between SIGTERM and SIGKILL at the least."""
HOOK_REFUSED_EVERY_SECONDS = 10.0
"""At most one PrestopHookRefused per this many seconds: a caller retrying a wrong token must
not turn into an Event storm (the ones in between are counted in the next one's note)."""
ELLIPSIS = "…"


# What started the termination, as the PrestopDraining note says it.
_STARTED_BY = {
    Trigger.PRESTOP: "the preStop hook (/prestop)",
    Trigger.SIGTERM: "SIGTERM from the kubelet",
    Trigger.SIGINT: "SIGINT",
}
# Why the drain ended, as the PrestopDrained note says it (the drain's outcomes).
_ENDED_BY = {
    "quiet": "traffic had stopped after the floor",
    "max": "its maximum, traffic still arriving",
    "max_before_floor": "its maximum, before the propagation floor",
    "fixed": "the fixed drain's length",
}


class EventClient(Protocol):
    """What the recorder needs from the API client (:class:`agent.kube.KubeClient`)."""

    async def create_event(self, namespace: str, body: Mapping[str, Any]) -> dict[str, Any]: ...

    async def get_pod(self, namespace: str, name: str) -> dict[str, Any]: ...


@dataclass(frozen=True, slots=True)
class PodEvent:
    """One Event to post on the pod."""

    reason: str
    action: str
    note: str
    warning: bool
    at: float
    """Wall-clock time it happened (the Event's ``eventTime``)."""


def micro_time(timestamp: float) -> str:
    """A wall-clock time as the API's MicroTime (RFC 3339, microseconds, UTC)."""
    moment = datetime.datetime.fromtimestamp(timestamp, tz=datetime.UTC)
    return moment.strftime("%Y-%m-%dT%H:%M:%S.%fZ")


def clipped(note: str, limit: int = NOTE_BYTES) -> str:
    """``note`` cut to ``limit`` bytes of UTF-8 (the API's limit counts bytes), ending in an
    ellipsis when cut, never in half a character."""
    encoded = note.encode("utf-8")
    if len(encoded) <= limit:
        return note
    room = limit - len(ELLIPSIS.encode("utf-8"))
    return encoded[:room].decode("utf-8", "ignore") + ELLIPSIS


def event_body(
    event: PodEvent, *, pod: str, namespace: str, uid: str | None = None
) -> dict[str, Any]:
    """The events.k8s.io/v1 Event for ``event`` on the pod."""
    regarding: dict[str, Any] = {
        "apiVersion": "v1",
        "kind": "Pod",
        "name": pod,
        "namespace": namespace,
    }
    if uid:
        # kubectl describe pod lists the Events whose regarding object has the pod's uid.
        regarding["uid"] = uid
    return {
        "apiVersion": "events.k8s.io/v1",
        "kind": "Event",
        # The API server completes the name: one Event per post, never a clash between pods.
        "metadata": {"generateName": f"{pod}.prestop-", "namespace": namespace},
        "eventTime": micro_time(event.at),
        "reportingController": REPORTING_CONTROLLER,
        "reportingInstance": pod[:128],
        "action": event.action,
        "reason": event.reason,
        "note": clipped(event.note),
        "type": "Warning" if event.warning else "Normal",
        "regarding": regarding,
    }


class EventRecorder:
    """Queues the termination's Events and posts them from one background task (:meth:`run`).

    Disabled (records nothing, one info line) without an API client (not in a cluster) or
    without the pod's name and namespace (POD_NAME, POD_NAMESPACE from the downward API)."""

    def __init__(
        self,
        client: EventClient | None,
        metrics: Metrics,
        *,
        pod: str,
        namespace: str,
        capacity: int = QUEUE_SIZE,
        wall_clock: Callable[[], float] = time.time,
        clock: Callable[[], float] = time.monotonic,
    ) -> None:
        self.client = client
        self.metrics = metrics
        self.pod = pod
        self.namespace = namespace
        self.uid: str | None = None
        """The pod's uid, read once at start (``kubectl describe pod`` matches on it)."""
        self._queue: asyncio.Queue[PodEvent] = asyncio.Queue(maxsize=capacity)
        self._wall_clock = wall_clock
        self._clock = clock
        self._failures = 0
        self._refused_at: float | None = None
        self._refused_since = 0
        """Refused hooks not posted since the last PrestopHookRefused (the rate limit)."""
        missing = [
            what
            for what, absent in (
                ("not in a cluster (KUBERNETES_SERVICE_HOST unset)", client is None),
                ("POD_NAME unset", not pod),
                ("POD_NAMESPACE unset", not namespace),
            )
            if absent
        ]
        self.enabled = not missing
        if missing:
            log.info("kube_events_disabled", reason="; ".join(missing))
        else:
            metrics.kube_events(REASONS)

    # --- recording: never blocks, never raises ------------------------------------------------

    def record(self, reason: str, action: str, note: str, *, warning: bool = False) -> None:
        """Queue an Event on the pod; when the queue is full it is dropped and counted."""
        if not self.enabled:
            return
        event = PodEvent(reason, action, note, warning, self._wall_clock())
        try:
            self._queue.put_nowait(event)
        except asyncio.QueueFull:
            self._failed(event, f"the queue of {self._queue.maxsize} Events is full")

    def hook_refused(self, status: int, message: str, remote: str | None) -> None:
        """A /prestop call was refused (401/403): a Warning, at most one per
        :data:`HOOK_REFUSED_EVERY_SECONDS` (the ones in between are counted in the next)."""
        if not self.enabled:
            return
        now = self._clock()
        if self._refused_at is not None and now - self._refused_at < HOOK_REFUSED_EVERY_SECONDS:
            self._refused_since += 1
            return
        since = self._refused_since
        self._refused_at, self._refused_since = now, 0
        more = f" ({since} more refused since the last such Event)" if since else ""
        self.record(
            HOOK_REFUSED,
            "RefuseHook",
            f"/prestop answered HTTP {status} to {remote or 'an unknown address'}: {message}"
            f"{more}. This call started no drain: the kubelet ignores the hook's status and"
            " sends the app SIGTERM at once. Check the preStop hook's httpHeaders"
            " (X-Prestop-Token) against PRESTOP_TOKEN, and PRESTOP_ALLOW_CIDRS.",
            warning=True,
        )

    # --- posting: the one background task -----------------------------------------------------

    async def run(self) -> None:
        """Read the pod's uid, then post every queued Event, one at a time, until cancelled."""
        if not self.enabled:
            return
        await self._learn_uid()
        while True:
            event = await self._queue.get()
            try:
                await self._post(event)
            finally:
                self._queue.task_done()

    async def flush(self, seconds: float = FLUSH_SECONDS) -> bool:
        """Wait up to ``seconds`` for the queued Events to be posted; whether they all were."""
        if not self.enabled:
            return True
        try:
            async with asyncio.timeout(seconds):
                await self._queue.join()
        except TimeoutError:
            log.info("kube_events_not_flushed", queued=self._queue.qsize(), seconds=seconds)
            return False
        return True

    async def _learn_uid(self) -> None:
        assert self.client is not None
        try:
            pod = await self.client.get_pod(self.namespace, self.pod)
        except KubeError as error:
            # Events still go out; kubectl get events shows them, describe pod may not.
            log.info("kube_pod_uid_unknown", error=str(error))
            return
        uid = (pod.get("metadata") or {}).get("uid")
        self.uid = uid if isinstance(uid, str) and uid else None

    async def _post(self, event: PodEvent) -> None:
        assert self.client is not None
        body = event_body(event, pod=self.pod, namespace=self.namespace, uid=self.uid)
        try:
            await self.client.create_event(self.namespace, body)
        except KubeError as error:
            self._failed(event, str(error))
        except Exception as error:  # a bug here must not end the posting (nor the agent)
            self._failed(event, f"unexpected {type(error).__name__}: {error}")
        else:
            self.metrics.kube_events_posted.labels(reason=event.reason).inc()
            log.debug("kube_event_posted", reason=event.reason)

    def _failed(self, event: PodEvent, error: str) -> None:
        self.metrics.kube_events_failed.labels(reason=event.reason).inc()
        self._failures += 1
        # The first failure says what to fix; the same cause later would only repeat it.
        say = log.warning if self._failures == 1 else log.debug
        say(
            "kube_event_failed",
            reason=event.reason,
            error=error,
            failures=self._failures,
            detail="the drain is not affected; prestop_kube_events_failed_total counts these",
        )


# --- the notes: what each Event says, from the plan and the timeline (no I/O) -------------------


def draining_note(
    plan: ShutdownPlan, trigger: Trigger | None, grace: GracePeriod | None = None
) -> str:
    """PrestopDraining: what started the termination and the plan, in a line; ``grace``: the
    grace period read at the trigger (said when the pod's deletion gave less)."""
    config, budget = plan.config, plan.budget
    started_by = "an unknown trigger" if trigger is None else _STARTED_BY[trigger]
    sources = "; ".join(
        f"{source.name} at worst {source.worst_case:g}s ({source.figures})"
        for source in plan.sources
    )
    floor = (
        f"propagation floor at worst {plan.worst_case_floor():g}s ({sources})"
        if plan.sources
        else "no propagation floor (no registry)"
    )
    return (
        f"Draining, started by {started_by}: /ready answers 503; registry {config.registry};"
        f" drain {config.drain_mode}, at most {budget.drain:g}s; {floor};"
        f" grace period {budget.grace_period:g}s{_grace_from(grace)},"
        f" answer by {budget.answer_by:g}s."
    )


def _grace_from(grace: GracePeriod | None) -> str:
    if grace is None or not grace.shortened:
        return ""
    return (
        f" (from the pod's {grace.source}, less than the configured {grace.configured_seconds:g}s)"
    )


def drained_note(plan: ShutdownPlan, lifecycle: Lifecycle) -> str:
    """PrestopDrained: how long the drain held, why it ended, each source's floor."""
    drain = lifecycle.drain_step
    if drain is None:
        return "Drained: no drain step was recorded."
    detail = drain.detail
    floor = detail.get("floor_seconds")
    reached = "reached" if detail.get("floor_reached", True) else "NOT reached"
    parts = [
        f"Drained: held the app serving {drain.duration or 0.0:.1f}s"
        f" ({drain.started + (drain.duration or 0.0):.1f}s after the trigger),"
        f" ended by {_ENDED_BY.get(str(drain.outcome), str(drain.outcome))}"
    ]
    if floor is not None and plan.sources:
        parts.append(f"floor {floor:.1f}s {reached}")
    parts += _source_figures(plan, lifecycle)
    last_data = detail.get("last_data_seconds")
    if last_data is not None:
        parts.append(f"last data to the app {last_data:.1f}s after the trigger")
    if lifecycle.failure is not None:
        parts.append(f"error: {lifecycle.failure}")
    return "; ".join(parts) + "."


def _source_figures(plan: ShutdownPlan, lifecycle: Lifecycle) -> list[str]:
    """Each active source's floor at the drain's end: when its routers could see the change
    (observed, or what it assumed) plus their bound (agent.propagation.figures_of)."""
    drain = lifecycle.drain_step
    sources = {} if drain is None else drain.detail.get("floor_sources") or {}
    figures = []
    for name, source in sources.items():
        if not source.get("active"):
            continue
        visible = source.get("visible_at_seconds")
        if visible is not None:
            seen = f"visible to its routers at {visible:.1f}s (observed)"
        else:
            seen = f"assumed: {source.get('assumption') or 'not observed'}"
        floor = source.get("floor_seconds")
        ends = "" if floor is None else f", floor {floor:.1f}s"
        figures.append(f"{name}: {seen} + {source.get('bound_seconds', 0.0):g}s bound{ends}")
    return figures


def floor_not_reached_note(plan: ShutdownPlan, lifecycle: Lifecycle) -> str:
    """PrestopFloorNotReached: the drain ended at its maximum before the floor."""
    drain = lifecycle.drain_step
    detail = {} if drain is None else drain.detail
    ended = 0.0 if drain is None else drain.started + (drain.duration or 0.0)
    remedy = plan.floor_warning() or "see docs/operations.md, sizing the drain"
    return (
        f"The drain ended at its maximum {ended:.1f}s after the trigger, before the propagation"
        f" floor ({detail.get('floor_seconds', 0.0):.1f}s): callers that route from a cache may"
        f" still send to this pod after the app stops. {remedy}"
    )
