"""What Eureka *clients* see of the instance: the servers' cached, client-facing view.

Clients fetch ``apps/``, ``apps/delta`` and ``apps/{APP}`` from each server's read-only response
cache (``ResponseCacheImpl`` in Netflix/eureka), which a timer refreshes from the registry every
``responseCacheUpdateIntervalMs`` (30 s by default). The instance endpoint the mark-down reads
back bypasses that cache, so it shows the new status at once while clients still get UP for up to
one refresh. This module watches the cached view instead, and records per server when the
instance first shows its new status there (:class:`agent.lifecycle.Propagation`).

The trap: the read-only cache is keyed by entity, name, format and accept type, and a key not yet
in it is loaded from the registry, fresh. A first ``GET apps/{APP}`` after the mark-down would
therefore show DOWN at once although clients, whose keys have been in the cache all along, still
see UP. Entries are never dropped from the read-only cache (only replaced by the timer), so
:meth:`ClientView.keep_hot` fetches the agent's key from start-up on, always with the same format
(JSON, ``application/json``), and again every ``KEEP_HOT_SECONDS`` in case a server restarted.

A background upkeep task of its own, separate from the backends' ``run()``: it only reads.
"""

from __future__ import annotations

import asyncio
from collections.abc import Callable, Mapping
from typing import TYPE_CHECKING, Any

import structlog

from agent.lifecycle import Propagation
from agent.registry._http import (
    Http,
    RequestFailed,
    Server,
    get_application,
    request_timeout,
    same_address,
    serves_on,
    ssl_context,
)

if TYPE_CHECKING:
    import aiohttp

    from agent.config import Config

log = structlog.get_logger()

# A key enters the read-only cache on its first read and stays; this only re-warms it after a
# server restart, at the clients' own fetch interval.
KEEP_HOT_SECONDS = 30.0
# After this many failed reads in a row a server's view counts as unobservable (its stage of the
# propagation is then assumed to last PRESTOP_EUREKA_SERVER_CACHE_SECONDS).
MAX_FAILURES = 3


class ClientView:
    """Watches the instance in the Eureka servers' client-facing view (``GET apps/{APP}``)."""

    def __init__(self, config: Config, session: aiohttp.ClientSession) -> None:
        self._http = Http(
            session, timeout=request_timeout(config), ssl=ssl_context(config.eureka_ca_file)
        )
        self._servers = tuple(Server.parse(url) for url in config.eureka_urls)
        self._app = config.eureka_app.upper()
        self._status = config.eureka_status
        self._poll = config.drain_poll_seconds
        self._instance_id = config.eureka_instance_id
        self._ip, self._port = config.pod_ip, config.app_port
        self._listed: set[Server] = set()
        """Servers whose view has listed the instance: only there does its absence mean that
        clients dropped it (elsewhere it may just not match)."""

    def _is_ours(self, instance: Mapping[str, Any]) -> bool:
        if self._instance_id:
            return instance.get("instanceId") == self._instance_id
        return same_address(instance.get("ipAddr"), self._ip) and serves_on(instance, self._port)

    async def _read(self, server: Server) -> str | None:
        """The status clients get from ``server`` for the instance; None when not listed."""
        until = asyncio.get_running_loop().time() + self._http.timeout
        instances = await get_application(self._http, server, self._app, until=until)
        status = next((str(i.get("status")) for i in instances if self._is_ours(i)), None)
        if status is not None:
            self._listed.add(server)
        return status

    async def keep_hot(self) -> None:
        """From start-up on: keep the agent's cache key in every server's read-only cache.

        Runs for the agent's life (cancelled at exit); never raises.
        """
        while True:
            for server in self._servers:
                try:
                    await self._read(server)
                except RequestFailed as exc:
                    log.debug("eureka_view_unreachable", server=server.shown, error=exc.reason)
                except Exception:  # upkeep must not take the agent down
                    log.exception("eureka_view_failed", server=server.shown)
            await asyncio.sleep(KEEP_HOT_SECONDS)

    async def watch(self, propagation: Propagation, elapsed: Callable[[], float]) -> None:
        """After the mark-down: read every server's view each poll until it shows the instance
        out of service (or no longer lists it), recording when (``elapsed()``: seconds since the
        trigger). Ends when every server has shown it or is given up on; cancelled with the
        drain otherwise. Never raises."""
        for server in self._servers:
            propagation.watch(server.shown)
        await asyncio.gather(*(self._watch_one(s, propagation, elapsed) for s in self._servers))
        if propagation.visible_to_clients is not None:
            log.info(
                "eureka_visible_to_clients",
                app=self._app,
                status=self._status,
                seconds=round(propagation.visible_to_clients, 4),
                servers=propagation.as_dict()["servers"],
            )

    async def _watch_one(
        self, server: Server, propagation: Propagation, elapsed: Callable[[], float]
    ) -> None:
        failures = 0
        while True:
            asked_at = elapsed()
            try:
                status = await self._read(server)
            except RequestFailed as exc:
                failures += 1
                if failures >= MAX_FAILURES:
                    propagation.lost(server.shown, exc.reason)
                    log.warning("eureka_view_lost", server=server.shown, error=exc.reason)
                    return
            except Exception as exc:  # a surprising answer: assume, do not measure
                propagation.lost(server.shown, f"unexpected {type(exc).__name__}")
                log.exception("eureka_view_failed", server=server.shown)
                return
            else:
                failures = 0
                if status is None and server not in self._listed:
                    # Never seen there: nothing to measure; assume the bound for this server.
                    propagation.lost(server.shown, "the instance is not listed in its view")
                    log.warning("eureka_view_lost", server=server.shown, error="not listed")
                    return
                if status != "UP":
                    # Shown at some instant between the request and its answer: the request's
                    # start is the earliest, the safe side for the floor is the answer.
                    propagation.seen(server.shown, elapsed())
                    log.debug(
                        "eureka_view_changed",
                        server=server.shown,
                        status=status,
                        asked_at=round(asked_at, 4),
                    )
                    return
            await asyncio.sleep(self._poll)
