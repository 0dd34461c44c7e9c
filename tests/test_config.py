"""Config: every variable's error path, the grace-budget arithmetic, redaction, the CLI's exit 2."""

from __future__ import annotations

import ipaddress
import re
import subprocess
import sys
from pathlib import Path

import pytest

from agent import cli
from agent.config import Config, ConfigError, load, redact_url

SECRET_TOKEN = "s3cr3t-token-value"
SECRET_PASSWORD = "p%40ss%3Aw%2Frd"  # "p@ss:w/rd", percent-encoded as in a URL


def test_defaults_are_a_working_agent() -> None:
    config = load({})
    assert (config.host, config.port) == ("0.0.0.0", 8099)
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
    ("PRESTOP_REGISTRY_TIMEOUT_SECONDS", "0", "> 0"),
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
    assert message.startswith("PRESTOP_DRAIN_SECONDS")
    assert (
        "drain 25s + registry deadline 3s + app shutdown 5s + margin 1s = 34s > grace period 30s"
        in message
    )
    assert "at most 21s is left for the drain" in message


def test_traffic_maximum_defaults_to_what_the_budget_leaves() -> None:
    config = load({"PRESTOP_DRAIN_MODE": "traffic", "PRESTOP_GRACE_PERIOD_SECONDS": "45"})
    assert config.drain_limit == 45 - 5 - 1
    with pytest.raises(ConfigError, match=r"PRESTOP_DRAIN_MAX_SECONDS.*= 41s > grace period 40s"):
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


def test_a_grace_period_shorter_than_the_app_shutdown_is_rejected() -> None:
    with pytest.raises(ConfigError, match="at most 0s is left"):
        load({"PRESTOP_GRACE_PERIOD_SECONDS": "5", "PRESTOP_DRAIN_MAX_SECONDS": "1"})


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
    assert fixed["PRESTOP_DRAIN_SECONDS"] == "10.0" and fixed["PRESTOP_REGISTRY"] == "none"
    assert all(name.startswith(("PRESTOP_", "POD_")) for name in fixed), "no field names"
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
    assert traffic["PRESTOP_DRAIN_QUIET_SECONDS"] == "3.0"
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
