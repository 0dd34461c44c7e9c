"""Rollouts as users run them: ``kubectl rollout restart`` of a Deployment on the real cluster of
``tests/harness/cluster.py``; the Deployment controller, the EndpointSlice controller and
kube-proxy do the rest, nothing is imitated.

On the cluster: Eureka as users deploy it on Kubernetes, two replicating peers behind one
Service (the fixture server as the single-replica Deployments ``eureka-a`` and ``eureka-b``, each
with a Service of its own that the other names as its peer, both selected by the ``eureka``
Service; every client's ``defaultZone`` and the agent's ``PRESTOP_EUREKA_URLS`` is that
Service's ClusterIP, so which peer answers depends on kube-proxy's pick), the demo app as the
Deployment ``demo-app`` (replicas set up for one scenario of ``rig.scenarios``, ``maxSurge: 1``,
``maxUnavailable: 0``, ``minReadySeconds`` the chart's, scaled like the other timings) behind
the Service ``demo-app``, and the callers, each a pod:

- ``busy``, ``slow``: the demo app in caller mode (Spring Cloud LoadBalancer over Eureka);
- ``fresh``: ``caller.py`` over Eureka's REST API, a new connection per request;
- ``pooled``: ``caller.py --service --keep-alive``, kept-alive connections to the ClusterIP;
- ``perconn``: ``caller.py --service``, a new connection to the ClusterIP per request.

``DeploymentRig.rollout()`` restarts the Deployment and watches, several times a second, the
pods, the EndpointSlices, kube-proxy's rules on the node (``iptables-save``) and Eureka's
client-facing view, then reads the callers' records and the kubelet's log: ``Rollout``.
"""

from __future__ import annotations

import json
import threading
import time
import urllib.request
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import yaml

from bench.rollout.rig import (
    BUSY_RATE,
    CONNECT_TIMEOUT,
    FRESH_RATE,
    OK,
    READ_TIMEOUT,
    SCALED,
    SLOW_RATE,
    RecordFile,
    Scenario,
    SpringRecords,
    Timings,
    eureka_pod,
    eureka_view,
    fresh_caller_pod,
    replica_pod,
    spring_caller_pod,
)
from tests.harness.cluster import KubeCluster
from tests.harness.node import kubelet_events
from tests.harness.pods import AGENT_PORT, APP_PORT, EUREKA_PORT

# urllib without proxies from the environment: the agents are on the pod network.
_OPENER = urllib.request.build_opener(urllib.request.ProxyHandler({}))

EUREKA_CALLERS = ("busy", "slow", "fresh")
SERVICE_CALLERS = ("pooled", "perconn")
DEPLOYMENT = "demo-app"
EXAMPLE = Path(__file__).resolve().parents[2] / "k8s" / "examples" / "classic-sidecar.yaml"
EUREKA_PEERS = ("eureka-a", "eureka-b")
# The label the ``eureka`` Service selects: every peer carries it.
EUREKA_PEER_LABEL = {"eureka": "peer"}
START_TIMEOUT = 420.0  # several JVMs starting at once on a loaded 2-core machine
# The chart's minReadySeconds (production); scaled timings divide it by 10 like the others.
MIN_READY_SECONDS = 30
TERMINATION = "termination"
STARTUP = "start-up"


def _metadata(name: str, labels: dict[str, str] | None = None) -> dict[str, Any]:
    return {"name": name, "labels": labels or {"app": name}}


def agent_access(account: str = "default") -> list[dict[str, Any]]:
    """The agent's Role as k8s/examples ships it (get the own pod, list and watch EndpointSlices,
    create Events), bound to ``account``: the rig's pods run as the namespace's ``default``
    account, whose automounted token the agent uses, so its EndpointSlice source observes the
    slices (without the Role it would assume its bound) and its Events reach the pods."""
    objects = yaml.safe_load_all(EXAMPLE.read_text(encoding="utf-8"))
    [role] = [o for o in objects if o and o.get("kind") == "Role"]
    role["metadata"] = _metadata("prestop-agent")
    binding = {
        "apiVersion": "rbac.authorization.k8s.io/v1",
        "kind": "RoleBinding",
        "metadata": _metadata("prestop-agent"),
        "roleRef": {
            "apiGroup": "rbac.authorization.k8s.io",
            "kind": "Role",
            "name": "prestop-agent",
        },
        "subjects": [{"kind": "ServiceAccount", "name": account}],
    }
    return [role, binding]


def deployment(
    name: str,
    pod: dict[str, Any],
    replicas: int,
    min_ready: int = 0,
    extra_labels: dict[str, str] | None = None,
) -> dict[str, Any]:
    """A Deployment of ``pod``'s spec (a pod manifest from tests/harness/pods.py or rig.py); its
    pods are labelled ``app: name`` plus ``extra_labels``."""
    labels = {"app": name}
    return {
        "apiVersion": "apps/v1",
        "kind": "Deployment",
        "metadata": _metadata(name),
        "spec": {
            "replicas": replicas,
            "minReadySeconds": min_ready,
            "selector": {"matchLabels": labels},
            "strategy": {
                "type": "RollingUpdate",
                "rollingUpdate": {"maxSurge": 1, "maxUnavailable": 0},
            },
            "template": {
                "metadata": {"labels": {**labels, **(extra_labels or {})}},
                "spec": pod["spec"],
            },
        },
    }


def service(
    name: str, port: int, target: int, selector: dict[str, str] | None = None
) -> dict[str, Any]:
    """A ClusterIP Service selecting ``app: name`` (or ``selector``)."""
    return {
        "apiVersion": "v1",
        "kind": "Service",
        "metadata": _metadata(name),
        "spec": {
            "selector": selector or {"app": name},
            "ports": [{"port": port, "targetPort": target}],
        },
    }


def eureka_peer_args(peer_url: str) -> list[str]:
    """A fixture Eureka server's arguments as one of two replicating peers: the other's URL as
    its peer, and the registry copied from it at start-up (tests/harness/javaapps.py's
    ``replicating_pair`` settings)."""
    return [
        f"--eureka.client.service-url.defaultZone={peer_url}",
        "--eureka.client.fetch-registry=true",
        "--eureka.server.registry-sync-retries=1",
    ]


def bare_pod(name: str, pod: dict[str, Any]) -> dict[str, Any]:
    """``pod`` as an API object named ``name`` (a caller: one pod, never rolled)."""
    return {"apiVersion": "v1", "kind": "Pod", "metadata": _metadata(name), "spec": pod["spec"]}


def service_caller_pod(
    cluster: KubeCluster, name: str, url: str, records: Path, keep_alive: bool
) -> dict[str, Any]:
    """``caller.py --service URL``: pooled (``keep_alive``) or a connection per request."""
    pod = fresh_caller_pod(cluster.node, name, SCALED, "unused", records)
    command = pod["spec"]["containers"][0]["command"]
    command[:] = [
        "python3",
        "/rollout/caller.py",
        f"--service={url}",
        *(["--keep-alive"] if keep_alive else []),
        f"--rate={FRESH_RATE:g}",
        f"--record={records / name}.jsonl",
        f"--connect-timeout={CONNECT_TIMEOUT:g}",
        f"--read-timeout={READ_TIMEOUT:g}",
    ]
    return pod


@dataclass
class PodEnd:
    """One old replica's end, epoch seconds (None: not seen)."""

    name: str
    ip: str
    deleted: float | None = None
    """First seen with a deletionTimestamp (the Deployment controller scaled it down)."""
    hook_started: float | None = None
    hook_answered: float | None = None
    """The kubelet's log: the preStop hook's start and end (held = answered - started)."""
    down_visible: float | None = None
    """Every Eureka peer's client-facing view had stopped listing it UP (a client reaching the
    peers through the Service may be served by either)."""
    down_visible_first: float | None = None
    """The first peer's client-facing view stopped listing it UP."""
    agent_peers: dict[str, str] | None = None
    """What its agent's ``/status`` said, before the rollout, of the peers behind each Eureka
    URL (``one``, ``several``, ``unknown``, with how the floor counts it)."""
    endpoint_not_ready: float | None = None
    """Its EndpointSlice endpoint first not ready (terminating) or gone."""
    endpoint_removed: float | None = None
    proxy_dropped: float | None = None
    """Its address first absent from kube-proxy's rules on the node."""
    gone: float | None = None
    """The pod object first absent from the API (the kubelet finished its termination)."""
    last_sent: float | None = None
    last_served: float | None = None
    """The last request an Eureka caller sent to it, and the last one it answered 200."""


@dataclass
class Rollout:
    """What one ``kubectl rollout restart`` measured."""

    scenario: str
    restarted: float
    complete: float
    """``kubectl rollout status`` returned (epoch seconds)."""
    grace: int
    old: list[PodEnd]
    new: list[str]
    records: dict[str, list[dict[str, Any]]]
    watch_period: float = 0.0
    """The watcher's mean time between samples of the pods and Eureka's views, s."""
    fast_watch_period: float = 0.0
    """Its mean time between samples of the EndpointSlices and kube-proxy's rules, s."""

    @property
    def failed(self) -> dict[str, dict[str, dict[str, int]]]:
        """caller -> side (``termination``, ``start-up``) -> failure kind -> count."""
        return classify(self)

    @property
    def sent(self) -> dict[str, int]:
        return {caller: len(records) for caller, records in self.records.items()}

    def failures(self, caller: str, side: str) -> int:
        return sum(self.failed.get(caller, {}).get(side, {}).values())


class Watcher:
    """Watches the old pods' ends in two threads, recording the first moment each state changed:
    the pods and Eureka's views every ``period`` s, and, every ``fast_period`` s, the Service
    path alone (the EndpointSlices, then kube-proxy's rules), each stamped when its read
    returned, so that kube-proxy's sync delay is measured finer than the slow sample."""

    def __init__(
        self,
        rig: DeploymentRig,
        old: dict[str, PodEnd],
        period: float = 0.25,
        fast_period: float = 0.05,
    ) -> None:
        self.rig = rig
        self.old = old
        self.errors = 0
        self.samples: list[float] = []
        self.fast_samples: list[float] = []
        self._stop = threading.Event()
        self._threads = [
            threading.Thread(
                target=self._run, args=(self._poll_pods, period, self.samples), daemon=True
            ),
            threading.Thread(
                target=self._run,
                args=(self._poll_service_path, fast_period, self.fast_samples),
                daemon=True,
            ),
        ]

    @staticmethod
    def _mean_period(samples: list[float]) -> float:
        if len(samples) < 2:
            return 0.0
        return (samples[-1] - samples[0]) / (len(samples) - 1)

    @property
    def mean_period(self) -> float:
        """Mean seconds between samples of the pods and the Eureka views."""
        return self._mean_period(self.samples)

    @property
    def mean_fast_period(self) -> float:
        """Mean seconds between samples of the EndpointSlices and kube-proxy's rules."""
        return self._mean_period(self.fast_samples)

    def _run(
        self, poll: Callable[[KubeCluster], None], period: float, samples: list[float]
    ) -> None:
        cluster = self.rig.cluster
        while not self._stop.is_set():
            samples.append(time.time())
            try:
                poll(cluster)
            except Exception:  # a slow API answer is one missed sample, not a failed rollout
                self.errors += 1
            self._stop.wait(period)

    def _poll_pods(self, cluster: KubeCluster) -> None:
        now = time.time()
        pods = cluster.api_get(f"/api/v1/namespaces/default/pods?labelSelector=app%3D{DEPLOYMENT}")
        present = {p["metadata"]["name"]: p for p in pods["items"]}
        views = [eureka_view(url) for url in self.rig.eureka_host_urls]
        seen = time.time()
        for end in self.old.values():
            pod = present.get(end.name)
            if end.deleted is None and pod and pod["metadata"].get("deletionTimestamp"):
                end.deleted = now
            if end.gone is None and pod is None:
                end.gone = now
            target = f"{end.ip}:{APP_PORT}"
            not_up = [bool(view) and view.get(target) != "UP" for view in views]
            if end.down_visible_first is None and any(not_up):
                end.down_visible_first = seen
            if end.down_visible is None and all(not_up):
                end.down_visible = seen

    def _poll_service_path(self, cluster: KubeCluster) -> None:
        slices = cluster.api_get(
            "/apis/discovery.k8s.io/v1/namespaces/default/endpointslices"
            f"?labelSelector=kubernetes.io%2Fservice-name%3D{DEPLOYMENT}"
        )
        sliced = time.time()
        endpoints = {
            address: bool(e.get("conditions", {}).get("ready"))
            for s in slices["items"]
            for e in s.get("endpoints") or []
            for address in e.get("addresses", [])
        }
        rules = cluster.proxy_rules()
        ruled = time.time()
        for end in self.old.values():
            if end.endpoint_not_ready is None and not endpoints.get(end.ip, False):
                end.endpoint_not_ready = sliced
            if end.endpoint_removed is None and end.ip not in endpoints:
                end.endpoint_removed = sliced
            if end.proxy_dropped is None and f"{end.ip}:{APP_PORT}" not in rules:
                end.proxy_dropped = ruled

    def __enter__(self) -> Watcher:
        for thread in self._threads:
            thread.start()
        return self

    def __exit__(self, *exc: object) -> None:
        self._stop.set()
        for thread in self._threads:
            thread.join(10)


class DeploymentRig:
    """Eureka, the app's Deployment and Service, the callers; see the module docstring."""

    def __init__(
        self,
        cluster: KubeCluster,
        eureka_jar: Path,
        demo_jar: Path,
        records: Path,
        timings: Timings = SCALED,
        callers: tuple[str, ...] = ("busy", *SERVICE_CALLERS),
    ) -> None:
        self.cluster = cluster
        self.eureka_jar = eureka_jar
        self.demo_jar = demo_jar
        self.records = records
        self.timings = timings
        self.callers = callers
        self.eureka_url = ""
        """What the pods use: the eureka Service's ClusterIP (both peers behind it)."""
        self.eureka_host_urls: list[str] = []
        """What this process polls: each peer pod's own address (no Service in between)."""
        self.scenario: Scenario | None = None
        self._files: dict[str, RecordFile | SpringRecords] = {}

    @property
    def min_ready(self) -> int:
        return MIN_READY_SECONDS // self.timings.scale

    def start_eureka(self) -> None:
        cluster = self.cluster
        self.records.mkdir(parents=True, exist_ok=True)
        for old in self.records.glob("*.jsonl"):
            old.unlink()
        # The Services first: each peer names the other by its Service's ClusterIP.
        cluster.apply(
            service("eureka", EUREKA_PORT, EUREKA_PORT, EUREKA_PEER_LABEL),
            *(service(peer, EUREKA_PORT, EUREKA_PORT) for peer in EUREKA_PEERS),
        )
        ips = {
            name: cluster.get("service", name)["spec"]["clusterIP"]
            for name in ("eureka", *EUREKA_PEERS)
        }
        urls = {name: f"http://{ip}:{EUREKA_PORT}/eureka/" for name, ip in ips.items()}
        for peer, other in zip(EUREKA_PEERS, reversed(EUREKA_PEERS), strict=True):
            pod = eureka_pod(cluster.node, self.eureka_jar, self.timings)
            pod["spec"]["containers"][0]["command"] += eureka_peer_args(urls[other])
            cluster.apply(deployment(peer, pod, 1, extra_labels=EUREKA_PEER_LABEL))
        for peer in EUREKA_PEERS:
            cluster.wait_rollout(peer, START_TIMEOUT)
        self.eureka_url = urls["eureka"]
        self.eureka_host_urls = [
            f"http://{cluster.pods(f'-l=app={peer}')[0]['status']['podIP']}:{EUREKA_PORT}/eureka/"
            for peer in EUREKA_PEERS
        ]

    def deploy(self, scenario: Scenario, replicas: int = 3) -> None:
        """The app's Deployment set up for ``scenario`` (replacing any other), its Service; wait
        until the rollout is complete, Eureka lists every replica UP, the replaced pods are gone
        and every caller's view has had time to forget them, so that the measured rollout
        starts from the set-up's replicas alone."""
        cluster = self.cluster
        pod = replica_pod(cluster.node, "x", self.demo_jar, scenario, self.timings, self.eureka_url)
        if self.scenario is not None and self.scenario.native != scenario.native:
            # A layout change is a new template; deleting first keeps the measured rollout pure.
            cluster.delete("deployment", DEPLOYMENT)
            self.wait_until("the old replicas gone", lambda: not self._app_pods(), 300)
        cluster.apply(
            *agent_access(),
            deployment(DEPLOYMENT, pod, replicas, self.min_ready),
            service(DEPLOYMENT, 80, APP_PORT),
        )
        self.scenario = scenario
        cluster.wait_rollout(DEPLOYMENT, START_TIMEOUT)
        self._wait_listed(replicas)
        # A set-up rollout's pods still ending (or still in a caller's view) made the measured
        # rollout's first failures: 52 of the busy caller's, counted as its start-up side.
        self.wait_until(
            "the replaced replicas gone",
            lambda: len(self._app_pods()) == replicas,
            self.timings.grace + 60,
        )
        time.sleep(self.timings.server_cache + self.timings.client_refresh + 1.0)

    def _app_pods(self) -> list[dict[str, Any]]:
        return cluster_pods(self.cluster, DEPLOYMENT)

    def _wait_listed(self, replicas: int) -> None:
        def listed() -> bool:
            ips = {p["status"].get("podIP") for p in self._app_pods() if _live(p)}
            views = [eureka_view(url) for url in self.eureka_host_urls]
            return len(ips) == replicas and all(
                view.get(f"{ip}:{APP_PORT}") == "UP" for ip in ips for view in views
            )

        self.wait_until("every replica UP in every Eureka peer's view", listed, START_TIMEOUT)

    def start_callers(self) -> None:
        cluster = self.cluster
        service_ip = cluster.get("service", DEPLOYMENT)["spec"]["clusterIP"]
        rates = {"busy": BUSY_RATE, "slow": SLOW_RATE}
        for caller in self.callers:
            if caller in ("busy", "slow"):
                pod = spring_caller_pod(
                    cluster.node, caller, self.demo_jar, rates[caller], self.timings,
                    self.eureka_url,
                )  # fmt: skip
                self._files[caller] = SpringRecords(cluster.node, caller)
                # The records are read from the pod's address in the API, not the kubelet's.
                self._files[caller].node = _ApiPodIps(cluster)  # type: ignore[assignment]
            elif caller == "fresh":
                pod = fresh_caller_pod(
                    cluster.node, caller, self.timings, self.eureka_url, self.records
                )
                self._files[caller] = RecordFile(self.records / f"{caller}.jsonl")
            else:
                pod = service_caller_pod(
                    cluster, caller, f"http://{service_ip}:80/hello", self.records,
                    keep_alive=caller == "pooled",
                )  # fmt: skip
                self._files[caller] = RecordFile(self.records / f"{caller}.jsonl")
            cluster.apply(bare_pod(caller, pod))
        for caller in self.callers:
            self.wait_until(
                f"{caller} sends", lambda c=caller: bool(self._files[c].read()), START_TIMEOUT
            )

    def wait_until(self, what: str, check: Callable[[], bool], timeout: float) -> float:
        return self.cluster.wait_until(what, check, timeout)

    def rollout(self, settle: float = 10.0) -> Rollout:
        """``kubectl rollout restart`` of the app; watched until ``settle`` s after the last
        old pod is gone."""
        assert self.scenario is not None, "deploy() first"
        cluster = self.cluster
        old = {
            p["metadata"]["name"]: PodEnd(p["metadata"]["name"], p["status"]["podIP"])
            for p in self._app_pods()
            if _live(p)
        }
        for end in old.values():
            end.agent_peers = agent_peers(end.ip)
        window_start = time.time() - 2.0
        with Watcher(self, old) as watcher:
            time.sleep(1.0)  # a first sample before the trigger
            restarted = cluster.rollout_restart(DEPLOYMENT)
            cluster.wait_rollout(DEPLOYMENT, 3 * START_TIMEOUT)
            complete = time.time()
            self.wait_until(
                "every old pod gone",
                lambda: all(end.gone for end in old.values()),
                self.timings.grace + 60,
            )
            last_gone = max(end.gone or 0 for end in old.values())
            time.sleep(max(0.0, last_gone + settle - time.time()))
        window_end = time.time()
        new = [p["metadata"]["name"] for p in self._app_pods() if _live(p)]
        records = {
            caller: [r for r in self._files[caller].read(window_start) if r["t"] <= window_end]
            for caller in self.callers
        }
        kubelet_log = cluster.node.kubelet_log.read_text(errors="replace")
        for end in old.values():
            events = kubelet_events(kubelet_log, end.name)
            started = [e.at for e in events if e.what == "hook_started"]
            answered = [e.at for e in events if e.what in ("hook_completed", "hook_failed")]
            end.hook_started = min(started) if started else None
            end.hook_answered = min(answered) if answered else None
            target = f"{end.ip}:{APP_PORT}"
            to_it = [r for c in EUREKA_CALLERS for r in records.get(c, []) if r["target"] == target]
            end.last_sent = max((r["t"] for r in to_it), default=None)
            end.last_served = max((r["t"] for r in to_it if r["outcome"] == OK), default=None)
        return Rollout(
            scenario=self.scenario.key,
            restarted=restarted,
            complete=complete,
            grace=self.timings.grace,
            old=list(old.values()),
            new=new,
            records=records,
            watch_period=watcher.mean_period,
            fast_watch_period=watcher.mean_fast_period,
        )


def classify(rollout: Rollout) -> dict[str, dict[str, dict[str, int]]]:
    """Failed requests per caller, side and kind.

    Eureka callers name the instance they sent to: a failure against an old pod is on the
    termination side; one against a new pod, or with no instance to send to, on the start-up
    side. Service callers only know the ClusterIP; kube-proxy sends new connections only to
    ready endpoints (a new pod is one only once Ready), so their failures are counted on the
    termination side while an old pod is between its deletion and ``settle`` after its end,
    and on the start-up side otherwise."""
    old_targets = {f"{end.ip}:{APP_PORT}" for end in rollout.old}
    ending = [
        (end.deleted or rollout.restarted, (end.gone or rollout.complete) + 5.0)
        for end in rollout.old
    ]
    failed: dict[str, dict[str, dict[str, int]]] = {}
    for caller, records in rollout.records.items():
        sides: dict[str, dict[str, int]] = {TERMINATION: {}, STARTUP: {}}
        for record in records:
            if record["outcome"] == OK:
                continue
            if caller in SERVICE_CALLERS:
                terminating = any(start <= record["t"] <= end for start, end in ending)
                side = TERMINATION if terminating else STARTUP
            else:
                side = TERMINATION if record["target"] in old_targets else STARTUP
            kinds = sides[side]
            kinds[record["outcome"]] = kinds.get(record["outcome"], 0) + 1
        failed[caller] = sides
    return failed


class _ApiPodIps:
    """What ``SpringRecords`` asks its node for (``pod_ip``), answered from the API."""

    def __init__(self, cluster: KubeCluster) -> None:
        self.cluster = cluster

    def pod_ip(self, name: str) -> str:
        pod = self.cluster.get("pod", name, check=False) or {}
        return str(pod.get("status", {}).get("podIP", ""))


def agent_peers(pod_ip: str) -> dict[str, str] | None:
    """What the agent at ``pod_ip`` says in ``/status`` of the peers behind each Eureka URL:
    ``{url: "several: assumed: ..."}``; None with no agent (or no answer)."""
    try:
        with _OPENER.open(f"http://{pod_ip}:{AGENT_PORT}/status", timeout=3) as response:
            status = json.load(response)
        view = status["registry"]["client_view"]
    except (OSError, ValueError, KeyError, TypeError):
        return None
    return {url: f"{said['peers']}: {said['floor']}" for url, said in view.items()}


def _live(pod: dict[str, Any]) -> bool:
    return not pod["metadata"].get("deletionTimestamp") and bool(pod["status"].get("podIP"))


def cluster_pods(cluster: KubeCluster, app: str) -> list[dict[str, Any]]:
    found = cluster.api_get(f"/api/v1/namespaces/default/pods?labelSelector=app%3D{app}")
    return list(found["items"])
