"""What every drain strategy shares: the outcome it returns, and a way off the event loop.

Kept apart from the package's ``__init__`` (which chooses and runs a strategy) so that the
strategies import it without importing the package that imports them.
"""

from __future__ import annotations

import asyncio
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any, TypeVar

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
