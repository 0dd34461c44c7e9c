"""Drain strategies: how long the app keeps serving after it left the registry.

One table, :data:`STRATEGIES`, one entry per ``PRESTOP_DRAIN_MODE``: the coroutine that drains
(one signature: the configuration, the limit and a :class:`DrainContext`; it returns a
:class:`DrainOutcome` saying why it ended), and the words the shutdown plan and its warnings use
for it. A new mode is a new entry with its own words; nothing falls back to another mode's.
``fixed`` sleeps; ``traffic`` (in :mod:`agent.drain.traffic`, imported only when chosen, so the
socket watcher costs nothing to an agent that does not use it) watches the app's sockets.
"""

from __future__ import annotations

import asyncio
import math
from collections.abc import Awaitable, Callable, Iterable
from dataclasses import dataclass
from typing import Any

from agent.config import Config
from agent.drain.base import DrainOutcome, off_the_loop
from agent.lifecycle import Lifecycle
from agent.metrics import Metrics

__all__ = [
    "STRATEGIES",
    "DrainContext",
    "DrainOutcome",
    "DrainStrategy",
    "Shortfall",
    "app_is_up",
    "run_drain",
]


@dataclass(frozen=True, slots=True)
class DrainContext:
    """What a strategy may use besides the configuration."""

    lifecycle: Lifecycle
    metrics: Metrics
    own_accepts: Callable[[], int] | None = None
    """The agent's own accepted connections (see :class:`agent.drain.sockdiag.NetlinkWatcher`)."""
    on_poll: Callable[[Any], None] | None = None
    """Called with what the strategy saw after every look (/status)."""


@dataclass(frozen=True, slots=True)
class Shortfall:
    """A propagation floor that outlasts the drain's longest, in figures, for the warning."""

    floor: float
    limit: float
    grace_needed: int
    """The grace period the drain would need to last until the floor."""
    budget: str
    """The time budget's sum, spelled out."""
    remedy: str
    """The source's own way to lower the floor."""


@dataclass(frozen=True, slots=True)
class DrainStrategy:
    """One drain mode: how it runs and how the plan words it."""

    name: str
    run: Callable[[Config, float, DrainContext], Awaitable[DrainOutcome]]
    """Drain for at most the limit (seconds); return why it ended."""
    waits_for_floor: bool
    """Whether it holds the app serving until the propagation floor."""
    describe: Callable[[Config, float], str]
    """The plan's step, given the drain's longest (seconds)."""
    shortfall: Callable[[Config, Shortfall], str]
    """What a floor longer than the drain's longest leaves uncovered, and the remedies."""


async def _fixed(config: Config, limit: float, context: DrainContext) -> DrainOutcome:
    seconds = min(config.drain_seconds, max(limit, 0.0))
    await asyncio.sleep(seconds)
    return DrainOutcome(reason="fixed" if seconds >= config.drain_seconds else "max")


def _describe_fixed(config: Config, limit: float) -> str:
    return f"drain: keep the app serving for {config.drain_seconds:g}s"


def _fixed_shortfall(config: Config, short: Shortfall) -> str:
    # The fixed drain never waits for the floor: it is the operator's bound, so say what it
    # leaves uncovered.
    return (
        f"fixed drain {short.limit:g}s (PRESTOP_DRAIN_SECONDS); the fixed drain does not wait for"
        " the floor, so clients may still send after it ends. Use PRESTOP_DRAIN_MODE=traffic, or"
        f" set PRESTOP_DRAIN_SECONDS to {math.ceil(short.floor)} and"
        " terminationGracePeriodSeconds and PRESTOP_GRACE_PERIOD_SECONDS to"
        f" {short.grace_needed}, or {short.remedy}"
    )


async def _traffic(config: Config, limit: float, context: DrainContext) -> DrainOutcome:
    from agent.drain.traffic import traffic_drain

    return await traffic_drain(
        config,
        limit=limit,
        lifecycle=context.lifecycle,
        metrics=context.metrics,
        own_accepts=context.own_accepts,
        on_poll=context.on_poll,
    )


def _describe_traffic(config: Config, limit: float) -> str:
    ports = ",".join(str(p) for p in config.app_ports)
    return (
        f"drain: watch ports {ports} every {config.drain_poll_seconds:g}s (open connections, and"
        " those that opened and closed between two looks); at least"
        f" {config.drain_min_seconds:g}s, then end after {config.drain_quiet_seconds:g}s without"
        " data, nothing in flight and, after the propagation floor, no connection still carrying"
        f" requests (kept alive, pinned to the pod); at most {limit:g}s"
    )


def _traffic_shortfall(config: Config, short: Shortfall) -> str:
    raise_max = " and PRESTOP_DRAIN_MAX_SECONDS" if config.drain_max_seconds is not None else ""
    return (
        f"drain maximum {short.limit:g}s ({short.budget}); clients may still send when the drain"
        " ends at its maximum. Raise terminationGracePeriodSeconds and"
        f" PRESTOP_GRACE_PERIOD_SECONDS to {short.grace_needed}{raise_max}, or {short.remedy}"
    )


STRATEGIES: dict[str, DrainStrategy] = {
    strategy.name: strategy
    for strategy in (
        DrainStrategy("fixed", _fixed, False, _describe_fixed, _fixed_shortfall),
        DrainStrategy("traffic", _traffic, True, _describe_traffic, _traffic_shortfall),
    )
}
"""Every drain mode, by its ``PRESTOP_DRAIN_MODE`` name (:data:`agent.config.DRAIN_MODES`)."""


async def run_drain(config: Config, *, limit: float, context: DrainContext) -> DrainOutcome:
    """Run the configured strategy for at most ``limit`` seconds."""
    return await STRATEGIES[config.drain_mode].run(config, limit, context)


async def app_is_up(ports: Iterable[int]) -> bool:
    """Does anything in the pod still listen on, or hold an open connection on, one of the app's
    ``ports`` (:func:`agent.drain.sockdiag.app_is_up`, read off the loop)? Raises OSError when the
    sockets cannot be read here (no /proc/net/tcp)."""
    from agent.drain import sockdiag

    return await off_the_loop(sockdiag.app_is_up, ports)
