"""The rollout benchmark's parts: timings, scenarios, pod manifests and record readers.

``bench/rollout/deployment.py`` puts them on the real cluster of tests/harness/cluster.py: the demo
app (``tests/fixtures/demo-app``) as a Deployment whose pods are set up for a scenario
(``replica_pod``), the fixture Eureka server (``eureka_pod``), and the callers as pods:

- ``busy``: the demo app in caller mode (Spring Cloud LoadBalancer over Boot's pooled keep-alive
  Apache HttpClient 5, no retries) at ``BUSY_RATE`` req/s;
- ``slow``: the same at ``SLOW_RATE`` req/s, i.e. about one request per 4 s to each of three
  replicas;
- ``fresh``: ``bench/rollout/caller.py``, a new TCP connection per request at ``FRESH_RATE``
  req/s, discovering the instances through Eureka's REST API with its own fetch and cache times.

The Spring callers keep their records in memory (read over HTTP, ``SpringRecords``); the Python
callers append one JSON line per request to a file in ``records`` (a hostPath volume,
``RecordFile``).
"""

from __future__ import annotations

import contextlib
import json
import urllib.request
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from tests.harness.node import KubeNode
from tests.harness.pods import (
    APP_PORT,
    agent_pod,
    eureka_server_pod,
    java_command,
    pod_manifest,
)

HERE = Path(__file__).resolve().parent
APP = "DEMO-APP"
OK = "200"
BUSY_RATE = 40.0
SLOW_RATE = 0.75
FRESH_RATE = 25.0
CONNECT_TIMEOUT = 1.0  # every caller's, seconds
READ_TIMEOUT = 5.0

# urllib without proxies from the environment: every target is on this machine.
_OPENER = urllib.request.build_opener(urllib.request.ProxyHandler({}))


@dataclass(frozen=True)
class Timings:
    """Spring Cloud's Eureka timings, all in seconds; ``SCALED`` is production divided by 10."""

    server_cache: float
    """Eureka server read-only response cache refresh (responseCacheUpdateIntervalMs)."""
    client_fetch: float
    """Client registry fetch interval (eureka.client.registry-fetch-interval-seconds)."""
    balancer_cache: float
    """Spring Cloud LoadBalancer cache TTL (spring.cloud.loadbalancer.cache.ttl)."""
    renewal: float
    """Lease renewal interval (eureka.instance.lease-renewal-interval-in-seconds)."""
    expiration: float
    """Lease expiration (eureka.instance.lease-expiration-duration-in-seconds)."""
    replication: float
    """Instance-info replication interval (eureka.client.instance-info-replication-...)."""
    grace: int
    """The replicas' terminationGracePeriodSeconds."""
    keep_alive_requests: int = 100
    """The replicas' ``server.tomcat.max-keep-alive-requests`` (Tomcat's default 100): the
    request on which Tomcat answers ``Connection: close``, the only clean way a kept-alive
    connection pinned to a terminating pod through the Service moves off it. The callers' rates
    are not scaled, so the scaled timings scale this count instead: 10 requests take a pinned
    connection as long, relative to the 10x shorter propagation floor, as 100 do in production
    (docs/operations.md, "Callers pinned through a Service")."""
    scale: int = 1
    """How many times shorter than production these timings are (minReadySeconds follows)."""

    @property
    def client_refresh(self) -> float:
        """How long a client may route to an instance after its server's view changed."""
        return self.client_fetch + self.balancer_cache


SCALED = Timings(3.0, 3.0, 3.5, 3.0, 9.0, 3.0, grace=30, keep_alive_requests=10, scale=10)
PRODUCTION = Timings(30.0, 30.0, 35.0, 30.0, 90.0, 30.0, grace=150)


@dataclass(frozen=True)
class Scenario:
    """How a replica is told to stop: its hook and, for the agent, its drain."""

    key: str
    title: str
    hook: str
    """``none``, ``classic`` (exec: POST DOWN to the actuator, then sleep), ``sleep``
    (Kubernetes' preStop.sleep), or ``agent`` (preStop.httpGet to the agent's /prestop)."""
    sleep: float = 0.0
    """Seconds of sleep for ``classic`` and ``sleep``; the fixed drain's length for the agent."""
    agent_env: dict[str, str] = field(default_factory=dict)
    native: bool = False


def scenarios(timings: Timings) -> dict[str, Scenario]:
    """The six scenarios of the benchmark, sleeps at 3 s scaled (30 s production)."""
    sleep = 30.0 / timings.scale
    traffic = {"PRESTOP_DRAIN_MODE": "traffic", "PRESTOP_DRAIN_QUIET_SECONDS": "1"}
    every = [
        Scenario("none", "1 no hook", "none"),
        Scenario("classic", f"2 exec DOWN + sleep {sleep:g}", "classic", sleep),
        Scenario("sleep", f"3 preStop.sleep {sleep:g}", "sleep", sleep),
        Scenario(
            "fixed",
            f"4 agent fixed {sleep:g} s",
            "agent",
            sleep,
            {"PRESTOP_DRAIN_MODE": "fixed", "PRESTOP_DRAIN_SECONDS": f"{sleep:g}"},
        ),
        Scenario("traffic", "5 agent traffic, classic", "agent", 0.0, traffic),
        Scenario("native", "6 agent traffic, native", "agent", 0.0, traffic, native=True),
    ]
    return {s.key: s for s in every}


def classic_sleep(seconds: float) -> Scenario:
    """The classic hook with another sleep length (the search for the shortest safe sleep)."""
    return Scenario(f"classic-{seconds:g}", f"exec DOWN + sleep {seconds:g}", "classic", seconds)


# ----------------------------------------------------------------------------- manifests


def _eureka_args(timings: Timings, url: str) -> list[str]:
    return [
        f"--eureka.client.service-url.defaultZone={url}",
        f"--eureka.client.registry-fetch-interval-seconds={timings.client_fetch:g}",
    ]


def eureka_pod(node: KubeNode, jar: Path, timings: Timings) -> dict[str, Any]:
    """The fixture Eureka server with a read-only response cache of ``server_cache`` seconds."""
    pod = eureka_server_pod("eureka", node.prepared, jar)
    pod["spec"]["containers"][0]["command"] += [
        "--eureka.server.use-read-only-response-cache=true",
        f"--eureka.server.response-cache-update-interval-ms={int(timings.server_cache * 1000)}",
    ]
    return pod


# The classic hook: the POST `curl -X POST .../actuator/serviceregistry -d '{"status":"DOWN"}'`
# sends, written by bash to /dev/tcp (the JRE image has bash but no curl), then a sleep.
_DOWN_BODY = '{"status":"DOWN"}'
_CLASSIC_HOOK = (
    f"exec 3<>/dev/tcp/127.0.0.1/{APP_PORT}"
    " && printf 'POST /actuator/serviceregistry HTTP/1.1\\r\\nHost: localhost\\r\\n"
    "Content-Type: application/json\\r\\nContent-Length: "
    f"{len(_DOWN_BODY)}\\r\\nConnection: close\\r\\n\\r\\n{_DOWN_BODY}' >&3"
    " && cat <&3 >/dev/null; sleep {seconds}"
)


def replica_pod(
    node: KubeNode,
    name: str,
    jar: Path,
    scenario: Scenario,
    timings: Timings,
    eureka_url: str,
) -> dict[str, Any]:
    """A demo app replica set up for ``scenario`` (tests/harness/pods.py's agent pod, reshaped)."""
    agent_env = {
        "PRESTOP_REGISTRY": "eureka",
        "PRESTOP_EUREKA_URLS": eureka_url,
        "PRESTOP_EUREKA_APP": APP,
        "PRESTOP_EUREKA_RENEWAL_SECONDS": f"{timings.renewal:g}",
        "PRESTOP_EUREKA_LEASE_SECONDS": f"{timings.expiration:g}",
        "PRESTOP_EUREKA_SERVER_CACHE_SECONDS": f"{timings.server_cache:g}",
        "PRESTOP_EUREKA_CLIENT_REFRESH_SECONDS": f"{timings.client_refresh:g}",
        **scenario.agent_env,
    }
    pod = agent_pod(
        name,
        node.prepared,
        jar,
        agent_env,
        native=scenario.native,
        grace=timings.grace,
        eureka_url=eureka_url,
    )
    spec = pod["spec"]
    app = spec["containers"][0]
    app["command"] += [
        *_eureka_args(timings, eureka_url)[1:],
        f"--eureka.instance.lease-renewal-interval-in-seconds={timings.renewal:g}",
        f"--eureka.instance.lease-expiration-duration-in-seconds={timings.expiration:g}",
        f"--eureka.client.instance-info-replication-interval-seconds={timings.replication:g}",
        "--spring.lifecycle.timeout-per-shutdown-phase=5s",
        f"--server.tomcat.max-keep-alive-requests={timings.keep_alive_requests}",
    ]
    if scenario.hook == "agent":
        return pod
    # No agent: the app's own readiness group is its probe, and the hook is the scenario's.
    spec["containers"] = [app]
    spec.pop("initContainers", None)
    app["readinessProbe"]["httpGet"] = {"port": APP_PORT, "path": "/actuator/health/readiness"}
    if scenario.hook == "none":
        del app["lifecycle"]
    elif scenario.hook == "sleep":
        app["lifecycle"] = {"preStop": {"sleep": {"seconds": int(scenario.sleep)}}}
    else:
        script = _CLASSIC_HOOK.replace("{seconds}", f"{scenario.sleep:g}")
        app["lifecycle"] = {"preStop": {"exec": {"command": ["bash", "-c", script]}}}
    return pod


def _records_volume(records: Path) -> tuple[dict[str, Any], dict[str, Any]]:
    volume = {"name": "records", "hostPath": {"path": str(records), "type": "Directory"}}
    return volume, {"name": "records", "mountPath": str(records)}


def spring_caller_pod(
    node: KubeNode, name: str, jar: Path, rate: float, timings: Timings, eureka_url: str
) -> dict[str, Any]:
    """The demo app in caller mode (its ``Caller``, ``demo.caller.target``): a Eureka client
    that only fetches; its records are read over HTTP (``/caller/records``)."""
    pod = agent_pod(name, node.prepared, jar, {}, eureka_url=eureka_url)
    spec = pod["spec"]
    app = spec["containers"][0]
    spec["containers"] = [app]
    app["command"] = java_command(
        jar,
        f"--server.port={APP_PORT}",
        *_eureka_args(timings, eureka_url),
        "--eureka.client.register-with-eureka=false",
        f"--spring.cloud.loadbalancer.cache.ttl={int(timings.balancer_cache * 1000)}ms",
        f"--demo.caller.target={APP.lower()}",
        f"--demo.caller.interval-ms={round(1000 / rate)}",
        # A deleted pod's address vanishes from the bridge: a connect to it is not refused but
        # unanswered, and HttpClient's default connect timeout (3 min) would hold the caller's
        # few sender threads for minutes. Timeouts as a production client sets them.
        f"--spring.http.client.connect-timeout={CONNECT_TIMEOUT:g}s",
        f"--spring.http.client.read-timeout={READ_TIMEOUT:g}s",
    )
    del app["lifecycle"]
    app["readinessProbe"]["httpGet"] = {"port": APP_PORT, "path": "/actuator/health"}
    spec["terminationGracePeriodSeconds"] = 5
    return pod


def fresh_caller_pod(
    node: KubeNode, name: str, timings: Timings, eureka_url: str, records: Path
) -> dict[str, Any]:
    """``caller.py`` (mounted from the repository) in the JRE image, which has a bare python3."""
    volume, mount = _records_volume(records)
    script = {"name": "script", "hostPath": {"path": str(HERE), "type": "Directory"}}
    return pod_manifest(
        name,
        {
            "terminationGracePeriodSeconds": 2,
            "containers": [
                {
                    "name": "caller",
                    "image": node.prepared.java_image,
                    "imagePullPolicy": "Never",
                    "command": [
                        "python3",
                        "/rollout/caller.py",
                        f"--eureka={eureka_url}",
                        f"--app={APP}",
                        f"--rate={FRESH_RATE:g}",
                        f"--fetch={timings.client_fetch:g}",
                        f"--cache={timings.balancer_cache:g}",
                        f"--record={records / name}.jsonl",
                        f"--connect-timeout={CONNECT_TIMEOUT:g}",
                        f"--read-timeout={READ_TIMEOUT:g}",
                    ],
                    "volumeMounts": [mount, {"name": "script", "mountPath": "/rollout"}],
                }
            ],
            "volumes": [volume, script],
        },
    )


# --------------------------------------------------------------------------------- views


def eureka_view(eureka_url: str) -> dict[str, str]:
    """Eureka's client-facing view of the app (its response cache): ``ip:port`` -> status."""
    request = urllib.request.Request(
        f"{eureka_url}apps/{APP}", headers={"Accept": "application/json"}
    )
    try:
        with _OPENER.open(request, timeout=2) as response:
            instances: Any = json.load(response)["application"]["instance"]
    except (OSError, ValueError, KeyError):
        return {}
    if isinstance(instances, dict):
        instances = [instances]
    return {f"{i['ipAddr']}:{i['port']['$']}": str(i["status"]) for i in instances}


class RecordFile:
    """The fresh caller's record file, read incrementally (it only grows)."""

    def __init__(self, path: Path) -> None:
        self.path = path
        self.records: list[dict[str, Any]] = []
        self._offset = 0

    def read(self, since: float = 0.0) -> list[dict[str, Any]]:
        """The complete records sent at or after ``since`` (epoch seconds)."""
        if self.path.exists():
            with self.path.open("rb") as file:
                file.seek(self._offset)
                chunk = file.read()
            complete = chunk[: chunk.rfind(b"\n") + 1]  # a line being written waits
            self._offset += len(complete)
            for line in complete.decode(errors="replace").splitlines():
                with contextlib.suppress(ValueError):
                    self.records.append(json.loads(line))
        return [r for r in self.records if r["t"] >= since]


# What the Spring caller's exception messages say, as the fresh caller's exception classes do.
_CAUSES = (
    ("Connection refused", "refused"),
    ("Connect timed out", "connect timeout"),
    ("connect timed out", "connect timeout"),
    ("Read timed out", "read timeout"),
    ("Connection reset", "reset"),
    ("closed", "closed"),
)


def _failure_kind(outcome: str) -> str:
    """``ExceptionClass: message`` -> ``ExceptionClass`` plus the cause its message names."""
    name, _, message = outcome.partition(":")
    cause = next((short for text, short in _CAUSES if text in message), "")
    return f"{name} ({cause})" if cause else name


class SpringRecords:
    """A Spring caller's records (``/caller/records`` of the demo app's ``Caller``), in the
    fresh caller's form: ``t`` seconds, ``ms``, ``target`` ``ip:port``, ``outcome`` ``200``
    or the exception class."""

    def __init__(self, node: KubeNode, pod: str) -> None:
        self.node = node
        self.pod = pod

    def read(self, since: float = 0.0) -> list[dict[str, Any]]:
        address = f"{self.node.pod_ip(self.pod)}:{APP_PORT}"
        url = f"http://{address}/caller/records?since={int(since * 1000)}"
        try:
            with _OPENER.open(url, timeout=10) as response:
                calls = json.load(response)
        except (OSError, ValueError):
            return []
        return [
            {
                "t": call["sentMs"] / 1000,
                "ms": call["tookMs"],
                # The instance id is ip:app:port (the demo app's eureka.instance.instance-id).
                "target": (
                    "{0}:{2}".format(*call["target"].split(":"))
                    if call["target"].count(":") == 2
                    else ""
                ),
                "outcome": OK if call["outcome"] == "ok" else _failure_kind(call["outcome"]),
            }
            for call in calls
        ]
