"""The EndpointSlice source and the real grace period against the real API server: the agent in
a pod selected by a Service, with its own ServiceAccount (and, but for the RBAC test, a Role that
lets it get its pod and list and watch the namespace's EndpointSlices), deleted through the API
server as users do. kube-proxy's rules on the node are read while the pod goes, so the floor the
agent reports is compared with the moment the node stopped sending new connections to it."""

from __future__ import annotations

import datetime
import threading
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest

from tests.harness.cluster import KubeCluster
from tests.harness.node import iter_agent_events
from tests.harness.pods import APP_PORT, agent_pod

pytestmark = [pytest.mark.kube, pytest.mark.java]

SERVICE = "sourced"
ACCOUNT = "prestop-agent-sources"
START_TIMEOUT = 240.0  # a JVM and the agent starting on a loaded 2-core machine
POLL_SECONDS = 0.1  # how often the node's rules are read while the pod goes
# The agent's defaults these tests rely on: kube-proxy's sync bound, the assumed slice update
# when the slices cannot be read, the traffic drain's quiet period and poll.
KUBE_PROXY_SYNC = 5.0
ASSUMED_UPDATE = 10.0
QUIET, POLL = 3.0, 0.2
POD_GRACE = "metadata.deletionGracePeriodSeconds"
# What the API server, the kubelet and the log files may add to a figure read from outside on a
# loaded 2-core machine.
SLACK = 1.5


def account(*, role: bool) -> list[dict[str, Any]]:
    """The agent's ServiceAccount; with ``role``, least privilege for what the agent reads."""
    documents: list[dict[str, Any]] = [
        {"apiVersion": "v1", "kind": "ServiceAccount", "metadata": {"name": ACCOUNT}}
    ]
    if role:
        rules = [
            {"apiGroups": [""], "resources": ["pods"], "verbs": ["get"]},
            {
                "apiGroups": ["discovery.k8s.io"],
                "resources": ["endpointslices"],
                "verbs": ["list", "watch"],
            },
        ]
        reference = {"apiGroup": "rbac.authorization.k8s.io", "kind": "Role", "name": ACCOUNT}
        documents += [
            {
                "apiVersion": "rbac.authorization.k8s.io/v1",
                "kind": "Role",
                "metadata": {"name": ACCOUNT},
                "rules": rules,
            },
            {
                "apiVersion": "rbac.authorization.k8s.io/v1",
                "kind": "RoleBinding",
                "metadata": {"name": ACCOUNT},
                "subjects": [{"kind": "ServiceAccount", "name": ACCOUNT}],
                "roleRef": reference,
            },
        ]
    return documents


SERVICE_MANIFEST = {
    "apiVersion": "v1",
    "kind": "Service",
    "metadata": {"name": SERVICE},
    "spec": {"selector": {"app": SERVICE}, "ports": [{"port": 80, "targetPort": APP_PORT}]},
}


def field_env(name: str, path: str) -> dict[str, Any]:
    return {"name": name, "valueFrom": {"fieldRef": {"fieldPath": path}}}


def sourced_pod(
    cluster: KubeCluster, jar: Path, name: str, *, grace: int = 30, namespace_env: bool = True
) -> dict[str, Any]:
    """The demo app and the agent (classic sidecar, traffic drain, no registry) under the
    Service, as the ServiceAccount; POD_NAME (and POD_NAMESPACE) from the downward API."""
    pod = agent_pod(name, cluster.node.prepared, jar, {"PRESTOP_REGISTRY": "none"}, grace=grace)
    pod["metadata"]["labels"] = {"app": SERVICE}
    pod["spec"]["serviceAccountName"] = ACCOUNT
    agent = next(c for c in pod["spec"]["containers"] if c["name"] == "prestop-agent")
    agent["env"].append(field_env("POD_NAME", "metadata.name"))
    if namespace_env:  # else the ServiceAccount's namespace file says it
        agent["env"].append(field_env("POD_NAMESPACE", "metadata.namespace"))
    return pod


@pytest.fixture
def service(cluster: KubeCluster) -> Iterator[KubeCluster]:
    """The Service; its ServiceAccount, Role and RoleBinding are the test's, removed after."""
    cluster.apply(SERVICE_MANIFEST)
    yield cluster
    cluster.kubectl(
        "delete", "rolebinding,role,serviceaccount", ACCOUNT, "--ignore-not-found", "--wait=true"
    )


class RuleWatch:
    """Reads the node's NAT rules every POLL_SECONDS: when kube-proxy last had the pod's
    endpoint in them (epoch seconds)."""

    def __init__(self, cluster: KubeCluster, endpoint: str) -> None:
        self.cluster, self.endpoint = cluster, endpoint
        self.last_present: float | None = None
        self.dropped: float | None = None
        """The first read without the endpoint after one with it."""
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._run, daemon=True)

    def __enter__(self) -> RuleWatch:
        self._thread.start()
        return self

    def __exit__(self, *exc: object) -> None:
        self._stop.set()
        self._thread.join(10)

    def _run(self) -> None:
        while not self._stop.is_set():
            read_at = time.time()
            present = self.endpoint in self.cluster.proxy_rules()
            if present:
                self.last_present, self.dropped = read_at, None
            elif self.last_present is not None and self.dropped is None:
                self.dropped = read_at
            self._stop.wait(POLL_SECONDS)


def agent_events(cluster: KubeCluster, pod: str) -> list[tuple[float, dict[str, Any]]]:
    return list(iter_agent_events(cluster.node.log_lines(pod, "prestop-agent")))


def the(events: list[tuple[float, dict[str, Any]]], name: str) -> dict[str, Any]:
    found = [event for _, event in events if event.get("event") == name]
    assert len(found) == 1, f"{len(found)} {name} in {[e.get('event') for _, e in events]}"
    return found[0]


def epoch(iso: str) -> float:
    return datetime.datetime.fromisoformat(iso.replace("Z", "+00:00")).timestamp()


def step(report: dict[str, Any], name: str) -> dict[str, Any]:
    return next(s for s in report["steps"] if s["name"] == name)


def no_traceback(cluster: KubeCluster, pod: str) -> None:
    text = cluster.node.logs(pod, "prestop-agent")
    assert "Traceback" not in text and '"exception"' not in text, text[-3000:]


def test_the_endpointslice_floor_is_never_before_the_nodes_rules_dropped_the_pod(
    service: KubeCluster, demo_app_jar: Path
) -> None:
    cluster = service
    cluster.apply(*account(role=True))
    cluster.apply_pod(sourced_pod(cluster, demo_app_jar, "sliced"))
    cluster.node.wait_ready("sliced", START_TIMEOUT)
    endpoint = f"{cluster.node.pod_ip('sliced')}:{APP_PORT}"
    cluster.wait_until(
        "the pod in kube-proxy's rules", lambda: endpoint in cluster.proxy_rules(), 60
    )
    with RuleWatch(cluster, endpoint) as rules:
        cluster.delete_pods("sliced")
    events = agent_events(cluster, "sliced")

    report = the(events, "shutdown_complete")
    slices = report["floor"]["sources"]["endpointslices"]
    print(f"\nendpointslices: {slices}; rules last with the pod {rules.last_present}")
    # Observed, not assumed: the Role lets the agent read the slices, and one lists the pod.
    assert slices["active"] and slices["assumption"] is None, slices
    assert slices["visible_at_seconds"] is not None and slices["bound_seconds"] == KUBE_PROXY_SYNC
    assert slices["floor_seconds"] == pytest.approx(slices["visible_at_seconds"] + KUBE_PROXY_SYNC)
    assert report["floor"]["latest"] == "endpointslices"
    drain = step(report, "drain")
    assert drain["floor_sources"]["endpointslices"]["floor_seconds"] == slices["floor_seconds"]
    assert drain["floor_reached"] and drain["outcome"] == "quiet", drain
    # The floor is never before the node's rules dropped the pod IP.
    assert rules.dropped is not None, "kube-proxy never dropped the pod while it was watched"
    triggered = epoch(report["triggered_at"])
    print(
        f"slice update {slices['visible_at_seconds']:.2f} s after the trigger, rules dropped"
        f" {rules.dropped - triggered:+.2f} s (read every {POLL_SECONDS:g} s), floor"
        f" {slices['floor_seconds']:.2f} s"
    )
    assert triggered + slices["floor_seconds"] >= rules.dropped, (rules.dropped, report)
    assert not [e for _, e in events if e.get("event") == "endpointslices_unreadable"]
    # The start-up read of the own pod (is it being deleted?) went through the same Role and
    # found it not terminating: neither is said (issue 21 item 7).
    said = {e.get("event") for _, e in events}
    assert not said & {"pod_not_read_at_start", "restarted_in_terminating_pod"}, said
    no_traceback(cluster, "sliced")


def test_a_shorter_grace_period_at_deletion_is_the_one_planned(
    service: KubeCluster, demo_app_jar: Path
) -> None:
    cluster = service
    cluster.apply(*account(role=True))
    cluster.apply_pod(sourced_pod(cluster, demo_app_jar, "short", grace=60))
    cluster.node.wait_ready("short", START_TIMEOUT)

    def delete() -> None:
        cluster.kubectl("delete", "pod", "short", "--grace-period=10", "--wait=false")

    deleted = cluster.node.delete("short", timeout=120, remove=delete)
    gone = time.monotonic() - deleted
    events = agent_events(cluster, "short")

    shortened = the(events, "grace_period_shortened")
    assert shortened["grace_period_seconds"] == 10 and shortened["grace_period_from"] == POD_GRACE
    assert shortened["configured_grace_period_seconds"] == 60
    # grace 10 - app shutdown 5 - margin 1: the answers are due 4 s after the trigger.
    assert shortened["answer_by_seconds"] == 4 and shortened["drain_max_seconds"] == 4
    report = the(events, "shutdown_complete")
    assert report["grace_period_seconds"] == 10 and report["grace_period_from"] == POD_GRACE
    # The slices' floor (their update + 5 s) no longer fits a 4 s drain: said at the trigger.
    assert "drain_floor_exceeds_max" in {e.get("event") for _, e in events}
    drain = step(report, "drain")
    assert drain["started_seconds"] + drain["duration_seconds"] <= 4 + POLL, drain
    exits = cluster.node.exit_codes("short")
    print(f"\ngone {gone:.2f} s after the deletion; exits {exits}; drain {drain}")
    assert exits.get("app") != 137 and exits.get("prestop-agent") == 0, exits
    assert gone <= 10, f"the pod took {gone:.2f} s to go, its grace period was 10 s"
    no_traceback(cluster, "short")


def test_without_rbac_the_agent_warns_once_and_drains_on_the_assumed_bound(
    service: KubeCluster, demo_app_jar: Path
) -> None:
    cluster = service
    cluster.apply(*account(role=False))
    cluster.apply_pod(sourced_pod(cluster, demo_app_jar, "denied", namespace_env=False))
    cluster.node.wait_ready("denied", START_TIMEOUT)
    time.sleep(3)  # the reader's retries after its first refusal (1 s, 2 s) come before the trigger
    cluster.delete_pods("denied")
    events = agent_events(cluster, "denied")

    warning = the(events, "endpointslices_unreadable")
    assert warning["level"] == "warning" and "HTTP 403" in warning["error"], warning
    assert "Role with list and watch on endpointslices" in warning["detail"], warning
    report = the(events, "shutdown_complete")
    slices = report["floor"]["sources"]["endpointslices"]
    assert slices["active"] and slices["visible_at_seconds"] is None, slices
    assert slices["floor_seconds"] == ASSUMED_UPDATE + KUBE_PROXY_SYNC
    assert "HTTP 403" in (slices["assumption"] or ""), slices
    # The pod cannot be read either: the configured grace period, said once at info.
    grace = the(events, "grace_period_configured")
    assert grace["level"] == "info" and "HTTP 403" in grace["grace_period_note"], grace
    # Nor at start-up, whether it is being deleted: the override's timestamps decide, said once.
    unread = the(events, "pod_not_read_at_start")
    assert unread["level"] == "info" and "HTTP 403" in unread["error"], unread
    # Held until the assumed bound, and not longer than the traffic rule adds to it.
    drain = step(report, "drain")
    ended = drain["started_seconds"] + drain["duration_seconds"]
    print(f"\ndrain {drain}")
    floor = ASSUMED_UPDATE + KUBE_PROXY_SYNC
    assert drain["outcome"] == "quiet" and floor <= ended <= floor + QUIET + 2 * POLL + SLACK
    levels = [e["level"] for _, e in events if e.get("level") in ("warning", "error")]
    # One warning per part that the missing Role stops: the slices (above) and the Events
    # (this account may not post them either); later failures of either at debug.
    warned = sorted(e["event"] for _, e in events if e.get("level") == "warning")
    assert warned == ["endpointslices_unreadable", "kube_event_failed"], warned
    assert levels == ["warning", "warning"], [e for _, e in events if e.get("level") != "info"]
    no_traceback(cluster, "denied")
