"""The ``prestop-agent`` command: ``run`` (the default) and ``check``.

Flags are a convenience for a person at a terminal; each one only sets the environment variable
of the same meaning before the one parser in :mod:`agent.config` runs, so a flag and a variable can
never disagree about validation.
"""

from __future__ import annotations

import argparse
import asyncio
import json
import os
import sys
from collections.abc import Mapping, Sequence

from agent import __version__
from agent.config import Config, ConfigError, load

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


def main(argv: Sequence[str] | None = None, environ: Mapping[str, str] | None = None) -> int:
    args = _parser().parse_args(argv)
    env = dict(os.environ if environ is None else environ)
    flags = {name: value for name, value in vars(args).items() if name in FLAGS.values()}
    env.update({name: value for name, value in flags.items() if value is not None})
    try:
        config = load(env)
    except ConfigError as exc:
        print(f"prestop-agent: configuration error: {exc}", file=sys.stderr)
        return EXIT_CONFIG

    from agent import logs

    logs.configure(config.log_format, config.log_level)
    if args.command == "check":
        return check(config)
    from agent.main import run

    return run(config)


def check(config: Config) -> int:
    """Print the effective settings and the shutdown plan, reach the registry; 0 if all is well."""
    budget = config.budget()
    print(f"prestop-agent {__version__}: configuration is valid")
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
            f"  3. drain: watch ports {ports} every {config.drain_poll_seconds:g}s (open"
            " connections, and those that opened and closed between two looks); at least"
            f" {config.drain_min_seconds:g}s, then end after {config.drain_quiet_seconds:g}s"
            f" without data and nothing in flight; at most {budget.drain:g}s"
        )
        if config.registry != "none":
            measured = (
                "when the Eureka servers' client-facing view shows the instance out (watched)"
                if config.watches_client_view
                else f"the server cache's bound, {config.eureka_server_cache_seconds:g}s"
                " (not observable: set PRESTOP_EUREKA_URLS and PRESTOP_EUREKA_APP)"
            )
            print(
                "     and never before registry clients can have dropped the instance:"
                f" {measured} + client refresh {config.eureka_client_refresh_seconds:g}s;"
                f" at worst {config.worst_case_floor():g}s after the trigger"
            )
        warning = config.floor_warning()
        if warning is not None:
            print(f"     WARNING: {warning}")
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
