"""Taking the instance out of service discovery: one small interface, one module per backend.

The backend is chosen by ``PRESTOP_REGISTRY``. Backend modules are imported only when chosen, so
an agent without a registry never loads their dependencies.
"""

from __future__ import annotations

import asyncio
import time
from collections.abc import Callable
from typing import TYPE_CHECKING, Any

import structlog

from agent.http import redact_urls_in
from agent.lifecycle import iso_time
from agent.registry.base import HealthState, Registry, RegistryError, RegistryHealth

if TYPE_CHECKING:
    import aiohttp

    from agent.config import Config
    from agent.http import AppHealth
    from agent.metrics import Metrics

__all__ = [
    "HealthState",
    "HealthWatch",
    "NoRegistry",
    "Registry",
    "RegistryError",
    "RegistryHealth",
    "open_registry",
]

log = structlog.get_logger()


class NoRegistry:
    """``PRESTOP_REGISTRY=none``: the pod is not in a registry the agent must update."""

    name = "none"

    async def run(self, pod_terminating: bool | None = None) -> None:
        return None

    async def mark_down(self, started: float | None = None) -> dict[str, Any]:
        return {}

    async def verify(self) -> dict[str, Any]:
        return {}

    async def finalize(self) -> None:
        return None

    async def close(self) -> None:
        return None

    async def describe(self) -> dict[str, Any]:
        return {"registry": "none"}

    async def check_health(self) -> RegistryHealth:
        return RegistryHealth(HealthState.FOUND, "no registry")


def open_registry(
    config: Config, session: aiohttp.ClientSession, health: AppHealth | None = None
) -> Registry:
    """The backend ``config.registry`` names, sharing the agent's HTTP session and (register
    mode, which reports the app's health to Eureka) its app health check."""
    if config.registry == "none":
        return NoRegistry()
    if config.registry == "eureka":
        from agent.registry.eureka import EurekaRegistry

        return EurekaRegistry(config, session)
    if config.registry == "actuator":
        from agent.registry.actuator import ActuatorRegistry

        return ActuatorRegistry(config, session)
    from agent.registry.register import RegisterRegistry

    return RegisterRegistry(config, session, health)


# The first checks come quickly (the app usually registers a few seconds after the agent
# started), then less and less often until PRESTOP_REGISTRY_CHECK_SECONDS.
FIRST_CHECK_INTERVAL_SECONDS = 1.0


class HealthWatch:
    """The registry health check from start-up until the shutdown begins.

    Exports ``prestop_registry_ready{backend}``, keeps the last result for /status, and logs only
    when the state changes: one line per change, however often it checks. The
    first result is logged too (a change from "not checked yet"). Warning when the instance is not
    found or the servers are unreachable, info when it is found.

    It never touches /ready: a Eureka outage must not take every pod out of its Service.
    """

    def __init__(
        self,
        registry: Registry,
        metrics: Metrics,
        *,
        interval_seconds: float,
        timeout_seconds: float,
        wall_clock: Callable[[], float] = time.time,
    ) -> None:
        self._registry = registry
        self._gauge = metrics.registry_ready.labels(backend=registry.name)
        self._interval = interval_seconds
        self._timeout = timeout_seconds
        self._wall_clock = wall_clock
        self.last: RegistryHealth | None = None
        self.checked_at: float | None = None
        """Wall-clock time of the last check."""
        self.changed_at: float | None = None
        """Wall-clock time the state last changed."""
        self.checks = 0

    async def check(self) -> RegistryHealth:
        """Check once, record, export, and log if anything changed."""
        try:
            async with asyncio.timeout(self._timeout):
                health = await self._registry.check_health()
        except TimeoutError:
            health = RegistryHealth(HealthState.UNREACHABLE, f"no answer within {self._timeout:g}s")
        except Exception as exc:  # check_health must not raise; if it does, say so once
            reason = redact_urls_in(f"{type(exc).__name__}: {exc}")
            health = RegistryHealth(HealthState.UNREACHABLE, f"health check failed: {reason}")
        self.record(health)
        return health

    def record(self, health: RegistryHealth) -> None:
        now = self._wall_clock()
        self.checks += 1
        self.checked_at = now
        self._gauge.set(1 if health.ready else 0)
        previous = self.last
        self.last = health
        if previous is not None and previous.state is health.state:
            return  # the reason may word the same state differently from check to check
        self.changed_at = now
        emit = log.info if health.ready else log.warning
        emit(
            "registry_health_changed",
            backend=self._registry.name,
            state=str(health.state),
            reason=health.reason,
            previous=None if previous is None else str(previous.state),
        )

    async def run(self) -> None:
        """Check at once, then quickly while the instance is not found, then every interval.
        Cancelled by ``main`` when the shutdown begins."""
        pause = min(FIRST_CHECK_INTERVAL_SECONDS, self._interval)
        while True:
            health = await self.check()
            if health.ready:
                pause = self._interval
            await asyncio.sleep(pause)
            pause = min(pause * 2, self._interval)

    def report(self) -> dict[str, Any]:
        """For /status."""
        last = self.last
        return {
            "backend": self._registry.name,
            "state": "not checked yet" if last is None else str(last.state),
            "ready": last is not None and last.ready,
            "reason": None if last is None else last.reason,
            "checked_at": iso_time(self.checked_at),
            "changed_at": iso_time(self.changed_at),
            "checks": self.checks,
        }
