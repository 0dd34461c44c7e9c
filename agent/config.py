"""The agent's one configuration: parsed from the environment in one place, validated, redacted.

Environment variables are the contract (they are what a pod spec sets); the CLI's flags are turned
into the same variable names before parsing, so there is exactly one parser and one set of checks.
Nothing else in the agent reads ``os.environ``.

The grace-budget arithmetic lives here too, because a drain that cannot fit the pod's
``terminationGracePeriodSeconds`` is a configuration error, caught at start-up rather than
discovered as a SIGKILL in the middle of a rollout.
"""

from __future__ import annotations

import dataclasses
import difflib
import ipaddress
import math
import ssl
from collections.abc import Callable, Iterable, Mapping
from dataclasses import dataclass, field
from typing import Any
from urllib.parse import urlsplit

from agent.http import REDACTED, check_host, redact_url

Network = ipaddress.IPv4Network | ipaddress.IPv6Network

DRAIN_LENGTHS = {"fixed": "drain_seconds", "traffic": "drain_max_seconds"}
"""Each drain mode (:data:`agent.drain.STRATEGIES` has the same names) and the field that sets its
longest drain; unset (None): whatever the grace budget leaves."""
DRAIN_MODES = tuple(DRAIN_LENGTHS)
DRAIN_SOURCES = ("auto", "netlink", "proc")
REGISTRIES = ("none", "eureka", "actuator", "register")
WITH_A_REGISTRY = REGISTRIES[1:]
"""Every backend but ``none``: what settings about the registry apply to."""
EUREKA_STATUSES = ("DOWN", "OUT_OF_SERVICE")
LOG_FORMATS = ("auto", "json", "console")
LOG_LEVELS = ("debug", "info", "warning", "error")
ALL_ADDRESSES = "*"
"""How an unset PRESTOP_HOST is shown: every IPv4 address, and every IPv6 one when there is IPv6."""
DEFAULT_APP_PORT = 8080  # Spring Boot's server.port default
# The mark-down gets 60 % of PRESTOP_REGISTRY_TIMEOUT_SECONDS for at least two requests (read the
# instance, PUT its status) of at least 0.05 s each (agent.http): below this, it could
# never succeed.
MIN_REGISTRY_TIMEOUT_SECONDS = 0.25


class ConfigError(ValueError):
    """A bad setting; the message names the variable, its (redacted) value and what is allowed."""


@dataclass(frozen=True, slots=True)
class Budget:
    """How the pod's grace period is spent after the first trigger, in seconds."""

    grace_period: float
    registry_deadline: float
    app_shutdown: float
    margin: float
    drain: float
    """Longest the drain may last: ``drain_seconds`` (fixed) or ``drain_max_seconds`` (traffic)."""

    @property
    def answer_by(self) -> float:
        """Seconds after the trigger by which every /prestop caller has its answer: after it,
        the app needs its shutdown time, and the margin stays back, before the kubelet's
        SIGKILL at the end of the grace period."""
        return self.grace_period - self.app_shutdown - self.margin

    @property
    def linger_until(self) -> float:
        """Seconds after the trigger until which the agent may stay up after the drain: the
        grace period less the margin, just before the kubelet's SIGKILL."""
        return self.grace_period - self.margin

    @property
    def available_for_drain(self) -> float:
        """What is left for the drain once everything else has its share."""
        return self.answer_by - self.registry_deadline

    def grace_for(self, drain: float) -> int:
        """The grace period, in whole seconds as Kubernetes takes it, that a drain of ``drain``
        seconds needs with everything else's share."""
        return math.ceil(drain + self.registry_deadline + self.app_shutdown + self.margin)

    @property
    def fits(self) -> bool:
        return self.drain <= self.available_for_drain + 1e-9

    def arithmetic(self) -> str:
        """The sum, spelled out, for error messages and ``prestop-agent check``."""
        used = self.drain + self.registry_deadline + self.app_shutdown + self.margin
        relation = "<=" if self.fits else ">"
        return (
            f"drain {self.drain:g}s + registry deadline {self.registry_deadline:g}s"
            f" + app shutdown {self.app_shutdown:g}s + margin {self.margin:g}s"
            f" = {used:g}s {relation} grace period {self.grace_period:g}s"
        )


# --------------------------------------------------------------------------------------------
# Parsing. Each parser takes the raw string and raises ValueError with what is allowed.


@dataclass(frozen=True, slots=True)
class Choice:
    """A parser for one of a few words (``--help`` lists them)."""

    allowed: tuple[str, ...]
    upper: bool = False
    aliases: tuple[tuple[str, str], ...] = ()
    """Other spellings accepted for an allowed word."""

    def __call__(self, raw: str) -> str:
        value = raw.strip().upper() if self.upper else raw.strip().lower()
        value = dict(self.aliases).get(value, value)
        if value not in self.allowed:
            raise ValueError(f"must be one of {', '.join(self.allowed)}")
        return value


def _seconds(*, minimum: float = 0.0, allow_zero: bool = True) -> Callable[[str], float]:
    def parse(raw: str) -> float:
        try:
            value = float(raw)
        except ValueError:
            raise ValueError("must be a number of seconds") from None
        if not math.isfinite(value) or value < minimum or (value == 0 and not allow_zero):
            bound = f"> {minimum:g}" if not allow_zero else f">= {minimum:g}"
            raise ValueError(f"must be a finite number of seconds {bound}")
        return value + 0.0  # -0 is 0 (shown "0s", not "-0s")

    return parse


def _port(raw: str) -> int:
    try:
        value = int(raw)
    except ValueError:
        raise ValueError("must be a TCP port, an integer 1-65535") from None
    if not 1 <= value <= 65535:
        raise ValueError("must be a TCP port, an integer 1-65535")
    return value


# The traffic drain's netlink filter tests each run of consecutive ports once; this many runs
# keep its program inside the kernel's 16-bit attribute length, far beyond any real app.
MAX_PORT_RANGES = 1024


def port_ranges(ports: Iterable[int]) -> list[tuple[int, int]]:
    """Consecutive ports merged into ``(low, high)`` ranges, in order (what the drain's socket
    filter tests, and what the limit above counts)."""
    ranges: list[tuple[int, int]] = []
    for port in sorted(set(ports)):
        if ranges and ranges[-1][1] == port - 1:
            ranges[-1] = (ranges[-1][0], port)
        else:
            ranges.append((port, port))
    return ranges


def _ports(raw: str) -> tuple[int, ...]:
    items = [item.strip() for item in raw.split(",") if item.strip()]
    if not items:
        raise ValueError("must be a comma-separated list of TCP ports 1-65535")
    try:
        ports = tuple(dict.fromkeys(_port(item) for item in items))
    except ValueError:
        raise ValueError("must be a comma-separated list of TCP ports 1-65535") from None
    runs = len(port_ranges(ports))
    if runs > MAX_PORT_RANGES:
        raise ValueError(
            f"has {runs} runs of consecutive ports; at most {MAX_PORT_RANGES} can be watched"
        )
    return ports


def _cidrs(raw: str) -> tuple[Network, ...]:
    networks = []
    for item in (i.strip() for i in raw.split(",")):
        if not item:
            continue
        try:
            networks.append(ipaddress.ip_network(item, strict=False))
        except ValueError:
            raise ValueError(
                f"{item!r} is not a CIDR; expected comma-separated CIDRs like 10.0.0.0/8,::1/128"
            ) from None
    return tuple(networks)


def _bool(raw: str) -> bool:
    value = raw.strip().lower()
    if value in ("1", "true", "yes", "on"):
        return True
    if value in ("0", "false", "no", "off", ""):
        return False
    raise ValueError("must be true or false")


def _http_url(raw: str) -> str:
    url = raw.strip()
    _check_userinfo(url)
    try:
        parts = urlsplit(url)
    except ValueError:  # an unclosed or invalid [IPv6] literal
        raise ValueError("must be an http:// or https:// URL with a valid host") from None
    try:
        port = parts.port  # a port out of range or not a number raises here
    except ValueError:
        raise ValueError("must be an http:// or https:// URL with a valid port") from None
    if parts.scheme not in ("http", "https") or not parts.hostname:
        raise ValueError("must be an http:// or https:// URL with a host")
    if port == 0:
        raise ValueError("must be an http:// or https:// URL with a port 1-65535")
    if any(c.isspace() or not c.isprintable() for c in url):
        raise ValueError("must not contain spaces or control characters")
    check_host(parts.hostname)
    return url


def _check_userinfo(url: str) -> None:
    """Refuse credentials whose password holds an unencoded ``#``, ``/`` or ``?``: the URL then
    ends its host part there (``http://user:123#x@eureka:8761/`` is host ``user``, port 123),
    requests go to that host, and errors print what should have been the password."""
    rest = url.partition("://")[2]
    userinfo, at, _ = rest.rpartition("@")
    if not at:
        return
    if any(c in userinfo for c in "#/?"):
        raise ValueError(
            "the part before '@' holds '#', '/' or '?', which end a URL's host part: encode"
            " them in a password as %23, %2F and %3F (and '@' in a path as %40)"
        )


def _http_urls(raw: str) -> tuple[str, ...]:
    urls = [item.strip() for item in raw.split(",") if item.strip()]
    if not urls:
        raise ValueError("must be comma-separated http(s) URLs")
    # Spring's defaultZone URLs end in "/"; requests are built by appending "apps/...".
    return tuple(_http_url(url).rstrip("/") + "/" for url in urls)


def _ip(raw: str) -> str:
    if not raw.strip():
        return ""
    try:
        return str(ipaddress.ip_address(raw.strip()))
    except ValueError:
        raise ValueError("must be an IPv4 or IPv6 address") from None


def _text(raw: str) -> str:
    return raw.strip()


def _listen_host(raw: str) -> str:
    value = raw.strip()
    if not value:
        raise ValueError("must be an address to listen on, e.g. 0.0.0.0 or ::, or unset for both")
    check_host(value)
    return value


def _whole_seconds(raw: str) -> float:
    value = _seconds(allow_zero=False)(raw)
    if not value.is_integer():
        raise ValueError(
            "must be whole seconds, as the pod's terminationGracePeriodSeconds (an integer)"
        )
    return value


def _optional_text(raw: str) -> str | None:
    return raw.strip() or None


# aiohttp refuses a header line longer than 8190 bytes with 400: a longer token could never be
# sent to /prestop at all. Half that leaves room for the header's name and any proxy's limits.
MAX_TOKEN_BYTES = 4096


def _token(raw: str) -> str | None:
    token = raw.strip()
    if len(token.encode("utf-8", "surrogateescape")) > MAX_TOKEN_BYTES:
        raise ValueError(
            f"is longer than {MAX_TOKEN_BYTES} bytes: the X-Prestop-Token header would exceed"
            " the HTTP parser's line limit and every hook would get 400"
        )
    return token or None


def _optional_url(raw: str) -> str | None:
    return _http_url(raw) if raw.strip() else None


LOG_LEVEL = Choice(LOG_LEVELS, aliases=(("warn", "warning"),))


# Variable name -> (Config field, parser). Fields without a variable keep their default.


# --------------------------------------------------------------------------------------------
# Each setting's facts, on its Config field: the variable, its parser, the group it is shown in,
# what it means, and which drain modes and registry backends read it. ``load``, ``check``,
# ``--help`` and docs/reference.md all read them from here, at run time, without the source.

VARIABLE = "variable"
"""The key of a Config field's :class:`Variable` in its ``metadata``."""
LISTENER = "The agent's own listener"
DRAIN = "The drain"
BUDGET = "The grace budget"
APP = "The app"
CALLERS = "Who may call /prestop"
LOGS = "Logs"
POD = "The pod, from the downward API"
REGISTRY = "The registry"
KUBERNETES = "Kubernetes"


@dataclass(frozen=True, slots=True)
class Variable:
    """The environment variable that sets one Config field, and its facts."""

    name: str
    parse: Callable[[str], Any]
    """Raw text to value; raises ValueError saying what is allowed."""
    section: str
    doc: str
    """What it means, one paragraph (the reference's and ``--help``'s text)."""
    modes: tuple[str, ...] = ()
    """The drain modes that read it; empty: every mode."""
    registries: tuple[str, ...] = ()
    """The registry backends that read it; empty: every backend."""
    flag: bool = False
    """Whether ``prestop-agent`` has a flag for it (``--`` and the name without ``PRESTOP_``)."""

    @property
    def choices(self) -> tuple[str, ...]:
        return self.parse.allowed if isinstance(self.parse, Choice) else ()


def setting(
    default: Any,
    name: str,
    parse: Callable[[str], Any],
    section: str,
    *doc: str,
    modes: tuple[str, ...] = (),
    registries: tuple[str, ...] = (),
    flag: bool = False,
) -> Any:
    """A Config field set by the variable ``name``."""
    variable = Variable(
        name, parse, section, " ".join("".join(doc).split()), modes, registries, flag
    )
    return field(default=default, metadata={VARIABLE: variable})


@dataclass(frozen=True, slots=True)
class Config:
    """Everything the agent can be told. Durations are in seconds, ports are TCP ports."""

    host: str | None = setting(
        None,
        "PRESTOP_HOST",
        _listen_host,
        LISTENER,
        "address to listen on. Unset: every IPv4 address, and every IPv6 address too when the "
        "host has IPv6 (an IPv6-only or dual-stack pod gets its hook); ``::`` means both as "
        "well. The kubelet sends the httpGet hook to the pod IP, so a loopback-only address "
        "cannot receive it.",
        flag=True,
    )
    port: int = setting(
        8099,
        "PRESTOP_PORT",
        _port,
        LISTENER,
        "port of /prestop, /ready, /live, /status and /metrics.",
        flag=True,
    )
    drain_mode: str = setting(
        "traffic",
        "PRESTOP_DRAIN_MODE",
        Choice(DRAIN_MODES),
        DRAIN,
        "``fixed`` (sleep ``drain_seconds``) or ``traffic`` (until it stops).",
        flag=True,
    )
    drain_seconds: float = setting(
        10.0,
        "PRESTOP_DRAIN_SECONDS",
        _seconds(),
        DRAIN,
        "how long the fixed drain keeps the app serving, seconds.",
        modes=("fixed",),
        flag=True,
    )
    drain_min_seconds: float = setting(
        2.0,
        "PRESTOP_DRAIN_MIN_SECONDS",
        _seconds(),
        DRAIN,
        "the traffic drain lasts at least this long, seconds.",
        modes=("traffic",),
        flag=True,
    )
    drain_quiet_seconds: float = setting(
        3.0,
        "PRESTOP_DRAIN_QUIET_SECONDS",
        _seconds(allow_zero=False),
        DRAIN,
        "the traffic drain ends after this long without data, seconds.",
        modes=("traffic",),
        flag=True,
    )
    drain_max_seconds: float | None = setting(
        None,
        "PRESTOP_DRAIN_MAX_SECONDS",
        _seconds(allow_zero=False),
        DRAIN,
        "the traffic drain ends at this point whatever happens, seconds. Unset: everything "
        "the grace budget leaves (see :class:`Budget`).",
        modes=("traffic",),
        flag=True,
    )
    drain_poll_seconds: float = setting(
        0.2,
        "PRESTOP_DRAIN_POLL_SECONDS",
        _seconds(minimum=0.01),
        DRAIN,
        "interval between two looks at the app's sockets, seconds.",
        modes=("traffic",),
    )
    drain_source: str = setting(
        "auto",
        "PRESTOP_DRAIN_SOURCE",
        Choice(DRAIN_SOURCES),
        DRAIN,
        "``auto`` (netlink sock_diag, else /proc), ``netlink`` or ``proc``.",
        modes=("traffic",),
        flag=True,
    )
    drain_ignore_cidrs: tuple[Network, ...] = setting(
        (),
        "PRESTOP_DRAIN_IGNORE_CIDRS",
        _cidrs,
        DRAIN,
        "peers whose traffic does not hold the drain (kubelet probes, Prometheus scraping the "
        "app), comma-separated CIDRs.",
        modes=("traffic",),
    )
    drain_count_accepts: bool = setting(
        True,
        "PRESTOP_DRAIN_COUNT_ACCEPTS",
        _bool,
        DRAIN,
        "count connections accepted in the pod's network namespace (/proc/net/snmp "
        "PassiveOpens) that no socket the drain saw accounts for as traffic: a client that "
        "opens a connection, sends a request and closes between two polls. Turn off only for "
        "``hostNetwork`` pods, whose count is the whole node's.",
        modes=("traffic",),
    )
    app_port: int = setting(
        DEFAULT_APP_PORT,
        "PRESTOP_APP_PORT",
        _port,
        DRAIN,
        "the app's serving port (used to find the instance in Eureka).",
        flag=True,
    )
    app_ports: tuple[int, ...] = setting(
        (DEFAULT_APP_PORT,),
        "PRESTOP_APP_PORTS",
        _ports,
        DRAIN,
        "ports whose traffic the traffic drain watches; default ``app_port``.",
        flag=True,
    )
    grace_period_seconds: float = setting(
        30.0,
        "PRESTOP_GRACE_PERIOD_SECONDS",
        _whole_seconds,
        BUDGET,
        "the pod's terminationGracePeriodSeconds, whole seconds (as Kubernetes takes it).",
        flag=True,
    )
    app_shutdown_seconds: float = setting(
        5.0,
        "PRESTOP_APP_SHUTDOWN_SECONDS",
        _seconds(),
        BUDGET,
        "time the app needs between its SIGTERM and exit.",
    )
    margin_seconds: float = setting(
        1.0,
        "PRESTOP_MARGIN_SECONDS",
        _seconds(),
        BUDGET,
        "slack kept back; the kubelet subtracts the hook's time in whole seconds, so up to "
        "one second can be lost to rounding.",
    )
    app_health_url: str | None = setting(
        None,
        "PRESTOP_APP_HEALTH_URL",
        _optional_url,
        APP,
        "when set, /ready also requires this URL to answer 2xx.",
    )
    token: str | None = setting(
        None,
        "PRESTOP_TOKEN",
        _token,
        CALLERS,
        "when set, /prestop requires header ``X-Prestop-Token`` with this value.",
    )
    allow_cidrs: tuple[Network, ...] = setting(
        (),
        "PRESTOP_ALLOW_CIDRS",
        _cidrs,
        CALLERS,
        "when set, only these source addresses may call /prestop.",
    )
    log_format: str = setting(
        "auto",
        "PRESTOP_LOG_FORMAT",
        Choice(LOG_FORMATS),
        LOGS,
        "``json``, ``console``, or ``auto`` (JSON unless stderr is a TTY).",
        flag=True,
    )
    log_level: str = setting(
        "info",
        "PRESTOP_LOG_LEVEL",
        LOG_LEVEL,
        LOGS,
        "debug, info, warning or error.",
        flag=True,
    )
    pod_name: str = setting(
        "",
        "POD_NAME",
        _text,
        POD,
        "metadata.name, for logs and metrics.",
    )
    pod_namespace: str = setting(
        "",
        "POD_NAMESPACE",
        _text,
        POD,
        "metadata.namespace, for logs and metrics.",
    )
    pod_ip: str = setting(
        "",
        "POD_IP",
        _ip,
        POD,
        "status.podIP; identifies the instance in Eureka.",
    )
    registry: str = setting(
        "none",
        "PRESTOP_REGISTRY",
        Choice(REGISTRIES),
        REGISTRY,
        "``none``, ``eureka``, ``actuator`` or ``register``.",
        flag=True,
    )
    registry_timeout_seconds: float = setting(
        5.0,
        "PRESTOP_REGISTRY_TIMEOUT_SECONDS",
        _seconds(minimum=MIN_REGISTRY_TIMEOUT_SECONDS),
        REGISTRY,
        "bound on the whole mark-down step, retries included.",
        registries=WITH_A_REGISTRY,
    )
    registry_check_seconds: float = setting(
        30.0,
        "PRESTOP_REGISTRY_CHECK_SECONDS",
        _seconds(minimum=0.1),
        REGISTRY,
        "interval of the registry health check, from start-up until the shutdown begins, "
        "seconds (checked sooner while the instance is not found yet).",
        registries=WITH_A_REGISTRY,
    )
    eureka_urls: tuple[str, ...] = setting(
        (),
        "PRESTOP_EUREKA_URLS",
        _http_urls,
        REGISTRY,
        "Eureka service URLs as in Spring's defaultZone, comma-separated; may carry "
        "credentials (never logged).",
        registries=WITH_A_REGISTRY,
    )
    eureka_ca_file: str | None = setting(
        None,
        "PRESTOP_EUREKA_CA_FILE",
        _optional_text,
        REGISTRY,
        "PEM bundle of a private CA for https Eureka URLs.",
        registries=WITH_A_REGISTRY,
    )
    eureka_app: str = setting(
        "",
        "PRESTOP_EUREKA_APP",
        _text,
        REGISTRY,
        "the application name in Eureka (e.g. ``ORDERS``).",
        registries=WITH_A_REGISTRY,
    )
    eureka_instance_id: str = setting(
        "",
        "PRESTOP_EUREKA_INSTANCE_ID",
        _text,
        REGISTRY,
        "the instance id; unset: found by POD_IP and app port.",
        registries=WITH_A_REGISTRY,
    )
    eureka_status: str = setting(
        "DOWN",
        "PRESTOP_EUREKA_STATUS",
        Choice(EUREKA_STATUSES, upper=True),
        REGISTRY,
        "the status override to set, ``DOWN`` or ``OUT_OF_SERVICE``.",
        registries=WITH_A_REGISTRY,
    )
    eureka_keep_override: bool = setting(
        False,
        "PRESTOP_EUREKA_KEEP_OVERRIDE",
        _bool,
        REGISTRY,
        "keep a DOWN override left by a previous pod at start-up.",
        registries=("eureka",),
    )
    eureka_renewal_seconds: float = setting(
        30.0,
        "PRESTOP_EUREKA_RENEWAL_SECONDS",
        _seconds(allow_zero=False),
        REGISTRY,
        "lease renewal interval in ``register`` mode.",
        registries=("register",),
    )
    eureka_lease_seconds: float = setting(
        90.0,
        "PRESTOP_EUREKA_LEASE_SECONDS",
        _seconds(allow_zero=False),
        REGISTRY,
        "lease duration announced in ``register`` mode.",
        registries=("register",),
    )
    actuator_url: str = setting(
        "http://127.0.0.1:8080/actuator/serviceregistry",
        "PRESTOP_ACTUATOR_URL",
        _http_url,
        REGISTRY,
        "the app's service-registry actuator endpoint.",
        registries=("actuator",),
    )
    eureka_client_refresh_seconds: float = setting(
        70.0,
        "PRESTOP_EUREKA_CLIENT_REFRESH_SECONDS",
        _seconds(),
        REGISTRY,
        "how long a Eureka client may keep routing to the instance after its server's "
        "client-facing view changed: the clients' registry fetch interval plus their load "
        "balancer's cache TTL (Spring Cloud: 30 s + 35 s) plus a margin (default 5 s) for the "
        "fetch's own duration, seconds.",
        registries=WITH_A_REGISTRY,
    )
    eureka_server_cache_seconds: float = setting(
        30.0,
        "PRESTOP_EUREKA_SERVER_CACHE_SECONDS",
        _seconds(),
        REGISTRY,
        "bound on the Eureka server's read-only response cache "
        "(``responseCacheUpdateIntervalMs``), assumed when its client-facing view cannot be "
        "watched (actuator mode without URLs, a server that stops answering), seconds.",
        registries=WITH_A_REGISTRY,
    )
    kubernetes_service_host: str | None = setting(
        None,
        "KUBERNETES_SERVICE_HOST",
        _optional_text,
        KUBERNETES,
        "the API server's address, set by the kubelet in every container. Set (with POD_IP): "
        "the agent runs in a cluster, watches the EndpointSlices that list the pod and reads "
        "the pod's real grace period at the trigger, and posts Events on the pod (with POD_NAME "
        "and POD_NAMESPACE); unset: none of these.",
    )
    kubernetes_service_port: int = setting(
        443,
        "KUBERNETES_SERVICE_PORT",
        _port,
        KUBERNETES,
        "the API server's port, set by the kubelet with the host.",
    )
    kube_proxy_sync_seconds: float = setting(
        5.0,
        "PRESTOP_KUBE_PROXY_SYNC_SECONDS",
        _seconds(),
        KUBERNETES,
        "how long kube-proxy (and gateways watching the EndpointSlices) may keep sending new "
        "connections to the pod after every slice listing it shows it not ready, seconds. "
        "Measured on this project's one-node cluster (iptables mode): 0.00-0.13 s from the "
        "slice update to the pod IP leaving the node's rules on a quiet node, up to 1.44 s "
        "after the trigger (the slice updated at or before it) with the machine's two cores "
        "busy (tests/kube/test_sources.py). The default leaves a wide margin "
        "for what that cluster does not show: kube-proxy batches changes (``minSyncPeriod``, "
        "1 s by default), a full iptables-restore with thousands of Services takes seconds, "
        "and ingress controllers push endpoints on their own period.",
    )

    def budget(self) -> Budget:
        """The grace-period arithmetic for this configuration."""
        partial = Budget(
            grace_period=self.grace_period_seconds,
            registry_deadline=self.registry_deadline,
            app_shutdown=self.app_shutdown_seconds,
            margin=self.margin_seconds,
            drain=0.0,
        )
        drain = getattr(self, DRAIN_LENGTHS[self.drain_mode])
        if drain is None:
            drain = partial.available_for_drain
        return dataclasses.replace(partial, drain=drain)

    @property
    def registry_deadline(self) -> float:
        """Seconds the mark-down step may take; nothing when there is no registry."""
        return 0.0 if self.registry == "none" else self.registry_timeout_seconds

    @property
    def drain_limit(self) -> float:
        """The longest the drain step may last, seconds."""
        return self.budget().drain

    @property
    def in_cluster(self) -> bool:
        """Whether the agent runs in a Kubernetes pod it can name: the API server is known
        (KUBERNETES_SERVICE_HOST) and so is the pod's IP, which the EndpointSlices list."""
        return bool(self.kubernetes_service_host) and bool(self.pod_ip)

    @property
    def watches_client_view(self) -> bool:
        """Whether the agent can watch the Eureka servers' client-facing view of the instance."""
        return self.registry in ("eureka", "register") or (
            self.registry == "actuator"
            and bool(self.eureka_urls)
            and bool(self.eureka_app)
            and bool(self.pod_ip or self.eureka_instance_id)
        )

    def redacted(self) -> dict[str, Any]:
        """Every setting, with secrets replaced, for /status, ``check`` and logs."""
        shown: dict[str, Any] = {}
        for f in dataclasses.fields(self):
            value = getattr(self, f.name)
            if f.name == "token":
                value = REDACTED if value else None
            elif f.name == "eureka_urls":
                value = [redact_url(url) for url in value]
            elif f.name in ("app_health_url", "actuator_url") and value:
                value = redact_url(value)
            elif isinstance(value, tuple):
                value = [str(item) if not isinstance(item, int) else item for item in value]
            elif f.name == "drain_max_seconds" and value is None:
                value = self.drain_limit  # what the budget leaves: the value in effect
            elif f.name == "host" and value is None:
                value = ALL_ADDRESSES
            shown[f.name] = value
        return shown

    def __repr__(self) -> str:
        settings = ", ".join(f"{k}={v!r}" for k, v in self.redacted().items())
        return f"Config({settings})"


def variables() -> tuple[tuple[str, Variable], ...]:
    """Every ``(field name, variable)`` of Config, in declaration order."""
    return tuple((f.name, f.metadata[VARIABLE]) for f in dataclasses.fields(Config))


_VARIABLES: dict[str, tuple[str, Callable[[str], Any]]] = {
    variable.name: (name, variable.parse) for name, variable in variables()
}
"""Variable name -> (Config field, parser), derived from the fields."""


def variable_of(field_name: str) -> str:
    """The environment variable that sets a Config field."""
    return Config.__dataclass_fields__[field_name].metadata[VARIABLE].name


VARIABLES = tuple(_VARIABLES)
"""Every environment variable the agent reads, derived from Config's fields (so a new setting is
known, validated, fuzzed and suggested without another list to keep), for the README and
``check``."""
PREFIX = "PRESTOP_"


def unknown_variables(environ: Mapping[str, str]) -> list[str]:
    """One warning per ``PRESTOP_*`` variable the agent does not read (a typo does nothing,
    silently, otherwise), naming the closest variable it does read. Values are not shown: a
    misspelt PRESTOP_TOKEN is still a secret."""
    warnings = []
    for name in sorted(environ):
        if not name.startswith(PREFIX) or name in VARIABLES:
            continue
        close = difflib.get_close_matches(name, VARIABLES, n=1, cutoff=0.6)
        hint = f"did you mean {close[0]}?" if close else "no variable of that name exists"
        warnings.append(f"{name} is not a prestop-agent variable and is ignored; {hint}")
    return warnings


def _shown(name: str, raw: str) -> str:
    if name == "PRESTOP_TOKEN":
        return REDACTED
    if name == "PRESTOP_EUREKA_URLS":
        return ",".join(redact_url(u.strip()) for u in raw.split(","))
    if name.endswith("_URL"):
        return redact_url(raw)
    return raw


def load(environ: Mapping[str, str]) -> Config:
    """Build and validate the Config from environment variables; ConfigError on any problem."""
    values: dict[str, Any] = {}
    for name, (field_name, parse) in _VARIABLES.items():
        raw = environ.get(name)
        if raw is None:
            continue
        try:
            values[field_name] = parse(raw)
        except ValueError as exc:
            raise ConfigError(f"{name}={_shown(name, raw)!r}: {exc}") from None
    if "app_ports" not in values:
        values["app_ports"] = (values.get("app_port", DEFAULT_APP_PORT),)
    config = Config(**values)
    _check_mode_settings(config, environ)
    _check_together(config, environ)
    return config


def in_use(config: Config, variable: str) -> bool:
    """Does this configuration read ``variable``? (``check`` shows only those settings.)"""
    facts = Config.__dataclass_fields__[_VARIABLES[variable][0]].metadata[VARIABLE]
    return (not facts.modes or config.drain_mode in facts.modes) and (
        not facts.registries or config.registry in facts.registries
    )


def _check_mode_settings(config: Config, environ: Mapping[str, str]) -> None:
    """A setting that only other drain modes read is a mistake worth stopping for:
    PRESTOP_DRAIN_SECONDS=25 under the traffic mode would be silently ignored."""
    for _, variable in variables():
        if variable.name in environ and variable.modes and config.drain_mode not in variable.modes:
            modes = "/".join(variable.modes)
            raise ConfigError(
                f"{variable.name}={environ[variable.name]!r}: applies only to"
                f" PRESTOP_DRAIN_MODE={modes}, and the mode is {config.drain_mode}; set"
                f" PRESTOP_DRAIN_MODE={variable.modes[0]} or remove it"
            )


def _check_together(config: Config, environ: Mapping[str, str]) -> None:
    """Rules that involve more than one setting."""
    _check_budget(config, environ)
    if config.port in config.app_ports:
        name = "PRESTOP_APP_PORTS" if "PRESTOP_APP_PORTS" in environ else "PRESTOP_APP_PORT"
        raise ConfigError(
            f"{name}={config.port}: is the agent's own port (PRESTOP_PORT): the hook's own"
            " connection would count as the app's traffic and every drain would run to its"
            " maximum; set the app's serving port"
        )
    if in_use(config, "PRESTOP_DRAIN_QUIET_SECONDS") and (
        config.drain_poll_seconds > config.drain_quiet_seconds
    ):
        raise ConfigError(
            f"PRESTOP_DRAIN_POLL_SECONDS={config.drain_poll_seconds:g}: must not exceed"
            f" PRESTOP_DRAIN_QUIET_SECONDS={config.drain_quiet_seconds:g}"
        )
    if config.registry in ("eureka", "register"):
        if not config.eureka_urls:
            raise ConfigError(
                f"PRESTOP_EUREKA_URLS is required when PRESTOP_REGISTRY={config.registry}"
            )
        if not config.eureka_app:
            raise ConfigError(
                f"PRESTOP_EUREKA_APP is required when PRESTOP_REGISTRY={config.registry}"
            )
    if config.eureka_ca_file is not None:
        try:
            ssl.create_default_context(cafile=config.eureka_ca_file)
        except (OSError, ValueError) as exc:  # ssl.SSLError; a name no file system can hold
            reason = getattr(exc, "strerror", None) or str(exc)
            raise ConfigError(
                f"PRESTOP_EUREKA_CA_FILE={config.eureka_ca_file!r}: must be a readable PEM file"
                f" of CA certificates ({reason})"
            ) from None
    if config.registry == "register" and not config.pod_ip:
        raise ConfigError("POD_IP is required when PRESTOP_REGISTRY=register")
    if config.registry == "eureka" and not config.eureka_instance_id and not config.pod_ip:
        raise ConfigError(
            "PRESTOP_EUREKA_INSTANCE_ID or POD_IP is required when PRESTOP_REGISTRY=eureka"
            " (the instance is found by POD_IP and PRESTOP_APP_PORT)"
        )


def _check_budget(config: Config, environ: Mapping[str, str]) -> None:
    """The drain must fit the grace period. The message names the grace period first (it is
    the pod's, and usually what is too short), then exactly the variables that take its time."""
    budget = config.budget()
    grace = f"PRESTOP_GRACE_PERIOD_SECONDS={config.grace_period_seconds:g}"
    costs = [
        (budget.registry_deadline, "registry deadline", "PRESTOP_REGISTRY_TIMEOUT_SECONDS"),
        (budget.app_shutdown, "app shutdown", "PRESTOP_APP_SHUTDOWN_SECONDS"),
        (budget.margin, "margin", "PRESTOP_MARGIN_SECONDS"),
    ]
    taken = [(seconds, what, name) for seconds, what, name in costs if seconds > 0]
    left = budget.available_for_drain
    spent = " - ".join(f"{what} {seconds:g}s ({name})" for seconds, what, name in taken)
    leaves = f"{config.grace_period_seconds:g}s" + (f" - {spent}" if spent else "")
    if left <= 0:
        raise ConfigError(
            f"{grace}: leaves no time for the drain: {leaves} = {left:g}s; raise it with the"
            f" pod's terminationGracePeriodSeconds, or lower"
            f" {' / '.join(name for _, _, name in taken)}"
        )
    # An explicit drain length that does not fit.
    drain_variable = variable_of(DRAIN_LENGTHS[config.drain_mode])
    if not budget.fits:
        raise ConfigError(
            f"{grace} is too short for {drain_variable}={budget.drain:g}: {budget.arithmetic()};"
            f" at most {left:g}s is left for the drain ({leaves}); lower"
            f" {drain_variable}, or raise the grace period with the pod's"
            " terminationGracePeriodSeconds"
        )
    # The traffic drain's own lengths must fit under its maximum, or they mean nothing.
    for value, name, meaning in (
        (
            config.drain_min_seconds,
            "PRESTOP_DRAIN_MIN_SECONDS",
            "the drain cannot last its minimum",
        ),
        (
            config.drain_quiet_seconds,
            "PRESTOP_DRAIN_QUIET_SECONDS",
            "the drain can never end because traffic stopped, only at its maximum",
        ),
    ):
        if not in_use(config, name) or value <= budget.drain + 1e-9:
            continue
        setting = f"{name}={value:g}" + ("" if name in environ else " (its default)")
        if config.drain_max_seconds is not None:
            raise ConfigError(
                f"{setting}: must not exceed PRESTOP_DRAIN_MAX_SECONDS="
                f"{config.drain_max_seconds:g}, or {meaning}; lower one or raise the other"
            )
        raise ConfigError(
            f"{grace} leaves {left:g}s for the drain ({leaves}), less than {setting}: {meaning};"
            f" raise the grace period with the pod's terminationGracePeriodSeconds, or lower"
            f" {name}"
        )
