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
import math
import os
from collections.abc import Iterator, Mapping, Sequence
from typing import TYPE_CHECKING

import structlog

from agent import __version__, floorplan
from agent.config import (
    Config,
    ConfigError,
    in_use,
    load,
    unknown_variables,
    variables,
)
from agent.plan import ShutdownPlan
from agent.reference import settings

if TYPE_CHECKING:
    import aiohttp

log = structlog.get_logger()

# flag -> environment variable it sets: the settings a person at a terminal sets most (the facts
# on each Config field say which), named after their variable.
FLAGS = {
    "--" + variable.name.removeprefix("PRESTOP_").lower().replace("_", "-"): variable.name
    for _, variable in variables()
    if variable.flag
}
# Flags whose variable takes one of a few words: --help lists them (the parser still checks).
CHOICES = {variable.name: variable.choices for _, variable in variables() if variable.choices}

EXIT_CONFIG = 2
# check: the registry's servers gave no answer / answered, but the instance is not there.
EXIT_REGISTRY_UNREACHABLE = 1
EXIT_INSTANCE_NOT_FOUND = 3
# check --config-only: the propagation floor can outlast the drain's maximum (helm test fails).
EXIT_FLOOR_ABOVE_MAX = 4


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
    check = parser.add_argument_group("check only")
    check.add_argument(
        "--config-only",
        action="store_true",
        help="check: validate and print the plan without asking the registry (a pod that is not"
        f" the app, e.g. helm test); exit {EXIT_FLOOR_ABOVE_MAX} when the propagation floor can"
        " outlast the drain maximum",
    )
    check.add_argument(
        "--floor-target",
        type=_positive_seconds,
        metavar="SECONDS",
        help="check: the propagation floor to bring the Eureka settings under (default: the"
        " drain maximum less the traffic drain's QUIET)",
    )
    check.add_argument(
        "--client-fetch-seconds",
        type=_positive_seconds,
        default=floorplan.DEFAULT_CLIENT_FETCH_SECONDS,
        metavar="SECONDS",
        help="check: the clients' eureka.client.registry-fetch-interval-seconds (default:"
        " %(default)g)",
    )
    check.add_argument(
        "--loadbalancer-ttl-seconds",
        type=_positive_seconds,
        default=floorplan.DEFAULT_LOADBALANCER_TTL_SECONDS,
        metavar="SECONDS",
        help="check: the clients' spring.cloud.loadbalancer.cache.ttl (default: %(default)g)",
    )
    documented = {s.variable: s for s in settings()}
    for flag, variable in FLAGS.items():
        choices = CHOICES.get(variable)
        metavar = "{" + ",".join(choices) + "}" if choices else _metavar(variable)
        setting = documented[variable]
        parser.add_argument(
            flag,
            dest=variable,
            metavar=metavar,
            help=f"sets {variable}: {setting.summary} (default: {setting.default})".replace(
                "%", "%%"
            ),
        )
    parser.epilog = "Every setting: docs/reference.md, or `prestop-agent check` for yours."
    return parser


def _positive_seconds(raw: str) -> float:
    try:
        value = float(raw)
    except ValueError:
        raise argparse.ArgumentTypeError(f"{raw!r} is not a number of seconds") from None
    if not (value > 0 and math.isfinite(value)):
        raise argparse.ArgumentTypeError(f"{raw!r}: must be more than 0 seconds")
    return value


def _metavar(variable: str) -> str:
    if variable.endswith("_SECONDS"):
        return "SECONDS"
    if variable.endswith("_PORTS"):
        return "PORT[,PORT...]"
    if variable.endswith("_PORT"):
        return "PORT"
    return "VALUE"


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
            try:
                return run(config, early_signals)
            finally:
                _write_pending_logs()
        stopped = [s for s in early_signals if s in (signal.SIGTERM, signal.SIGINT)]
    # ``check`` is a person's command, not the sidecar: Ctrl-C interrupts it as usual.
    if stopped:
        print(f"prestop-agent: {signal.Signals(stopped[0]).name} received, check not run")
        return 128 + stopped[0]
    try:
        return check(
            config,
            warnings,
            config_only=args.config_only,
            floor_target=args.floor_target,
            client_fetch_seconds=args.client_fetch_seconds,
            loadbalancer_ttl_seconds=args.loadbalancer_ttl_seconds,
        )
    finally:
        _write_pending_logs()


# At exit, how long the last log lines may take to reach a slow reader: the drain is over by
# then, and a reader that is stuck must not keep the pod from going.
PENDING_LOGS_SECONDS = 1.0


def _write_pending_logs() -> None:
    from agent import logs

    logs.write_pending(PENDING_LOGS_SECONDS)


def check(
    config: Config,
    warnings: Sequence[str] = (),
    *,
    config_only: bool = False,
    floor_target: float | None = None,
    client_fetch_seconds: float = floorplan.DEFAULT_CLIENT_FETCH_SECONDS,
    loadbalancer_ttl_seconds: float = floorplan.DEFAULT_LOADBALANCER_TTL_SECONDS,
) -> int:
    """Print the effective settings, the shutdown plan and the propagation floor by stage, reach
    the registry (unless ``config_only``); 0 if all is well."""
    plan = ShutdownPlan.of(config)
    print(f"prestop-agent {__version__}: configuration is valid")
    for warning in warnings:
        print(f"warning: {warning}")
    print(
        f"\nSettings read by drain mode {config.drain_mode} and registry {config.registry}"
        " (secrets redacted):"
    )
    shown = config.redacted()
    used = [s for s in settings() if in_use(config, s.variable)]
    width = max(len(s.variable) for s in used)
    for setting in used:
        print(f"  {setting.variable:<{width}} = {_shown_value(shown[setting.field])}")
    print("  (what each one means: docs/reference.md)")
    print()
    for line in plan.describe():
        print(line)
    if config.registry != "none":
        stages = floorplan.stages_of(
            config.eureka_server_cache_seconds,
            config.eureka_client_refresh_seconds,
            client_fetch_seconds,
            loadbalancer_ttl_seconds,
        )
        # By default the floor plus QUIET fits the drain maximum: a drain can still end quiet
        # after the floor instead of at its maximum.
        quiet = config.drain_quiet_seconds if plan.strategy.waits_for_floor else 0.0
        target = plan.budget.drain - quiet if floor_target is None else floor_target
        print()
        for line in floorplan.describe(stages, target):
            print(line)
    if config_only:
        if plan.floor_warning() is not None:
            print("\nThe propagation floor can outlast the drain maximum (see WARNING above)")
            return EXIT_FLOOR_ABOVE_MAX
        return 0
    if config.in_cluster:
        asyncio.run(_check_kubernetes(config))
    if config.registry == "none":
        return 0
    return asyncio.run(_check_registry(config))


def _shown_value(value: object) -> str:
    if value is None:
        return "unset"
    if isinstance(value, list):
        value = ",".join(str(item) for item in value)
    if isinstance(value, bool):
        return "true" if value else "false"
    if isinstance(value, float):
        return f"{value:g}"
    return str(value) if value != "" else "empty"


# check's one list call to the API server is bounded by this many seconds.
KUBE_CHECK_SECONDS = 5.0


async def _check_kubernetes(config: Config) -> None:
    """In a cluster: whether the EndpointSlices can be read (one bounded list call), and which
    list the pod; when they cannot, the same warning and remedy as the agent's at start-up.
    A warning, not a failure: the drain then assumes the source's bound."""
    import aiohttp

    from agent import endpointslices
    from agent.kube import InCluster, KubeClient, KubeError

    assert config.kubernetes_service_host is not None  # config.in_cluster
    cluster = InCluster(config.kubernetes_service_host, config.kubernetes_service_port)
    namespace = config.pod_namespace or cluster.namespace()
    assumed = (
        f"the drain will assume the endpoint not ready {endpointslices.ASSUMED_UPDATE_SECONDS:g}s"
        " after the trigger"
    )
    print()
    if namespace is None:
        print(
            "warning: Kubernetes: the pod's namespace is not known (set POD_NAMESPACE from the"
            f" downward API, or mount the ServiceAccount token); {assumed}"
        )
        return
    try:
        async with aiohttp.ClientSession() as session:
            client = KubeClient(cluster, session, timeout=KUBE_CHECK_SECONDS)
            items, _ = await client.list_endpointslices(namespace)
    except KubeError as error:
        print(
            f"warning: Kubernetes: the EndpointSlices cannot be read: {error}; {assumed};"
            f" {endpointslices.REMEDY}"
        )
        return
    listing = [
        endpointslices.slice_key(item)
        for item in items
        if endpointslices.endpoint_ready(item, config.pod_ip) is not None
    ]
    print(
        f"Kubernetes: the EndpointSlices of namespace {namespace} are readable;"
        f" {len(listing)} list the pod's IP {config.pod_ip}"
        + (f": {', '.join(listing)}" if listing else " (no Service selects it: not counted)")
    )


async def _check_registry(config: Config) -> int:
    """Three answers an operator can act on: the servers are unreachable, they answer but the
    instance is not there, or it is found (and then what the mark-down would change)."""
    import aiohttp

    from agent.http import AppHealth
    from agent.registry import HealthState, RegistryError, open_registry

    timeout = config.registry_timeout_seconds
    async with aiohttp.ClientSession() as session:
        url = config.app_health_url
        registry = open_registry(config, session, AppHealth(url, session) if url else None)
        try:
            try:
                async with asyncio.timeout(timeout):
                    health = await registry.check_health()
            except TimeoutError:
                print(
                    f"\nRegistry {config.registry}: server NOT reachable: no answer within"
                    f" {timeout:g}s"
                )
                return EXIT_REGISTRY_UNREACHABLE
            if health.state is HealthState.UNREACHABLE:
                print(f"\nRegistry {config.registry}: server NOT reachable: {health.reason}")
                return EXIT_REGISTRY_UNREACHABLE
            if health.state is HealthState.NOT_FOUND:
                print(
                    f"\nRegistry {config.registry}: server reachable, but the instance is NOT"
                    f" found: {health.reason}"
                )
                return EXIT_INSTANCE_NOT_FOUND
            print(f"\nRegistry {config.registry}: instance found: {health.reason}")
            await _check_client_view(config, session)
            try:
                async with asyncio.timeout(timeout):
                    described = await registry.describe()
            except (RegistryError, TimeoutError) as exc:
                print(f"  (could not describe it: {exc or 'no answer in time'})")
                return 0
        finally:
            await registry.close()
    print("The instance it would mark down:")
    print(json.dumps(described, indent=2, default=str))
    return 0


async def _check_client_view(config: Config, session: aiohttp.ClientSession) -> None:
    """How the propagation floor will count each Eureka URL: measured, or assumed because
    several peers answer behind it."""
    if not config.watches_client_view:
        return
    from agent.registry.view import ClientView

    try:
        async with asyncio.timeout(config.registry_timeout_seconds):
            said = await ClientView(config, session).describe_peers()
    except TimeoutError:
        said = {"(all)": "not known: no answer in time"}
    print("Propagation floor, per Eureka URL:")
    for url, basis in said.items():
        print(f"  {url}: {basis}")


if __name__ == "__main__":
    sys.exit(main())
