"""The agent's one outbound HTTP client: bounded requests over the shared session, and URLs.

Every server the agent asks (the Eureka servers, the app's actuator and health endpoints) is
untrusted input and may be slow, hostile or gone. One client therefore owns what any request
needs: credentials split off the URL into an ``Authorization`` header, a per-request timeout cut to
the caller's deadline, a size cap on every answer, retries with backoff on 5xx and connection
errors, and reasons that never quote a credential or a traceback. :class:`AppHealth` (/ready's
check of the app) is its one caller outside the registry. The URL helpers (checking a host,
redacting a URL) live here too, so that a URL is parsed, sent and shown by one module;
:mod:`agent.config` uses them to validate the settings.

Eureka's own wire format (its JSON, its paths, how a status is read back) is in
:mod:`agent.registry.wire`.
"""

from __future__ import annotations

import asyncio
import base64
import ipaddress
import json
import re
import ssl
import time
from collections.abc import Awaitable, Callable, Mapping
from dataclasses import dataclass, field
from typing import Any, TypeVar
from urllib.parse import SplitResult, quote, unquote, urlsplit, urlunsplit

import aiohttp
import yarl

T = TypeVar("T")

JSON = "application/json"
REDACTED = "***"
# Backoff between attempts: short first (a loopback 503 during a server's start clears fast),
# capped so that a few attempts still fit a registry deadline of a few seconds.
FIRST_BACKOFF = 0.05
MAX_BACKOFF = 1.0
MIN_REQUEST_TIMEOUT = 0.05  # agent.config.MIN_REGISTRY_TIMEOUT_SECONDS counts on it
# Every answer is read through one bounded reader: a registry (or the app's health endpoint) is
# untrusted input, and a server that streams gigabytes must cost the agent a failed request, not
# its memory. Eureka's ``GET apps/{APP}`` is ~1.5 KB per instance, so 4 MiB is thousands of them.
MAX_ANSWER_BYTES = 4 * 1024 * 1024
READ_CHUNK = 64 * 1024
MAX_REASON = 200


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


# --------------------------------------------------------------------------------------------
# URLs: checked, and shown without their secrets.


def redact_url(url: str) -> str:
    """Hide the password and the query string (which may carry tokens) of a URL.

    Works on malformed URLs too (they end up in error messages): everything between the scheme
    and the last ``@`` is credentials, whatever characters the password holds.
    """
    scheme, sep, rest = url.partition("://")
    if not sep:
        scheme, rest = "", url
    if "@" in rest:
        userinfo, _, rest = rest.rpartition("@")
        rest = f"{userinfo.split(':', 1)[0]}:{REDACTED}@{rest}"
    if "?" in rest:
        rest = rest.split("?", 1)[0] + "?" + REDACTED
    return f"{scheme}{sep}{rest}"


# A URL inside free text (an HTTP client's error message quotes the request's URL): from its
# scheme to the first space, quote or bracket.
_URL_IN_TEXT = re.compile(r"\b[a-zA-Z][a-zA-Z0-9+.-]*://[^\s'\"<>]+")


def redact_urls_in(text: str) -> str:
    """``text`` with every URL in it passed through :func:`redact_url`: for any message built
    from an HTTP client's error, which may carry the request's query token."""
    return _URL_IN_TEXT.sub(lambda match: redact_url(match.group(0)), text)


_LABEL = re.compile(r"[a-z0-9_]([a-z0-9_-]*[a-z0-9_])?", re.ASCII | re.IGNORECASE)
MAX_LABEL = 63
MAX_HOST_NAME = 253


def ascii_host(host: str) -> str:
    """A host name checked by :func:`check_host` as resolvers and TLS want it (IDNA, ``xn--``)."""
    if host.isascii():
        return host
    # Label by label, ASCII labels as they are (the codec would refuse a long one with a vaguer
    # message than check_host's).
    return ".".join(
        label if label.isascii() else label.encode("idna").decode("ascii")
        for label in host.split(".")
    )


def check_host(host: str) -> None:
    """Raise ValueError unless ``host`` is an IP address or a host name that resolvers and
    URL libraries accept: IDNA-encodable, no empty label (``a..b``, a leading dot), labels of
    at most 63 characters, at most 253 in all, letters, digits, ``-`` and ``_``. A name that
    fails here would otherwise fail later, inside a request, as a UnicodeError."""
    try:
        ipaddress.ip_address(host)
        return
    except ValueError:
        pass
    name = host[:-1] if host.endswith(".") else host  # one trailing dot: a fully qualified name
    if not name:
        raise ValueError("has an empty host name")
    labels = name.split(".")
    if any(not label for label in labels):
        raise ValueError(f"host {host!r} has an empty label (a leading dot or '..')")
    try:
        encoded = ascii_host(name).split(".")
    except UnicodeError:
        raise ValueError(f"host {host!r} is not a valid international (IDNA) name") from None
    for label in encoded:
        if len(label) > MAX_LABEL:
            raise ValueError(f"host {host!r} has a label longer than {MAX_LABEL} characters")
        if not _LABEL.fullmatch(label):
            raise ValueError(
                f"host {host!r}: a label may hold letters, digits, '-' and '_', and may not"
                " begin or end with '-'"
            )
    if len(".".join(encoded)) > MAX_HOST_NAME:
        raise ValueError(f"host {host!r} is longer than {MAX_HOST_NAME} characters")


class AppHealth:
    """The app's own health, for /ready, asked at most once per ``cache_seconds``.

    A readiness probe storm (or several probes at once) must not turn into a request storm
    against the app, so concurrent callers share one in-flight check and its result is cached.
    """

    def __init__(
        self,
        url: str,
        session: aiohttp.ClientSession,
        *,
        timeout_seconds: float = 1.0,
        cache_seconds: float = 1.0,
        clock: Callable[[], float] = time.monotonic,
    ) -> None:
        # The app's answer is untrusted input too: the same bounded client as the registry's
        # (size cap, credentials in the URL sent as basic auth and never shown, any failure a
        # reason).
        self._http = Http(session, timeout=timeout_seconds)
        self._endpoint = Server.endpoint(url)
        self._cache_seconds = cache_seconds
        self._clock = clock
        self._checked_at = -float("inf")
        self._healthy = False
        self._reason = "not checked yet"
        self._lock = asyncio.Lock()

    async def check(self) -> tuple[bool, str]:
        """(healthy, reason) from the cache or one fresh request."""
        async with self._lock:
            if self._clock() - self._checked_at >= self._cache_seconds:
                self._healthy, self._reason = await self._ask()
                self._checked_at = self._clock()
            return self._healthy, self._reason

    async def _ask(self) -> tuple[bool, str]:
        try:
            status, _ = await self._http.request(
                self._endpoint, "GET", "", headers={"Accept": "*/*"}
            )
        except Exception as exc:  # RequestFailed, or a bug: either way "not healthy", said why
            return False, f"app health unreachable: {failure_reason(exc)}"
        if 200 <= status < 300:
            return True, "app healthy"
        return False, f"app health answered {status}"
