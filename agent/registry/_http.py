"""HTTP plumbing shared by the backends: Eureka server URLs, bounded requests, retries, reads.

The ``eureka`` and ``register`` backends talk to the same Eureka servers the same way (credentials
from Spring-style ``defaultZone`` URLs, a private CA, per-request timeouts under the step's
deadline, backoff on 5xx and connection errors, reading one instance back as JSON); this module
is that shared half, so both backends agree on what "reachable" and "shows the status" mean.

Credentials never leave :class:`Server`: requests go to a URL without userinfo and carry an
``Authorization`` header instead, and everything printable uses :func:`agent.config.redact_url`.
"""

from __future__ import annotations

import asyncio
import base64
import ipaddress
import json
import re
import ssl
from collections.abc import Awaitable, Callable, Mapping
from dataclasses import dataclass, field
from typing import Any, TypeVar
from urllib.parse import SplitResult, quote, unquote, urlsplit, urlunsplit

import aiohttp
import structlog
import yarl

from agent.config import Config, ascii_host, redact_url, redact_urls_in
from agent.registry import RegistryError

log = structlog.get_logger()

T = TypeVar("T")

JSON = "application/json"
# Eureka's own clients send this header only when one server replicates to another; a request
# that carries it is not replicated onwards, so the agent must never send it.
REPLICATION_HEADER = "x-netflix-discovery-replication"
# Backoff between attempts: short first (a loopback 503 during a server's start clears fast),
# capped so that a few attempts still fit a registry deadline of a few seconds.
FIRST_BACKOFF = 0.05
MAX_BACKOFF = 1.0
MIN_REQUEST_TIMEOUT = 0.05  # agent.config.MIN_REGISTRY_TIMEOUT_SECONDS counts on it
# Shares of PRESTOP_REGISTRY_TIMEOUT_SECONDS, counted from the start of the step: the status
# change (retries included) may use MARK_SHARE, reading it back runs until VERIFY_SHARE. Ending
# before the whole timeout means our own error, naming each server, beats main's bare timeout.
MARK_SHARE = 0.6
VERIFY_SHARE = 0.9
# Every answer is read through one bounded reader: a registry (or the app's health endpoint) is
# untrusted input, and a server that streams gigabytes must cost the agent a failed request, not
# its memory. Eureka's ``GET apps/{APP}`` is ~1.5 KB per instance, so 4 MiB is thousands of them.
MAX_ANSWER_BYTES = 4 * 1024 * 1024
READ_CHUNK = 64 * 1024
MAX_REASON = 200
MAX_FIELD = 200


class RequestFailed(Exception):
    """One request got no usable answer. ``retriable``: worth another attempt (timeouts,
    connection errors, 5xx); a 4xx or a certificate error will not get better by retrying."""

    def __init__(
        self, reason: str, *, retriable: bool, status: int | None = None, answered: bool = False
    ) -> None:
        super().__init__(reason)
        self.reason = reason
        self.retriable = retriable
        self.status = status
        self.answered = answered or status is not None
        """The server gave an HTTP answer (an error status, XML, a body of the wrong shape): it
        is reachable, and what it answered is the problem, not the network."""


@dataclass(frozen=True, slots=True)
class Server:
    """One Eureka service URL, split into what is sent and what may be shown."""

    base: str
    """The URL without userinfo, ending in ``/`` (``http://eureka-0:8761/eureka/``)."""
    shown: str
    """The configured URL with the password redacted: for logs, errors and ``check``."""
    authorization: str | None = field(default=None, repr=False, compare=False)
    """The ``Authorization`` header for the URL's credentials (basic auth, UTF-8)."""

    @classmethod
    def parse(cls, url: str) -> Server:
        """Split a ``defaultZone`` URL. Userinfo is percent-decoded, as Spring does, so that a
        password holding ``@``, ``:`` or ``%`` can be written in the URL at all."""
        parts = urlsplit(url)
        authorization = None
        if parts.username is not None:
            credentials = f"{unquote(parts.username)}:{unquote(parts.password or '')}"
            authorization = "Basic " + base64.b64encode(credentials.encode("utf-8")).decode()
        hostport = _ascii_hostport(parts)
        path = parts.path if parts.path.endswith("/") else parts.path + "/"
        base = urlunsplit((parts.scheme, hostport, path, "", ""))
        return cls(base=base, shown=redact_url(url), authorization=authorization)

    @classmethod
    def endpoint(cls, url: str) -> Server:
        """One URL requested as it is (an actuator or health endpoint, query kept, no ``/``
        appended), its credentials split off like a ``defaultZone`` URL's."""
        parts = urlsplit(url)
        hostport = _ascii_hostport(parts)
        base = urlunsplit((parts.scheme, hostport, parts.path or "/", parts.query, ""))
        return cls(base=base, shown=redact_url(url), authorization=cls.parse(url).authorization)


def _ascii_hostport(parts: SplitResult) -> str:
    """``host[:port]`` of a URL with an international host name in its IDNA form, so that the
    resolver, the Host header and TLS all get the same ASCII name."""
    hostport = parts.netloc.rpartition("@")[2]
    host = parts.hostname or ""
    if host.isascii():
        return hostport
    return ascii_host(host) + (f":{parts.port}" if parts.port is not None else "")


def segment(value: str) -> str:
    """One path segment, percent-encoded. ``:`` stays as is: Spring's instance ids
    (``host:app:port``) are sent that way by Eureka's own clients."""
    return quote(value, safe=":@")


def request_timeout(config: Config) -> float:
    """The timeout of one request: a third of the step's deadline, so that a server that hangs
    still leaves time for a retry or for the other servers' answers, and at most 5 s."""
    return max(MIN_REQUEST_TIMEOUT, min(5.0, config.registry_timeout_seconds / 3))


def ssl_context(ca_file: str | None) -> ssl.SSLContext | bool:
    """Verify Eureka's certificate against a private CA when one is configured, else the
    system's trust store (``True``: aiohttp's default verification)."""
    if not ca_file:
        return True
    return ssl.create_default_context(cafile=ca_file)


class Http:
    """Requests to Eureka servers over the agent's one shared session."""

    def __init__(
        self,
        session: aiohttp.ClientSession,
        *,
        timeout: float,
        ssl: ssl.SSLContext | bool = True,
    ) -> None:
        self.session = session
        self.timeout = timeout
        self._ssl = ssl

    async def request(
        self,
        server: Server,
        method: str,
        path: str,
        *,
        body: bytes | None = None,
        headers: Mapping[str, str] | None = None,
        until: float | None = None,
    ) -> tuple[int, bytes]:
        """Send ``method {server}{path}`` (``path`` already percent-encoded, query included).

        Returns ``(status, body)`` for any HTTP answer; raises :class:`RequestFailed` when there
        is none. The timeout is the per-request one, cut to what is left before ``until``.
        """
        timeout = self.timeout
        if until is not None:
            timeout = min(timeout, until - asyncio.get_running_loop().time())
        if timeout < MIN_REQUEST_TIMEOUT:
            raise RequestFailed("no time left for another request", retriable=False)
        sent = {"Accept": JSON, **(headers or {})}
        if server.authorization:
            sent["Authorization"] = server.authorization
        if body is None and method in ("PUT", "POST"):
            sent.setdefault("Content-Length", "0")
        url = yarl.URL(server.base + path, encoded=True)
        try:
            async with self.session.request(
                method,
                url,
                data=body,
                headers=sent,
                ssl=self._ssl,
                timeout=aiohttp.ClientTimeout(total=timeout),
                allow_redirects=False,
            ) as response:
                return response.status, await read_bounded(response)
        except RequestFailed:
            raise
        except TimeoutError:
            raise RequestFailed(f"no answer within {timeout:.3g}s", retriable=True) from None
        except aiohttp.ClientSSLError as exc:
            raise RequestFailed(f"TLS: {_reason(exc)}", retriable=False) from None
        except (aiohttp.ClientError, OSError) as exc:
            raise RequestFailed(_reason(exc), retriable=True) from None
        except Exception as exc:
            # Anything else (an unencodable host name in the resolver, a malformed header): the
            # request failed, the backend carries on with its other servers.
            raise RequestFailed(f"unexpected {_reason(exc)}", retriable=False) from None


async def read_bounded(response: aiohttp.ClientResponse, limit: int = MAX_ANSWER_BYTES) -> bytes:
    """The answer's body, refusing more than ``limit`` bytes: a promised (Content-Length) or
    streamed (chunked, endless) body over the limit is :class:`RequestFailed` before it is held
    in memory."""
    promised = response.content_length
    if promised is not None and promised > limit:
        raise RequestFailed(f"answer larger than {limit} bytes", retriable=False)
    chunks: list[bytes] = []
    size = 0
    while chunk := await response.content.read(READ_CHUNK):
        size += len(chunk)
        if size > limit:
            raise RequestFailed(f"answer larger than {limit} bytes", retriable=False)
        chunks.append(chunk)
    return b"".join(chunks)


def _reason(exc: BaseException) -> str:
    """An exception as a short reason. The request URL has no userinfo, but aiohttp's
    ``ClientResponseError`` quotes it whole, query string (a token) included: every URL in the
    text is redacted."""
    text = " ".join(str(exc).split()) or type(exc).__name__  # one line, whatever it quotes
    text = redact_urls_in(text)
    if len(text) > MAX_REASON:  # a message may quote the hostile answer itself
        text = text[:MAX_REASON] + "..."
    return f"{type(exc).__name__}: {text}"


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


# Answers about credentials: their body is about what the agent sent, never quoted.
CREDENTIAL_STATUSES = (401, 407)
MAX_SNIPPET = 120
# What an error page echoing the request could show of it: an Authorization value, a query.
_CREDENTIAL_IN_TEXT = re.compile(r"(?i)\b(basic|bearer|digest|negotiate|token)\b\s*[:=]?\s*\S+")
_QUERY_IN_TEXT = re.compile(r"\?[^\s\"'<>]*")


def error_snippet(body: bytes) -> str:
    """The start of an error answer, for a reason: one line, at most MAX_SNIPPET characters,
    with anything that could be what the agent sent (an echoed Authorization header, a query
    string, a URL's userinfo) redacted."""
    text = body[: MAX_SNIPPET * 4].decode("utf-8", "replace")
    text = " ".join(text.split())
    text = redact_urls_in(text)
    text = _CREDENTIAL_IN_TEXT.sub(lambda m: f"{m.group(1)} ***", text)
    text = _QUERY_IN_TEXT.sub("?***", text)
    return text if len(text) <= MAX_SNIPPET else text[:MAX_SNIPPET] + "..."


def check_status(status: int, body: bytes, ok: tuple[int, ...] = (200, 204)) -> None:
    """Turn an unwanted HTTP status into :class:`RequestFailed`: 5xx is worth a retry."""
    if status in ok:
        return
    if status in CREDENTIAL_STATUSES:
        reason = f"HTTP {status}: the credentials were refused"
    else:
        snippet = error_snippet(body)
        reason = f"HTTP {status}" + (f": {snippet}" if snippet else "")
    raise RequestFailed(reason, retriable=status >= 500, status=status)


async def retrying(
    attempt: Callable[[], Awaitable[T]],
    *,
    until: float,
    give_up: Callable[[], bool] = lambda: False,
) -> tuple[T, int]:
    """Run ``attempt`` until it succeeds, it fails for good, ``until`` (loop time) passes or
    ``give_up()`` says another way already won. Returns ``(result, attempts)``; raises the last
    :class:`RequestFailed`, its reason prefixed with the attempt count when there were several."""
    loop = asyncio.get_running_loop()
    delay = FIRST_BACKOFF
    attempts = 0
    while True:
        attempts += 1
        try:
            try:
                return await attempt(), attempts
            except RequestFailed:
                raise
            except Exception as unexpected:
                # A server's answer broke something in the attempt: that server failed, for good.
                raise RequestFailed(failure_reason(unexpected), retriable=False) from None
        except RequestFailed as exc:
            left = until - loop.time()
            if not exc.retriable or give_up() or left < delay + MIN_REQUEST_TIMEOUT:
                if attempts > 1:
                    exc.reason = f"{exc.reason} (after {attempts} attempts)"
                    exc.args = (exc.reason,)
                raise
            await asyncio.sleep(delay)
            delay = min(delay * 2, MAX_BACKOFF)


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


def parse_json(body: bytes) -> Any:
    """The answer as JSON, or :class:`RequestFailed` saying why not: bad encoding, truncated or
    malformed text, and nesting too deep for the parser (``RecursionError``) alike."""
    try:
        return json.loads(body)
    except UnicodeDecodeError:
        raise RequestFailed(
            "the answer is not JSON: not UTF-8 text", retriable=False, answered=True
        ) from None
    except ValueError as exc:
        reason = exc.msg if isinstance(exc, json.JSONDecodeError) else str(exc)
        raise RequestFailed(
            f"the answer is not JSON: {reason}", retriable=False, answered=True
        ) from None
    except RecursionError:
        raise RequestFailed(
            "the answer is not JSON: nested too deeply", retriable=False, answered=True
        ) from None


def failure_text(exc: BaseException) -> str:
    """One server's failed exchange as shown per server: ``answered: ...`` when it gave an
    HTTP answer that was not the one wanted (it is reachable), ``error: ...`` when it gave
    none."""
    answered = isinstance(exc, RequestFailed) and exc.answered
    return f"{'answered' if answered else 'error'}: {failure_reason(exc)}"


def failure_reason(exc: BaseException) -> str:
    """What one server's failed exchange is reported as: the reason of a
    :class:`RequestFailed`, or the type of an unexpected error (never its traceback)."""
    if isinstance(exc, RequestFailed):
        return exc.reason
    return f"unexpected {_reason(exc)}"


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

        async def read(server: Server) -> str:
            try:
                instance = await get_instance(http, server, app, instance_id, until=until)
            except Exception as exc:  # one server's bad answer must not hide another's
                return failure_text(exc)
            return "not listed" if instance is None else str(text_of(instance.get("status")))

        answers = await asyncio.gather(*(read(s) for s in servers))
        said = {s.shown: a for s, a in zip(servers, answers, strict=True)}
        if expected in answers:
            return said
        if until - loop.time() < delay + MIN_REQUEST_TIMEOUT:
            shown = "; ".join(f"{url}: {answer}" for url, answer in said.items())
            raise RequestFailed(f"no server shows {expected}: {shown}", retriable=False)
        await asyncio.sleep(delay)
        delay = min(delay * 2, MAX_BACKOFF)
