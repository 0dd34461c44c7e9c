"""The ``prestop-agent`` command: ``run`` (the default) and ``check``.

Flags are a convenience for a person at a terminal; each one only sets the environment variable
of the same meaning before the one parser in :mod:`agent.config` runs, so a flag and a variable can
never disagree about validation.
"""

from __future__ import annotations

# First, before the slower imports: from here on SIGTERM, SIGINT and SIGHUP are recorded instead
# of killing the process (see signals_recorded). Only in the agent's own process: a test that
# imports this module keeps its own handlers.
import signal
import sys
from types import FrameType

_received: list[int] = []


def _record(signum: int, frame: FrameType | None) -> None:
    _received.append(signum)


EARLY_SIGNALS = (signal.SIGTERM, signal.SIGINT, signal.SIGHUP)
if __name__ == "__main__" or sys.argv[0].rpartition("/")[2] == "prestop-agent":
    for _signum in EARLY_SIGNALS:
        signal.signal(_signum, _record)

import argparse
import asyncio
import contextlib
import json
import os
from collections.abc import Iterator, Mapping, Sequence

import structlog

from agent import __version__
from agent.config import Config, ConfigError, load, unknown_variables

log = structlog.get_logger()

# flag -> environment variable it sets
FLAGS = {
    "--host": "PRESTOP_HOST",
    "--port": "PRESTOP_PORT",
    "--drain-mode": "PRESTOP_DRAIN_MODE",
    "--drain-seconds": "PRESTOP_DRAIN_SECONDS",
    "--grace-period-seconds": "PRESTOP_GRACE_PERIOD_SECONDS",
    "--app-port": "PRESTOP_APP_PORT",
    "--registry": "PRESTOP_REGISTRY",
    "--log-format": "PRESTOP_LOG_FORMAT",
    "--log-level": "PRESTOP_LOG_LEVEL",
}

EXIT_CONFIG = 2


def _parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="prestop-agent",
        description="Sidecar that takes a pod out of Eureka and drains it before it stops."
        " Configured by PRESTOP_* environment variables; flags override them.",
    )
    parser.add_argument("--version", action="version", version=f"prestop-agent {__version__}")
    parser.add_argument(
        "command",
        nargs="?",
        choices=("run", "check"),
        default="run",
        help="run the agent (default), or check the configuration and print the shutdown plan",
    )
    for flag, variable in FLAGS.items():
        parser.add_argument(flag, dest=variable, metavar="VALUE", help=f"sets {variable}")
    return parser


@contextlib.contextmanager
def signals_recorded() -> Iterator[list[int]]:
    """From the first instruction of :func:`main` until the agent's loop takes them over, record
    SIGTERM, SIGINT and SIGHUP instead of dying of them (the default): the pod may be deleted
    while the agent is still importing, and that deletion still deserves its drain and a log
    line. Handlers only record (uvicorn's rule); the previous ones come back on exit."""
    previous = {signum: signal.signal(signum, _record) for signum in EARLY_SIGNALS}
    try:
        yield _received
    finally:
        for signum, handler in previous.items():
            signal.signal(signum, handler)
        _received.clear()  # replayed by now (run) or read (check); the next main() starts afresh


def main(argv: Sequence[str] | None = None, environ: Mapping[str, str] | None = None) -> int:
    with signals_recorded() as early_signals:
        args = _parser().parse_args(argv)
        env = dict(os.environ if environ is None else environ)
        flags = {name: value for name, value in vars(args).items() if name in FLAGS.values()}
        env.update({name: value for name, value in flags.items() if value is not None})
        try:
            config = load(env)
        except ConfigError as exc:
            print(f"prestop-agent: configuration error: {exc}", file=sys.stderr)
            return EXIT_CONFIG
        warnings = unknown_variables(env)

        from agent import logs

        logs.configure(config.log_format, config.log_level)
        if args.command != "check":
            from agent.main import run

            for warning in warnings:
                log.warning("unknown_variable", warning=warning)
            return run(config, early_signals)
        stopped = [s for s in early_signals if s in (signal.SIGTERM, signal.SIGINT)]
    # ``check`` is a person's command, not the sidecar: Ctrl-C interrupts it as usual.
    if stopped:
        print(f"prestop-agent: {signal.Signals(stopped[0]).name} received, check not run")
        return 128 + stopped[0]
    return check(config, warnings)


def check(config: Config, warnings: Sequence[str] = ()) -> int:
    """Print the effective settings and the shutdown plan, reach the registry; 0 if all is well."""
    budget = config.budget()
    print(f"prestop-agent {__version__}: configuration is valid")
    for warning in warnings:
        print(f"warning: {warning}")
    print("\nEffective settings (secrets redacted):")
    for name, value in config.redacted().items():
        print(f"  {name} = {json.dumps(value)}")
    print("\nShutdown plan, from the first trigger (/prestop, SIGTERM or SIGINT):")
    print("  1. /ready answers 503 at once")
    if config.registry == "none":
        print("  2. registry: none, nothing to mark down")
    else:
        print(
            f"  2. registry {config.registry}: mark the instance {config.eureka_status}"
            f" within {config.registry_timeout_seconds:g}s (retries included), then read it back"
        )
    if config.drain_mode == "fixed":
        print(f"  3. drain: keep the app serving for {config.drain_seconds:g}s")
    else:
        ports = ",".join(str(p) for p in config.app_ports)
        print(
            f"  3. drain: watch ports {ports} every {config.drain_poll_seconds:g}s; at least"
            f" {config.drain_min_seconds:g}s, then end after {config.drain_quiet_seconds:g}s"
            f" without data and nothing in flight; at most {budget.drain:g}s"
        )
    print("  4. answer every /prestop caller: the kubelet then sends the app SIGTERM")
    print(f"     and the app has {config.app_shutdown_seconds:g}s to stop")
    print("  5. exit once a SIGTERM has arrived")
    print(f"\nTime budget: {budget.arithmetic()}")
    if config.registry == "none":
        return 0
    return asyncio.run(_check_registry(config))


async def _check_registry(config: Config) -> int:
    import aiohttp

    from agent.registry import RegistryError, open_registry
    from agent.server import AppHealth

    async with aiohttp.ClientSession() as session:
        url = config.app_health_url
        registry = open_registry(config, session, AppHealth(url, session) if url else None)
        try:
            async with asyncio.timeout(config.registry_timeout_seconds):
                described = await registry.describe()
        except (RegistryError, TimeoutError) as exc:
            reason = str(exc) or f"no answer within {config.registry_timeout_seconds:g}s"
            print(f"\nRegistry {config.registry}: NOT reachable: {reason}")
            return 1
        finally:
            await registry.close()
    print(f"\nRegistry {config.registry}: reachable; the instance it would mark down:")
    print(json.dumps(described, indent=2, default=str))
    return 0


if __name__ == "__main__":
    sys.exit(main())
