"""Property-based configuration fuzzing (hypothesis) over every variable the agent reads.

The property (issue 9): any environment gives either a valid Config that the rest of the agent
can use without an exception (URLs it can request, addresses it can listen on, a plan ``check``
can print, a budget that fits), or a ConfigError that is one line, starts with the name of a
variable, never shows the token, and makes ``prestop-agent`` exit 2 with exactly that line.

The variables come from ``agent.config.VARIABLES`` (derived from Config's fields), so a new
setting is fuzzed without touching this file. FUZZ_EXAMPLES is the run's size.
"""

from __future__ import annotations

import contextlib
import io
import json
import math
import string

import pytest
import yarl
from hypothesis import HealthCheck, event, given, settings
from hypothesis import strategies as st

from agent import cli
from agent.config import (
    MAX_PORT_RANGES,
    MIN_REGISTRY_TIMEOUT_SECONDS,
    VARIABLES,
    Config,
    ConfigError,
    load,
    port_ranges,
)
from agent.http import Server, ascii_host
from agent.main import listen_addresses

FUZZ_EXAMPLES = 3000
TOKEN = "fuzz-token-7f3a9c"

# Text as an environment can hold it: any code point, surrogate escapes of undecodable bytes
# included, but no NUL (no environment can carry one).
any_text = st.text(st.characters(exclude_characters="\x00"), max_size=40)
numbers = st.one_of(
    st.integers(-10, 100_000).map(str),
    st.floats(allow_nan=True, allow_infinity=True).map(repr),
    st.sampled_from(
        ["0", "0.0", "1e400", "-0", "-0.0", "nan", "inf", "30.5", " 7 ", "1_0", "0x10", "0.06", ""]
    ),
)
label = st.text(string.ascii_lowercase + string.digits + "-_", min_size=0, max_size=70)
hosts = st.one_of(
    st.lists(label, min_size=1, max_size=5).map(".".join),
    st.sampled_from(
        [
            "127.0.0.1",
            "[::1]",
            "[fd00::1%eth0]",
            "[fd00:77:0:0:0:0:0:5]",
            "[::ffff:10.0.0.1]",
            "[FD00:77::5]",
            "bücher.example",
            "\u2ff0.x",
            ".lead",
            "a..b",
        ]
    ),
    any_text,
)
urls = st.builds(
    lambda scheme, creds, host, port, path: f"{scheme}://{creds}{host}{port}{path}",
    st.sampled_from(["http", "https", "ftp", "HTTP", ""]),
    # Issue 21: passwords with an unencoded '#', '/' or '?' (after digits: a "port").
    st.sampled_from(["", "user:p%40ss@", "u:@", "@", "a:b:c@", "u:123#x@", "u:9/x@", "u:1?t=@"]),
    hosts,
    st.one_of(st.just(""), numbers.map(lambda n: f":{n}")),
    st.sampled_from(["/", "/eureka/", "", "/a?b=c", "/%zz", "/ x", "/h?token=t0k#frag"]),
)
plausible = st.one_of(
    numbers,
    urls,
    st.lists(urls, min_size=1, max_size=3).map(",".join),
    hosts,
    st.sampled_from(
        [
            "fixed",
            "traffic",
            "auto",
            "netlink",
            "proc",
            "none",
            "eureka",
            "actuator",
            "register",
            "DOWN",
            "out_of_service",
            "json",
            "console",
            "warn",
            "debug",
            "true",
            "no",
            "10.0.0.0/8,::1/128",
            "10.0.0.0/33",
            "8080,8081",
            "8080,",
            "8099",
            ",".join(str(p) for p in range(2000, 4100, 2)),  # more runs than the filter takes
            "t" * 5000,  # a token longer than the HTTP parser's line limit allows
            "70000",
            "10.1.2.3",
            "fe80::1",
            "/nonexistent/ca.pem",
            "/etc/hostname",
        ]
    ),
    any_text,
)
names = st.one_of(
    st.sampled_from(VARIABLES),
    st.sampled_from(["PRESTOP_DRAIN_QUIET", "PRESTOP_TOKN", "PRESTOP_", "PRESTOPX"]),
)
# Working configurations of every registry; the fuzzer changes a few of their variables, so that
# valid configurations with URLs (and the checks between settings) are reached often too.
BASES = [
    {},
    {"PRESTOP_DRAIN_MODE": "fixed", "PRESTOP_DRAIN_SECONDS": "10"},
    {
        "PRESTOP_REGISTRY": "eureka",
        "PRESTOP_EUREKA_URLS": "http://u:p@eureka-0:8761/eureka/,http://[fd00::1]:8761/eureka/",
        "PRESTOP_EUREKA_APP": "orders",
        "POD_IP": "10.1.2.3",
    },
    {
        "PRESTOP_REGISTRY": "register",
        "PRESTOP_EUREKA_URLS": "https://eureka.example/eureka/",
        "PRESTOP_EUREKA_APP": "orders",
        "POD_IP": "fd00::5",
        "PRESTOP_APP_HEALTH_URL": "http://127.0.0.1:8080/actuator/health",
    },
    {"PRESTOP_REGISTRY": "actuator", "PRESTOP_TOKEN": TOKEN},
]
environments = st.one_of(
    st.dictionaries(names, plausible, max_size=12),
    st.builds(
        lambda base, changes: {**base, **changes},
        st.sampled_from(BASES),
        st.dictionaries(names, plausible, max_size=3),
    ),
)


def _usable(config: Config) -> None:
    """What the rest of the agent does with a Config must not raise, and nothing it accepts
    can never work (issue 21)."""
    assert config.budget().fits
    assert config.port not in config.app_ports  # the hook's own traffic would hold every drain
    assert len(port_ranges(config.app_ports)) <= MAX_PORT_RANGES
    assert config.token is None or len(config.token.encode("utf-8", "surrogateescape")) <= 4096
    assert config.registry_timeout_seconds >= MIN_REGISTRY_TIMEOUT_SECONDS
    for value in config.redacted().values():
        assert not (isinstance(value, float) and math.copysign(1, value) < 0), value
    for url in [*config.eureka_urls, config.actuator_url, config.app_health_url or ""]:
        # No password can end the host part early: requests go where the URL says.
        assert not any(c in url.partition("://")[2].rpartition("@")[0] for c in "#/?"), url
    json.dumps(config.redacted())
    listen_addresses(config.host)
    endpoints = [config.actuator_url, config.app_health_url]
    for url in [*config.eureka_urls, *filter(None, endpoints)]:
        for server in (Server.parse(url), Server.endpoint(url)):
            parsed = yarl.URL(server.base, encoded=True)
            assert parsed.host, url
            ascii_host(parsed.host.strip("[]")).encode("idna")
    if config.registry == "none":
        with contextlib.redirect_stdout(io.StringIO()) as out:
            assert cli.check(config) == 0
        assert "Time budget" in out.getvalue()


@pytest.mark.slow  # FUZZ_EXAMPLES environments: a quarter of a minute
@settings(
    max_examples=FUZZ_EXAMPLES,
    deadline=None,
    suppress_health_check=[HealthCheck.too_slow, HealthCheck.filter_too_much],
)
@given(environments)
def test_any_environment_is_a_valid_config_or_one_line_naming_a_variable(
    environ: dict[str, str],
) -> None:
    try:
        config = load(environ)
    except ConfigError as exc:
        message = str(exc)
        event(f"refused: {message.split('=')[0].split(':')[0].split(' ')[0]}")
        assert "\n" not in message and "\r" not in message, message
        assert message.startswith(VARIABLES), message
        if environ.get("PRESTOP_TOKEN") == TOKEN:
            assert TOKEN not in message
        # The command says exactly that, in one line, and exits 2.
        with (
            contextlib.redirect_stderr(io.StringIO()) as err,
            contextlib.redirect_stdout(io.StringIO()),
        ):
            assert cli.main(["check"], environ) == cli.EXIT_CONFIG
        assert err.getvalue() == f"prestop-agent: configuration error: {message}\n"
        return
    event(f"valid, registry {config.registry}")
    _usable(config)
