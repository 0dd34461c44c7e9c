"""Who can still route to this pod, and until when: one interface, one implementation per source.

A caller finds the pod through a *source*: a service registry's client-facing view (Eureka's,
:class:`agent.lifecycle.Propagation`), or Kubernetes EndpointSlices (kube-proxy and gateways,
:class:`agent.endpointslices.EndpointSliceSource`). After the trigger each source changes (the
instance marked DOWN, the endpoint not ready); its routers may keep sending until they have seen
that change and then for their own bound (a client's cache, kube-proxy's rule sync). Each source
reports three figures, all seconds after the trigger except the bound:

- ``visible_at``: when its change became visible to its routers (None: not observed, or not yet);
- ``bound_seconds``: how long its routers may keep routing after that;
- ``assumption``: what it assumes instead when it cannot observe (None when it observes), in words.

Its ``floor(elapsed)`` is the moment before which the drain may not end as far as its routers are
concerned, as known ``elapsed`` seconds after the trigger; a source that no router uses (no
registry, a pod no Service selects) is not ``active`` and does not count. The drain's floor is the
latest over the active sources (:class:`Floor`). Pure data and rules: no I/O, no clock of its
own; every figure is measured by whoever feeds the source.

Nothing here knows a particular source: a new backend (Consul, Nacos) is one more implementation
with its own bounds, never Eureka's.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any, Protocol, runtime_checkable


@runtime_checkable
class PropagationSource(Protocol):
    """One way callers find the pod, as the drain's floor counts it."""

    @property
    def name(self) -> str:
        """The source as logs, /status, the answer and ``check`` name it (``eureka``)."""
        ...

    @property
    def active(self) -> bool:
        """Whether any caller can route to the pod through this source at all."""
        ...

    @property
    def visible_at(self) -> float | None:
        """Seconds after the trigger when the change became visible to every router of this
        source; None while not observed (not yet, or it cannot be observed)."""
        ...

    @property
    def bound_seconds(self) -> float:
        """How long its routers may keep routing to the pod after they can see the change."""
        ...

    @property
    def assumption(self) -> str | None:
        """What the source assumes because it cannot observe (None: it observes)."""
        ...

    def floor(self, elapsed: float) -> float:
        """Seconds after the trigger before which its routers may still send, as known
        ``elapsed`` seconds after the trigger. Never decreases as ``elapsed`` grows."""
        ...

    def as_dict(self) -> dict[str, Any]:
        """The source's own detail (JSON-ready), shown beside its figures."""
        ...


def figures_of(source: PropagationSource, elapsed: float) -> dict[str, Any]:
    """One source's figures, the same keys for every source (the answer, /status, the logs)."""
    return {
        "active": source.active,
        "visible_at_seconds": _rounded(source.visible_at),
        "bound_seconds": source.bound_seconds,
        "assumption": source.assumption,
        "floor_seconds": round(source.floor(elapsed), 4) if source.active else None,
    }


@dataclass(frozen=True, slots=True)
class Floor:
    """The drain's floor: the latest over the active sources (0 with none: nothing to wait for
    beyond the drain's own minimum)."""

    sources: tuple[PropagationSource, ...]

    def __post_init__(self) -> None:
        names = [source.name for source in self.sources]
        if len(set(names)) != len(names):
            raise ValueError(f"propagation sources must have distinct names, got {names}")

    def active(self) -> tuple[PropagationSource, ...]:
        return tuple(source for source in self.sources if source.active)

    def at(self, elapsed: float) -> float:
        """Seconds after the trigger before which the drain may not end, known at ``elapsed``."""
        return max((source.floor(elapsed) for source in self.active()), default=0.0)

    def latest(self, elapsed: float) -> str | None:
        """The source whose floor is the latest (the first such one on a tie); None with no
        active source."""
        active = self.active()
        if not active:
            return None
        return max(active, key=lambda source: source.floor(elapsed)).name

    def reached(self, elapsed: float) -> bool:
        """Whether a drain ending at ``elapsed`` has held until every active source's floor."""
        return elapsed + 1e-9 >= self.at(elapsed)

    def as_dict(self, elapsed: float) -> dict[str, Any]:
        """The floor, the source that sets it and every source's figures."""
        return {
            "floor_seconds": round(self.at(elapsed), 4),
            "latest": self.latest(elapsed),
            "sources": {source.name: figures_of(source, elapsed) for source in self.sources},
        }


def _rounded(value: float | None) -> float | None:
    return None if value is None else round(value, 4)
