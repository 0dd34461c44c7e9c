"""Taking the instance out of service discovery: one small interface, one module per backend.

The backend is chosen by ``PRESTOP_REGISTRY``. Backend modules are imported only when chosen, so
an agent without a registry never loads their dependencies.
"""

from __future__ import annotations

from typing import TYPE_CHECKING, Any, Protocol

if TYPE_CHECKING:
    import aiohttp

    from agent.config import Config
    from agent.server import AppHealth


class RegistryError(Exception):
    """The registry step failed. The message is shown in /prestop's answer: it names the server
    and what went wrong, and never carries credentials."""


class Registry(Protocol):
    """What the shutdown sequence needs from a backend.

    ``main`` bounds ``mark_down`` + ``verify`` together by ``PRESTOP_REGISTRY_TIMEOUT_SECONDS``;
    backends put their own per-request timeouts below that.
    """

    name: str
    """The backend's name, as in ``PRESTOP_REGISTRY`` and the metrics' ``backend`` label."""

    async def run(self) -> None:
        """Background upkeep for the agent's whole life, started once the agent serves and
        cancelled at exit: clear a stale override (eureka), or register and renew (register).
        Returns early when there is nothing to keep up. Must not raise."""

    async def mark_down(self) -> dict[str, Any]:
        """Take the instance out; return what each server said. Raise RegistryError on failure."""

    async def verify(self) -> dict[str, Any]:
        """Read the status back; raise RegistryError when no server shows it."""

    async def finalize(self) -> None:
        """After the drain: cancel a registration made on the app's behalf. Must not raise."""

    async def close(self) -> None:
        """Stop background work (heartbeats). Must not raise."""

    async def describe(self) -> dict[str, Any]:
        """For ``prestop-agent check``: reach the registry, show the instance it would mark down."""


class NoRegistry:
    """``PRESTOP_REGISTRY=none``: the pod is not in a registry the agent must update."""

    name = "none"

    async def run(self) -> None:
        return None

    async def mark_down(self) -> dict[str, Any]:
        return {}

    async def verify(self) -> dict[str, Any]:
        return {}

    async def finalize(self) -> None:
        return None

    async def close(self) -> None:
        return None

    async def describe(self) -> dict[str, Any]:
        return {"registry": "none"}


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
