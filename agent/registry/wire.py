"""Eureka's wire format: its paths, its JSON, and how a status change is read back.

What the ``eureka`` and ``register`` backends and the client view share about talking to Eureka
servers: the client set-up from the configuration (:class:`EurekaServers`), reading one instance
or one application as JSON (one instance is an object, several a list; numbers such as
lastDirtyTimestamp may be strings), the one per-server status read (:func:`status_on`), and the
read-back after a status change. Requests themselves go through :mod:`agent.http`.
"""

from __future__ import annotations

import asyncio
import ipaddress
from collections.abc import Mapping
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any

from agent.http import (
    FIRST_BACKOFF,
    MAX_BACKOFF,
    MIN_REQUEST_TIMEOUT,
    Http,
    RequestFailed,
    Server,
    check_status,
    failure_text,
    parse_json,
    segment,
    ssl_context,
)
from agent.registry.base import RegistryError

if TYPE_CHECKING:
    import aiohttp

    from agent.config import Config

# Eureka's own clients send this header only when one server replicates to another; a request
# that carries it is not replicated onwards, so the agent must never send it.
REPLICATION_HEADER = "x-netflix-discovery-replication"
MAX_FIELD = 200
NOT_LISTED = "not listed"


def request_timeout(timeout_seconds: float) -> float:
    """The timeout of one request under a step of ``timeout_seconds``: a third of it, so that a
    server that hangs still leaves time for a retry or for the other servers' answers, and at
    most 5 s."""
    return max(MIN_REQUEST_TIMEOUT, min(5.0, timeout_seconds / 3))


@dataclass(frozen=True, slots=True)
class EurekaServers:
    """The configured Eureka servers and how to reach them: one client over the shared session,
    one :class:`agent.http.Server` per ``defaultZone`` URL, and the application's name as Eureka
    stores it (upper-cased)."""

    http: Http
    servers: tuple[Server, ...]
    app: str

    @classmethod
    def of(cls, config: Config, session: aiohttp.ClientSession) -> EurekaServers:
        http = Http(
            session,
            timeout=request_timeout(config.registry_timeout_seconds),
            ssl=ssl_context(config.eureka_ca_file),
        )
        servers = tuple(Server.parse(url) for url in config.eureka_urls)
        return cls(http=http, servers=servers, app=config.eureka_app.upper())


async def confirm_applied(
    http: Http,
    servers: tuple[Server, ...],
    said: dict[str, dict[str, Any]],
    app: str,
    instance_id: str,
    status: str,
    *,
    until: float,
) -> None:
    """When no server confirmed the status change: read the instance back before reporting the
    failure. A PUT that timed out on our side may still have been applied (a slow server), and
    then the instance is marked: its server's result becomes ``ok`` (``confirmed_by:
    read_back``). Only servers whose last status request got no answer (``unanswered``) are
    asked: a refusal (4xx) was not applied."""
    unanswered = tuple(s for s in servers if said[s.shown].pop("unanswered", False))
    if not unanswered or any(answer["result"] == "ok" for answer in said.values()):
        return
    servers = unanswered
    try:
        shown = await read_back(http, servers, app, instance_id, status, until=until)
    except RequestFailed:
        return  # nobody shows it: the failure stands as reported
    for server in servers:
        if shown.get(server.shown) == status:
            said[server.shown] = {**said[server.shown], "result": "ok", "confirmed_by": "read_back"}


def require_one_marked(
    said: Mapping[str, Mapping[str, Any]], app: str, instance_id: str, status: str
) -> None:
    """The mark-down step succeeds when at least one server took the status; else the error
    names what every server said."""
    if any(answer["result"] == "ok" for answer in said.values()):
        return
    reasons = "; ".join(f"{url}: {answer['error']}" for url, answer in said.items())
    raise RegistryError(f"could not mark {app}/{instance_id} {status} on any server: {reasons}")


# --------------------------------------------------------------------------------------------
# Reading Eureka's JSON. Eureka serialises one instance as an object and several as a list, and
# numbers such as lastDirtyTimestamp as strings; these helpers hide both.


def instances_of(document: Any) -> list[dict[str, Any]]:
    """The instances of ``GET apps/{APP}`` (``{"application": {"instance": [...]}}``)."""
    application = document.get("application", {}) if isinstance(document, dict) else {}
    instances = application.get("instance", []) if isinstance(application, dict) else []
    if isinstance(instances, dict):
        return [instances]
    return [i for i in instances if isinstance(i, dict)]


def instance_of(document: Any) -> dict[str, Any]:
    """The instance of ``GET apps/{APP}/{id}`` (``{"instance": {...}}``)."""
    instance = document.get("instance") if isinstance(document, dict) else None
    if not isinstance(instance, dict):
        raise RequestFailed("the answer holds no instance", retriable=False, answered=True)
    return instance


def port_of(instance: Mapping[str, Any], field: str = "port") -> int | None:
    """The instance's ``port`` (or ``securePort``): ``{"$": 8080, "@enabled": "true"}``."""
    port = instance.get(field)
    value = port.get("$") if isinstance(port, dict) else port
    try:
        return int(value) if value is not None else None
    except (TypeError, ValueError):
        return None


def secure_port_of(instance: Mapping[str, Any]) -> int | None:
    return port_of(instance, "securePort")


def serves_on(instance: Mapping[str, Any], port: int) -> bool:
    """Whether the instance is registered with ``port``: as its plain port, or as its secure one
    (an HTTPS-only app registers ``port`` disabled and ``securePort`` enabled)."""
    return port in (port_of(instance), secure_port_of(instance))


def same_address(listed: Any, address: str) -> bool:
    """Whether an ``ipAddr`` a server listed is ``address``, compared as addresses: the
    downward API writes ``fd00:77::5`` where Java writes ``fd00:77:0:0:0:0:0:5``."""
    if not isinstance(listed, str) or not address:
        return False
    if listed == address:
        return True
    try:
        return ipaddress.ip_address(listed.split("%", 1)[0]) == ipaddress.ip_address(address)
    except ValueError:
        return False


def text_of(value: Any) -> str | None:
    """A field of a server's answer as text for comparisons, logs and answers: strings (cut
    short) and numbers as they are, anything else by its type. Never ``str()`` of a nested value
    a hostile server sent: printing a structure nested hundreds deep can raise RecursionError."""
    if value is None:
        return None
    if isinstance(value, str):
        return value if len(value) <= MAX_FIELD else value[:MAX_FIELD] + "..."
    if isinstance(value, int | float):
        return str(value)
    return f"<a JSON {type(value).__name__}>"


def override_of(instance: Mapping[str, Any]) -> str:
    """The status override; Eureka writes ``overriddenStatus`` (older servers
    ``overriddenstatus``), ``UNKNOWN`` meaning none."""
    override = instance.get("overriddenStatus") or instance.get("overriddenstatus")
    return text_of(override) or "UNKNOWN"


def dirty_timestamp_of(instance: Mapping[str, Any]) -> str | None:
    """Eureka's lastDirtyTimestamp (milliseconds, sent as a number or a string); None when the
    answer has none or something else, so that no odd value ever ends up in a request's URL."""
    value = instance.get("lastDirtyTimestamp")
    if isinstance(value, bool) or not isinstance(value, int | str):
        return None
    text = str(value)
    return text if text.isascii() and text.isdigit() and len(text) <= 20 else None


def summary(instance: Mapping[str, Any]) -> dict[str, Any]:
    """What ``check``, logs and /prestop's answer show of an instance."""
    return {
        "instanceId": text_of(instance.get("instanceId")),
        "app": text_of(instance.get("app")),
        "ipAddr": text_of(instance.get("ipAddr")),
        "port": port_of(instance),
        "status": text_of(instance.get("status")),
        "overriddenStatus": override_of(instance),
        "lastDirtyTimestamp": dirty_timestamp_of(instance),
    }


async def get_instance(
    http: Http, server: Server, app: str, instance_id: str, *, until: float
) -> dict[str, Any] | None:
    """``GET apps/{APP}/{id}``: the instance, or None when the server does not list it.

    This read goes to the registry itself, not to the server's response cache (which serves
    ``GET apps`` and ``GET apps/{APP}`` up to 30 s stale), so it shows a status change at once.
    """
    status, body = await http.request(
        server, "GET", f"apps/{segment(app)}/{segment(instance_id)}", until=until
    )
    if status == 404:
        return None
    check_status(status, body, ok=(200,))
    return instance_of(parse_json(body))


async def get_application(
    http: Http, server: Server, app: str, *, until: float
) -> list[dict[str, Any]]:
    """``GET apps/{APP}``: its instances (none when the server does not know the app)."""
    status, body = await http.request(server, "GET", f"apps/{segment(app)}", until=until)
    if status == 404:
        return []
    check_status(status, body, ok=(200,))
    return instances_of(parse_json(body))


def shown_status(found: Mapping[str, Any] | str | None) -> str:
    """One server's answer about the instance as shown per server: its status (through
    :func:`text_of`: never ``str()`` of what a hostile server sent), ``not listed``, or the
    failure already put in words (a string)."""
    if found is None:
        return NOT_LISTED
    if isinstance(found, str):
        return found
    return str(text_of(found.get("status")))


async def status_on(http: Http, server: Server, app: str, instance_id: str, *, until: float) -> str:
    """The instance's status on one server (``GET apps/{APP}/{id}``, the registry itself),
    ``not listed``, or ``error: ...`` / ``answered: ...`` (:func:`agent.http.failure_text`).
    Never raises: one server's bad answer must not hide another's."""
    try:
        found = await get_instance(http, server, app, instance_id, until=until)
    except Exception as exc:
        return failure_text(exc)
    return shown_status(found)


async def read_back(
    http: Http,
    servers: tuple[Server, ...],
    app: str,
    instance_id: str,
    expected: str,
    *,
    until: float,
) -> dict[str, Any]:
    """Read the instance from every server until one shows ``expected`` or ``until`` passes.

    Returns what each server said (its status, ``not listed`` or the error). Raises
    :class:`RequestFailed` naming every server's answer when none shows ``expected``.
    """
    loop = asyncio.get_running_loop()
    delay = FIRST_BACKOFF
    while True:
        answers = await asyncio.gather(
            *(status_on(http, s, app, instance_id, until=until) for s in servers)
        )
        said = {s.shown: a for s, a in zip(servers, answers, strict=True)}
        if expected in answers:
            return said
        if until - loop.time() < delay + MIN_REQUEST_TIMEOUT:
            shown = "; ".join(f"{url}: {answer}" for url, answer in said.items())
            raise RequestFailed(f"no server shows {expected}: {shown}", retriable=False)
        await asyncio.sleep(delay)
        delay = min(delay * 2, MAX_BACKOFF)
