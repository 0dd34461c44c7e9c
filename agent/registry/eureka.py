"""``PRESTOP_REGISTRY=eureka``: put a status override on the Eureka servers themselves.

The app keeps its own Eureka client and keeps renewing its lease while it drains. A status
override (``PUT apps/{APP}/{id}/status?value=DOWN``) is what keeps it out meanwhile: the server
applies the override to every renewal, whereas cancelling the lease (``DELETE apps/{APP}/{id}``)
would only make the app's next renewal fail with 404 and re-register it as UP. So this backend
never cancels anything.

What Eureka's server does with the requests (``InstanceResource`` in Netflix/eureka):

- ``statusUpdate`` stores the override and sets the status; when a ``lastDirtyTimestamp`` is
  given and newer than the server's, it becomes the instance's. Passing "now" would make the
  server's copy look newer than the app's, so the agent passes the instance's own timestamp as the
  server just reported it, or none.
- Without the replication header, a server replicates the change to its peers; the agent still
  sends it to every configured server, so that a peer that lags or has lost replication shows the
  status too, and a dead peer costs nothing but its own answer.
- ``deleteStatusUpdate`` (``DELETE .../status``) drops the override and leaves the status
  ``UNKNOWN``; the app's next renewal is then refused and its client re-registers with its real
  status. That is how a stale override from a previous pod is cleared without guessing the app's
  status for it.
"""

from __future__ import annotations

import asyncio
import time
from typing import TYPE_CHECKING, Any

import structlog

from agent.http import RequestFailed, Server, check_status, failure_text, retrying, segment
from agent.registry.base import HealthState, RegistryError, RegistryHealth, StepDeadlines
from agent.registry.wire import (
    EurekaServers,
    confirm_applied,
    dirty_timestamp_of,
    get_application,
    get_instance,
    override_of,
    port_of,
    read_back,
    require_one_marked,
    same_address,
    secure_port_of,
    serves_on,
    shown_status,
    summary,
    text_of,
)

if TYPE_CHECKING:
    import aiohttp

    from agent.config import Config

log = structlog.get_logger()

OVERRIDES = ("DOWN", "OUT_OF_SERVICE")
# At start-up the app usually registers after the agent is up: look for its instance after 1 s,
# then less and less often, so that an app that never registers (a misconfiguration) does not
# cost the Eureka servers a request per second per pod for ever.
FIND_INTERVAL_SECONDS = 1.0
FIND_INTERVAL_MAX_SECONDS = 30.0
MAX_LISTED = 10
# Eureka stamps a registration's lease and the instance's lastUpdatedTimestamp within the same
# request, a few milliseconds apart at most; an override applied later is further apart.
REGISTRATION_STAMP_MS = 1000
# How far the Eureka server's clock may be from the pod's (NTP keeps nodes well within this).
CLOCK_SKEW_MS = 5000
# How often verify() reads a server back while a start-up clean-up DELETE may still land there.
CLEANUP_FENCE_POLL_SECONDS = 0.1
# After the read-back, how often such a server is read again, until the agent stops. A server
# applies a DELETE whose answer never came whenever it gets to it (a GC pause, a frozen or
# overloaded peer), and Eureka's deleteStatusOverride removes the override unconditionally (no
# timestamp guards it), then replicates that to the peers; until the app's lease is gone, that
# puts the instance back in service at the app's next renewal.
LATE_CLEANUP_POLL_SECONDS = 0.5
# Why an override is this pod's own, by what the Kubernetes API said of the pod at start-up
# (True: being deleted; None: not known). False never keeps one.
OWN_OVERRIDE_BECAUSE = {
    True: "the pod is being deleted (metadata.deletionTimestamp): the agent restarted during"
    " its termination, and the override is its mark-down",
    None: "set after the app's current registration, within one grace period: this pod's own"
    " mark-down (the agent restarted while it terminates)",
}


def _millis(value: Any) -> int | None:
    """A Eureka timestamp (milliseconds, a number or a string of digits), or None."""
    if isinstance(value, bool):
        return None
    if isinstance(value, int):
        return value
    if isinstance(value, str) and value.isascii() and value.isdigit() and len(value) <= 20:
        return int(value)
    return None


class EurekaRegistry:
    """Mark an instance that registers itself DOWN / OUT_OF_SERVICE on every Eureka server."""

    name = "eureka"

    def __init__(self, config: Config, session: aiohttp.ClientSession) -> None:
        self._config = config
        eureka = EurekaServers.of(config, session)
        self._http, self._servers, self._app = eureka.http, eureka.servers, eureka.app
        self._instance_id: str | None = config.eureka_instance_id or None
        self._status = config.eureka_status
        # The start-up clean-up must never remove the override the shutdown sets. The trigger
        # cancels it (no DELETE is sent or retried after _marking), and a DELETE already sent
        # whose answer never came (it timed out, or was cancelled) may still be applied by a
        # slow server later: its server is "unsettled", and verify() then watches it and marks
        # it again until its deadline (read back after the last write), and a fence task after
        # that, until close() (a DELETE may land any time while the app's lease lives).
        self._marking = False
        self._clearing: asyncio.Task[list[str]] | None = None
        self._unsettled: set[Server] = set()
        self._reachable: tuple[Server, ...] = self._servers
        self._verify_until = 0.0
        self._fence: asyncio.Task[None] | None = None

    # --- start-up -----------------------------------------------------------------------------

    async def run(self, pod_terminating: bool | None = None) -> None:
        """Find the instance once it has registered; clear an override a previous pod left
        (``pod_terminating``: what the Kubernetes API said of this pod, see
        :meth:`_own_override`)."""
        loop = asyncio.get_running_loop()
        interval = FIND_INTERVAL_SECONDS
        try:
            while not self._marking:
                until = loop.time() + self._config.registry_timeout_seconds
                instance_id = self._instance_id or await self._discover(until, quiet=True)
                if instance_id is not None:
                    found = await self._read_all(instance_id, until)
                    if any(isinstance(i, dict) for i in found.values()):
                        await self._clear_stale_override(instance_id, found, until, pod_terminating)
                        return
                await asyncio.sleep(interval)
                interval = min(interval * 2, FIND_INTERVAL_MAX_SECONDS)
        except RegistryError as exc:
            # Several instances match, say: nothing to clean up safely; mark_down says it again.
            log.warning("eureka_startup_check_failed", error=str(exc))
        except Exception:  # run() must not raise: a bug here must not take the agent down
            log.exception("eureka_startup_check_failed")

    async def _clear_stale_override(
        self,
        instance_id: str,
        found: dict[Server, dict[str, Any] | str | None],
        until: float,
        pod_terminating: bool | None = None,
    ) -> None:
        overridden = {
            server: instance
            for server, instance in found.items()
            if isinstance(instance, dict) and override_of(instance) in OVERRIDES
        }
        own = {s: i for s, i in overridden.items() if self._own_override(i, pod_terminating)}
        if own:
            # The agent restarted in the middle of this pod's termination (killed mid-drain):
            # that override is this pod's own mark-down, and clearing it would put a pod that
            # is going away back in service.
            log.warning(
                "eureka_own_override_kept",
                app=self._app,
                instance_id=instance_id,
                overrides={server.shown: override_of(i) for server, i in own.items()},
                reason=OWN_OVERRIDE_BECAUSE[pod_terminating],
            )
        stale = {s: i for s, i in overridden.items() if s not in own}
        if not stale:
            if not own:
                log.info("eureka_instance_found", app=self._app, instance_id=instance_id)
            return
        overrides = {server.shown: override_of(i) for server, i in stale.items()}
        if self._config.eureka_keep_override:
            log.warning(
                "eureka_stale_override_kept",
                app=self._app,
                instance_id=instance_id,
                overrides=overrides,
                reason="PRESTOP_EUREKA_KEEP_OVERRIDE=true",
            )
            return
        if self._marking:
            return  # the shutdown began meanwhile: that override is ours now
        self._clearing = asyncio.ensure_future(
            asyncio.gather(
                *(self._delete_override(s, instance_id, i, until) for s, i in stale.items())
            )
        )
        try:
            results = await self._clearing
        except asyncio.CancelledError:
            if not self._marking:
                raise  # the agent is stopping, not the clean-up
            log.info("eureka_stale_override_cleanup_cancelled", reason="the shutdown began")
            return
        log.info(
            "eureka_stale_override_cleared",
            app=self._app,
            instance_id=instance_id,
            overrides=overrides,
            results=dict(zip((s.shown for s in stale), results, strict=True)),
        )

    def _own_override(self, instance: dict[str, Any], pod_terminating: bool | None) -> bool:
        """Whether the instance's override is this pod's own mark-down. The pod's deletion
        timestamp says it directly: a pod being deleted keeps every override (its containers
        are only restarted before the kubelet begins the termination, never during it:
        docs/operations.md), a pod that is not being deleted has none of its own to keep (an
        override its previous agent set, on a SIGTERM or a /prestop without a deletion, would
        keep a serving pod out of service). Without the API: the registry's stamps."""
        if pod_terminating is None:
            return self._set_during_this_registration(instance)
        return pod_terminating

    def _set_during_this_registration(self, instance: dict[str, Any]) -> bool:
        """Whether the instance's override is this pod's own, set by a previous run of this
        agent in the same pod (the app container kept running, the agent restarted).

        Eureka's server stamps ``lastUpdatedTimestamp`` when it applies a status override and
        when it accepts a registration (which opens a new lease, ``registrationTimestamp``). A
        previous pod's override is carried into the next registration of the same id, so there
        both stamps fall together; this pod's own override came after the app's registration,
        and, being part of a termination, within one grace period from now. Used when the
        Kubernetes API could not say whether the pod is being deleted. Missing or odd
        timestamps: not recognised, the override counts as stale.
        """
        updated = _millis(instance.get("lastUpdatedTimestamp"))
        lease = instance.get("leaseInfo")
        registered = (
            _millis(lease.get("registrationTimestamp")) if isinstance(lease, dict) else None
        )
        if updated is None or registered is None:
            return False
        age = time.time() * 1000 - updated
        recent = -CLOCK_SKEW_MS <= age <= self._config.grace_period_seconds * 1000 + CLOCK_SKEW_MS
        return recent and updated - registered > REGISTRATION_STAMP_MS

    async def _delete_override(
        self, server: Server, instance_id: str, instance: dict[str, Any], until: float
    ) -> str:
        path = f"apps/{segment(self._app)}/{segment(instance_id)}/status"
        dirty = dirty_timestamp_of(instance)
        if dirty:
            path += f"?lastDirtyTimestamp={dirty}"

        async def attempt() -> None:
            if self._marking:
                raise RequestFailed("the shutdown began", retriable=False)
            try:
                status, body = await self._http.request(server, "DELETE", path, until=until)
            except (RequestFailed, asyncio.CancelledError):
                # No answer (a timeout, a reset, the trigger's cancel): the server may apply it
                # later, even after a later attempt was answered.
                self._unsettled.add(server)
                raise
            check_status(status, body)

        try:
            await retrying(attempt, until=until, give_up=lambda: self._marking)
        except RequestFailed as exc:
            return f"failed: {exc.reason}"
        return "cleared"

    # --- the shutdown -------------------------------------------------------------------------

    async def mark_down(self, started: float | None = None) -> dict[str, Any]:
        """PUT the override on every server at once; succeed when at least one took it."""
        self._marking = True
        if self._clearing is not None and not self._clearing.done():
            self._clearing.cancel()  # no clean-up DELETE from now on
            await asyncio.gather(self._clearing, return_exceptions=True)
        loop = asyncio.get_running_loop()
        started = loop.time() if started is None else started
        deadlines = StepDeadlines.starting(started, self._config.registry_timeout_seconds)
        until, self._verify_until = deadlines.mark, deadlines.verify
        instance_id = self._instance_id or await self._discover(until, quiet=False)
        assert instance_id is not None  # _discover(quiet=False) raises instead
        done = asyncio.Event()
        results = await asyncio.gather(
            *(self._put_status(s, instance_id, until, done) for s in self._servers)
        )
        said = {s.shown: r for s, r in zip(self._servers, results, strict=True)}
        # Verify asks only the servers that answered: a dead peer would just burn the deadline.
        self._reachable = tuple(
            s for s, r in zip(self._servers, results, strict=True) if "http_status" in r
        )
        await confirm_applied(
            self._http,
            self._servers,
            said,
            self._app,
            instance_id,
            self._status,
            until=self._verify_until,
        )
        require_one_marked(said, self._app, instance_id, self._status)
        log.info(
            "eureka_marked",
            app=self._app,
            instance_id=instance_id,
            status=self._status,
            servers=said,
            seconds=round(loop.time() - started, 4),
        )
        return said

    async def _put_status(
        self, server: Server, instance_id: str, until: float, done: asyncio.Event
    ) -> dict[str, Any]:
        """Read the instance's lastDirtyTimestamp, then PUT the override, retrying 5xx and
        connection errors until another server has taken the override (the peers replicate it
        among themselves) or the time is up."""
        result: dict[str, Any] = {}
        base = f"apps/{segment(self._app)}/{segment(instance_id)}"

        async def attempt() -> None:
            instance = await get_instance(self._http, server, self._app, instance_id, until=until)
            result["http_status"] = 404 if instance is None else 200
            if instance is None:
                raise RequestFailed("instance not registered on this server", retriable=False)
            dirty = dirty_timestamp_of(instance)
            path = f"{base}/status?value={self._status}"
            if dirty:
                path += f"&lastDirtyTimestamp={dirty}"
            result["unanswered"] = True  # until an answer comes: it may be applied regardless
            status, body = await self._http.request(server, "PUT", path, until=until)
            result["unanswered"] = False
            result["http_status"] = status
            check_status(status, body, ok=(200,))
            result["lastDirtyTimestamp"] = dirty

        try:
            _, attempts = await retrying(attempt, until=until, give_up=done.is_set)
        except RequestFailed as exc:
            if exc.status is not None:
                result["http_status"] = exc.status
            return {"result": "failed", "error": exc.reason, **result}
        done.set()
        result.pop("unanswered", None)
        return {"result": "ok", "attempts": attempts, **result}

    async def remark(self, server: Server) -> str:
        """PUT the override on one server again, during the drain: it came back after the view
        lost it, or the first PUT did not reach it. A peer that missed the change keeps listing
        the pod UP with no time limit: the replicated status update expires after 30 s, and
        heartbeats carry the override only when the dirty timestamps differ. Never raises."""
        instance_id = self._instance_id
        if instance_id is None:
            return "failed: no instance was marked"
        until = StepDeadlines.starting(None, self._config.registry_timeout_seconds).mark
        try:
            result = await self._put_status(server, instance_id, until, asyncio.Event())
        except Exception as exc:  # the drain goes on whatever this one server does
            return f"failed: unexpected {type(exc).__name__}"
        return "ok" if result["result"] == "ok" else f"failed: {result.get('error')}"

    async def verify(self) -> dict[str, Any]:
        """Read the instance back from the servers that answered; one showing it is enough."""
        instance_id = self._instance_id
        if instance_id is None:
            raise RegistryError("no instance was marked: mark_down did not find it")
        try:
            said = await read_back(
                self._http,
                self._reachable or self._servers,
                self._app,
                instance_id,
                self._status,
                until=self._verify_until,
            )
        except RequestFailed as exc:
            raise RegistryError(f"{self._app}/{instance_id}: {exc.reason}") from None
        if self._unsettled:
            said = await self._outlast_cleanup(instance_id, said)
            if self._fence is None:
                self._fence = asyncio.create_task(
                    self._fence_late_cleanup(instance_id, tuple(self._unsettled)),
                    name="eureka-cleanup-fence",
                )
        return said

    async def _outlast_cleanup(self, instance_id: str, said: dict[str, Any]) -> dict[str, Any]:
        """A clean-up DELETE sent before the trigger got no answer: a slow server may apply it
        after our PUT (the override gone, the instance back in service at the app's next
        renewal). Until the verify deadline, read those servers again and put the override
        back wherever it went; the answer is the last read, after the last write. Later
        arrivals are the fence's (:meth:`_fence_late_cleanup`)."""
        loop = asyncio.get_running_loop()
        servers = tuple(self._unsettled)
        remarked: dict[str, int] = {}
        while True:
            for server in servers:
                try:
                    found = await get_instance(
                        self._http, server, self._app, instance_id, until=self._verify_until
                    )
                except RequestFailed:
                    continue  # what it last showed stands
                if found is not None and override_of(found) != self._status:
                    # The late DELETE landed: mark it again.
                    result = await self._put_status(
                        server, instance_id, self._verify_until, asyncio.Event()
                    )
                    remarked[server.shown] = remarked.get(server.shown, 0) + 1
                    log.warning(
                        "eureka_override_restored",
                        server=server.shown,
                        reason="a start-up clean-up DELETE was applied after the mark-down",
                        result=result["result"],
                    )
                    said[server.shown] = f"restored: {result['result']}"
                    continue  # read back on the next pass, after this write
                said[server.shown] = shown_status(found)
            if self._verify_until - loop.time() < 2 * CLEANUP_FENCE_POLL_SECONDS:
                break
            await asyncio.sleep(CLEANUP_FENCE_POLL_SECONDS)
        if self._status not in said.values():
            shown = "; ".join(f"{url}: {answer}" for url, answer in said.items())
            raise RegistryError(
                f"{self._app}/{instance_id}: no server shows {self._status}: {shown}"
            )
        if remarked:
            said["restored_after_late_cleanup"] = remarked
        return said

    async def _fence_late_cleanup(self, instance_id: str, servers: tuple[Server, ...]) -> None:
        """After the read-back, until :meth:`close`: read the servers whose clean-up DELETE got
        no answer, and put the override back wherever one landed late. A server that no longer
        lists the instance (the app's lease is gone) has nothing left to undo. Never raises."""
        watched = set(servers)
        while watched:
            await asyncio.sleep(LATE_CLEANUP_POLL_SECONDS)
            for server in tuple(watched):
                until = StepDeadlines.starting(None, self._config.registry_timeout_seconds).verify
                try:
                    found = await get_instance(
                        self._http, server, self._app, instance_id, until=until
                    )
                except RequestFailed:
                    continue  # read again next time
                except Exception:  # a bug here must not take the agent down
                    log.exception("eureka_cleanup_fence_failed", server=server.shown)
                    continue
                if found is None:
                    watched.discard(server)
                elif override_of(found) != self._status:
                    said = await self.remark(server)
                    log.warning(
                        "eureka_override_restored",
                        server=server.shown,
                        reason="a start-up clean-up DELETE was applied after the read-back",
                        result=said,
                    )

    async def finalize(self) -> None:
        # Deliberately nothing: the app's own client still renews; see the module docstring.
        return None

    async def close(self) -> None:
        if self._fence is not None:
            self._fence.cancel()
            await asyncio.gather(self._fence, return_exceptions=True)

    async def describe(self) -> dict[str, Any]:
        """Reach every server and show the instance as each one lists it."""
        until = StepDeadlines.starting(None, self._config.registry_timeout_seconds).verify
        instance_id = self._instance_id or await self._discover(until, quiet=False)
        assert instance_id is not None
        found = await self._read_all(instance_id, until)
        if not any(isinstance(i, dict) for i in found.values()):
            shown = "; ".join(f"{s.shown}: {shown_status(i)}" for s, i in found.items())
            raise RegistryError(f"{self._app}/{instance_id} is not listed: {shown}")
        return {
            "backend": self.name,
            "app": self._app,
            "instance_id": instance_id,
            "found_by": "PRESTOP_EUREKA_INSTANCE_ID"
            if self._config.eureka_instance_id
            else f"POD_IP {self._config.pod_ip} and PRESTOP_APP_PORT {self._config.app_port}",
            "would_set": self._status,
            "servers": {
                s.shown: summary(i) if isinstance(i, dict) else shown_status(i)
                for s, i in found.items()
            },
        }

    # --- finding the instance -----------------------------------------------------------------

    async def _read_all(
        self, instance_id: str, until: float
    ) -> dict[Server, dict[str, Any] | str | None]:
        """The instance from each server: its JSON, None (not listed) or the error."""

        async def read(server: Server) -> dict[str, Any] | str | None:
            try:
                found, _ = await retrying(
                    lambda: get_instance(self._http, server, self._app, instance_id, until=until),
                    until=until,
                )
            except RequestFailed as exc:
                return failure_text(exc)
            return found

        results = await asyncio.gather(*(read(s) for s in self._servers))
        return dict(zip(self._servers, results, strict=True))

    async def _match(self, until: float) -> tuple[list[str], list[dict[str, Any]], list[str]]:
        """``GET apps/{APP}`` on every server: the ids matching POD_IP and PRESTOP_APP_PORT,
        every instance listed, and one error line per server that did not answer."""
        ip, port = self._config.pod_ip, self._config.app_port

        async def listed(server: Server) -> list[dict[str, Any]] | str:
            try:
                instances, _ = await retrying(
                    lambda: get_application(self._http, server, self._app, until=until),
                    until=until,
                )
            except RequestFailed as exc:
                return failure_text(exc)
            return instances

        answers = await asyncio.gather(*(listed(s) for s in self._servers))
        errors = [
            f"{s.shown}: {a}"
            for s, a in zip(self._servers, answers, strict=True)
            if isinstance(a, str)
        ]
        instances = [i for a in answers if isinstance(a, list) for i in a]
        # The id as listed, whole: it is what the mark-down puts in the URL (text_of would cut
        # a long one short, and the PUT would then name an instance that does not exist).
        matching = sorted(
            {
                i["instanceId"]
                for i in instances
                if isinstance(i.get("instanceId"), str)
                and same_address(i.get("ipAddr"), ip)
                and serves_on(i, port)
            }
        )
        return matching, instances, errors

    def _nobody_answered(self, errors: list[str]) -> bool:
        """Every server failed without an HTTP answer (a 401 or an XML page is an answer)."""
        return len(errors) == len(self._servers) and not any(": answered: " in e for e in errors)

    def _adopt(self, instance_id: str) -> str:
        self._instance_id = instance_id
        log.info(
            "eureka_instance_discovered",
            app=self._app,
            instance_id=instance_id,
            ip=self._config.pod_ip,
            port=self._config.app_port,
        )
        return instance_id

    def _several(self, matching: list[str]) -> str:
        shown = ", ".join(str(text_of(m)) for m in matching[:MAX_LISTED])
        return (
            f"several instances of {self._app} have ipAddr {self._config.pod_ip} and port"
            f" {self._config.app_port}: {shown}; set PRESTOP_EUREKA_INSTANCE_ID"
        )

    def _none_matches(self, instances: list[dict[str, Any]], errors: list[str]) -> str:
        """Why nothing matched. The reason reaches /status, which answers anyone: other pods'
        instance ids and addresses are counted, never listed; only those at this pod's own
        address (registered with another port, say) are shown."""
        ip = self._config.pod_ip
        here = sorted(
            {
                f"{text_of(i.get('instanceId'))} (port {port_of(i)}, securePort"
                f" {secure_port_of(i)})"
                for i in instances
                if same_address(i.get("ipAddr"), ip)
            }
        )
        others = len({text_of(i.get("instanceId")) for i in instances}) - len(here)
        listing = f"{others} at other addresses"
        if here:
            listing += f"; at {ip}: " + ", ".join(here[:MAX_LISTED])
        unreachable = f"; unreachable: {'; '.join(errors)}" if errors else ""
        return (
            f"no instance of {self._app} has ipAddr {ip} and port {self._config.app_port}"
            f" (listed: {listing}){unreachable}"
        )

    async def _discover(self, until: float, *, quiet: bool) -> str | None:
        """Find the instance id by POD_IP and PRESTOP_APP_PORT in ``GET apps/{APP}``.

        ``quiet``: return None when nothing matches yet (start-up, the app may not have
        registered); otherwise raise RegistryError saying what was listed.
        """
        matching, instances, errors = await self._match(until)
        if len(matching) == 1:
            return self._adopt(matching[0])
        if len(matching) > 1:
            raise RegistryError(self._several(matching))
        if quiet:
            return None
        if len(errors) == len(self._servers):
            nobody = "no server answered" if self._nobody_answered(errors) else "no server listed"
            raise RegistryError(f"{nobody} GET apps/{self._app}: {'; '.join(errors)}")
        raise RegistryError(self._none_matches(instances, errors))

    # --- health -------------------------------------------------------------------------------

    async def check_health(self) -> RegistryHealth:
        """Found when at least one server lists the instance (by id, or by POD_IP and port)."""
        until = StepDeadlines.starting(None, self._config.registry_timeout_seconds).verify
        instance_id = self._instance_id
        if instance_id is None:
            matching, instances, errors = await self._match(until)
            if self._nobody_answered(errors):
                return RegistryHealth(
                    HealthState.UNREACHABLE,
                    f"no server answered GET apps/{self._app}: {'; '.join(errors)}",
                )
            if len(errors) == len(self._servers):
                return RegistryHealth(
                    HealthState.NOT_FOUND,
                    f"no server listed GET apps/{self._app}: {'; '.join(errors)}",
                )
            if len(matching) != 1:
                reason = (
                    self._several(matching) if matching else self._none_matches(instances, errors)
                )
                return RegistryHealth(HealthState.NOT_FOUND, reason)
            instance_id = self._adopt(matching[0])
        found = await self._read_all(instance_id, until)
        listed = {s: i for s, i in found.items() if isinstance(i, dict)}
        shown = "; ".join(f"{s.shown}: {shown_status(i)}" for s, i in found.items())
        if listed:
            return RegistryHealth(
                HealthState.FOUND,
                f"{self._app}/{instance_id} listed by {len(listed)} of {len(found)}"
                f" server(s): {shown}",
            )
        if all(isinstance(i, str) and i.startswith("error: ") for i in found.values()):
            return RegistryHealth(HealthState.UNREACHABLE, f"no server answered: {shown}")
        return RegistryHealth(
            HealthState.NOT_FOUND, f"{self._app}/{instance_id} is not listed: {shown}"
        )
