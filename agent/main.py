"""Wiring: build the parts, serve, own the signals, run the one shutdown sequence, exit.

Read :meth:`Agent.run` top to bottom for the whole life of the process and :meth:`Agent.shutdown`
for the termination, step by step, in the order docs/design.md gives.
"""

from __future__ import annotations

import asyncio
import contextlib
import errno
import os
import resource
import signal
import socket
import sys
from collections.abc import Coroutine, Sequence
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any

import aiohttp
import structlog
from aiohttp import web

from agent import __version__, endpointslices, events, logs
from agent.config import Config
from agent.drain import DrainContext, DrainOutcome, app_is_up, run_drain
from agent.events import EventRecorder
from agent.http import AppHealth
from agent.kube import InCluster, KubeClient, KubeError
from agent.lifecycle import GracePeriod, Lifecycle, Phase, Propagation, Step, Trigger
from agent.logs import AccessLogger
from agent.metrics import Metrics
from agent.plan import CONFIGURED_GRACE, LINGER_STEP, LingerOutcome, ShutdownPlan
from agent.registry import HealthWatch, Registry, RegistryError, open_registry
from agent.server import PendingAnswers, make_app

if TYPE_CHECKING:
    # Imported at run time only when used.
    from agent.drain.traffic import TrafficVerdict
    from agent.registry.view import ClientView

log = structlog.get_logger()

# How long the last /prestop answers may take to leave once the drain is over. They are written
# in one go on a local connection, so anything slower is a caller that stopped reading.
ANSWER_SECONDS = 2.0
# How long aiohttp may take to close its connections at exit (in-flight handlers included).
SERVER_CLOSE_SECONDS = 1.0
# How often the agent looks for the app's listening socket while it waits for the final scrape.
APP_EXIT_POLL_SECONDS = 0.25
# The exit status of a forced exit (second Ctrl-C), as a shell reports death by SIGINT.
FORCED_EXIT_STATUS = 128 + signal.SIGINT
# The forced exit still leaves its log line (when the log stream takes it this soon).
FORCED_EXIT_LOG_SECONDS = 0.2
# A connection that sends no complete request for this long is closed (aiohttp's keep-alive
# timer runs from the connection's start): idle or slowloris connections cannot pile up until
# the agent runs out of file descriptors and the kubelet's probes go unanswered. Probes open a
# connection per request and Prometheus reconnects per scrape, so nobody waits on this.
IDLE_CONNECTION_SECONDS = 5.0
SHUTDOWN_SIGNALS = (signal.SIGTERM, signal.SIGINT)
# Nobody sends a sidecar SIGHUP on purpose (there is no terminal, and no configuration file to
# reload); its default action would kill the agent silently and lose the drain, so it is ignored.
IGNORED_SIGNALS = (signal.SIGHUP,)
# How long the trigger's read of the own pod (its deletionGracePeriodSeconds) may take. It runs
# beside the mark-down and the drain's limit waits for it, so it is short: an API server that is
# away costs the drain at most this, and the configured grace period is used.
GRACE_READ_SECONDS = 1.0
POD_GRACE = "metadata.deletionGracePeriodSeconds"
# How long the start-up read of the own pod (is it being deleted?) may delay the listener: an API
# server that hangs costs the start at most this, and the registry's stamps decide instead.
POD_READ_AT_START_SECONDS = 1.0
POD_DELETION = "metadata.deletionTimestamp"


@dataclass(frozen=True, slots=True)
class PodAtStart:
    """What the Kubernetes API said of the agent's own pod when the agent started."""

    deletion_timestamp: str | None = None
    """The pod's ``metadata.deletionTimestamp``: set, the pod was already being deleted, so this
    agent restarted during its termination."""
    note: str | None = None
    """Why the pod could not be read (then whether it is being deleted is not known)."""
    read: bool = False
    """Whether the pod was read (False outside a cluster, or when ``note`` says why not)."""

    @property
    def terminating(self) -> bool | None:
        """True: being deleted; False: not; None: not known."""
        return (self.deletion_timestamp is not None) if self.read else None

    def not_ready_reason(self) -> str | None:
        """Why /ready answers 503 whatever the app's health (None: no such reason)."""
        if self.deletion_timestamp is None:
            return None
        return (
            f"the pod is being deleted ({POD_DELETION} {self.deletion_timestamp}): this agent"
            " restarted during the pod's termination"
        )

    def as_dict(self) -> dict[str, Any]:
        return {
            "terminating": self.terminating,
            "deletion_timestamp": self.deletion_timestamp,
            "note": self.note,
        }


def host_has_ipv6() -> bool:
    """Whether IPv6 is usable here: the kernel has it and some interface has an IPv6 address
    (a pod or network namespace with IPv6 disabled lists none in /proc/net/if_inet6)."""
    if not socket.has_ipv6:
        return False
    try:
        with open("/proc/net/if_inet6") as addresses:
            return any(line.strip() for line in addresses)
    except OSError:
        return False


def listen_addresses(host: str | None) -> list[str]:
    """Where the agent listens: PRESTOP_HOST when set; else every IPv4 address and, when the host
    has IPv6, every IPv6 address too (asyncio makes the ``::`` socket IPv6-only, so the two
    sockets share the port)."""
    if host is not None and host.strip("[]") != "::":
        return [host]
    # "::" alone would be IPv6-only (asyncio sets IPV6_V6ONLY): the operator who wrote it means
    # "every address", as unset does.
    return ["0.0.0.0", "::"] if host_has_ipv6() or host is not None else ["0.0.0.0"]


class Agent:
    """One agent process: its parts, its signals and its shutdown."""

    def __init__(
        self,
        config: Config,
        *,
        metrics: Metrics | None = None,
        lifecycle: Lifecycle | None = None,
        early_signals: Sequence[int] = (),
    ) -> None:
        self.config = config
        self.plan = ShutdownPlan.of(config)
        """What the termination will do and by when: the same plan ``check`` prints."""
        self._early_signals = early_signals
        """Signals that arrived before :meth:`run` installed its handlers (recorded by the CLI
        from its first instruction); replayed, in order, once it has."""
        self._listening: list[str] = []
        self.metrics = metrics if metrics is not None else Metrics()
        self.lifecycle = lifecycle if lifecycle is not None else Lifecycle()
        self.pending = PendingAnswers()
        self.exit_requested = asyncio.Event()
        """Set by the first SIGTERM/SIGINT: exit as soon as the drain is over."""
        self.started = asyncio.Event()
        """Set once the listener accepts connections (tests and the benchmark wait on it)."""
        self.final_scrape = asyncio.Event()
        """Set once /metrics has been served after the drain: the termination's figures left."""
        self._drain_source: str | None = None
        """How the traffic drain sees the app's sockets (``netlink`` or ``proc``), for /status."""
        self._drain_seen: dict[str, Any] = {}
        """What the traffic drain saw at its last poll, for /status."""
        self.accepted = 0
        """Connections the agent's own listener accepted: they share the pod's count of
        accepted connections, which the traffic drain reads to find connections it missed."""
        self._view: ClientView | None = None
        """The Eureka servers' client-facing view, when the registry is watched (Eureka URLs)."""
        self._health: HealthWatch | None = None
        self._health_check: asyncio.Task[None] | None = None
        """The registry health check's task: it ends when the shutdown begins."""
        self.kube: KubeClient | None = None
        """The Kubernetes API client on the agent's HTTP session, in a cluster (else None)."""
        self.namespace: str | None = None
        """The pod's namespace (POD_NAMESPACE, else the ServiceAccount's), in a cluster."""
        self.slices = endpointslices.source_of(config)
        """The EndpointSlice propagation source, in a cluster (else None)."""
        if self.slices is not None:
            self.lifecycle.sources.append(self.slices)
        self.grace_planned: asyncio.Task[ShutdownPlan] | None = None
        """Started at the trigger: done within GRACE_READ_SECONDS of it, once the pod's grace
        period is read (``lifecycle.grace``) and ``plan`` is the one in effect; whoever reports
        the plan at the trigger (the Events) awaits it, the drain's limit too."""
        self.events: EventRecorder | None = None
        """The Events on the pod (agent.events), from start-up on; None outside a cluster."""
        self.pod_at_start = PodAtStart()
        """What the API said of the pod at start-up: being deleted means this agent restarted
        during the pod's termination (read before the listener opens)."""
        self.metrics.track(self.lifecycle)
        self.lifecycle.subscribe(self._log_phase)
        output = logs.output()
        if output is not None:  # the CLI configured logging: count what it has to drop
            self.metrics.log_lines_dropped.inc(output.dropped)
            output.on_drop = self.metrics.log_lines_dropped.inc

    # --- signals: record, nothing else --------------------------------------------------------

    def handle_signal(self, signum: int) -> None:
        """Record a SIGTERM/SIGINT. The shutdown coroutine does the work."""
        trigger = Trigger.SIGINT if signum == signal.SIGINT else Trigger.SIGTERM
        if self.exit_requested.is_set() and trigger is Trigger.SIGINT:
            # A person pressing Ctrl-C twice wants out now, drain or not.
            log.warning("forced_exit", signal=str(trigger), phase=str(self.lifecycle.phase))
            logs.write_pending(FORCED_EXIT_LOG_SECONDS)
            os._exit(FORCED_EXIT_STATUS)
        self.exit_requested.set()
        if self.lifecycle.start(trigger):
            log.info("shutdown_triggered", trigger=str(trigger))
        else:
            # Classic sidecar: SIGTERM lands while the app's hook already drains; a second SIGTERM
            # must not cut that drain short either.
            log.info("signal_joined", signal=str(trigger), phase=str(self.lifecycle.phase))

    def handle_ignored_signal(self, signum: int) -> None:
        log.info(
            "signal_ignored",
            signal=signal.Signals(signum).name,
            reason="SIGHUP does not stop the agent; SIGTERM or SIGINT does",
        )

    def _install_signal_handlers(self, loop: asyncio.AbstractEventLoop) -> None:
        for signum in SHUTDOWN_SIGNALS:
            loop.add_signal_handler(signum, self.handle_signal, signum)
        for signum in IGNORED_SIGNALS:
            loop.add_signal_handler(signum, self.handle_ignored_signal, signum)
        # Now that the loop owns them, what came before: the pod may be deleted while it starts.
        for signum in self._early_signals:
            log.info("signal_before_start", signal=signal.Signals(signum).name)
            if signum in SHUTDOWN_SIGNALS:
                self.handle_signal(signum)
            else:
                self.handle_ignored_signal(signum)

    # --- the process --------------------------------------------------------------------------

    async def run(self) -> int:
        """Serve until the drain is over and a signal asked us to go; return the exit status.

        The whole life of the process, as uvicorn's ``_serve``: start up, wait for the trigger,
        shut down, then linger (or wait for the kubelet's signal). Every resource and background
        task is entered on one exit stack, so they stop in reverse order: the tasks before the
        listener, the registry and the HTTP session they use."""
        loop = asyncio.get_running_loop()
        self._install_signal_handlers(loop)
        try:
            async with contextlib.AsyncExitStack() as resources:
                registry = await self._start(resources)
                await self.lifecycle.wait_triggered()
                if self._health_check is not None:
                    # From here on the mark-down step reports on the registry.
                    self._health_check.cancel()
                await self.shutdown(registry)
                await self._after_drain()
                await self._flush_events()
                log.info("shutdown_complete", **self.lifecycle.report())
        finally:
            for signum in (*SHUTDOWN_SIGNALS, *IGNORED_SIGNALS):
                loop.remove_signal_handler(signum)
        return 0

    async def _start(self, resources: contextlib.AsyncExitStack) -> Registry:
        """Open the HTTP session, the registry and the listener, announce the agent, and start
        the background tasks; everything on ``resources``. Returns the registry backend."""
        # Opened first, closed last: the registry, the health check and the view share it.
        session = await resources.enter_async_context(aiohttp.ClientSession())
        health = (
            AppHealth(self.config.app_health_url, session) if self.config.app_health_url else None
        )
        registry = open_registry(self.config, session, health)
        resources.push_async_callback(registry.close)
        self._start_kube(resources, session)
        # Before the listener: /ready's first answer already says whether the pod is going.
        self.pod_at_start = await self._read_pod_at_start()
        await self._listen(resources, health)
        self._announce(registry)
        self.started.set()
        # The registry's own start-up and upkeep (clear a stale override; register and renew).
        self._spawn(resources, registry.run(self.pod_at_start.terminating), "registry")
        if registry.name != "none":
            self._health = HealthWatch(
                registry,
                self.metrics,
                interval_seconds=self.config.registry_check_seconds,
                timeout_seconds=self.config.registry_timeout_seconds,
            )
            self._health_check = self._spawn(resources, self._health.run(), "registry_health")
        if self.config.watches_client_view:
            # Keeps the agent's key hot in the Eureka servers' response cache, so that the
            # propagation watch sees what clients see (agent.registry.view).
            from agent.registry.view import ClientView

            self._view = ClientView(self.config, session)
            self._spawn(resources, self._view.keep_hot(), "registry-view")
        return registry

    def _start_kube(
        self, resources: contextlib.AsyncExitStack, session: aiohttp.ClientSession
    ) -> None:
        """In a cluster: the API client, the Events on the pod, and the EndpointSlice reader from
        start-up on, so that the source knows which slices list the pod before the trigger. Its
        first failure is logged once, with the remedy (agent.endpointslices.follow)."""
        config = self.config
        if config.kubernetes_service_host is None:
            return
        cluster = InCluster(config.kubernetes_service_host, config.kubernetes_service_port)
        self.kube = KubeClient(cluster, session)
        self.namespace = config.pod_namespace or cluster.namespace()
        self._open_events(resources)
        if self.slices is None:
            return
        if self.namespace is None:
            reason = "the pod's namespace is not known"
            self.slices.lost(reason, 0.0)
            log.warning(
                "endpointslices_unreadable",
                error=reason,
                assumed=self.slices.assumption,
                detail="set POD_NAMESPACE from the downward API (metadata.namespace), or mount"
                " the ServiceAccount token",
            )
            return
        reader = endpointslices.follow(
            self.kube, self.slices, self.namespace, self.lifecycle.elapsed
        )
        self._spawn(resources, reader, "endpointslices")

    def _open_events(self, resources: contextlib.AsyncExitStack) -> None:
        """The Events on the pod, whose posting task ``resources`` stops (agent.events)."""
        self.events = EventRecorder(
            self.kube, self.metrics, pod=self.config.pod_name, namespace=self.namespace or ""
        )
        if self.events.enabled:
            self._spawn(resources, self.events.run(), "kube-events")

    async def _flush_events(self) -> None:
        """PrestopDrained was queued at the drain's end: a short, bounded chance to leave before
        the process goes (the hooks have their answers), never past the grace budget's end,
        where the kubelet's SIGKILL would cut the exit's own log line."""
        if self.events is not None:
            left = self.plan.budget.linger_until - self.lifecycle.elapsed()
            await self.events.flush(min(events.FLUSH_SECONDS, max(left, 0.0)))

    def _hook_refused(self, status: int, message: str, remote: str | None) -> None:
        if self.events is not None:
            self.events.hook_refused(status, message, remote)

    @staticmethod
    def _spawn(
        resources: contextlib.AsyncExitStack, work: Coroutine[Any, Any, None], name: str
    ) -> asyncio.Task[None]:
        """Start a background task that ``resources`` cancels, and waits for, at exit: before
        anything entered earlier (the HTTP session it uses) closes."""
        task = asyncio.create_task(work, name=name)

        async def stop() -> None:
            task.cancel()
            await asyncio.gather(task, return_exceptions=True)

        resources.push_async_callback(stop)
        return task

    async def _listen(self, resources: contextlib.AsyncExitStack, health: AppHealth | None) -> None:
        """Serve the agent's endpoints on every listen address."""
        runner = web.AppRunner(
            make_app(
                self.config,
                self.lifecycle,
                self.metrics,
                health=health,
                pending=self.pending,
                status_extra=self._status_extra,
                on_final_scrape=self.final_scrape.set,
                on_refused=self._hook_refused,
                held_out=lambda: self.pod_at_start.not_ready_reason(),
            ),
            handle_signals=False,  # the signals are ours: see handle_signal
            access_log_class=AccessLogger,
            shutdown_timeout=SERVER_CLOSE_SECONDS,
            keepalive_timeout=IDLE_CONNECTION_SECONDS,
        )
        await runner.setup()
        resources.push_async_callback(runner.cleanup)
        self._count_accepts(runner)
        for address in listen_addresses(self.config.host):
            try:
                await web.TCPSite(runner, address, self.config.port).start()
            except OSError as exc:
                raise ListenError(self.config, address, exc) from None
            self._listening.append(_host_port(address, self.config.port))

    def _announce(self, registry: Registry) -> None:
        """Export what this agent is and log that it started, once it listens."""
        # No pod or namespace label: the scrape's target labels carry them, and the same names
        # exported here would collide (exported_pod, exported_namespace).
        # drain_source is the setting, not the source in use (prestop_drain_watch_source): an
        # explicit proc is a choice, auto falling back to proc is not, and the fallback alert
        # tells them apart by this label.
        self.metrics.describe(
            drain_mode=self.config.drain_mode,
            drain_source=self.config.drain_source,
            registry=registry.name,
        )
        self.metrics.registry_backend(registry.name)
        if self.config.drain_mode == "traffic":
            from agent.drain.traffic import probe_source

            self._drain_source = probe_source(
                self.config.app_ports, self.config.drain_source, self.metrics
            )
        log.info(
            "agent_started",
            version=__version__,
            listen=self._listening,
            drain_mode=self.config.drain_mode,
            registry=registry.name,
            pid=os.getpid(),
            drain_source=self._drain_source,
            open_files_limit=resource.getrlimit(resource.RLIMIT_NOFILE)[0],
        )
        self._announce_floor()

    async def _after_drain(self) -> None:
        """The plan's linger rule: a classic sidecar (SIGTERM came with the trigger) stays until
        the drain's figures, which exist only in this process, have been scraped; a native one
        goes when the kubelet says so, after the app has exited (scrapes happen meanwhile)."""
        if self.plan.lingers(self.exit_requested.is_set()):
            await self._linger()
        else:
            await self.exit_requested.wait()

    async def shutdown(self, registry: Registry) -> None:
        """The termination, in order. Every step is bounded; no step's failure skips the next."""
        plan, lifecycle = self.plan, self.lifecycle
        # 1. The trigger already set DRAINING, so /ready has answered 503 since that instant.
        #    In a cluster, the pod's real grace period is read meanwhile (bounded).
        self.grace_planned = asyncio.create_task(self._plan_grace(), name="grace-period")

        # 2. Take the instance out of the registry (bounded by its own deadline).
        lifecycle.propagation = plan.propagation()
        marked = await self._mark_down(registry)
        plan = await self.grace_planned

        # 3. Keep the app serving while traffic may still arrive, and at least until every
        #    registry client can have dropped the instance: watch the servers' client-facing
        #    view meanwhile (without a marked instance there is nothing to watch, and the
        #    floor assumes the server cache's bound).
        propagation = lifecycle.propagation
        watch: asyncio.Task[None] | None = None
        if marked and self._view is not None:
            watch = self._view.watch(
                propagation,
                lifecycle.elapsed,
                remark=getattr(registry, "remark", None),
                unmarked=self._unmarked(
                    next(s.detail for s in lifecycle.steps if s.name == "mark_down").get("servers")
                ),
            )
        limit = plan.drain_limit(lifecycle.elapsed())
        step = lifecycle.begin("drain")
        try:
            outcome = await self._drain(limit)
        finally:
            if watch is not None:
                watch.cancel()
                await asyncio.gather(watch, return_exceptions=True)
        self._end_drain(step, outcome, limit, propagation)

        # 4. DRAINED: every /prestop caller gets its answer; we wait until they all have it.
        lifecycle.finish()
        try:
            async with asyncio.timeout(ANSWER_SECONDS):
                await self.pending.wait_idle()
        except TimeoutError:
            log.warning("prestop_answers_pending", callers=self.pending.count)

        # 5. Register mode: the app has stopped taking traffic, so its registration goes.
        try:
            async with asyncio.timeout(plan.budget.registry_deadline or None):
                await registry.finalize()
        except TimeoutError:
            log.warning("registry_finalize_timeout", backend=registry.name)

    def _end_drain(
        self, step: Step, outcome: DrainOutcome, limit: float, propagation: Propagation
    ) -> None:
        """Record how the drain ended, with the floor and each source's figures."""
        lifecycle = self.lifecycle
        reason = self._record_propagation(outcome.reason, propagation)
        detail = dict(outcome.detail)
        if outcome.last_data_seconds is not None:
            detail["last_data_seconds"] = round(outcome.last_data_seconds, 4)
        ended, floor = lifecycle.elapsed(), lifecycle.floor()
        detail["floor_seconds"] = round(floor.at(ended), 4)
        detail["floor_reached"] = floor.reached(ended)
        detail["floor_sources"] = floor.as_dict(ended)["sources"]
        lifecycle.end(step, reason, limit_seconds=round(limit, 4), **detail)
        self.metrics.drains.labels(reason=reason).inc()
        self.metrics.drain_duration.observe(step.duration or 0.0)
        self._record_drained(reached=detail["floor_reached"])
        if outcome.last_data_seconds is not None:
            self.metrics.last_data_after_trigger.observe(outcome.last_data_seconds)

    async def _read_pod_metadata(self, bound: float) -> tuple[dict[str, Any] | None, str | None]:
        """The own pod's metadata, or None and why it could not be read (no reason outside a
        cluster); never raises, and returns within ``bound`` seconds."""
        if self.kube is None or self.namespace is None or not self.config.pod_name:
            return None, None if self.kube is None else "POD_NAME or the namespace is not known"
        try:
            async with asyncio.timeout(bound):
                pod = await self.kube.get_pod(self.namespace, self.config.pod_name)
        except TimeoutError:
            return None, f"the pod could not be read within {bound:g}s"
        except KubeError as error:
            return None, f"the pod could not be read: {error}"
        except Exception as error:  # whatever it is, the caller's fallback stands
            return None, f"the pod could not be read: {type(error).__name__}"
        metadata = pod.get("metadata")
        return (metadata if isinstance(metadata, dict) else {}), None

    async def _read_pod_at_start(self) -> PodAtStart:
        """Whether the pod is already being deleted: then this agent restarted during its
        termination (killed mid-drain, say), and its registry override must stay and /ready
        answer 503. Said once; within POD_READ_AT_START_SECONDS, never raises."""
        metadata, note = await self._read_pod_metadata(POD_READ_AT_START_SECONDS)
        if metadata is None:
            if note is not None:
                log.info(
                    "pod_not_read_at_start",
                    error=note,
                    detail="whether the pod is being deleted is not known: a registry override"
                    " counts as this pod's own by its timestamps only",
                )
            return PodAtStart(note=note)
        deleted = metadata.get("deletionTimestamp")
        if deleted is None or deleted == "":
            return PodAtStart(read=True)
        pod = PodAtStart(deletion_timestamp=str(deleted)[:64], read=True)
        log.warning(
            "restarted_in_terminating_pod",
            deletion_timestamp=pod.deletion_timestamp,
            detail=f"the pod is being deleted ({POD_DELETION}): /ready answers 503 from the"
            " start and the registry's override is kept",
        )
        return pod

    async def _read_grace(self) -> GracePeriod:
        """The grace period this termination has: the pod's deletionGracePeriodSeconds when it
        is less than the configured one, else the configured one; never raises, and returns
        within GRACE_READ_SECONDS (the API's failures are said in ``note``)."""
        configured = self.config.grace_period_seconds
        metadata, note = await self._read_pod_metadata(GRACE_READ_SECONDS)
        if metadata is None:
            return GracePeriod(configured, CONFIGURED_GRACE, configured, note)
        given = metadata.get("deletionGracePeriodSeconds")
        whole = isinstance(given, int) and not isinstance(given, bool)
        if whole and 0 < given < configured:
            return GracePeriod(float(given), POD_GRACE, configured)
        if note is None and given is None:
            note = "the pod has no deletionGracePeriodSeconds (it is not being deleted)"
        elif note is None and not whole:
            note = f"the pod's deletionGracePeriodSeconds {given!r} is not a whole number"
        return GracePeriod(configured, CONFIGURED_GRACE, configured, note)

    async def _plan_grace(self) -> ShutdownPlan:
        """Plan the rest of the termination with the grace period read at the trigger (done
        within GRACE_READ_SECONDS of it); say when it is less than the configured one, and when
        the floor no longer fits."""
        grace = await self._read_grace()
        lifecycle = self.lifecycle
        lifecycle.grace = grace
        if grace.shortened:
            self._replan(grace)
        elif grace.note is not None:
            log.info("grace_period_configured", **grace.as_dict())
        # Said on the pod once the plan in effect is known (queued: never waits for the API).
        note = events.draining_note(self.plan, lifecycle.trigger, grace)
        self._record(events.DRAINING, "Draining", note)
        return self.plan

    def _replan(self, grace: GracePeriod) -> None:
        """The pod's deletion gave less than the configured grace period: plan with it."""
        self.plan = self.plan.with_grace(grace)
        log.warning(
            "grace_period_shortened",
            **grace.as_dict(),
            budget=self.plan.budget.arithmetic(),
            answer_by_seconds=self.plan.budget.answer_by,
            drain_max_seconds=self.plan.budget.drain,
            detail=f"the pod's deletion gave {grace.seconds:g}s, less than"
            f" {CONFIGURED_GRACE}={grace.configured_seconds:g}: the termination is planned with"
            " it",
        )
        self.metrics.drain_max.set(self.plan.budget.drain)
        warning = self.plan.floor_warning()
        if warning is not None:
            log.warning("drain_floor_exceeds_max", detail=warning, grace_period_from=POD_GRACE)

    def _record_propagation(self, reason: str, propagation: Propagation) -> str:
        """At the drain's end: record how long the change took to reach the clients' view, or
        that it could not be measured (censored: the slowest cases, which sizing needs most);
        name a drain that its maximum cut before the floor (``max_before_floor``, not ``max``:
        traffic may have stopped long ago, it is the callers' caches that were still stale).
        Returns the drain's outcome."""
        visible = propagation.visible_to_clients
        if visible is not None:
            self.metrics.registry_propagation.observe(visible)
        censored = propagation.censored()
        if censored is not None:
            self.metrics.registry_propagation_censored.labels(reason=censored).inc()
        elapsed, floor = self.lifecycle.elapsed(), self.lifecycle.floor()
        if floor.reached(elapsed):
            return reason
        figures = floor.as_dict(elapsed)
        log.warning(
            "drain_ended_before_floor",
            reason=reason,
            elapsed_seconds=round(elapsed, 4),
            floor_seconds=figures["floor_seconds"],
            latest_source=figures["latest"],
            sources=figures["sources"],
            propagation=propagation.as_dict(),
            detail=f"callers that route through {figures['latest']} may still send to this pod"
            " after it stops; see docs/operations.md (sizing the drain)",
        )
        return "max_before_floor" if reason == "max" else reason

    @staticmethod
    def _unmarked(servers: Any) -> set[str]:
        """The servers the mark-down's PUT did not reach, from its per-server answers."""
        if not isinstance(servers, dict):
            return set()
        return {
            shown
            for shown, said in servers.items()
            if isinstance(said, dict) and said.get("result") not in (None, "ok")
        }

    async def _linger(self) -> None:
        """Stay up (not ready) after the drain until the first of: a /metrics scrape served
        after it, the app's sockets gone (no listener, no open connection: the app exited, the
        pod is going), the grace budget spent (the kubelet's SIGKILL would come next). Recorded
        as the :data:`agent.plan.LINGER_STEP` step."""
        lifecycle = self.lifecycle
        step = lifecycle.begin(LINGER_STEP)
        deadline = self.plan.budget.linger_until
        ports = self.config.app_ports
        outcome = LingerOutcome.GRACE
        watch_app = True
        while (left := deadline - lifecycle.elapsed()) > 0:
            if self.final_scrape.is_set():
                outcome = LingerOutcome.SCRAPED
                break
            try:
                if watch_app and not await app_is_up(ports):
                    outcome = LingerOutcome.APP_EXITED
                    break
            except OSError as exc:
                # No /proc/net/tcp here: wait for the scrape or the grace budget only.
                log.warning("app_exit_not_observable", error=str(exc))
                watch_app = False
            with contextlib.suppress(TimeoutError):
                async with asyncio.timeout(min(APP_EXIT_POLL_SECONDS, left)):
                    await self.final_scrape.wait()
        lifecycle.end(step, str(outcome))

    async def _mark_down(self, registry: Registry) -> bool:
        """Step 2; True when the instance was marked."""
        lifecycle, metrics = self.lifecycle, self.metrics
        step = lifecycle.begin("mark_down")
        if registry.name == "none":
            lifecycle.end(step, "skipped", backend="none")
            return False
        timeout = self.config.registry_timeout_seconds
        error: str | None = None
        detail: dict[str, Any] = {}
        propagation = lifecycle.propagation
        started = asyncio.get_running_loop().time()
        try:
            async with asyncio.timeout(timeout):
                if self._view is not None:
                    # Every server's key into its read-only cache before the change, whatever
                    # happened since the last keep-hot pass (agent.registry.view).
                    await self._view.warm()
                detail["servers"] = await registry.mark_down(started)
                if propagation is not None:
                    # The servers have the change from here: their assumed bound counts from
                    # this instant, not from the trigger.
                    propagation.assumed_from = lifecycle.elapsed()
                detail["verified"] = await registry.verify()
        except TimeoutError:
            error = f"registry {registry.name}: not done within {timeout:g}s"
        except RegistryError as exc:
            error = f"registry {registry.name}: {exc}"
        except Exception as exc:  # a backend bug must not cost the pod its drain
            log.exception("registry_failed", backend=registry.name)
            error = f"registry {registry.name}: unexpected {type(exc).__name__}"
        if propagation is not None and "servers" not in detail:
            propagation.assumed_from = lifecycle.elapsed()  # whatever reached a server, by now
        lifecycle.end(step, "failed" if error else "ok", backend=registry.name, **detail)
        result = "failed" if error else "ok"
        metrics.registry_updates.labels(backend=registry.name, result=result).inc()
        metrics.registry_update_duration.labels(backend=registry.name).observe(step.duration or 0.0)
        if error:
            lifecycle.fail(error)
            log.error("registry_mark_down_failed", error=error, duration_seconds=step.duration)
            self._record(
                events.REGISTRY_FAILED,
                "MarkDown",
                f"Could not take the instance out of the registry: {error}. The drain goes on;"
                " callers may keep routing to this pod until their registry entry expires, and"
                " the preStop hook answers 500.",
                warning=True,
            )
        return error is None

    async def _drain(self, limit: float) -> DrainOutcome:
        started = self.lifecycle.elapsed()
        try:
            return await run_drain(
                self.config,
                limit=limit,
                context=DrainContext(
                    lifecycle=self.lifecycle,
                    metrics=self.metrics,
                    own_accepts=lambda: self.accepted,
                    on_poll=self._drain_polled,
                ),
            )
        except Exception as exc:
            # Whatever broke, the app still needs its drain: keep it serving up to the limit.
            log.exception("drain_strategy_failed", mode=self.config.drain_mode)
            await asyncio.sleep(max(0.0, limit - (self.lifecycle.elapsed() - started)))
            return DrainOutcome(reason="max", detail={"error": type(exc).__name__})

    def _record(self, reason: str, action: str, note: str, *, warning: bool = False) -> None:
        if self.events is not None:
            self.events.record(reason, action, note, warning=warning)

    def _record_drained(self, *, reached: bool) -> None:
        """The drain's Events: PrestopDrained, and the Warning when it ended before the floor."""
        plan, lifecycle = self.plan, self.lifecycle
        if not reached:
            note = events.floor_not_reached_note(plan, lifecycle)
            self._record(events.FLOOR_NOT_REACHED, "Drain", note, warning=True)
        self._record(events.DRAINED, "Drained", events.drained_note(plan, lifecycle))

    def _count_accepts(self, runner: web.AppRunner) -> None:
        """Count the connections the agent's listener accepts (see ``accepted``).

        aiohttp's low-level server is told of every accepted connection (``connection_made``);
        the count is taken there rather than per request, so that a connection without a request
        (a TCP probe) counts too.
        """
        server = runner.server
        assert server is not None  # set by runner.setup()
        made = server.connection_made

        def counted(handler: Any, transport: Any) -> None:
            self.accepted += 1
            made(handler, transport)

        server.connection_made = counted  # type: ignore[method-assign]

    def _announce_floor(self) -> None:
        """Export the worst-case propagation floor and the drain's maximum, and say once when
        the one can outlast the other."""
        plan = self.plan
        self.metrics.drain_floor.set(plan.worst_case_floor())
        self.metrics.drain_max.set(plan.budget.drain)
        warning = plan.floor_warning()
        if warning is not None:
            log.warning("drain_floor_exceeds_max", detail=warning)

    # --- observing ----------------------------------------------------------------------------

    def _drain_polled(self, verdict: TrafficVerdict) -> None:
        self._drain_seen = {
            **verdict.snapshot(),
            "quiet_since_seconds": round(verdict.quiet_since - verdict.trigger_at, 4),
        }

    def _log_phase(self, phase: Phase, lifecycle: Lifecycle) -> None:
        if phase is Phase.SERVING:
            return
        log.info(
            "phase_changed",
            phase=str(phase),
            trigger=None if lifecycle.trigger is None else str(lifecycle.trigger),
            elapsed_seconds=round(lifecycle.elapsed(), 4),
            steps=[step.as_dict() for step in lifecycle.steps],
        )

    def _status_extra(self) -> dict[str, Any]:
        return {
            "version": __version__,
            "exit_requested": self.exit_requested.is_set(),
            "listening": self._listening,
            "drain": {
                "mode": self.config.drain_mode,
                "source": self._drain_source,
                "sees": _SEES.get(self._drain_source or ""),
                "seen": self._drain_seen,
                "floor_seconds": self.plan.worst_case_floor(),
                "max_seconds": self.plan.budget.drain,
                "floor_warning": self.plan.floor_warning(),
            },
            "plan": self.plan.as_dict(),
            "kubernetes": None
            if self.kube is None
            else {
                "namespace": self.namespace,
                "pod_at_start": self.pod_at_start.as_dict(),
                "endpointslices": None if self.slices is None else self.slices.as_dict(),
            },
            "registry": {
                **(
                    {"backend": self.config.registry}
                    if self._health is None
                    else self._health.report()
                ),
                **({} if self._view is None else {"client_view": self._view.report()}),
            },
        }


# What each watcher source can see, for /status.
_SEES = {
    "netlink": "open connections on the app's ports with their last data (sock_diag tcp_info),"
    " connections the app closed first (TIME_WAIT), and connections accepted in the pod that"
    " neither accounts for (/proc/net/snmp PassiveOpens minus the agent's own)",
    "proc": "open connections on the app's ports only (/proc/net/tcp): no timestamps, and a"
    " connection that opens and closes between two polls is not seen",
}


def raise_open_files_limit() -> None:
    """Raise the soft limit on open files to the hard one (a container's soft limit is often
    1024): a storm of connections must cost descriptors the agent has, not its probes."""
    soft, hard = resource.getrlimit(resource.RLIMIT_NOFILE)
    if soft != hard:
        with contextlib.suppress(ValueError, OSError):
            resource.setrlimit(resource.RLIMIT_NOFILE, (hard, hard))


class ListenError(Exception):
    """The listener could not be opened. ``status``: 2 when the address is not this host's (a
    configuration error, as the CLI's), 1 otherwise (the port is taken, say)."""

    def __init__(self, config: Config, address: str, error: OSError) -> None:
        reason = error.strerror or str(error)
        where = _host_port(address, config.port)
        unusable_host = isinstance(error, socket.gaierror) or error.errno in (
            errno.EADDRNOTAVAIL,
            errno.EAFNOSUPPORT,
        )
        if unusable_host and config.host is not None:
            message = (
                f"configuration error: PRESTOP_HOST={config.host!r}: cannot listen on {where}:"
                f" {reason}; set an address of this pod, or unset it for every address"
            )
            self.status = 2
        else:
            message = f"cannot listen on {where} (PRESTOP_PORT={config.port}): {reason}"
            self.status = 1
        super().__init__(message)


def _host_port(address: str, port: int) -> str:
    """``address:port``, an IPv6 address in brackets."""
    return f"[{address}]:{port}" if ":" in address else f"{address}:{port}"


def _run_loop(agent: Agent) -> int:
    """``asyncio.run``, except that a worker thread that cannot start at the end (closing the
    default executor starts one) is said in one line, not a traceback: the drain is over."""
    runner = asyncio.Runner()
    try:
        return runner.run(agent.run())
    finally:
        try:
            runner.close()
        except RuntimeError as exc:
            log.warning("event_loop_close_incomplete", error=str(exc))


def run(config: Config, early_signals: Sequence[int] = ()) -> int:
    """Run the agent in a fresh event loop until it exits; return the process exit status.
    ``early_signals``: SIGTERM/SIGINT/SIGHUP received before, in order."""
    raise_open_files_limit()
    try:
        return _run_loop(Agent(config, early_signals=early_signals))
    except ListenError as exc:
        # One line, no traceback, straight to stderr (the log queue may never be written).
        _say(f"prestop-agent: {exc}")
        return exc.status
    except OSError as exc:
        _say(f"prestop-agent: {exc}")
        return 1


def _say(line: str) -> None:
    """One line to stderr, when there is one that takes it."""
    with contextlib.suppress(OSError, ValueError, AttributeError):
        print(line, file=sys.stderr, flush=True)
