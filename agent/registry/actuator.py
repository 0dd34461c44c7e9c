"""``PRESTOP_REGISTRY=actuator``: ask the app to take itself out, as the classic curl hook does.

Spring Cloud's ``ServiceRegistryEndpoint`` sets the status through the app's own Eureka client,
which puts the same status override on the server that the ``eureka`` backend would; the agent
only needs to reach the app. Two forms exist:

- Spring Boot 2.4+ and 3.x: ``POST /actuator/serviceregistry`` with JSON ``{"status": "DOWN"}``
  (the default ``PRESTOP_ACTUATOR_URL``);
- Spring Boot 1.x: ``POST /service-registry/instance-status`` with the bare status as a
  ``text/plain`` body, which is what ``curl -X POST --data DOWN`` sends.

Both answer ``GET`` on the same URL with the registration's status (``{"status": ...,
"overriddenStatus": ...}`` for Eureka), which is how the step is verified.
"""

from __future__ import annotations

import asyncio
import json
from typing import TYPE_CHECKING, Any
from urllib.parse import urlsplit

import structlog

from agent.http import (
    MIN_REQUEST_TIMEOUT,
    Http,
    RequestFailed,
    Server,
    check_status,
    failure_reason,
    parse_json,
    retrying,
)
from agent.registry.base import HealthState, RegistryError, RegistryHealth, StepDeadlines
from agent.registry.wire import request_timeout

if TYPE_CHECKING:
    import aiohttp

    from agent.config import Config

log = structlog.get_logger()

LEGACY_SUFFIX = "instance-status"  # the Spring Boot 1.x endpoint's last path segment
FIRST_POLL = 0.05
MAX_BARE_STATUS = 64  # "DOWN", "OUT_OF_SERVICE": a bare status is a short word


def _short(value: Any) -> Any:
    """A reported status as shown: strings and nulls as they are, anything else (a nested
    object a broken or hostile endpoint sent) as a short text."""
    if value is None or (isinstance(value, str) and len(value) <= MAX_BARE_STATUS):
        return value
    return f"{value[:40]}..." if isinstance(value, str) else f"<a JSON {type(value).__name__}>"


class ActuatorRegistry:
    """POST the status to the app's service-registry endpoint, then read it back."""

    name = "actuator"

    def __init__(self, config: Config, session: aiohttp.ClientSession) -> None:
        self._config = config
        self._http = Http(session, timeout=request_timeout(config.registry_timeout_seconds))
        # Server splits off credentials (a management port behind basic auth) like a Eureka URL;
        # the endpoint is its "base" and the requests add no path.
        parts = urlsplit(config.actuator_url)
        self._endpoint = Server.endpoint(config.actuator_url)
        self._legacy = parts.path.rstrip("/").endswith(LEGACY_SUFFIX)
        self._status = config.eureka_status
        self._verify_until = 0.0

    async def run(self, pod_terminating: bool | None = None) -> None:
        return None  # the app's own client keeps its registration and its status

    async def mark_down(self, started: float | None = None) -> dict[str, Any]:
        deadlines = StepDeadlines.starting(started, self._config.registry_timeout_seconds)
        until, self._verify_until = deadlines.mark, deadlines.verify
        if self._legacy:
            body = self._status.encode()
            headers = {"Content-Type": "text/plain"}
        else:
            body = json.dumps({"status": self._status}).encode()
            headers = {"Content-Type": "application/json"}

        async def attempt() -> int:
            status, answer = await self._http.request(
                self._endpoint, "POST", "", body=body, headers=headers, until=until
            )
            check_status(status, answer, ok=(200, 201, 202, 204))
            return status

        try:
            status, attempts = await retrying(attempt, until=until)
        except RequestFailed as exc:
            raise RegistryError(f"POST {self._endpoint.shown}: {exc.reason}") from None
        said = {
            "endpoint": self._endpoint.shown,
            "form": "boot1-text" if self._legacy else "json",
            "http_status": status,
            "attempts": attempts,
        }
        log.info("actuator_marked", status=self._status, **said)
        return said

    async def verify(self) -> dict[str, Any]:
        """Poll ``GET`` until the app reports the status (or its override) as set."""
        loop = asyncio.get_running_loop()
        delay = FIRST_POLL
        last = "no answer"
        while True:
            try:
                reported = await self._read(self._verify_until)
                if self._status in (reported.get("status"), reported.get("overriddenStatus")):
                    return {"endpoint": self._endpoint.shown, **reported}
                last = f"reports {reported}"
            except Exception as exc:  # a bad answer is "not yet", up to the deadline
                last = failure_reason(exc)
            if self._verify_until - loop.time() < delay + MIN_REQUEST_TIMEOUT:
                raise RegistryError(
                    f"GET {self._endpoint.shown}: not {self._status} in time, last: {last}"
                )
            await asyncio.sleep(delay)
            delay = min(delay * 2, 0.5)

    async def _read(self, until: float) -> dict[str, Any]:
        status, body = await self._http.request(self._endpoint, "GET", "", until=until)
        check_status(status, body, ok=(200,))
        return self._parse(body)

    @staticmethod
    def _parse(body: bytes) -> dict[str, Any]:
        try:
            document = parse_json(body)
        except RequestFailed:
            # A handler that answers the bare status ("DOWN"); anything longer is not one, and
            # why it is not JSON is the better reason.
            text = body.decode("utf-8", "replace").strip()
            if len(text) > MAX_BARE_STATUS:
                raise
            return {"status": text}
        if isinstance(document, dict):
            return {
                k: _short(document.get(k)) for k in ("status", "overriddenStatus") if k in document
            }
        return {"status": _short(document)}

    async def finalize(self) -> None:
        return None

    async def close(self) -> None:
        return None

    async def describe(self) -> dict[str, Any]:
        until = StepDeadlines.starting(None, self._config.registry_timeout_seconds).verify
        try:
            reported, _ = await retrying(lambda: self._read(until), until=until)
        except RequestFailed as exc:
            raise RegistryError(f"GET {self._endpoint.shown}: {exc.reason}") from None
        return {
            "backend": self.name,
            "endpoint": self._endpoint.shown,
            "form": "Spring Boot 1.x (text/plain)" if self._legacy else "Spring Boot 2.4+ (JSON)",
            "would_set": self._status,
            "reported": reported,
        }

    async def check_health(self) -> RegistryHealth:
        """Found when the endpoint answers with a status; an HTTP error means the app is up
        but the endpoint is missing (not exposed) or has no registration."""
        until = asyncio.get_running_loop().time() + self._config.registry_timeout_seconds
        try:
            reported = await self._read(until)
        except RequestFailed as exc:
            state = HealthState.NOT_FOUND if exc.answered else HealthState.UNREACHABLE
            return RegistryHealth(state, f"GET {self._endpoint.shown}: {exc.reason}")
        return RegistryHealth(HealthState.FOUND, f"GET {self._endpoint.shown}: {reported}")
