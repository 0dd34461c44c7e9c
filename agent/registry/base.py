"""What every registry backend is: the interface the shutdown needs, its error and its health.

Kept apart from the package's ``__init__`` (which chooses and opens a backend) so that the
backends import it without importing the package that imports them.
"""

from __future__ import annotations

import asyncio
from dataclasses import dataclass
from enum import StrEnum
from typing import Any, Protocol

# Shares of PRESTOP_REGISTRY_TIMEOUT_SECONDS, counted from the start of the step: the status
# change (retries included) may use MARK_SHARE, reading it back runs until VERIFY_SHARE. Ending
# before the whole timeout means the backend's own error, naming each server, beats main's bare
# timeout.
MARK_SHARE = 0.6
VERIFY_SHARE = 0.9


@dataclass(frozen=True, slots=True)
class StepDeadlines:
    """The registry step's deadlines, in event-loop time: every backend splits its timeout so."""

    mark: float
    """The status change, retries included, ends by this."""
    verify: float
    """Reading the change back (and any read-only look: ``check``, the health check) ends by
    this."""

    @classmethod
    def starting(cls, started: float | None, timeout_seconds: float) -> StepDeadlines:
        """The split of a step of ``timeout_seconds`` that began at ``started`` (None: now)."""
        if started is None:
            started = asyncio.get_running_loop().time()
        return cls(
            mark=started + timeout_seconds * MARK_SHARE,
            verify=started + timeout_seconds * VERIFY_SHARE,
        )


class RegistryError(Exception):
    """The registry step failed. The message is shown in /prestop's answer: it names the server
    and what went wrong, and never carries credentials."""


class HealthState(StrEnum):
    """What a registry health check found. Three states, because "the server is down" and "the
    server answers but does not know us" call for different fixes."""

    UNREACHABLE = "unreachable"
    """No registry server (or, for ``actuator``, the app's endpoint) gave an answer."""
    NOT_FOUND = "not_found"
    """A server answered, but the instance is not there (not registered, or not UP in
    ``register`` mode; for ``actuator``, the endpoint answered with an error)."""
    FOUND = "found"
    """The instance is there: the shutdown's mark-down has something to mark."""


@dataclass(frozen=True, slots=True)
class RegistryHealth:
    """The result of one health check."""

    state: HealthState
    reason: str
    """One line for logs, /status and ``check``: names the servers and what they said, never
    credentials."""

    @property
    def ready(self) -> bool:
        return self.state is HealthState.FOUND


class Registry(Protocol):
    """What the shutdown sequence needs from a backend.

    ``main`` bounds ``mark_down`` + ``verify`` together by ``PRESTOP_REGISTRY_TIMEOUT_SECONDS``;
    backends put their own per-request timeouts below that.
    """

    name: str
    """The backend's name, as in ``PRESTOP_REGISTRY`` and the metrics' ``backend`` label."""

    async def run(self, pod_terminating: bool | None = None) -> None:
        """Background upkeep for the agent's whole life, started once the agent serves and
        cancelled at exit: clear a stale override (eureka), or register and renew (register).
        Returns early when there is nothing to keep up. Must not raise.

        ``pod_terminating``: what the Kubernetes API said of the pod at start-up. True: it is
        being deleted (``metadata.deletionTimestamp``), so this agent restarted during the
        pod's termination and nothing may put the instance back in service; False: it is not;
        None: not known (outside a cluster, or the API did not answer in time)."""

    async def mark_down(self, started: float | None = None) -> dict[str, Any]:
        """Take the instance out; return what each server said. Raise RegistryError on failure.

        ``started`` (event-loop time) is when the registry step began: its shares of
        ``PRESTOP_REGISTRY_TIMEOUT_SECONDS`` count from there, so that work done in the step
        before the PUT (warming the client view) leaves the read-back time to end inside it."""

    async def verify(self) -> dict[str, Any]:
        """Read the status back; raise RegistryError when no server shows it."""

    async def finalize(self) -> None:
        """After the drain: cancel a registration made on the app's behalf. Must not raise."""

    async def close(self) -> None:
        """Stop background work (heartbeats). Must not raise."""

    async def describe(self) -> dict[str, Any]:
        """For ``prestop-agent check``: reach the registry, show the instance it would mark down."""

    async def check_health(self) -> RegistryHealth:
        """One look: do the servers answer, and is the instance there? Read-only, bounded by
        ``PRESTOP_REGISTRY_TIMEOUT_SECONDS``, one attempt per server. Must not raise."""
