"""Drain strategies: how long the app keeps serving after it left the registry.

Each strategy is a coroutine that returns a :class:`DrainOutcome` saying why it ended. ``fixed``
sleeps; ``traffic`` (in :mod:`agent.drain.traffic`, imported only when chosen, so the socket
watcher costs nothing to an agent that does not use it) watches the app's sockets.
"""

from __future__ import annotations

import asyncio
from collections.abc import Callable, Iterable
from typing import Any

from agent.config import Config
from agent.drain.base import DrainOutcome, off_the_loop
from agent.lifecycle import Lifecycle
from agent.metrics import Metrics


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


async def app_is_up(ports: Iterable[int]) -> bool:
    """Does anything in the pod still listen on, or hold an open connection on, one of the app's
    ``ports`` (:func:`agent.drain.sockdiag.app_is_up`, read off the loop)? Raises OSError when the
    sockets cannot be read here (no /proc/net/tcp)."""
    from agent.drain import sockdiag

    return await off_the_loop(sockdiag.app_is_up, ports)
