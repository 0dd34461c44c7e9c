"""``PRESTOP_REGISTRY=register``: register an app that has no Eureka client, on its behalf.

The agent is then the instance's Eureka client: it registers the app (pod IP, app port, health
and status URLs, metadata), renews the lease on the Eureka schedule, reports UP only while
``PRESTOP_APP_HEALTH_URL`` answers 2xx, marks the instance DOWN at shutdown and cancels the
registration once the drain is over (safe here, unlike in the ``eureka`` backend: nobody else
renews this lease).

What py-eureka-client gives us, and what it does not
----------------------------------------------------
Used: its instance model (``Instance``, ``LeaseInfo``, ``DataCenterInfo``, ``PortWrapper``) and
its protocol functions in ``eureka_basic`` (``register``, ``send_heartbeat``, ``status_update``,
``cancel``), which build Eureka's JSON and URLs correctly.

Replaced:

- ``EurekaClient`` itself: its heartbeat runs on a ``threading.Timer`` thread and its sync
  wrappers start their own event loop, neither of which belongs inside the agent's one loop. The
  renewal loop is :meth:`RegisterRegistry.run`, a coroutine cancelled with the agent.
- Its HTTP client: every call opens a fresh ``httpx.AsyncClient`` with ``Connection: close``,
  a fixed 5 s timeout, no custom CA, and a URL regex that rejects IPv6 literals and passwords
  with characters such as ``$`` or ``+``. The library lets the client be replaced
  (``set_http_client``); ours sends every request over the agent's shared aiohttp session with
  our timeouts, TLS and basic auth. py-eureka-client only ever sees placeholder URLs
  (``http://eureka-0.invalid/``), so it neither parses nor holds credentials; the placeholder is
  mapped back to the real server per request. ``set_http_client`` is process-wide, so the
  registry whose requests are being sent is found through a context variable.
- Reads: its getters parse XML; the read-back uses :mod:`agent.registry.wire` (JSON, the
  registry itself rather than the response cache), shared with the ``eureka`` backend.
"""

from __future__ import annotations

import asyncio
import contextvars
import time
from typing import TYPE_CHECKING, Any
from urllib.error import HTTPError, URLError
from urllib.parse import urlsplit

import aiohttp
import structlog
from py_eureka_client import eureka_basic
from py_eureka_client import http_client as eureka_http

from agent.http import Http, RequestFailed, Server, redact_urls_in, retrying, segment
from agent.registry.base import HealthState, RegistryError, RegistryHealth, StepDeadlines
from agent.registry.wire import (
    EurekaServers,
    confirm_applied,
    read_back,
    require_one_marked,
    status_on,
)

if TYPE_CHECKING:
    from agent.config import Config
    from agent.http import AppHealth

log = structlog.get_logger()

# How Eureka's own Java clients describe a data centre that is neither AWS nor Netflix.
DATA_CENTER_NAME = "MyOwn"
DATA_CENTER_CLASS = "com.netflix.appinfo.InstanceInfo$DefaultDataCenterInfo"


def _now_ms() -> int:
    return int(time.time() * 1000)


class _Transport:
    """One registry's way to its servers, for the py-eureka-client calls it makes."""

    def __init__(self, http: Http, servers: tuple[Server, ...]) -> None:
        self.http = http
        self.placeholders = {f"http://eureka-{i}.invalid/": s for i, s in enumerate(servers)}
        self.until: float | None = None

    def placeholder(self, server: Server) -> str:
        return next(p for p, s in self.placeholders.items() if s is server)

    async def send(
        self, request: eureka_http.HttpRequest | str, data: bytes | None
    ) -> eureka_http.HttpResponse:
        if isinstance(request, str):
            request = eureka_http.HttpRequest(request)
        url = request.url
        found = [(p, s) for p, s in self.placeholders.items() if url.startswith(p)]
        if not found:
            raise URLError("py-eureka-client asked for a server this registry does not know")
        prefix, server = found[0]
        # Its client forces "Connection: close" (one connection per call); we keep the pool.
        headers = {
            k: v
            for k, v in request.headers.items()
            if k.lower() not in ("connection", "accept-encoding", "authorization")
        }
        body = data if data is not None else request.content
        try:
            status, answer = await self.http.request(
                server,
                request.method,
                url[len(prefix) :],
                body=body,
                headers=headers,
                until=self.until,
            )
        except RequestFailed as exc:
            raise URLError(exc.reason) from None
        if status >= 300:
            # What its own client raises, so that its functions behave as they were written
            # (a redirect is not followed, so it is no success either).
            # Its message is the status alone: an error body may echo what we sent.
            raise HTTPError(server.shown, status, f"HTTP {status}", {}, None)  # type: ignore[arg-type]
        response = eureka_http.HttpResponse()
        response.body_text = answer.decode("utf-8", "replace")
        return response


_current: contextvars.ContextVar[_Transport | None] = contextvars.ContextVar(
    "prestop_eureka_transport", default=None
)


class _SessionHttpClient(eureka_http.HttpClient):
    """py-eureka-client's HTTP client slot, filled with the calling registry's transport."""

    async def urlopen(
        self,
        request: eureka_http.HttpRequest | str | None = None,
        data: bytes | None = None,
        # The library's signature; our transport applies its own, deadline-bound timeout.
        timeout: float | None = None,  # noqa: ASYNC109
    ) -> eureka_http.HttpResponse:
        transport = _current.get()
        if transport is None or request is None:
            raise URLError("py-eureka-client called outside a RegisterRegistry request")
        return await transport.send(request, data)


eureka_http.set_http_client(_SessionHttpClient())


def _failure(exc: BaseException) -> str:
    if isinstance(exc, HTTPError):
        return f"HTTP {exc.code}"
    if isinstance(exc, URLError):
        return str(exc.reason)
    return redact_urls_in(f"{type(exc).__name__}: {exc}")


def _retriable(exc: BaseException) -> bool:
    return not isinstance(exc, HTTPError) or exc.code >= 500


# What a Spring Boot app's own Eureka client publishes (Spring Cloud Netflix's
# EurekaInstanceConfigBean): the actuator's paths on the instance's own address.
STATUS_PAGE_PATH = "/actuator/info"
HEALTH_CHECK_PATH = "/actuator/health"


def published_urls(config: Config) -> tuple[str, str, str]:
    """(homePageUrl, statusPageUrl, healthCheckUrl) as every Eureka client, the dashboard and
    Spring Boot Admin will read them: the pod IP (``127.0.0.1`` means nothing outside the pod),
    the app's port (or the health URL's own port, a separate management port), and paths only.

    ``PRESTOP_APP_HEALTH_URL`` is the agent's private way to the app: its userinfo and query
    string (a password, a token) are never published, and neither is its host.
    """
    ip = config.pod_ip
    host = f"[{ip}]" if ":" in ip else ip
    home = f"http://{host}:{config.app_port}/"
    if not config.app_health_url:
        base = home.rstrip("/")
        return home, base + STATUS_PAGE_PATH, base + HEALTH_CHECK_PATH
    parts = urlsplit(config.app_health_url)
    base = f"{parts.scheme}://{host}:{parts.port or config.app_port}"
    return home, base + STATUS_PAGE_PATH, base + (parts.path or HEALTH_CHECK_PATH)


class RegisterRegistry:
    """Be the Eureka client of an app that has none."""

    name = "register"

    def __init__(
        self, config: Config, session: aiohttp.ClientSession, health: AppHealth | None = None
    ) -> None:
        self._config = config
        self._app_health = health
        """The agent's check of PRESTOP_APP_HEALTH_URL (the one /ready uses); None: always UP."""
        eureka = EurekaServers.of(config, session)
        self._http, self._servers, self._app = eureka.http, eureka.servers, eureka.app
        self._transport = _Transport(eureka.http, self._servers)
        self._instance = self._build_instance(config)
        self._registered: dict[Server, bool] = dict.fromkeys(self._servers, False)
        # One lock orders the renewal loop, mark_down and finalize: a renewal that slipped in
        # after the cancel would get 404 and register the instance again.
        self._lock = asyncio.Lock()
        self._marked = False
        self._finalized = False
        self._stop = asyncio.Event()
        self._verify_until = 0.0

    @property
    def instance_id(self) -> str:
        return str(self._instance.instanceId)

    @staticmethod
    def _build_instance(config: Config) -> eureka_basic.Instance:
        ip, port = config.pod_ip, config.app_port
        home, status_page, health_check = published_urls(config)
        # Spring's default instance id is host:app:port; the pod IP stands in for the host.
        instance_id = config.eureka_instance_id or f"{ip}:{config.eureka_app.lower()}:{port}"
        metadata = {"registered-by": "prestop-agent"}
        if config.pod_name:
            metadata["pod"] = config.pod_name
        if config.pod_namespace:
            metadata["namespace"] = config.pod_namespace
        # Every argument is passed: the model's defaults are shared mutable objects.
        return eureka_basic.Instance(
            instanceId=instance_id,
            app=config.eureka_app.upper(),
            ipAddr=ip,
            hostName=ip,
            port=eureka_basic.PortWrapper(port=port, enabled=True),
            securePort=eureka_basic.PortWrapper(port=443, enabled=False),
            homePageUrl=home,
            statusPageUrl=status_page,
            healthCheckUrl=health_check,
            vipAddress=config.eureka_app.lower(),
            secureVipAddress=config.eureka_app.lower(),
            dataCenterInfo=eureka_basic.DataCenterInfo(
                name=DATA_CENTER_NAME, className=DATA_CENTER_CLASS, metadata={}
            ),
            leaseInfo=eureka_basic.LeaseInfo(
                renewalIntervalInSecs=max(1, round(config.eureka_renewal_seconds)),
                durationInSecs=max(1, round(config.eureka_lease_seconds)),
            ),
            status="STARTING",
            overriddenstatus="UNKNOWN",
            metadata=metadata,
            lastUpdatedTimestamp=_now_ms(),
            lastDirtyTimestamp=_now_ms(),
        )

    async def _call(self, until: float, call: Any, *args: Any, **kwargs: Any) -> None:
        """Run one py-eureka-client protocol call through this registry's transport."""
        self._transport.until = until
        token = _current.set(self._transport)
        try:
            await call(*args, **kwargs)
        finally:
            _current.reset(token)

    async def _about_instance(
        self, server: Server, until: float, call: Any, *args: Any, **kwargs: Any
    ) -> None:
        """One py-eureka-client call about this instance on ``server`` (its arguments begin
        with the server, the app and the instance id)."""
        placeholder = self._transport.placeholder(server)
        await self._call(until, call, placeholder, self._app, self.instance_id, *args, **kwargs)

    # --- registration and renewals ------------------------------------------------------------

    async def run(self, pod_terminating: bool | None = None) -> None:
        """Register, then renew every ``PRESTOP_EUREKA_RENEWAL_SECONDS`` until finalized. In a
        pod being deleted (this agent restarted during its termination), the registration
        carries the mark-down's status from the start, whatever the app's health says."""
        loop = asyncio.get_running_loop()
        interval = self._config.eureka_renewal_seconds
        if pod_terminating:
            async with self._lock:
                self._marked = True
                self._set_status(self._config.eureka_status)
            log.warning(
                "eureka_registered_out_of_service",
                app=self._app,
                instance_id=self.instance_id,
                status=self._config.eureka_status,
                reason="the pod is being deleted (metadata.deletionTimestamp): this agent"
                " restarted during its termination",
            )
        while not self._finalized:
            try:
                async with self._lock:
                    if self._finalized:
                        return
                    await self._renew(loop.time() + interval)
            except Exception:  # run() must not raise: the next renewal tries again
                log.exception("eureka_renewal_failed", app=self._app, instance_id=self.instance_id)
            try:
                async with asyncio.timeout(interval):
                    await self._stop.wait()
            except TimeoutError:
                pass

    async def _renew(self, until: float) -> None:
        if not self._marked:
            status = await self._health()
            if status != self._instance.status:
                log.info(
                    "eureka_status_changed",
                    app=self._app,
                    instance_id=self.instance_id,
                    previous=self._instance.status,
                    status=status,
                )
                self._set_status(status)
        await asyncio.gather(*(self._renew_on(s, until) for s in self._servers))

    def _set_status(self, status: str) -> None:
        # As Eureka's Java client does: a changed instance is "dirty" and is registered again,
        # carrying the new lastDirtyTimestamp.
        self._instance.status = status
        self._instance.lastDirtyTimestamp = _now_ms()
        self._registered = dict.fromkeys(self._servers, False)

    async def _renew_on(self, server: Server, until: float) -> None:
        placeholder = self._transport.placeholder(server)
        if self._registered[server]:
            try:
                await self._about_instance(
                    server,
                    until,
                    eureka_basic.send_heartbeat,
                    self._instance.lastDirtyTimestamp,
                    status=self._instance.status,
                )
                return
            except HTTPError as exc:
                if exc.code != 404:
                    log.warning("eureka_renewal_failed", server=server.shown, error=_failure(exc))
                    return
                # The server lost the lease (restart, eviction): register again, now.
                self._registered[server] = False
            except URLError as exc:
                log.warning("eureka_renewal_failed", server=server.shown, error=_failure(exc))
                return
        try:
            await self._call(until, eureka_basic.register, placeholder, self._instance)
        except (HTTPError, URLError) as exc:
            log.warning("eureka_register_failed", server=server.shown, error=_failure(exc))
            return
        self._registered[server] = True
        log.info(
            "eureka_registered",
            server=server.shown,
            app=self._app,
            instance_id=self.instance_id,
            status=self._instance.status,
        )

    async def _health(self) -> str:
        if self._app_health is None:
            return "UP"
        healthy, _ = await self._app_health.check()
        return "UP" if healthy else "DOWN"

    # --- the shutdown -------------------------------------------------------------------------

    async def mark_down(self, started: float | None = None) -> dict[str, Any]:
        """Put the status override on every server (py-eureka-client's ``status_update``)."""
        deadlines = StepDeadlines.starting(started, self._config.registry_timeout_seconds)
        until, self._verify_until = deadlines.mark, deadlines.verify
        target = self._config.eureka_status
        async with self._lock:
            self._marked = True
            # A renewal that has to register again (the lease was lost) now registers DOWN.
            self._instance.status = target
            self._instance.lastDirtyTimestamp = _now_ms()
        done = asyncio.Event()
        results = await asyncio.gather(
            *(self._put_status(s, target, until, done) for s in self._servers)
        )
        said = {s.shown: r for s, r in zip(self._servers, results, strict=True)}
        await confirm_applied(
            self._http,
            self._servers,
            said,
            self._app,
            self.instance_id,
            target,
            until=self._verify_until,
        )
        require_one_marked(said, self._app, self.instance_id, target)
        log.info(
            "eureka_marked",
            app=self._app,
            instance_id=self.instance_id,
            status=target,
            servers=said,
        )
        return said

    async def _put_status(
        self, server: Server, target: str, until: float, done: asyncio.Event
    ) -> dict[str, Any]:
        """Put the status override on one server (py-eureka-client's ``status_update``),
        retrying until another server has taken it or the time is up."""
        unanswered = False

        async def attempt() -> None:
            nonlocal unanswered
            try:
                await self._about_instance(
                    server,
                    until,
                    eureka_basic.status_update,
                    self._instance.lastDirtyTimestamp,
                    status=target,
                )
            except (HTTPError, URLError) as exc:
                # No HTTP answer (a timeout, a reset): the server may have applied it.
                unanswered = not isinstance(exc, HTTPError)
                raise RequestFailed(_failure(exc), retriable=_retriable(exc)) from None

        try:
            _, attempts = await retrying(attempt, until=until, give_up=done.is_set)
        except RequestFailed as exc:
            return {"result": "failed", "error": exc.reason, "unanswered": unanswered}
        done.set()
        return {"result": "ok", "attempts": attempts}

    async def verify(self) -> dict[str, Any]:
        try:
            return await read_back(
                self._http,
                self._servers,
                self._app,
                self.instance_id,
                self._config.eureka_status,
                until=self._verify_until,
            )
        except RequestFailed as exc:
            raise RegistryError(f"{self._app}/{self.instance_id}: {exc.reason}") from None

    async def finalize(self) -> None:
        """Stop renewing, then cancel the registration on every server."""
        async with self._lock:
            self._finalized = True
            self._stop.set()
        until = StepDeadlines.starting(None, self._config.registry_timeout_seconds).verify

        async def cancel(server: Server) -> str:
            async def attempt() -> None:
                try:
                    await self._about_instance(server, until, eureka_basic.cancel)
                except HTTPError as exc:
                    if exc.code == 404:
                        return  # already gone there (a peer replicated the cancel first)
                    raise RequestFailed(_failure(exc), retriable=_retriable(exc)) from None
                except URLError as exc:
                    raise RequestFailed(_failure(exc), retriable=True) from None

            try:
                await retrying(attempt, until=until)
            except RequestFailed as exc:
                return f"failed: {exc.reason}"
            return "cancelled"

        try:
            results = await asyncio.gather(*(cancel(s) for s in self._servers))
        except Exception:  # finalize() must not raise
            log.exception("eureka_cancel_failed", app=self._app, instance_id=self.instance_id)
            return
        log.info(
            "eureka_cancelled",
            app=self._app,
            instance_id=self.instance_id,
            servers={s.shown: r for s, r in zip(self._servers, results, strict=True)},
        )

    async def close(self) -> None:
        self._stop.set()

    async def describe(self) -> dict[str, Any]:
        """Show the registration the agent would make, and reach every server."""
        until = StepDeadlines.starting(None, self._config.registry_timeout_seconds).verify

        async def reach(server: Server) -> str:
            async def attempt() -> int:
                status, _ = await self._http.request(
                    server, "GET", f"apps/{segment(self._app)}", until=until
                )
                if status >= 500:
                    raise RequestFailed(f"HTTP {status}", retriable=True, status=status)
                return status

            try:
                status, _ = await retrying(attempt, until=until)
            except RequestFailed as exc:
                return f"error: {exc.reason}"
            return "reachable" if status == 200 else f"HTTP {status}"

        answers = await asyncio.gather(*(reach(s) for s in self._servers))
        servers = {s.shown: a for s, a in zip(self._servers, answers, strict=True)}
        if "reachable" not in answers:
            shown = "; ".join(f"{url}: {a}" for url, a in servers.items())
            raise RegistryError(f"no Eureka server reachable: {shown}")
        health = await self._health()
        i = self._instance
        return {
            "backend": self.name,
            "app": self._app,
            "instance_id": self.instance_id,
            "ipAddr": i.ipAddr,
            "port": i.port.port,
            "healthCheckUrl": i.healthCheckUrl,
            "statusPageUrl": i.statusPageUrl,
            "app_health_now": health,
            "renewal_seconds": i.leaseInfo.renewalIntervalInSecs,
            "lease_seconds": i.leaseInfo.durationInSecs,
            "metadata": i.metadata,
            "would_set": self._config.eureka_status,
            "servers": servers,
        }

    async def check_health(self) -> RegistryHealth:
        """Found when at least one server lists our registration as UP."""
        until = asyncio.get_running_loop().time() + self._config.registry_timeout_seconds

        answers = await asyncio.gather(
            *(
                status_on(self._http, s, self._app, self.instance_id, until=until)
                for s in self._servers
            )
        )
        shown = "; ".join(f"{s.shown}: {a}" for s, a in zip(self._servers, answers, strict=True))
        if "UP" in answers:
            return RegistryHealth(
                HealthState.FOUND, f"{self._app}/{self.instance_id} registered UP: {shown}"
            )
        if all(a.startswith("error: ") for a in answers):
            return RegistryHealth(HealthState.UNREACHABLE, f"no server answered: {shown}")
        return RegistryHealth(
            HealthState.NOT_FOUND, f"{self._app}/{self.instance_id} not registered UP: {shown}"
        )
