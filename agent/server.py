"""The HTTP face of the agent: the aiohttp app factory and its handlers.

Handlers only read the lifecycle or start it; the shutdown itself runs in ``main``. Every answer
is JSON (or the Prometheus text format) and no error ever shows a traceback to a client.
"""

from __future__ import annotations

import asyncio
import hmac
import ipaddress
from collections.abc import Awaitable, Callable
from typing import Any

import structlog
from aiohttp import web

from agent.config import Config
from agent.http import AppHealth
from agent.lifecycle import Lifecycle, Phase, Trigger
from agent.metrics import CONTENT_TYPE, Metrics

log = structlog.get_logger()

TOKEN_HEADER = "X-Prestop-Token"

Handler = Callable[[web.Request], Awaitable[web.StreamResponse]]


class PendingAnswers:
    """Counts /prestop callers still waiting for (or receiving) their answer.

    The process may exit only once this is zero: a classic sidecar gets SIGTERM while the app's
    hook is still waiting on us, and that hook must get its answer before we go.
    """

    def __init__(self) -> None:
        self.count = 0
        self._idle = asyncio.Event()
        self._idle.set()

    def __enter__(self) -> None:
        self.count += 1
        self._idle.clear()

    def __exit__(self, *exc_info: object) -> None:
        self.count -= 1
        if self.count == 0:
            self._idle.set()

    async def wait_idle(self) -> None:
        await self._idle.wait()


def _json(data: Any, status: int = 200, headers: dict[str, str] | None = None) -> web.Response:
    return web.json_response(data, status=status, headers=headers)


def _peer_address(request: web.Request) -> ipaddress.IPv4Address | ipaddress.IPv6Address | None:
    try:
        address = ipaddress.ip_address((request.remote or "").split("%", 1)[0])
    except ValueError:
        return None
    if isinstance(address, ipaddress.IPv6Address) and address.ipv4_mapped is not None:
        return address.ipv4_mapped
    return address


@web.middleware
async def _json_errors(request: web.Request, handler: Handler) -> web.StreamResponse:
    """Turn aiohttp's HTTP errors and any bug into a JSON answer without a traceback."""
    try:
        return await handler(request)
    except web.HTTPException as exc:
        if exc.status < 400:
            raise
        headers = {k: v for k, v in exc.headers.items() if k.lower() == "allow"}
        return _json({"error": exc.reason}, status=exc.status, headers=headers)
    except (asyncio.CancelledError, ConnectionResetError):
        raise
    except Exception:
        log.exception("handler_failed", method=request.method, path=request.path)
        return _json({"error": "internal error"}, status=500)


def _refusal(config: Config, request: web.Request) -> tuple[int, str, str] | None:
    """(status, metric result, message) when the caller may not trigger a shutdown."""
    if config.allow_cidrs:
        peer = _peer_address(request)
        if peer is None or not any(peer in net for net in config.allow_cidrs):
            return 403, "forbidden", f"source address {request.remote} is not allowed"
    if config.token is not None:
        given = request.headers.get(TOKEN_HEADER, "")
        # A header's bytes that are not UTF-8 arrive as surrogate escapes: compared as the
        # bytes they were (a wrong token, 401), never an encoding error (500).
        expected = config.token.encode("utf-8", "surrogateescape")
        if not hmac.compare_digest(given.encode("utf-8", "surrogateescape"), expected):
            return 401, "unauthorized", f"missing or wrong {TOKEN_HEADER} header"
    return None


RefusalListener = Callable[[int, str, "str | None"], None]
"""Told of every refused /prestop call: (HTTP status, why, the caller's address)."""


def _prestop_handler(
    config: Config,
    lifecycle: Lifecycle,
    metrics: Metrics,
    pending: PendingAnswers,
    on_refused: RefusalListener | None = None,
) -> Handler:
    """/prestop: start the shutdown (or join it), wait for the drain, answer with the timeline."""

    async def prestop(request: web.Request) -> web.StreamResponse:
        refused = _refusal(config, request)
        if refused is not None:
            status, result, message = refused
            metrics.hook_calls.labels(result=result).inc()
            log.warning("prestop_refused", reason=message, remote=request.remote)
            if on_refused is not None:
                # The kubelet ignores the hook's status: an Event is the only trace in the
                # cluster (agent.events rate-limits them).
                on_refused(status, message, request.remote)
            return _json({"error": message}, status=status)
        with pending:
            if lifecycle.start(Trigger.PRESTOP):
                log.info("shutdown_triggered", trigger=str(Trigger.PRESTOP), remote=request.remote)
            await lifecycle.wait_drained()
            ok = lifecycle.failure is None
            metrics.hook_calls.labels(result="ok" if ok else "failed").inc()
            response = _json(lifecycle.report(), status=200 if ok else 500)
            # Written here, inside the count, so the process never exits before the bytes left.
            try:
                await response.prepare(request)
                await response.write_eof()
            except (ConnectionError, RuntimeError):
                log.info("prestop_caller_gone", remote=request.remote)
            return response

    return prestop


def _ready_handler(
    lifecycle: Lifecycle, health: AppHealth | None, held_out: Callable[[], str | None] | None
) -> Handler:
    """/ready: 503 from the trigger on, while the pod is known to be going (``held_out``), or
    while the app's health check fails."""

    async def ready(request: web.Request) -> web.Response:
        if lifecycle.phase is not Phase.SERVING:
            return _json({"ready": False, "reason": f"shutdown {lifecycle.phase}"}, status=503)
        going = held_out() if held_out is not None else None
        if going is not None:
            return _json({"ready": False, "reason": going}, status=503)
        if health is not None:
            healthy, reason = await health.check()
            if lifecycle.phase is not Phase.SERVING:  # a trigger may land during the check
                return _json({"ready": False, "reason": f"shutdown {lifecycle.phase}"}, 503)
            return _json({"ready": healthy, "reason": reason}, status=200 if healthy else 503)
        return _json({"ready": True, "reason": "serving"})

    return ready


def make_app(
    config: Config,
    lifecycle: Lifecycle,
    metrics: Metrics,
    *,
    health: AppHealth | None = None,
    pending: PendingAnswers | None = None,
    status_extra: Callable[[], dict[str, Any]] | None = None,
    on_final_scrape: Callable[[], None] | None = None,
    on_refused: RefusalListener | None = None,
    held_out: Callable[[], str | None] | None = None,
) -> web.Application:
    """The agent's aiohttp application.

    ``on_final_scrape`` is called once a /metrics page generated after the drain (so holding
    its figures) has been written to the scraper; ``on_refused`` of every refused /prestop
    call; ``held_out`` says why /ready must answer 503 before any trigger (the pod is already
    being deleted), or None."""
    pending = pending if pending is not None else PendingAnswers()
    prestop = _prestop_handler(config, lifecycle, metrics, pending, on_refused)
    ready = _ready_handler(lifecycle, health, held_out)

    async def live(request: web.Request) -> web.Response:
        return _json({"live": True, "phase": str(lifecycle.phase)})

    async def status(request: web.Request) -> web.Response:
        body = {"lifecycle": lifecycle.report(), "config": config.redacted()}
        if status_extra is not None:
            body.update(status_extra())
        return _json(body)

    async def metrics_page(request: web.Request) -> web.Response:
        # A HEAD (a monitor checking the endpoint) gets no figures: only a GET is the scrape.
        final = lifecycle.phase is Phase.DRAINED and request.method == "GET"
        response = web.Response(body=metrics.exposition())
        response.headers["Content-Type"] = CONTENT_TYPE
        if final and on_final_scrape is not None:
            # Written here, so the process (waiting on this) never exits before the bytes left.
            await response.prepare(request)
            await response.write_eof()
            on_final_scrape()
        return response

    app = web.Application(middlewares=[_json_errors])
    app.router.add_route("GET", "/prestop", prestop)
    app.router.add_route("POST", "/prestop", prestop)
    app.router.add_get("/ready", ready)
    app.router.add_get("/live", live)
    app.router.add_get("/status", status)
    app.router.add_get("/metrics", metrics_page)
    return app
