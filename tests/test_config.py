"""Config: every variable's error path, the grace-budget arithmetic, redaction, the CLI's exit 2."""

from __future__ import annotations

import ipaddress
import re
import subprocess
import sys
from pathlib import Path

import pytest

from agent import cli
from agent.config import (
    VARIABLES,
    Config,
    ConfigError,
    load,
    unknown_variables,
    variable_of,
)
from agent.http import redact_url

SECRET_TOKEN = "s3cr3t-token-value"
SECRET_PASSWORD = "p%40ss%3Aw%2Frd"  # "p@ss:w/rd", percent-encoded as in a URL


def test_defaults_are_a_working_agent() -> None:
    config = load({})
    assert (config.host, config.port) == (None, 8099)  # None: dual-stack, see main.listen_addresses
    assert config.drain_mode == "traffic"
    assert config.registry == "none"
    assert config.app_ports == (8080,)
    assert config.budget().fits


def test_every_variable_is_read() -> None:
    config = load(
        {
            "PRESTOP_HOST": "127.0.0.1",
            "PRESTOP_PORT": "9000",
            "PRESTOP_DRAIN_MODE": "TRAFFIC",
            "PRESTOP_DRAIN_MIN_SECONDS": "1",
            "PRESTOP_DRAIN_QUIET_SECONDS": "2.5",
            "PRESTOP_DRAIN_MAX_SECONDS": "12",
            "PRESTOP_DRAIN_POLL_SECONDS": "0.1",
            "PRESTOP_DRAIN_IGNORE_CIDRS": "10.0.0.0/8, ::1/128",
            "PRESTOP_APP_PORT": "8081",
            "PRESTOP_GRACE_PERIOD_SECONDS": "60",
            "PRESTOP_APP_SHUTDOWN_SECONDS": "10",
            "PRESTOP_APP_HEALTH_URL": "http://127.0.0.1:8081/actuator/health",
            "PRESTOP_TOKEN": SECRET_TOKEN,
            "PRESTOP_ALLOW_CIDRS": "192.168.0.0/16",
            "PRESTOP_LOG_FORMAT": "console",
            "PRESTOP_LOG_LEVEL": "WARN",
            "POD_NAME": "orders-7f9c",
            "POD_NAMESPACE": "shop",
            "POD_IP": "10.1.2.3",
        }
    )
    assert config.host == "127.0.0.1" and config.port == 9000
    assert config.drain_mode == "traffic" and config.drain_max_seconds == 12
    assert config.app_ports == (8081,), "APP_PORTS defaults to APP_PORT"
    assert config.drain_ignore_cidrs == (
        ipaddress.ip_network("10.0.0.0/8"),
        ipaddress.ip_network("::1/128"),
    )
    assert config.log_level == "warning" and config.log_format == "console"
    assert config.token == SECRET_TOKEN
    assert (config.pod_name, config.pod_namespace, config.pod_ip) == (
        "orders-7f9c",
        "shop",
        "10.1.2.3",
    )


BAD_VALUES = [
    ("PRESTOP_PORT", "http", "TCP port"),
    ("PRESTOP_PORT", "70000", "TCP port"),
    ("PRESTOP_HOST", "", "address to listen on"),
    ("PRESTOP_DRAIN_MODE", "sleep", "fixed, traffic"),
    ("PRESTOP_DRAIN_SECONDS", "ten", "number of seconds"),
    ("PRESTOP_DRAIN_SECONDS", "-1", ">= 0"),
    ("PRESTOP_DRAIN_SECONDS", "nan", "finite"),
    ("PRESTOP_DRAIN_MIN_SECONDS", "x", "number of seconds"),
    ("PRESTOP_DRAIN_QUIET_SECONDS", "0", "> 0"),
    ("PRESTOP_DRAIN_MAX_SECONDS", "inf", "finite"),
    ("PRESTOP_DRAIN_POLL_SECONDS", "0.001", ">= 0.01"),
    ("PRESTOP_DRAIN_SOURCE", "ebpf", "auto, netlink, proc"),
    ("PRESTOP_DRAIN_IGNORE_CIDRS", "10.0.0.0/33", "not a CIDR"),
    ("PRESTOP_APP_PORT", "0", "TCP port"),
    ("PRESTOP_APP_PORTS", "8080,x", "list of TCP ports"),
    ("PRESTOP_APP_PORTS", ",", "list of TCP ports"),
    ("PRESTOP_GRACE_PERIOD_SECONDS", "0", "> 0"),
    ("PRESTOP_APP_SHUTDOWN_SECONDS", "soon", "number of seconds"),
    ("PRESTOP_MARGIN_SECONDS", "-2", ">= 0"),
    ("PRESTOP_APP_HEALTH_URL", "localhost:8080/health", "http:// or https://"),
    ("PRESTOP_APP_HEALTH_URL", "http://host:99999/", "valid port"),
    ("PRESTOP_ALLOW_CIDRS", "everyone", "not a CIDR"),
    ("PRESTOP_LOG_FORMAT", "xml", "auto, json, console"),
    ("PRESTOP_LOG_LEVEL", "loud", "debug, info, warning, error"),
    ("POD_IP", "10.0.0", "IPv4 or IPv6"),
    ("PRESTOP_REGISTRY", "consul", "none, eureka, actuator, register"),
    ("PRESTOP_REGISTRY_TIMEOUT_SECONDS", "0", ">= 0.25"),
    ("PRESTOP_REGISTRY_TIMEOUT_SECONDS", "0.1", ">= 0.25"),
    ("PRESTOP_EUREKA_URLS", "eureka:8761", "http:// or https://"),
    ("PRESTOP_EUREKA_STATUS", "STARTING", "DOWN, OUT_OF_SERVICE"),
    ("PRESTOP_EUREKA_KEEP_OVERRIDE", "maybe", "true or false"),
    ("PRESTOP_EUREKA_RENEWAL_SECONDS", "0", "> 0"),
    ("PRESTOP_EUREKA_LEASE_SECONDS", "-5", "> 0"),
    ("PRESTOP_ACTUATOR_URL", "ftp://app/actuator", "http:// or https://"),
]


@pytest.mark.parametrize(("variable", "value", "allowed"), BAD_VALUES)
def test_bad_value_exits_2_naming_variable_value_and_what_is_allowed(
    variable: str, value: str, allowed: str, capsys: pytest.CaptureFixture[str]
) -> None:
    assert cli.main([], {variable: value}) == cli.EXIT_CONFIG
    err = capsys.readouterr().err
    assert err.count("\n") == 1, f"one line expected, got {err!r}"
    assert err.startswith("prestop-agent: configuration error: ")
    assert variable in err
    assert allowed in err
    assert value in err or variable == "PRESTOP_HOST"
    assert "Traceback" not in err


MISSING_TOGETHER = [
    ({"PRESTOP_REGISTRY": "eureka", "POD_IP": "10.0.0.1"}, "PRESTOP_EUREKA_URLS"),
    (
        {"PRESTOP_REGISTRY": "eureka", "PRESTOP_EUREKA_URLS": "http://e:8761/eureka/"},
        "PRESTOP_EUREKA_APP",
    ),
    (
        {
            "PRESTOP_REGISTRY": "eureka",
            "PRESTOP_EUREKA_URLS": "http://e:8761/eureka/",
            "PRESTOP_EUREKA_APP": "ORDERS",
        },
        "PRESTOP_EUREKA_INSTANCE_ID or POD_IP",
    ),
    (
        {
            "PRESTOP_REGISTRY": "register",
            "PRESTOP_EUREKA_URLS": "http://e:8761/eureka/",
            "PRESTOP_EUREKA_APP": "ORDERS",
        },
        "POD_IP",
    ),
    (
        {"PRESTOP_DRAIN_MODE": "traffic", "PRESTOP_DRAIN_MIN_SECONDS": "30"},
        "PRESTOP_DRAIN_MIN_SECONDS",
    ),
    (
        {
            "PRESTOP_DRAIN_MODE": "traffic",
            "PRESTOP_DRAIN_POLL_SECONDS": "5",
            "PRESTOP_DRAIN_QUIET_SECONDS": "1",
        },
        "PRESTOP_DRAIN_POLL_SECONDS",
    ),
]


@pytest.mark.parametrize(("environ", "variable"), MISSING_TOGETHER)
def test_settings_that_only_fail_together(
    environ: dict[str, str], variable: str, capsys: pytest.CaptureFixture[str]
) -> None:
    assert cli.main([], environ) == cli.EXIT_CONFIG
    err = capsys.readouterr().err
    assert variable in err and "Traceback" not in err


@pytest.mark.parametrize("content", [None, "not a certificate"], ids=["missing", "not-pem"])
def test_an_unusable_ca_file_is_a_config_error(
    content: str | None, tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    path = tmp_path / "ca.pem"
    if content is not None:
        path.write_text(content)
    assert cli.main([], {"PRESTOP_EUREKA_CA_FILE": str(path)}) == cli.EXIT_CONFIG
    err = capsys.readouterr().err
    assert f"PRESTOP_EUREKA_CA_FILE='{path}': must be a readable PEM file" in err
    assert err.count("\n") == 1


def test_a_drain_that_cannot_fit_the_grace_budget_shows_the_arithmetic() -> None:
    with pytest.raises(ConfigError) as caught:
        load(
            {
                "PRESTOP_DRAIN_MODE": "fixed",
                "PRESTOP_DRAIN_SECONDS": "25",
                "PRESTOP_REGISTRY": "actuator",
                "PRESTOP_REGISTRY_TIMEOUT_SECONDS": "3",
            }
        )
    message = str(caught.value)
    # The grace period first (the pod's, usually what is too short), then the drain it blocks.
    assert message.startswith("PRESTOP_GRACE_PERIOD_SECONDS=30 is too short for")
    assert "PRESTOP_DRAIN_SECONDS=25" in message
    assert (
        "drain 25s + registry deadline 3s + app shutdown 5s + margin 1s = 34s > grace period 30s"
        in message
    )
    assert "at most 21s is left for the drain" in message


def test_traffic_maximum_defaults_to_what_the_budget_leaves() -> None:
    config = load({"PRESTOP_DRAIN_MODE": "traffic", "PRESTOP_GRACE_PERIOD_SECONDS": "45"})
    assert config.drain_limit == 45 - 5 - 1
    with pytest.raises(
        ConfigError, match=r"^PRESTOP_GRACE_PERIOD_SECONDS=40 is too short for PRESTOP_DRAIN_MAX_"
    ):
        load(
            {
                "PRESTOP_DRAIN_MODE": "traffic",
                "PRESTOP_GRACE_PERIOD_SECONDS": "40",
                "PRESTOP_DRAIN_MAX_SECONDS": "35",
            }
        )


@pytest.mark.parametrize(
    ("environ", "variable"),
    [
        ({"PRESTOP_DRAIN_SECONDS": "25"}, "PRESTOP_DRAIN_SECONDS"),
        ({"PRESTOP_DRAIN_MODE": "fixed", "PRESTOP_DRAIN_QUIET_SECONDS": "2"}, "QUIET"),
    ],
)
def test_a_setting_of_the_other_drain_mode_is_refused(
    environ: dict[str, str], variable: str
) -> None:
    with pytest.raises(ConfigError, match=f"{variable}.*applies only to PRESTOP_DRAIN_MODE="):
        load(environ)


def test_a_grace_period_shorter_than_the_app_shutdown_names_it_and_only_what_is_in_play() -> None:
    # Issue 9: GRACE=5 blamed PRESTOP_DRAIN_MAX_SECONDS (never set) with "drain -1s ... <= 5s".
    with pytest.raises(ConfigError) as caught:
        load({"PRESTOP_GRACE_PERIOD_SECONDS": "5"})
    message = str(caught.value)
    assert message.startswith("PRESTOP_GRACE_PERIOD_SECONDS=5: leaves no time for the drain")
    assert "5s - app shutdown 5s (PRESTOP_APP_SHUTDOWN_SECONDS)" in message
    assert "margin 1s (PRESTOP_MARGIN_SECONDS) = -1s" in message
    assert "DRAIN_MAX" not in message and "REGISTRY" not in message  # neither is in play
    assert "<=" not in message
    # With a registry, its deadline is in play and named.
    with pytest.raises(ConfigError, match=r"registry deadline 5s \(PRESTOP_REGISTRY_TIMEOUT_SEC"):
        load({"PRESTOP_GRACE_PERIOD_SECONDS": "10", "PRESTOP_REGISTRY": "actuator"})


def test_a_grace_period_too_short_for_the_minimum_names_the_grace_period_first() -> None:
    # Issue 9: GRACE=7 blamed PRESTOP_DRAIN_MIN_SECONDS=2 without naming the grace period.
    with pytest.raises(ConfigError) as caught:
        load({"PRESTOP_GRACE_PERIOD_SECONDS": "7"})
    message = str(caught.value)
    assert message.startswith("PRESTOP_GRACE_PERIOD_SECONDS=7 leaves 1s for the drain")
    assert "(7s - app shutdown 5s (PRESTOP_APP_SHUTDOWN_SECONDS) - margin 1s" in message
    assert "less than PRESTOP_DRAIN_MIN_SECONDS=2 (its default)" in message
    # An explicit maximum: then the grace period is not what is in play.
    with pytest.raises(ConfigError, match=r"^PRESTOP_DRAIN_MIN_SECONDS=5: must not exceed PRE"):
        load({"PRESTOP_DRAIN_MIN_SECONDS": "5", "PRESTOP_DRAIN_MAX_SECONDS": "4"})


def test_quiet_longer_than_the_drain_maximum_is_refused() -> None:
    # Issue 9: accepted silently; the traffic drain could then only ever end at its maximum.
    with pytest.raises(ConfigError, match=r"^PRESTOP_DRAIN_QUIET_SECONDS=10: must not exceed"):
        load({"PRESTOP_DRAIN_QUIET_SECONDS": "10", "PRESTOP_DRAIN_MAX_SECONDS": "8"})
    with pytest.raises(
        ConfigError, match=r"leaves 2s for the drain .* less than PRESTOP_DRAIN_QUI"
    ):
        load({"PRESTOP_GRACE_PERIOD_SECONDS": "8", "PRESTOP_DRAIN_MIN_SECONDS": "1"})
    assert load({"PRESTOP_DRAIN_QUIET_SECONDS": "8", "PRESTOP_DRAIN_MAX_SECONDS": "8"})


@pytest.mark.parametrize("value", ["30.5", "0.5", "29.999"])
def test_a_fractional_grace_period_is_refused(value: str) -> None:
    with pytest.raises(ConfigError, match=r"PRESTOP_GRACE_PERIOD_SECONDS.*must be whole seconds"):
        load({"PRESTOP_GRACE_PERIOD_SECONDS": value})
    assert load({"PRESTOP_GRACE_PERIOD_SECONDS": "45"}).grace_period_seconds == 45


def test_check_and_status_show_effective_values_not_nulls(
    capsys: pytest.CaptureFixture[str],
) -> None:
    # Issue 9: `drain_max_seconds = null` while the plan said 24 s.
    config = load({})
    assert config.redacted()["drain_max_seconds"] == 24
    assert config.redacted()["host"] == "*"
    assert cli.main(["check"], {}) == 0
    out = capsys.readouterr().out
    assert re.search(r"PRESTOP_DRAIN_MAX_SECONDS += 24\n", out) and "at most 24s" in out
    assert "null" not in out and "None" not in out


@pytest.mark.parametrize(
    ("variable", "value", "reason"),
    [
        ("PRESTOP_EUREKA_URLS", "http://a..b/eureka/", "empty label"),
        ("PRESTOP_EUREKA_URLS", "http://.eureka:8761/eureka/", "empty label"),
        ("PRESTOP_EUREKA_URLS", f"http://{'a' * 64}.example/", "longer than 63"),
        ("PRESTOP_EUREKA_URLS", f"http://{'a.' * 127}b/", "longer than 253"),
        ("PRESTOP_EUREKA_URLS", "http://eu reka/", "spaces"),
        ("PRESTOP_EUREKA_URLS", "http://-eureka/", "may not"),
        ("PRESTOP_EUREKA_URLS", "http://[::1/", "valid host"),
        ("PRESTOP_EUREKA_URLS", "http://eureka:0/", "port 1-65535"),
        ("PRESTOP_EUREKA_URLS", "ftp://eureka/", "http://"),
        ("PRESTOP_APP_HEALTH_URL", "http://a..b/health", "empty label"),
        ("PRESTOP_ACTUATOR_URL", "http://\u00ad/", "control characters"),
        ("PRESTOP_ACTUATOR_URL", "http://\u0627\u0031.example/", "IDNA"),
        ("PRESTOP_ACTUATOR_URL", "http://\u2ff0.example/", "IDNA"),
        ("PRESTOP_HOST", "a..b", "empty label"),
        ("PRESTOP_HOST", " ", "address to listen on"),
    ],
)
def test_unusable_host_names_are_refused_at_start_up(
    variable: str, value: str, reason: str, capsys: pytest.CaptureFixture[str]
) -> None:
    # Issue 9: these passed validation, then UnicodeError escaped: check printed a traceback,
    # a mark-down beside a good server turned into a 500, and /ready answered 500.
    with pytest.raises(ConfigError) as caught:
        load({"PRESTOP_REGISTRY": "actuator", variable: value})
    message = str(caught.value)
    assert "\n" not in message and message.startswith(variable) and reason in message, message


@pytest.mark.parametrize(
    "url",
    [
        "http://eureka-0.eureka.svc.cluster.local.:8761/eureka/",
        "http://[fd00::1]:8761/eureka/",
        "https://user:p%40ss@bücher.example/eureka/",
        "http://my_host:80/",
        "http://10.0.0.1/",
    ],
)
def test_usable_host_names_are_accepted(url: str) -> None:
    assert load({"PRESTOP_ACTUATOR_URL": url}).actuator_url == url


def test_a_misspelt_variable_is_warned_about_naming_the_closest(
    capsys: pytest.CaptureFixture[str],
) -> None:
    # Issue 9: PRESTOP_DRAIN_QUIET=5 did nothing, and nobody was told.
    environ = {"PRESTOP_DRAIN_QUIET": "5", "PRESTOP_TOKN": "s3cret", "PRESTOP_ZZZZZZZZZZZZ": "1"}
    warnings = unknown_variables(environ)
    assert warnings == [
        "PRESTOP_DRAIN_QUIET is not a prestop-agent variable and is ignored;"
        " did you mean PRESTOP_DRAIN_QUIET_SECONDS?",
        "PRESTOP_TOKN is not a prestop-agent variable and is ignored; did you mean PRESTOP_TOKEN?",
        "PRESTOP_ZZZZZZZZZZZZ is not a prestop-agent variable and is ignored;"
        " no variable of that name exists",
    ]
    assert cli.main(["check"], environ) == 0
    out = capsys.readouterr().out
    assert out.count("warning: ") == 3 and "PRESTOP_DRAIN_QUIET_SECONDS?" in out
    assert "s3cret" not in out
    assert unknown_variables({"POD_NAME": "x", "HOME": "/", "PRESTOP_PORT": "1"}) == []


def test_every_config_field_has_its_variable_and_parser() -> None:
    # The known names come from Config itself; every one of them must also be parsed.
    from agent.config import _VARIABLES

    assert set(VARIABLES) == set(_VARIABLES)
    for name, (field_name, _) in _VARIABLES.items():
        assert variable_of(field_name) == name


def test_flags_override_the_environment_through_the_same_checks(
    capsys: pytest.CaptureFixture[str],
) -> None:
    fixed = ["--drain-mode", "fixed"]
    assert cli.main(["check", *fixed, "--drain-seconds", "99"], {}) == cli.EXIT_CONFIG
    assert "PRESTOP_DRAIN_SECONDS" in capsys.readouterr().err
    assert cli.main(["check", *fixed, "--port", "9001", "--drain-seconds", "3"], {}) == 0
    out = capsys.readouterr().out
    assert re.search(r"^  PRESTOP_PORT +  = 9001$", out, re.MULTILINE), out
    assert "drain 3s + registry deadline 0s + app shutdown 5s + margin 1s = 9s" in out


def _shown_settings(out: str) -> dict[str, str]:
    """The ``NAME = value`` lines of check's settings block."""
    return dict(re.findall(r"^  (\S+) += (.*)$", out, re.MULTILINE))


def test_check_shows_variable_names_and_only_the_settings_in_use(
    capsys: pytest.CaptureFixture[str],
) -> None:
    assert cli.main(["check", "--drain-mode", "fixed"], {}) == 0
    fixed = _shown_settings(capsys.readouterr().out)
    assert fixed["PRESTOP_DRAIN_SECONDS"] == "10" and fixed["PRESTOP_REGISTRY"] == "none"
    variables = ("PRESTOP_", "POD_", "KUBERNETES_")
    assert all(name.startswith(variables) for name in fixed), "no field names"
    assert "port" not in fixed and "drain_seconds" not in fixed
    assert not {"PRESTOP_DRAIN_MIN_SECONDS", "PRESTOP_DRAIN_SOURCE"} & set(fixed)
    assert not [name for name in fixed if "EUREKA" in name or "ACTUATOR" in name]

    eureka = {
        "PRESTOP_REGISTRY": "eureka",
        "PRESTOP_EUREKA_URLS": f"http://admin:{SECRET_PASSWORD}@127.0.0.1:1/eureka/",
        "PRESTOP_EUREKA_APP": "orders",
        "POD_IP": "10.1.2.3",
        "PRESTOP_REGISTRY_TIMEOUT_SECONDS": "0.3",
    }
    cli.main(["check"], eureka)
    out = capsys.readouterr().out
    traffic = _shown_settings(out)
    assert traffic["PRESTOP_DRAIN_QUIET_SECONDS"] == "3"
    assert traffic["PRESTOP_EUREKA_URLS"] == "http://admin:***@127.0.0.1:1/eureka/"
    assert traffic["PRESTOP_EUREKA_INSTANCE_ID"] == "empty"
    assert "PRESTOP_DRAIN_SECONDS" not in traffic
    assert not {"PRESTOP_ACTUATOR_URL", "PRESTOP_EUREKA_LEASE_SECONDS"} & set(traffic)
    assert SECRET_PASSWORD not in out


def test_help_has_the_traffic_drain_flags_and_lists_allowed_values(
    capsys: pytest.CaptureFixture[str],
) -> None:
    with pytest.raises(SystemExit):
        cli.main(["--help"], {})
    text = " ".join(capsys.readouterr().out.split())
    for flag in (
        "--drain-min-seconds SECONDS",
        "--drain-quiet-seconds SECONDS",
        "--drain-max-seconds SECONDS",
        "--drain-source {auto,netlink,proc}",
        "--app-ports PORT[,PORT...]",
        "--drain-mode {fixed,traffic}",
        "--registry {none,eureka,actuator,register}",
        "--log-level {debug,info,warning,error}",
    ):
        assert flag in text
    assert "sets PRESTOP_DRAIN_QUIET_SECONDS: the traffic drain ends after" in text
    assert "(default: 3)" in text
    # A flag sets the variable, so the one parser checks it: a wrong word is a config error.
    assert cli.main(["check", "--drain-source", "ebpf"], {}) == cli.EXIT_CONFIG
    assert "must be one of auto, netlink, proc" in capsys.readouterr().err


def test_check_prints_the_plan_with_its_budget(capsys: pytest.CaptureFixture[str]) -> None:
    environ = {"PRESTOP_DRAIN_MODE": "traffic", "PRESTOP_APP_PORTS": "8080,8443"}
    assert cli.main(["check"], environ) == 0
    out = capsys.readouterr().out
    assert "configuration is valid" in out
    assert "watch ports 8080,8443" in out
    assert "at most 24s" in out
    assert "Time budget: drain 24s" in out


def test_secrets_are_redacted_everywhere_config_is_shown(
    capsys: pytest.CaptureFixture[str],
) -> None:
    environ = {
        "PRESTOP_TOKEN": SECRET_TOKEN,
        "PRESTOP_EUREKA_URLS": f"http://admin:{SECRET_PASSWORD}@eureka:8761/eureka/",
        "PRESTOP_APP_HEALTH_URL": "http://u:hunter2@app:8080/health?key=abc",
    }
    config = load(environ)
    shown = str(config.redacted()) + repr(config)
    for secret in (SECRET_TOKEN, SECRET_PASSWORD, "hunter2", "key=abc"):
        assert secret not in shown
    assert "http://admin:***@eureka:8761/eureka/" in shown
    assert cli.main(["check"], environ) == 0
    out = capsys.readouterr().out
    for secret in (SECRET_TOKEN, SECRET_PASSWORD, "hunter2"):
        assert secret not in out


def test_secrets_are_redacted_in_error_messages(capsys: pytest.CaptureFixture[str]) -> None:
    for unencoded in ("p@ss:w/rd", SECRET_PASSWORD):
        bad = {"PRESTOP_EUREKA_URLS": f"eureka://admin:{unencoded}@eureka/"}
        assert cli.main([], bad) == cli.EXIT_CONFIG
        err = capsys.readouterr().err
        assert unencoded not in err and "ss:w" not in err and "admin:***@eureka/" in err


def test_redact_url_keeps_what_helps_debugging() -> None:
    assert redact_url("https://user:pw@host:8761/eureka/") == "https://user:***@host:8761/eureka/"
    assert redact_url("http://host/eureka/") == "http://host/eureka/"


def test_config_is_frozen() -> None:
    config = Config()
    with pytest.raises(AttributeError):
        config.port = 1  # type: ignore[misc]


def test_a_real_process_with_bad_config_exits_2_without_traceback() -> None:
    done = subprocess.run(
        [sys.executable, "-m", "agent.cli"],
        env={"PRESTOP_DRAIN_MODE": "sleepy", "PATH": "/usr/bin:/bin"},
        capture_output=True,
        text=True,
        timeout=30,
    )
    assert done.returncode == 2
    assert done.stdout == ""
    assert done.stderr.strip().splitlines() == [
        "prestop-agent: configuration error: PRESTOP_DRAIN_MODE='sleepy':"
        " must be one of fixed, traffic"
    ]


def test_urls_inside_messages_lose_password_and_query() -> None:
    from agent.http import redact_urls_in

    text = "400, message='x', url='https://u:pw@h:1/p?token=t0k' and http://h2/q?a=b done"
    assert redact_urls_in(text) == (
        "400, message='x', url='https://u:***@h:1/p?***' and http://h2/q?*** done"
    )


@pytest.mark.parametrize(
    ("environ", "message"),
    [
        # Issue 21 item 9: requests went to host "user", port 123, and errors printed the digits.
        (
            {
                "PRESTOP_REGISTRY": "eureka",
                "PRESTOP_EUREKA_URLS": "http://user:123#4/5@eureka-0:8761/eureka/",
                "PRESTOP_EUREKA_APP": "orders",
                "POD_IP": "10.1.2.3",
            },
            "PRESTOP_EUREKA_URLS='http://user:***@eureka-0:8761/eureka/': the part before '@'"
            " holds '#', '/' or '?', which end a URL's host part: encode them in a password as"
            " %23, %2F and %3F",
        ),
        (
            {"PRESTOP_APP_HEALTH_URL": "http://probe:9/x@127.0.0.1:8080/actuator/health"},
            "PRESTOP_APP_HEALTH_URL='http://probe:***@127.0.0.1:8080/actuator/health': the part",
        ),
        # Item 10: check passed, the agent crashed at start-up with a traceback.
        (
            {"PRESTOP_APP_PORTS": ",".join(str(p) for p in range(2000, 6100, 2))},
            "has 2050 runs of consecutive ports; at most 1024 can be watched",
        ),
        # Item 16: accepted, and every hook then got 400 from the HTTP parser.
        ({"PRESTOP_TOKEN": "t" * 9000}, "PRESTOP_TOKEN='***': is longer than 4096 bytes"),
        # Item 22: the hook's own connection was the app's traffic: every drain ran to its max.
        ({"PRESTOP_APP_PORT": "8099"}, "PRESTOP_APP_PORT=8099: is the agent's own port"),
        (
            {"PRESTOP_PORT": "9000", "PRESTOP_APP_PORTS": "8080,9000"},
            "PRESTOP_APP_PORTS=9000: is the agent's own port",
        ),
        # Item 23: accepted, and the mark-down always failed (no time for one request).
        (
            {"PRESTOP_REGISTRY": "actuator", "PRESTOP_REGISTRY_TIMEOUT_SECONDS": "0.06"},
            "PRESTOP_REGISTRY_TIMEOUT_SECONDS='0.06': must be a finite number of seconds >= 0.25",
        ),
    ],
)
def test_settings_that_could_never_work_are_refused_at_start_up(
    environ: dict[str, str], message: str, capsys: pytest.CaptureFixture[str]
) -> None:
    assert cli.main(["check"], environ) == cli.EXIT_CONFIG
    err = capsys.readouterr().err
    assert err.count("\n") == 1 and err.startswith("prestop-agent: configuration error: ")
    assert message in err, err
    assert "123" not in err and "t" * 100 not in err


def test_minus_zero_seconds_is_shown_as_zero(capsys: pytest.CaptureFixture[str]) -> None:
    # Issue 21 item 25: "-0s" in check's plan and /status.
    config = load({"PRESTOP_DRAIN_MIN_SECONDS": "-0", "PRESTOP_MARGIN_SECONDS": "-0.0"})
    assert cli.check(config) == 0
    out = capsys.readouterr().out
    assert "-0" not in out, out
    assert config.redacted()["drain_min_seconds"] == 0 and "-0" not in repr(config)
