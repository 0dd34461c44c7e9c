"""The EndpointSlice propagation source: callers that reach the pod through a Service.

kube-proxy on every node, and gateways or ingress controllers, route to a Service's endpoints
from its EndpointSlices (discovery.k8s.io/v1). When the pod terminates, the EndpointSlice
controller publishes its endpoint as not ready (``ready: false``; ``serving`` and ``terminating``
as KEP-1672 defines them); once every slice listing the pod's IP shows that, every watcher of
the slices has been sent the change, and kube-proxy needs one rule sync more to stop sending new
connections to the pod (``PRESTOP_KUBE_PROXY_SYNC_SECONDS``).

:class:`EndpointSliceSource` is the pure record (no I/O, times are seconds after the trigger,
given by whoever reads the slices): it takes the slices as the API server returns them and
implements :class:`agent.propagation.PropagationSource`. :func:`follow` is its reader: list,
then watch, through :class:`agent.kube.KubeClient`.

- No slice has listed the pod's IP: no Service selects the pod, the source is inactive.
- Every slice that lists it shows it not ready (or dropped it): the change is visible to the
  routers from that moment; the floor is that moment plus the sync bound.
- Some slice still shows it ready: the floor is held open (now plus the bound).
- The slices cannot be read (no token, RBAC denies, the API server is away): the source assumes
  the change visible ``assumed_update_seconds`` after the trigger, never more than that, so an
  absent API never delays the drain beyond the assumed bound.
"""

from __future__ import annotations

import asyncio
from collections.abc import Awaitable, Callable, Iterable, Mapping
from dataclasses import dataclass, field
from typing import Any

import structlog

from agent.config import Config, variable_of
from agent.kube import Gone, KubeClient, KubeError
from agent.lifecycle import FloorSource

log = structlog.get_logger()

KUBE_PROXY_SYNC_SECONDS = Config().kube_proxy_sync_seconds
"""Default bound of kube-proxy's rule sync after a slice update (why: the Config field)."""

ASSUMED_UPDATE_SECONDS = 10.0
"""Default for when the slices cannot be read: seconds after the trigger by which the
EndpointSlice controller has published the endpoint as not ready. The controller reacts to the
pod's deletion, which comes before the preStop hook and the classic sidecar's SIGTERM; its
queue and API rate limits (``--kube-api-qps``) delay it in busy rollouts. Not yet measured."""


@dataclass(slots=True)
class EndpointSliceSource:
    """How far the pod's not-ready endpoint has reached the Service's routers."""

    pod_ip: str
    bound_seconds: float = KUBE_PROXY_SYNC_SECONDS
    """kube-proxy's rule sync after the update (PRESTOP_KUBE_PROXY_SYNC_SECONDS)."""
    assumed_update_seconds: float = ASSUMED_UPDATE_SECONDS
    name: str = "endpointslices"  # NAME
    slices: dict[str, bool] = field(default_factory=dict)
    """Slices (namespace/name) that list the pod's IP now, and whether they show it ready."""
    listed: set[str] = field(default_factory=set)
    """Every slice that has listed the pod's IP since the source started reading."""
    visible: float | None = None
    """When every listing slice showed the endpoint not ready; None while some shows it ready."""
    held: float = 0.0
    """The latest moment a slice was seen still showing the endpoint ready. Never lowered."""
    blind: str | None = "the EndpointSlices have not been read yet"
    """Why the slices cannot be read now (None: they are being read)."""

    # --- fed by the reader ---------------------------------------------------------------------

    def replace(self, items: Iterable[Mapping[str, Any]], at: float) -> None:
        """A full list of the namespace's slices (a list call, or a relist after a watch broke),
        read ``at`` seconds after the trigger (0 or less: before it)."""
        self.blind = None
        self.slices = {}
        for item in items:
            self._take(item)
        self._settle(at)

    def update(self, kind: str, item: Mapping[str, Any], at: float) -> None:
        """One watch event (``ADDED``, ``MODIFIED``, ``DELETED``) about a slice."""
        key = slice_key(item)
        self.slices.pop(key, None)
        if kind != "DELETED":
            self._take(item)
        self._settle(at)

    def lost(self, reason: str, at: float) -> None:
        """The slices could not be read (any more) ``at`` seconds after the trigger. Once every
        slice has shown the endpoint not ready, what happens after is not needed: kept."""
        if self.visible is not None and self.blind is None:
            return
        self.blind = reason
        self._settle(at)

    def _take(self, item: Mapping[str, Any]) -> None:
        ready = endpoint_ready(item, self.pod_ip)
        if ready is not None:
            key = slice_key(item)
            self.slices[key] = ready
            self.listed.add(key)

    def _settle(self, at: float) -> None:
        at = max(0.0, at)
        if any(self.slices.values()):
            self.held = max(self.held, at)
            self.visible = None
        elif self.visible is None and self.listed and self.blind is None:
            self.visible = at

    # --- as a propagation source ---------------------------------------------------------------

    @property
    def active(self) -> bool:
        """Some slice lists the pod, or the slices cannot be read (then a Service is assumed)."""
        return bool(self.listed) or self.blind is not None

    @property
    def visible_at(self) -> float | None:
        return None if self.blind is not None else self.visible

    @property
    def assumption(self) -> str | None:
        if self.blind is None:
            return None
        return (
            f"the endpoint not ready {self.assumed_update_seconds:g}s after the trigger"
            f" ({self.blind})"
        )

    def floor(self, elapsed: float) -> float:
        if not self.active:
            return 0.0
        if self.blind is not None:
            moment = self.assumed_update_seconds
        elif self.visible is not None:
            moment = self.visible
        else:
            moment = elapsed  # some slice still shows it ready: its routers may still use it
        return max(moment, self.held) + self.bound_seconds

    def as_dict(self) -> dict[str, Any]:
        return {
            "pod_ip": self.pod_ip,
            "slices": dict(self.slices),
            "last_ready_seconds": round(self.held, 4),
            "blind": self.blind,
        }


NAME = "endpointslices"
REMEDY = (
    "give the agent's ServiceAccount a Role with list and watch on endpointslices"
    " (discovery.k8s.io) and get on pods, bound to it by a RoleBinding"
)
"""What makes the slices readable when they are not (a warning's last words)."""


def floor_source(config: Config) -> FloorSource | None:
    """The EndpointSlices as the plan counts them: in a cluster only (the API server and the
    pod's IP known). Watched when the slices can be read; when they cannot, the endpoint is
    assumed not ready ``ASSUMED_UPDATE_SECONDS`` after the trigger."""
    if not config.in_cluster:
        return None
    sync = config.kube_proxy_sync_seconds
    return FloorSource(
        name=NAME,
        watched=True,
        blind_seconds=ASSUMED_UPDATE_SECONDS,
        refresh_seconds=sync,
        figures=f"EndpointSlice update {ASSUMED_UPDATE_SECONDS:g}s (assumed when unreadable)"
        f" + kube-proxy sync {sync:g}s",
        watching="when every EndpointSlice listing the pod's IP shows it not ready (watched;"
        f" assumed {ASSUMED_UPDATE_SECONDS:g}s after the trigger when the slices cannot be"
        " read; not counted when no Service selects the pod)"
        f" + kube-proxy sync {sync:g}s",
        remedy=f"lower {variable_of('kube_proxy_sync_seconds')} to what kube-proxy's rule sync"
        " is measured to take in the cluster",
    )


def source_of(config: Config) -> EndpointSliceSource | None:
    """The runtime record for :func:`floor_source`'s source (None: not in a cluster)."""
    if not config.in_cluster:
        return None
    return EndpointSliceSource(pod_ip=config.pod_ip, bound_seconds=config.kube_proxy_sync_seconds)


def slice_key(item: Mapping[str, Any]) -> str:
    metadata = item.get("metadata") or {}
    return f"{metadata.get('namespace', '')}/{metadata.get('name', '')}"


def endpoint_ready(item: Mapping[str, Any], pod_ip: str) -> bool | None:
    """Whether the slice shows the endpoint with ``pod_ip`` ready; None when it does not list it.

    An absent ``ready`` condition means ready (discovery.k8s.io/v1: "nil should be interpreted
    as true"); kube-proxy treats a not-ready endpoint as gone for new connections unless no
    endpoint of the Service is ready (then it falls back to serving, terminating ones, which
    the agent keeps serving anyway).
    """
    listed: bool | None = None
    for endpoint in item.get("endpoints") or ():
        if not isinstance(endpoint, Mapping) or pod_ip not in (endpoint.get("addresses") or ()):
            continue
        conditions = endpoint.get("conditions") or {}
        ready = conditions.get("ready") is not False if isinstance(conditions, Mapping) else True
        listed = bool(listed) or ready
    return listed


# --- the reader: the slices from the API server into the source (I/O through the client) -------

RETRY_SECONDS = (1.0, 2.0, 5.0, 10.0)
"""Pauses between attempts after a failed list or watch (the last one repeats)."""
EMPTY_WATCH_PAUSE_SECONDS = 0.2


async def follow(
    client: KubeClient,
    source: EndpointSliceSource,
    namespace: str,
    elapsed: Callable[[], float],
    *,
    watch_seconds: int = 60,
    sleep: Callable[[float], Awaitable[None]] = asyncio.sleep,
) -> None:
    """List the namespace's slices, then watch them, into ``source``, until cancelled.

    ``elapsed`` gives seconds after the trigger (0 or less before it). A failure never ends the
    reading and never raises: the source is told (it then assumes its bound), the first failure
    and every recovery are logged once, and the next attempt follows a pause.
    """
    failures = 0
    version: str | None = None
    while True:
        try:
            if version is None:
                items, version = await client.list_endpointslices(namespace)
                source.replace(items, elapsed())
                if failures:
                    log.info("endpointslices_readable", after_failures=failures)
                failures = 0
            events = 0
            async for kind, item in client.watch_endpointslices(
                namespace, version, timeout_seconds=watch_seconds
            ):
                events += 1
                source.update(kind, item, elapsed())
                version = (item.get("metadata") or {}).get("resourceVersion") or version
            # The server ended the watch on time: watch again from where it was (after a short
            # pause when it brought nothing, so a server that ends every watch at once is not
            # asked in a loop; a change meanwhile comes with the next watch).
            if not events:
                await sleep(EMPTY_WATCH_PAUSE_SECONDS)
            continue
        except Gone:
            version = None  # too old: list again, at once
            continue
        except KubeError as error:
            version = None
            source.lost(str(error), elapsed())
            failures += 1
            if failures == 1:
                log.warning(
                    "endpointslices_unreadable",
                    error=str(error),
                    assumed=source.assumption,
                    detail="the drain assumes the Service's routers saw the pod go"
                    f" {source.assumed_update_seconds:g}s after the trigger; {REMEDY}",
                )
            else:
                log.debug("endpointslices_unreadable", error=str(error), failures=failures)
        await sleep(RETRY_SECONDS[min(failures, len(RETRY_SECONDS)) - 1])
