"""Drain strategies: how long the app keeps serving after it left the registry.

Each strategy is a coroutine that returns a :class:`DrainOutcome` saying why it ended. ``fixed``
sleeps; ``traffic`` (in :mod:`agent.drain.traffic`, imported only when chosen, so the socket
watcher costs nothing to an agent that does not use it) watches the app's sockets.
"""

from __future__ import annotations

import asyncio
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any, TypeVar

from agent.config import Config
from agent.lifecycle import Lifecycle
from agent.metrics import Metrics

T = TypeVar("T")


async def off_the_loop(function: Callable[..., T], *args: Any) -> T:
    """``function(*args)`` (a short blocking read of the app's sockets) in a worker thread, or
    right here when no thread can start (memory or thread limits exhausted): a short blocking
    read on the loop beats losing the drain or the final scrape."""
    try:
        return await asyncio.to_thread(function, *args)
    except RuntimeError as exc:
        if "thread" not in str(exc):
            raise
        return function(*args)


@dataclass(frozen=True, slots=True)
class DrainOutcome:
    reason: str
    """``fixed`` (slept the configured time), ``quiet`` (traffic stopped) or ``max`` (the limit)."""
    last_data_seconds: float | None = None
    """Seconds after the trigger at which data last reached the app, when known."""
    detail: dict[str, Any] = field(default_factory=dict)
    """Strategy-specific figures for the timeline (connections seen, watcher source, ...)."""


async def run_drain(
    config: Config,
    *,
    limit: float,
    lifecycle: Lifecycle,
    metrics: Metrics,
    own_accepts: Callable[[], int] | None = None,
    on_poll: Callable[[Any], None] | None = None,
) -> DrainOutcome:
    """Run the configured strategy for at most ``limit`` seconds (the traffic drain: see
    :func:`agent.drain.traffic.traffic_drain` for ``own_accepts`` and ``on_poll``)."""
    if config.drain_mode == "traffic":
        from agent.drain.traffic import traffic_drain

        return await traffic_drain(
            config,
            limit=limit,
            lifecycle=lifecycle,
            metrics=metrics,
            own_accepts=own_accepts,
            on_poll=on_poll,
        )
    seconds = min(config.drain_seconds, max(limit, 0.0))
    await asyncio.sleep(seconds)
    return DrainOutcome(reason="fixed" if seconds >= config.drain_seconds else "max")
