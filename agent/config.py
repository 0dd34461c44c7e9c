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

DRAIN_MODES = ("fixed", "traffic")
DRAIN_SOURCES = ("auto", "netlink", "proc")
REGISTRIES = ("none", "eureka", "actuator", "register")
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


@dataclass(frozen=True, slots=True)
class Config:
    """Everything the agent can be told. Durations are in seconds, ports are TCP ports."""

    # --- the agent's own listener -------------------------------------------------------------
    host: str | None = None
    """PRESTOP_HOST: address to listen on. Unset: every IPv4 address, and every IPv6 address
    too when the host has IPv6 (an IPv6-only or dual-stack pod gets its hook); ``::`` means
    both as well. The kubelet sends
    the httpGet hook to the pod IP, so a loopback-only address cannot receive it."""
    port: int = 8099
    """PRESTOP_PORT: port of /prestop, /ready, /live, /status and /metrics."""

    # --- the drain ----------------------------------------------------------------------------
    drain_mode: str = "traffic"
    """PRESTOP_DRAIN_MODE: ``fixed`` (sleep ``drain_seconds``) or ``traffic`` (until it stops)."""
    drain_seconds: float = 10.0
    """PRESTOP_DRAIN_SECONDS: how long the fixed drain keeps the app serving, seconds."""
    drain_min_seconds: float = 2.0
    """PRESTOP_DRAIN_MIN_SECONDS: the traffic drain lasts at least this long, seconds."""
    drain_quiet_seconds: float = 3.0
    """PRESTOP_DRAIN_QUIET_SECONDS: the traffic drain ends after this long without data, seconds."""
    drain_max_seconds: float | None = None
    """PRESTOP_DRAIN_MAX_SECONDS: the traffic drain ends at this point whatever happens, seconds.
    Unset: everything the grace budget leaves (see :class:`Budget`)."""
    drain_poll_seconds: float = 0.2
    """PRESTOP_DRAIN_POLL_SECONDS: interval between two looks at the app's sockets, seconds."""
    drain_source: str = "auto"
    """PRESTOP_DRAIN_SOURCE: ``auto`` (netlink sock_diag, else /proc), ``netlink`` or ``proc``."""
    drain_ignore_cidrs: tuple[Network, ...] = ()
    """PRESTOP_DRAIN_IGNORE_CIDRS: peers whose traffic does not hold the drain (kubelet probes,
    Prometheus scraping the app), comma-separated CIDRs."""
    drain_count_accepts: bool = True
    """PRESTOP_DRAIN_COUNT_ACCEPTS: count connections accepted in the pod's network namespace
    (/proc/net/snmp PassiveOpens) that no socket the drain saw accounts for as traffic: a
    client that opens a connection, sends a request and closes between two polls. Turn off
    only for ``hostNetwork`` pods, whose count is the whole node's."""
    app_port: int = DEFAULT_APP_PORT
    """PRESTOP_APP_PORT: the app's serving port (used to find the instance in Eureka)."""
    app_ports: tuple[int, ...] = (DEFAULT_APP_PORT,)
    """PRESTOP_APP_PORTS: ports whose traffic the traffic drain watches; default ``app_port``."""

    # --- the grace budget ---------------------------------------------------------------------
    grace_period_seconds: float = 30.0
    """PRESTOP_GRACE_PERIOD_SECONDS: the pod's terminationGracePeriodSeconds, whole seconds (as
    Kubernetes takes it)."""
    app_shutdown_seconds: float = 5.0
    """PRESTOP_APP_SHUTDOWN_SECONDS: time the app needs between its SIGTERM and exit."""
    margin_seconds: float = 1.0
    """PRESTOP_MARGIN_SECONDS: slack kept back; the kubelet subtracts the hook's time in whole
    seconds, so up to one second can be lost to rounding."""

    # --- the app ------------------------------------------------------------------------------
    app_health_url: str | None = None
    """PRESTOP_APP_HEALTH_URL: when set, /ready also requires this URL to answer 2xx."""

    # --- who may call /prestop ----------------------------------------------------------------
    token: str | None = field(default=None, repr=False)
    """PRESTOP_TOKEN: when set, /prestop requires header ``X-Prestop-Token`` with this value."""
    allow_cidrs: tuple[Network, ...] = ()
    """PRESTOP_ALLOW_CIDRS: when set, only these source addresses may call /prestop."""

    # --- logs ---------------------------------------------------------------------------------
    log_format: str = "auto"
    """PRESTOP_LOG_FORMAT: ``json``, ``console``, or ``auto`` (JSON unless stderr is a TTY)."""
    log_level: str = "info"
    """PRESTOP_LOG_LEVEL: debug, info, warning or error."""

    # --- the pod, from the downward API -------------------------------------------------------
    pod_name: str = ""
    """POD_NAME: metadata.name, for logs and metrics."""
    pod_namespace: str = ""
    """POD_NAMESPACE: metadata.namespace, for logs and metrics."""
    pod_ip: str = ""
    """POD_IP: status.podIP; identifies the instance in Eureka."""

    # --- the registry -------------------------------------------------------------------------
    registry: str = "none"
    """PRESTOP_REGISTRY: ``none``, ``eureka``, ``actuator`` or ``register``."""
    registry_timeout_seconds: float = 5.0
    """PRESTOP_REGISTRY_TIMEOUT_SECONDS: bound on the whole mark-down step, retries included."""
    registry_check_seconds: float = 30.0
    """PRESTOP_REGISTRY_CHECK_SECONDS: interval of the registry health check, from start-up until
    the shutdown begins, seconds (checked sooner while the instance is not found yet)."""
    eureka_urls: tuple[str, ...] = field(default=(), repr=False)
    """PRESTOP_EUREKA_URLS: Eureka service URLs as in Spring's defaultZone, comma-separated;
    may carry credentials (never logged)."""
    eureka_ca_file: str | None = None
    """PRESTOP_EUREKA_CA_FILE: PEM bundle of a private CA for https Eureka URLs."""
    eureka_app: str = ""
    """PRESTOP_EUREKA_APP: the application name in Eureka (e.g. ``ORDERS``)."""
    eureka_instance_id: str = ""
    """PRESTOP_EUREKA_INSTANCE_ID: the instance id; unset: found by POD_IP and app port."""
    eureka_status: str = "DOWN"
    """PRESTOP_EUREKA_STATUS: the status override to set, ``DOWN`` or ``OUT_OF_SERVICE``."""
    eureka_keep_override: bool = False
    """PRESTOP_EUREKA_KEEP_OVERRIDE: keep a DOWN override left by a previous pod at start-up."""
    eureka_renewal_seconds: float = 30.0
    """PRESTOP_EUREKA_RENEWAL_SECONDS: lease renewal interval in ``register`` mode."""
    eureka_lease_seconds: float = 90.0
    """PRESTOP_EUREKA_LEASE_SECONDS: lease duration announced in ``register`` mode."""
    actuator_url: str = "http://127.0.0.1:8080/actuator/serviceregistry"
    """PRESTOP_ACTUATOR_URL: the app's service-registry actuator endpoint."""
    eureka_client_refresh_seconds: float = 70.0
    """PRESTOP_EUREKA_CLIENT_REFRESH_SECONDS: how long a Eureka client may keep routing to the
    instance after its server's client-facing view changed: the clients' registry fetch
    interval plus their load balancer's cache TTL (Spring Cloud: 30 s + 35 s) plus a margin
    (default 5 s) for the fetch's own duration, seconds."""
    eureka_server_cache_seconds: float = 30.0
    """PRESTOP_EUREKA_SERVER_CACHE_SECONDS: bound on the Eureka server's read-only response
    cache (``responseCacheUpdateIntervalMs``), assumed when its client-facing view cannot be
    watched (actuator mode without URLs, a server that stops answering), seconds."""

    def budget(self) -> Budget:
        """The grace-period arithmetic for this configuration."""
        partial = Budget(
            grace_period=self.grace_period_seconds,
            registry_deadline=self.registry_deadline,
            app_shutdown=self.app_shutdown_seconds,
            margin=self.margin_seconds,
            drain=0.0,
        )
        if self.drain_mode == "fixed":
            drain = self.drain_seconds
        elif self.drain_max_seconds is not None:
            drain = self.drain_max_seconds
        else:
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


# --------------------------------------------------------------------------------------------
# Parsing. Each parser takes the raw string and raises ValueError with what is allowed.


def _choice(allowed: tuple[str, ...], *, upper: bool = False) -> Callable[[str], str]:
    def parse(raw: str) -> str:
        value = raw.strip().upper() if upper else raw.strip().lower()
        if value not in allowed:
            raise ValueError(f"must be one of {', '.join(allowed)}")
        return value

    return parse


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


def _log_level(raw: str) -> str:
    value = raw.strip().lower()
    value = {"warn": "warning"}.get(value, value)
    return _choice(LOG_LEVELS)(value)


# Variable name -> (Config field, parser). Fields without a variable keep their default.
_VARIABLES: dict[str, tuple[str, Callable[[str], Any]]] = {
    "PRESTOP_HOST": ("host", _listen_host),
    "PRESTOP_PORT": ("port", _port),
    "PRESTOP_DRAIN_MODE": ("drain_mode", _choice(DRAIN_MODES)),
    "PRESTOP_DRAIN_SECONDS": ("drain_seconds", _seconds()),
    "PRESTOP_DRAIN_MIN_SECONDS": ("drain_min_seconds", _seconds()),
    "PRESTOP_DRAIN_QUIET_SECONDS": ("drain_quiet_seconds", _seconds(allow_zero=False)),
    "PRESTOP_DRAIN_MAX_SECONDS": ("drain_max_seconds", _seconds(allow_zero=False)),
    "PRESTOP_DRAIN_POLL_SECONDS": ("drain_poll_seconds", _seconds(minimum=0.01)),
    "PRESTOP_DRAIN_SOURCE": ("drain_source", _choice(DRAIN_SOURCES)),
    "PRESTOP_DRAIN_IGNORE_CIDRS": ("drain_ignore_cidrs", _cidrs),
    "PRESTOP_DRAIN_COUNT_ACCEPTS": ("drain_count_accepts", _bool),
    "PRESTOP_APP_PORT": ("app_port", _port),
    "PRESTOP_APP_PORTS": ("app_ports", _ports),
    "PRESTOP_GRACE_PERIOD_SECONDS": ("grace_period_seconds", _whole_seconds),
    "PRESTOP_APP_SHUTDOWN_SECONDS": ("app_shutdown_seconds", _seconds()),
    "PRESTOP_MARGIN_SECONDS": ("margin_seconds", _seconds()),
    "PRESTOP_APP_HEALTH_URL": ("app_health_url", _optional_url),
    "PRESTOP_TOKEN": ("token", _token),
    "PRESTOP_ALLOW_CIDRS": ("allow_cidrs", _cidrs),
    "PRESTOP_LOG_FORMAT": ("log_format", _choice(LOG_FORMATS)),
    "PRESTOP_LOG_LEVEL": ("log_level", _log_level),
    "POD_NAME": ("pod_name", _text),
    "POD_NAMESPACE": ("pod_namespace", _text),
    "POD_IP": ("pod_ip", _ip),
    "PRESTOP_REGISTRY": ("registry", _choice(REGISTRIES)),
    "PRESTOP_REGISTRY_TIMEOUT_SECONDS": (
        "registry_timeout_seconds",
        _seconds(minimum=MIN_REGISTRY_TIMEOUT_SECONDS),
    ),
    "PRESTOP_REGISTRY_CHECK_SECONDS": ("registry_check_seconds", _seconds(minimum=0.1)),
    "PRESTOP_EUREKA_URLS": ("eureka_urls", _http_urls),
    "PRESTOP_EUREKA_CA_FILE": ("eureka_ca_file", _optional_text),
    "PRESTOP_EUREKA_APP": ("eureka_app", _text),
    "PRESTOP_EUREKA_INSTANCE_ID": ("eureka_instance_id", _text),
    "PRESTOP_EUREKA_STATUS": ("eureka_status", _choice(EUREKA_STATUSES, upper=True)),
    "PRESTOP_EUREKA_KEEP_OVERRIDE": ("eureka_keep_override", _bool),
    "PRESTOP_EUREKA_RENEWAL_SECONDS": ("eureka_renewal_seconds", _seconds(allow_zero=False)),
    "PRESTOP_EUREKA_LEASE_SECONDS": ("eureka_lease_seconds", _seconds(allow_zero=False)),
    "PRESTOP_ACTUATOR_URL": ("actuator_url", _http_url),
    "PRESTOP_EUREKA_CLIENT_REFRESH_SECONDS": ("eureka_client_refresh_seconds", _seconds()),
    "PRESTOP_EUREKA_SERVER_CACHE_SECONDS": ("eureka_server_cache_seconds", _seconds()),
}
# Fields whose variable is not PRESTOP_ + the field's name (the downward API's own names).
_ENVIRONMENT_NAMES = {"pod_name": "POD_NAME", "pod_namespace": "POD_NAMESPACE", "pod_ip": "POD_IP"}


def variable_of(field_name: str) -> str:
    """The environment variable that sets a Config field."""
    return _ENVIRONMENT_NAMES.get(field_name, f"PRESTOP_{field_name.upper()}")


VARIABLES = tuple(variable_of(f.name) for f in dataclasses.fields(Config))
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


# Settings that only one drain mode reads. Setting one for the other mode is a mistake worth
# stopping for: PRESTOP_DRAIN_SECONDS=25 under the traffic mode would be silently ignored.
_MODE_VARIABLES = {
    "fixed": ("PRESTOP_DRAIN_SECONDS",),
    "traffic": (
        "PRESTOP_DRAIN_MIN_SECONDS",
        "PRESTOP_DRAIN_QUIET_SECONDS",
        "PRESTOP_DRAIN_MAX_SECONDS",
        "PRESTOP_DRAIN_POLL_SECONDS",
        "PRESTOP_DRAIN_SOURCE",
        "PRESTOP_DRAIN_IGNORE_CIDRS",
        "PRESTOP_DRAIN_COUNT_ACCEPTS",
    ),
}


# Settings that only some registry backends read (the rest apply to every configuration).
_REGISTRY_VARIABLES = {
    "PRESTOP_REGISTRY_TIMEOUT_SECONDS": ("eureka", "actuator", "register"),
    "PRESTOP_REGISTRY_CHECK_SECONDS": ("eureka", "actuator", "register"),
    # actuator mode reads the Eureka URLs too, when given, to watch the clients' view.
    "PRESTOP_EUREKA_URLS": ("eureka", "actuator", "register"),
    "PRESTOP_EUREKA_CA_FILE": ("eureka", "actuator", "register"),
    "PRESTOP_EUREKA_APP": ("eureka", "actuator", "register"),
    "PRESTOP_EUREKA_INSTANCE_ID": ("eureka", "actuator", "register"),
    "PRESTOP_EUREKA_CLIENT_REFRESH_SECONDS": ("eureka", "actuator", "register"),
    "PRESTOP_EUREKA_SERVER_CACHE_SECONDS": ("eureka", "actuator", "register"),
    "PRESTOP_EUREKA_STATUS": ("eureka", "actuator", "register"),
    "PRESTOP_EUREKA_KEEP_OVERRIDE": ("eureka",),
    "PRESTOP_EUREKA_RENEWAL_SECONDS": ("register",),
    "PRESTOP_EUREKA_LEASE_SECONDS": ("register",),
    "PRESTOP_ACTUATOR_URL": ("actuator",),
}


def in_use(config: Config, variable: str) -> bool:
    """Does this configuration read ``variable``? (``check`` shows only those settings.)"""
    for mode, variables in _MODE_VARIABLES.items():
        if variable in variables:
            return mode == config.drain_mode
    return config.registry in _REGISTRY_VARIABLES.get(variable, (config.registry,))


def field_of(variable: str) -> str:
    """The Config field a variable sets."""
    return _VARIABLES[variable][0]


def _check_mode_settings(config: Config, environ: Mapping[str, str]) -> None:
    for mode, variables in _MODE_VARIABLES.items():
        if mode == config.drain_mode:
            continue
        for name in variables:
            if name in environ:
                raise ConfigError(
                    f"{name}={environ[name]!r}: applies only to PRESTOP_DRAIN_MODE={mode}, and"
                    f" the mode is {config.drain_mode}; set PRESTOP_DRAIN_MODE={mode} or remove it"
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
    if config.drain_mode == "traffic" and config.drain_poll_seconds > config.drain_quiet_seconds:
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
        except OSError as exc:  # ssl.SSLError is one too
            reason = exc.strerror or str(exc)
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
    explicit = {"fixed": "PRESTOP_DRAIN_SECONDS", "traffic": "PRESTOP_DRAIN_MAX_SECONDS"}
    drain_variable = explicit[config.drain_mode]
    if not budget.fits:
        raise ConfigError(
            f"{grace} is too short for {drain_variable}={budget.drain:g}: {budget.arithmetic()};"
            f" at most {left:g}s is left for the drain ({leaves}); lower"
            f" {drain_variable}, or raise the grace period with the pod's"
            " terminationGracePeriodSeconds"
        )
    if config.drain_mode != "traffic":
        return
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
        if value <= budget.drain + 1e-9:
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
