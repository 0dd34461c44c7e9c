"""The traffic-aware drain: keep the app serving until requests stop arriving, not until a timer.

Eureka clients keep routing to a pod from caches that are up to ~90 s stale, and how stale differs
from client to client and rollout to rollout. So instead of guessing, we watch the app's own TCP
connections (shared network namespace) and end the drain once, after ``min``:

* no data has arrived on any watched connection for ``quiet`` seconds, and
* no request is in flight: no unread or unacknowledged bytes, and no connection that received a
  request the app has not answered (nothing ever sent back, or last data received newer than
  last data sent).

Idle keep-alive connections do not hold the drain (their last data predates the trigger); a
stream that never stops does, until ``max``. :class:`TrafficVerdict` holds the rules and does no
I/O (it is unit-tested with synthetic polls); :func:`traffic_drain` feeds it real polls.

Pinned connections: after the propagation floor no router sends a new request to the pod, yet a
keep-alive connection a caller opened before (through a Service: conntrack keeps it on the pod)
goes on carrying that caller's requests until it closes; the app's shutdown closes it under the
caller (Tomcat: without ``Connection: close``), whose next request then fails unless it retries.
So a connection open and receiving data after the floor is *pinned*, and the drain also waits, up
to ``max``, until none is left: each closes cleanly when the app rotates it (Tomcat answers
``Connection: close`` on a connection's ``maxKeepAliveRequests``-th request) or its caller drops
it. A connection idle since the floor does not hold the drain: nothing routes to the pod any more,
and how its caller treats it at its next use is the caller's (docs/operations.md, "Callers pinned
through a Service"). Without a floor nothing says when routing stopped: nothing counts as pinned.

On the /proc fallback there are no per-connection timestamps, so the drain can only wait for the
watched connections to close: idle keep-alive connections then hold it until ``max``.
"""

from __future__ import annotations

import asyncio
import time
from collections.abc import Callable, Iterable
from dataclasses import dataclass, field
from ipaddress import IPv4Address, IPv6Address

import structlog

from agent.config import Config, Network
from agent.drain.base import DrainOutcome, off_the_loop
from agent.drain.sockdiag import Poll, SocketSample, SocketWatcher, open_watcher
from agent.lifecycle import Lifecycle
from agent.metrics import Metrics
from agent.propagation import Floor

log = structlog.get_logger()

# Never sleep less than this between polls, however close a deadline is: the kernel's
# tcpi_last_data_recv has a few milliseconds of granularity anyway.
MIN_SLEEP_SECONDS = 0.01


@dataclass(slots=True)
class TrafficVerdict:
    """Decides, poll by poll, whether the drain may end. Times are ``time.monotonic()`` seconds."""

    trigger_at: float
    """When the shutdown was triggered: data older than this does not count as traffic."""
    started_at: float
    """When the drain step began: ``min_seconds`` and ``limit_seconds`` count from here."""
    min_seconds: float
    quiet_seconds: float
    limit_seconds: float
    ignore: tuple[Network, ...] = ()
    """Peers whose traffic does not hold the drain (probes, scrapers)."""
    timestamps: bool = True
    """False on the /proc fallback: connections are counted, never timed."""
    floor_seconds: float = 0.0
    """Seconds after the trigger before which the drain may not end: until every caller can
    have dropped the instance, through every propagation source (:class:`agent.propagation.Floor`).
    Updated by the drain loop as the sources are observed."""

    last_data_at: float | None = None
    """When data last arrived on a watched connection, as far as any poll could tell."""
    connections: int = 0
    """Watched (not ignored) connections at the last poll."""
    in_flight: int = 0
    """Connections at the last poll with a request not yet answered."""
    peak_connections: int = 0
    missed: int = 0
    """Connections seen only after they had closed (TIME_WAIT), not ignored."""
    unaccounted_opens: int = 0
    """Accepted connections no socket seen accounts for (a client that closed first)."""
    polls: int = 0
    _last_poll_at: float | None = field(default=None, repr=False)
    _open_data_at: tuple[float, ...] = field(default=(), repr=False)
    """When each open (established), watched connection last received data, at the last poll
    (connections that never received any are left out)."""

    def observe(self, poll: Poll) -> None:
        """Take one poll into account."""
        connections = in_flight = 0
        open_data_at: list[float] = []
        for sample in poll.sockets:
            if self._ignored(sample):
                continue
            connections += 1
            if _request_in_flight(sample):
                in_flight += 1
            if not self.timestamps:
                continue
            if sample.last_data_received_ms is not None:
                data_at = poll.taken_at - sample.last_data_received_ms / 1000
                self._saw_data(data_at)
                # Without bytes received, the "last data" time is the connection's age.
                if sample.state == "ESTABLISHED" and sample.bytes_received != 0:
                    open_data_at.append(data_at)
        if not self.timestamps and connections:
            # /proc: an open connection is all we can see; count it as traffic now.
            self._saw_data(poll.taken_at)
        # Connections that opened and closed since the last poll carried data in between; when
        # exactly is unknown, so the latest instant it may have been: now.
        missed = sum(1 for peer in poll.missed if not self._ignored_peer(peer))
        if missed or poll.unaccounted_opens:
            self._saw_data(poll.taken_at)
        self.missed += missed
        self.unaccounted_opens += poll.unaccounted_opens
        self.connections, self.in_flight = connections, in_flight
        self._open_data_at = tuple(open_data_at)
        self.peak_connections = max(self.peak_connections, connections)
        self.polls += 1
        self._last_poll_at = poll.taken_at

    def verdict(self, now: float) -> str | None:
        """``max`` or ``quiet`` when the drain ends at ``now``; None to keep draining."""
        if now - self.started_at >= self.limit_seconds:
            return "max"
        if self._last_poll_at is None or now - self.started_at < self.min_seconds:
            return None
        if now - self.trigger_at < self.floor_seconds:
            return None  # callers that still list the instance may yet send
        if self.pinned:
            return None  # their callers' next requests would fail at the app's shutdown
        if self.in_flight == 0 and self._last_poll_at - self.quiet_since >= self.quiet_seconds:
            return "quiet"
        return None

    @property
    def pinned(self) -> int:
        """Connections open at the last poll that received data after the propagation floor:
        kept on the pod by their callers (keep-alive through a Service) after every router
        dropped it. Waited for until they close; see the module docstring. Zero without a floor
        (no propagation source): then nothing says when routing stopped."""
        if self.floor_seconds <= 0:
            return 0
        floor_at = self.trigger_at + self.floor_seconds
        return sum(1 for data_at in self._open_data_at if data_at >= floor_at)

    def next_look_in(self, now: float, poll_seconds: float) -> float:
        """Seconds until the next poll: the poll interval, or sooner when a bound falls earlier,
        so the drain ends close to the instant it may, not up to a whole interval later."""
        bounds = (
            self.started_at + self.limit_seconds,
            self.started_at + self.min_seconds,
            self.quiet_since + self.quiet_seconds,
            self.trigger_at + self.floor_seconds,
        )
        upcoming = [bound - now for bound in bounds if bound > now]
        return max(MIN_SLEEP_SECONDS, min([poll_seconds, *upcoming]))

    def snapshot(self) -> dict[str, float | int]:
        """What the last poll showed, for the drain's outcome and /status."""
        return {
            "connections": self.connections,
            "in_flight": self.in_flight,
            "pinned": self.pinned,
            "missed_connections": self.missed,
            "unaccounted_opens": self.unaccounted_opens,
            "floor_seconds": round(self.floor_seconds, 4),
        }

    @property
    def quiet_since(self) -> float:
        """Since when nothing counted as traffic: the last data, or the trigger if later."""
        if self.last_data_at is None:
            return self.trigger_at
        return max(self.last_data_at, self.trigger_at)

    @property
    def last_data_after_trigger(self) -> float | None:
        """Seconds from the trigger to the last data received (0 when it all came before)."""
        if self.last_data_at is None or not self.timestamps:
            return None
        return max(0.0, self.last_data_at - self.trigger_at)

    def _saw_data(self, at: float) -> None:
        if self.last_data_at is None or at > self.last_data_at:
            self.last_data_at = at

    def _ignored(self, sample: SocketSample) -> bool:
        return self._ignored_peer(sample.peer)

    def _ignored_peer(self, peer: IPv4Address | IPv6Address) -> bool:
        return any(peer in network for network in self.ignore)


def _request_in_flight(sample: SocketSample) -> bool:
    """Is the app holding a request it has not answered yet on this connection?"""
    if sample.receive_queue > 0 or sample.send_queue > 0:
        return True  # unread request bytes, or response bytes the client has not acknowledged
    if not sample.bytes_received:
        return False  # nothing was ever asked on this connection
    if sample.bytes_acked == 0:
        return True  # asked, never answered: a slow first request on a new connection
    received, sent = sample.last_data_received_ms, sample.last_data_sent_ms
    if received is None or sent is None:
        return False
    # Data arrived after the last data went out: a request read by the app, not yet answered
    # (a slow handler). Equal values are one jiffy, i.e. answered at once.
    return received < sent


async def traffic_drain(
    config: Config,
    *,
    limit: float,
    lifecycle: Lifecycle,
    metrics: Metrics,
    open_watcher: Callable[..., SocketWatcher] = open_watcher,
    clock: Callable[[], float] = time.monotonic,
    own_accepts: Callable[[], int] | None = None,
    on_poll: Callable[[TrafficVerdict], None] | None = None,
) -> DrainOutcome:
    """Drain until the app's traffic has stopped (``quiet``) or ``limit`` seconds (``max``).

    Never ``quiet`` before the propagation floor (``lifecycle.floor()``, re-read every poll
    as the sources are observed). ``own_accepts`` counts the agent's own
    accepted connections (see :class:`agent.drain.sockdiag.NetlinkWatcher`); ``on_poll`` sees
    the verdict after every poll (/status).
    """
    started_at = clock()
    # Read together with started_at: read after opening the watcher (milliseconds), it would
    # put the trigger that much earlier and let the drain end that much before the floor.
    trigger_at = started_at - lifecycle.elapsed()
    watcher = open_watcher(
        config.app_ports,
        force_proc=config.drain_source == "proc",
        own_accepts=own_accepts,
        count_accepts=config.drain_count_accepts,
    )
    metrics.watching(watcher.source)
    verdict = TrafficVerdict(
        trigger_at=trigger_at,
        started_at=started_at,
        min_seconds=config.drain_min_seconds,
        quiet_seconds=config.drain_quiet_seconds,
        limit_seconds=limit,
        ignore=config.drain_ignore_cidrs,
        timestamps=watcher.source == "netlink",
    )
    _log_source(watcher.source, config.drain_source, config.app_ports)
    try:
        while True:
            poll = await off_the_loop(watcher.poll)
            verdict.observe(poll)
            now = clock()
            _observed(verdict, now, lifecycle.floor(), metrics)
            if on_poll is not None:
                on_poll(verdict)
            reason = verdict.verdict(now)
            if reason is not None:
                break
            # Sleeping past the limit would overrun it: the limit is checked without a poll.
            pause = verdict.next_look_in(now, config.drain_poll_seconds)
            await asyncio.sleep(pause)
            if clock() - started_at >= limit:
                reason = "max"
                break
    finally:
        watcher.close()
    _warn_if_pinned_left(reason, verdict)
    return _outcome(reason, verdict, watcher.source)


def _warn_if_pinned_left(reason: str, verdict: TrafficVerdict) -> None:
    """A drain cut at its maximum with pinned connections open: each of their callers loses a
    request at the app's shutdown unless it retries. Say so, with the remedy."""
    if reason != "max" or not verdict.pinned:
        return
    log.warning(
        "drain_ended_with_pinned_connections",
        pinned=verdict.pinned,
        reason="connections that carried requests after the propagation floor were still"
        " open at the drain's maximum: the app's shutdown closes them under their callers,"
        " whose next request fails unless they retry. Lower the app's keep-alive request"
        " limit (Spring Boot: server.tomcat.max-keep-alive-requests) so that they rotate"
        " away within the drain, or raise the grace period",
    )


def _outcome(reason: str, verdict: TrafficVerdict, source: str) -> DrainOutcome:
    return DrainOutcome(
        reason=reason,
        last_data_seconds=verdict.last_data_after_trigger,
        detail={
            "source": source,
            "polls": verdict.polls,
            "peak_connections": verdict.peak_connections,
            **verdict.snapshot(),
        },
    )


def _observed(verdict: TrafficVerdict, now: float, floor: Floor, metrics: Metrics) -> None:
    """After a poll: follow the propagation floor (the latest over every source) as the
    sources are observed, and export what the poll saw."""
    seconds = floor.at(now - verdict.trigger_at)
    if seconds != verdict.floor_seconds:
        verdict.floor_seconds = seconds
        metrics.drain_floor.set(seconds)
    metrics.watched_connections.set(verdict.connections)
    # On /proc, last_data_at is "a connection was open", not data: the gauge stays NaN.
    if verdict.last_data_at is not None and verdict.timestamps:
        metrics.seconds_since_last_data.set(max(0.0, now - verdict.last_data_at))


def probe_source(ports: Iterable[int], requested: str, metrics: Metrics) -> str:
    """Which way the drain will see sockets here (``netlink`` or ``proc``), for /status and
    ``prestop_drain_watch_source``: known from start-up, so an alert need not wait for a drain."""
    watcher = open_watcher(ports, force_proc=requested == "proc")
    try:
        metrics.watching(watcher.source)
        return watcher.source
    finally:
        watcher.close()


def _log_source(source: str, requested: str, ports: Iterable[int]) -> None:
    if source == "netlink" or requested == "proc":
        log.info("drain_watching", source=source, ports=list(ports))
        return
    log.warning(
        "drain_watching",
        source=source,
        ports=list(ports),
        reason="netlink sock_diag unavailable: /proc counts connections only, so idle"
        " keep-alive connections hold the drain until its maximum",
    )
