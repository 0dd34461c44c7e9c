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
(JSON, ``application/json``), and again every ``KEEP_HOT_SECONDS`` in case a server restarted;
:meth:`ClientView.warm` reads it once more just before the PUT, so that a server restarted since
then holds it before the change too.

Two more ways one answer can stand for less than every client: a server that stops answering
(it is assumed, still read, and given the change again if it comes back showing the old status),
and one URL in front of several peers (told apart by the instance's registration timestamps over
fresh connections; such a URL counts with the assumed bound). The rules that turn the answers
into the floor are :class:`agent.lifecycle.Propagation`'s.

A background upkeep task of its own, separate from the backends' ``run()``: it only reads.
"""

from __future__ import annotations

import asyncio
import time
from collections.abc import Awaitable, Callable, Collection, Mapping
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any

import structlog

from agent.http import RequestFailed, Server, check_status, parse_json, segment
from agent.lifecycle import FloorSource, Propagation, iso_time
from agent.registry.wire import (
    EurekaServers,
    get_application,
    instances_of,
    same_address,
    serves_on,
    text_of,
)

if TYPE_CHECKING:
    import aiohttp

    from agent.config import Config

log = structlog.get_logger()

# A key enters the read-only cache on its first read and stays; this only re-warms it after a
# server restart, at the clients' own fetch interval.
KEEP_HOT_SECONDS = 30.0
# After this many failed reads in a row a server's view counts as unobservable (its stage of the
# propagation is then assumed: see agent.lifecycle.Propagation).
MAX_FAILURES = 3
# Keep-hot passes failing in a row before a server's key is reported cold (warning, /status):
# one miss is a blip, three are 90 s in which a trigger would measure a cold key.
KEEP_HOT_WARN_AFTER = 3
# A lost server is still read, less often: it may come back still showing the old status (and
# then needs the change again), and its stage must follow it.
LOST_POLL_SECONDS = 1.0
# The reads just before the PUT wait at most this long (and at most this share of the registry
# deadline, which they spend): they put the agent's key in every server's read-only cache before
# the change, so that the next cache tick is the real flip. A server slower than that counts as
# assumed for this drain.
WARM_SECONDS = 1.0
WARM_SHARE = 0.1

# Reads of a URL's view over fresh connections per keep-hot pass, to find out whether several
# peers answer behind it (a Kubernetes Service in front of the Eureka servers spreads
# connections, while the watch's pooled connection sticks to one): with two peers behind a
# random balancer, six reads all land on the same one 3 % of the time, and every pass tries
# again. Each read also warms the key on whichever peer it reached.
PEER_PROBES = 6
# What the agent knows of the peers behind one URL.
ONE_PEER = "one"
SEVERAL_PEERS = "several"
UNKNOWN_PEERS = "unknown"

Remark = Callable[[Server], Awaitable[str]]
"""Puts the status change on one server again (a peer that came back still showing the old
status may have missed it); returns what it did, for the log."""


@dataclass(slots=True)
class KeyHealth:
    """How the keep-hot reads of one server went, for warnings and /status."""

    failures: int = 0
    """Keep-hot passes failed in a row."""
    last_ok: float | None = None
    """Wall-clock time of the last successful read."""
    last_error: str | None = None
    peers: str = UNKNOWN_PEERS
    """Whether one peer or several answer at this URL (``one``, ``several``, ``unknown``)."""
    registrations: frozenset[str] = frozenset()
    """The instance's registration timestamps seen through this URL in one pass: each Eureka
    peer stamps its own copy of a registration (replicated ones too), so two of them mean two
    peers."""

    @property
    def cold(self) -> bool:
        return self.failures >= KEEP_HOT_WARN_AFTER

    @property
    def assumed(self) -> bool:
        """Whether this URL's answers cannot stand for every client: several peers answer at it,
        or it is not known yet that only one does, so the one the watch reads is not necessarily
        the slowest."""
        return self.peers != ONE_PEER


class ClientView:
    """Watches the instance in the Eureka servers' client-facing view (``GET apps/{APP}``)."""

    def __init__(
        self,
        config: Config,
        session: aiohttp.ClientSession,
        *,
        wall_clock: Callable[[], float] = time.time,
    ) -> None:
        eureka = EurekaServers.of(config, session)
        self._http, self._servers, self._app = eureka.http, eureka.servers, eureka.app
        self._status = config.eureka_status
        self._poll = config.drain_poll_seconds
        self._instance_id = config.eureka_instance_id
        self._ip, self._port = config.pod_ip, config.app_port
        self._wall_clock = wall_clock
        self._warm_seconds = min(WARM_SECONDS, WARM_SHARE * config.registry_timeout_seconds)
        self._listed: set[Server] = set()
        """Servers whose view has listed the instance: only there does its absence mean that
        clients dropped it (elsewhere it may just not match)."""
        self._keys = {server: KeyHealth() for server in self._servers}
        self._unread: dict[Server, str] = {}
        """Servers the reads just before the PUT did not reach, and why: their key may be cold,
        so a change they show first is not a measurement."""

    def _is_ours(self, instance: Mapping[str, Any]) -> bool:
        if self._instance_id:
            return instance.get("instanceId") == self._instance_id
        return same_address(instance.get("ipAddr"), self._ip) and serves_on(instance, self._port)

    async def _read(self, server: Server, until: float | None = None) -> str | None:
        """The status clients get from ``server`` for the instance; None when not listed."""
        if until is None:
            until = asyncio.get_running_loop().time() + self._http.timeout
        instances = await get_application(self._http, server, self._app, until=until)
        status = next((str(text_of(i.get("status"))) for i in instances if self._is_ours(i)), None)
        if status is not None:
            self._listed.add(server)
        return status

    # --- before the shutdown: keep the key hot ------------------------------------------------

    async def keep_hot(self) -> None:
        """From start-up on: keep the agent's cache key in every server's read-only cache.

        Runs for the agent's life (cancelled at exit); never raises.
        """
        while True:
            await asyncio.gather(*(self._keep_one(server) for server in self._servers))
            await asyncio.sleep(KEEP_HOT_SECONDS)

    async def _keep_one(self, server: Server) -> None:
        key = self._keys[server]
        try:
            await self._read(server)
        except RequestFailed as exc:
            self._key_failed(server, exc.reason)
        except Exception as exc:  # upkeep must not take the agent down
            log.exception("eureka_view_failed", server=server.shown)
            self._key_failed(server, f"unexpected {type(exc).__name__}")
        else:
            if key.cold:
                log.info("eureka_view_key_warm", server=server.shown, after_failures=key.failures)
            key.failures, key.last_ok, key.last_error = 0, self._wall_clock(), None
            try:
                await self.probe_peers(server)
            except Exception as exc:  # the next pass tries again; the key itself is warm
                reason = exc.reason if isinstance(exc, RequestFailed) else type(exc).__name__
                log.debug("eureka_view_peers_unknown", server=server.shown, error=reason)

    def _key_failed(self, server: Server, reason: str) -> None:
        key = self._keys[server]
        key.failures += 1
        key.last_error = reason
        if key.failures == KEEP_HOT_WARN_AFTER:
            # Said once per run of failures: from now on a trigger may find this server's key
            # cold (it would show the change at once), unless the read before the PUT reaches it.
            log.warning(
                "eureka_view_key_cold",
                server=server.shown,
                failures=key.failures,
                error=reason,
            )
        else:
            log.debug("eureka_view_unreachable", server=server.shown, error=reason)

    async def probe_peers(self, server: Server, until: float | None = None) -> str:
        """Read the URL's view ``PEER_PROBES`` times, each over a fresh connection, and tell from
        the instance's registration timestamps whether several peers answer there (then its
        answers cannot stand for every client: the floor assumes the server cache's bound for
        it). ``several`` is kept once seen. ``until``: a loop-time deadline for all the reads
        (each read's own timeout otherwise). Raises RequestFailed when a read fails."""
        key = self._keys[server]
        path = f"apps/{segment(self._app)}"
        stamps: set[str] = set()
        for _ in range(PEER_PROBES):
            deadline = until or asyncio.get_running_loop().time() + self._http.timeout
            status, body = await self._http.request(
                server, "GET", path, headers={"Connection": "close"}, until=deadline
            )
            if status == 404:
                continue
            check_status(status, body, ok=(200,))
            for instance in instances_of(parse_json(body)):
                if self._is_ours(instance) and (stamp := _registered_at(instance)) is not None:
                    stamps.add(stamp)
        before = key.peers
        key.registrations = frozenset(stamps)
        if len(stamps) > 1:
            key.peers = SEVERAL_PEERS
        elif stamps and key.peers == UNKNOWN_PEERS:
            key.peers = ONE_PEER
        if key.peers != before:
            announce = log.warning if key.assumed else log.info
            announce(
                "eureka_view_peers",
                server=server.shown,
                peers=key.peers,
                floor=self.floor_basis(server),
                registrations=sorted(stamps),
            )
        return key.peers

    async def describe_peers(self) -> dict[str, str]:
        """For ``check``: per URL, whether one peer or several answer there, and so how the
        floor counts it. Never raises."""
        said: dict[str, str] = {}
        for server in self._servers:
            try:
                await self.probe_peers(server)
            except Exception as exc:
                reason = exc.reason if isinstance(exc, RequestFailed) else type(exc).__name__
                said[server.shown] = f"{self.floor_basis(server)} ({reason})"
                continue
            said[server.shown] = self.floor_basis(server)
        return said

    def floor_basis(self, server: Server) -> str:
        """How the floor counts this URL's stage: measured, or the assumed server-cache bound."""
        peers = self._keys[server].peers
        if peers == ONE_PEER:
            return "measured: one Eureka server answers at this URL"
        if peers == SEVERAL_PEERS:
            return (
                "assumed: several Eureka peers answer at this URL and the watch reads one of"
                " them, so the server cache's bound (PRESTOP_EUREKA_SERVER_CACHE_SECONDS) is"
                " assumed; list each peer's own URL in PRESTOP_EUREKA_URLS to measure them"
            )
        return (
            "assumed: the peers behind this URL are not known yet (the instance not listed"
            " through it), so the server cache's bound (PRESTOP_EUREKA_SERVER_CACHE_SECONDS) is"
            " assumed"
        )

    def report(self) -> dict[str, Any]:
        """For /status: per server, how keeping its key hot goes and how its stage counts."""
        return {
            server.shown: {
                "key": "cold" if key.cold else "warm" if key.last_ok is not None else "unknown",
                "failures_in_a_row": key.failures,
                "last_ok": iso_time(key.last_ok),
                "last_error": key.last_error,
                "peers": key.peers,
                "floor": self.floor_basis(server),
            }
            for server, key in self._keys.items()
        }

    # --- the shutdown -------------------------------------------------------------------------

    async def warm(self) -> None:
        """Just before the PUT: read every server's view once, in parallel, so that the agent's
        key is in each read-only cache before the change whatever happened since the last
        keep-hot pass (a restarted or added server); the next tick is then the real flip.
        Bounded by ``WARM_SECONDS`` (and ``WARM_SHARE`` of the registry deadline); never
        raises. A server not read is remembered: what it shows first cannot be told from a cold
        key. A URL whose peers are not known yet is probed for them within the same bound."""
        until = asyncio.get_running_loop().time() + self._warm_seconds

        async def one(server: Server) -> None:
            try:
                await self._read(server, until)
            except RequestFailed as exc:
                self._unread[server] = f"not read before the mark-down: {exc.reason}"
            except Exception as exc:
                self._unread[server] = f"not read before the mark-down: {type(exc).__name__}"
            else:
                self._unread.pop(server, None)
            if server in self._unread or self._keys[server].peers != UNKNOWN_PEERS:
                return
            # A pod that is triggered before its first keep-hot pass found the instance (it
            # registers after the agent starts) must not take one peer's answers for all.
            try:
                await self.probe_peers(server, until)
            except Exception as exc:  # still unknown: the floor assumes the bound for it
                reason = exc.reason if isinstance(exc, RequestFailed) else type(exc).__name__
                log.debug("eureka_view_peers_unknown", server=server.shown, error=reason)

        await asyncio.gather(*(one(server) for server in self._servers))

    def watch(
        self,
        propagation: Propagation,
        elapsed: Callable[[], float],
        remark: Remark | None = None,
        unmarked: Collection[str] = (),
    ) -> asyncio.Task[None]:
        """After the mark-down: enrol every server in ``propagation`` now (so the floor counts
        them from the first look), then read each server's view until it shows the instance out
        of service (or no longer lists it), recording every answer (``elapsed()``: seconds since
        the trigger). A server that stops answering is lost (assumed) but still read, and one
        that comes back still showing the old status, or that the PUT did not reach
        (``unmarked``, by shown URL), gets the change again (``remark``). Ends
        when every server has shown it; cancelled with the drain otherwise. Never raises."""
        for server in self._servers:
            key = self._keys[server]
            assumed = self.floor_basis(server) if key.assumed else None
            propagation.watch(server.shown, assumed=assumed)
            if server in self._unread:
                propagation.lost(server.shown, self._unread[server])
        return asyncio.create_task(
            self._watch(propagation, elapsed, remark, set(unmarked)), name="registry-watch"
        )

    async def _watch(
        self,
        propagation: Propagation,
        elapsed: Callable[[], float],
        remark: Remark | None,
        unmarked: set[str],
    ) -> None:
        await asyncio.gather(
            *(self._watch_one(s, propagation, elapsed, remark, unmarked) for s in self._servers)
        )
        if propagation.visible_to_clients is not None:
            log.info(
                "eureka_visible_to_clients",
                app=self._app,
                status=self._status,
                seconds=round(propagation.visible_to_clients, 4),
                servers=propagation.as_dict()["servers"],
            )

    async def _watch_one(
        self,
        server: Server,
        propagation: Propagation,
        elapsed: Callable[[], float],
        remark: Remark | None,
        unmarked: set[str],
    ) -> None:
        name = server.shown
        while True:
            asked_at = elapsed()
            try:
                status = await self._read(server)
            except Exception as exc:  # unreachable, or a surprising answer: assume, keep reading
                reason = exc.reason if isinstance(exc, RequestFailed) else type(exc).__name__
                if not isinstance(exc, RequestFailed):
                    log.exception("eureka_view_failed", server=name)
                if propagation.failed(name, reason, elapsed()):
                    log.warning(
                        "eureka_view_lost",
                        server=name,
                        error=reason,
                        floor_seconds=round(propagation.floor(elapsed()), 4),
                    )
            else:
                if status is None and server not in self._listed:
                    # Never seen there: nothing to measure; assume the bound for this server.
                    if name not in propagation.unobservable:
                        propagation.lost(name, "the instance is not listed in its view", elapsed())
                        log.warning("eureka_view_lost", server=name, error="not listed")
                elif status == "UP":
                    back = propagation.still_up(name, elapsed())
                    if back:
                        log.warning("eureka_view_back", server=name, status=status)
                    if (back or name in unmarked) and remark is not None:
                        # It may have missed the change (the PUT did not reach it, and the
                        # replicated one expires after 30 s): give it the change again.
                        unmarked.discard(name)
                        said = await remark(server)
                        log.warning("eureka_remarked", server=name, result=said)
                else:
                    # Shown at some instant between the request and its answer: the request's
                    # start is the earliest, the safe side for the floor is the answer.
                    propagation.seen(name, elapsed())
                    log.debug(
                        "eureka_view_changed",
                        server=name,
                        status=status,
                        asked_at=round(asked_at, 4),
                    )
                    return
            lost = name in propagation.unobservable
            await asyncio.sleep(max(self._poll, LOST_POLL_SECONDS) if lost else self._poll)


def _registered_at(instance: Mapping[str, Any]) -> str | None:
    """The instance's ``leaseInfo.registrationTimestamp`` as a peer stamped it, as text."""
    lease = instance.get("leaseInfo")
    stamp = lease.get("registrationTimestamp") if isinstance(lease, dict) else None
    if isinstance(stamp, bool) or not isinstance(stamp, int | str):
        return None
    return str(stamp)


def floor_source(config: Config) -> FloorSource | None:
    """Eureka as a propagation source: the servers' response cache (watched in their
    client-facing view when the agent can read it, else its configured bound assumed), then each
    client's registry fetch and load-balancer cache (``PRESTOP_EUREKA_CLIENT_REFRESH_SECONDS``).
    None without a registry."""
    if config.registry == "none":
        return None
    cache, refresh = config.eureka_server_cache_seconds, config.eureka_client_refresh_seconds
    watching = (
        "when the Eureka servers' client-facing view shows the instance out (watched)"
        if config.watches_client_view
        else f"the server cache's bound, {cache:g}s (not observable: set PRESTOP_EUREKA_URLS"
        " and PRESTOP_EUREKA_APP)"
    )
    return FloorSource(
        name="eureka",
        watched=config.watches_client_view,
        blind_seconds=cache,
        refresh_seconds=refresh,
        figures=f"Eureka server cache {cache:g}s + client refresh {refresh:g}s",
        watching=f"{watching} + client refresh {refresh:g}s",
        remedy="lower the clients' eureka.client.registry-fetch-interval-seconds and"
        " spring.cloud.loadbalancer.cache.ttl (and the server's"
        " response-cache-update-interval-ms) and set PRESTOP_EUREKA_CLIENT_REFRESH_SECONDS"
        " (and PRESTOP_EUREKA_SERVER_CACHE_SECONDS) to match",
        registry=True,
    )
