"""Events on the pod against the real API server: the agent (its image, in a pod run by the
cluster's kubelet) posts events.k8s.io/v1 Events with its ServiceAccount's token, and
``kubectl get events`` / ``kubectl describe pod`` show them. The "app" beside it is a Python HTTP
server (no JVM: these tests are about the agent's Events, the hook's caller is the kubelet).

Three pods terminate together: one whose hook carries the token, one whose hook does not (401:
``PrestopHookRefused``), and one whose ServiceAccount has no Role (the Events are refused: the
drain is not delayed, the failure is logged once and counted)."""

from __future__ import annotations

import re
import threading
import time
from typing import Any

import pytest

from tests.harness.cluster import KubeCluster
from tests.harness.javaapps import http_request
from tests.harness.node import iter_agent_events
from tests.harness.pods import AGENT_PORT, agent_container, pod_manifest

pytestmark = [pytest.mark.kube, pytest.mark.timeout(900)]

APP_PORT = 8080
DRAIN_SECONDS = 12  # long enough to see the pod's Events while it still terminates
TOKEN = "s3cret"
ACCOUNT = "prestop-events"
NO_ROLE_ACCOUNT = "prestop-events-norole"
START_TIMEOUT = 180.0


def rbac() -> list[dict[str, Any]]:
    """The agent's Role: create on events.k8s.io events, get on pods (the pod's uid, which
    ``kubectl describe pod`` matches on), list and watch on EndpointSlices; and a second account
    with no Role at all."""
    role = {
        "apiVersion": "rbac.authorization.k8s.io/v1",
        "kind": "Role",
        "metadata": {"name": ACCOUNT},
        "rules": [
            {"apiGroups": ["events.k8s.io"], "resources": ["events"], "verbs": ["create"]},
            {"apiGroups": [""], "resources": ["pods"], "verbs": ["get"]},
            # The EndpointSlice source's: readable slices that list no pod of the test (no
            # Service selects them) leave it inactive, so no floor outlasts the fixed drain.
            {
                "apiGroups": ["discovery.k8s.io"],
                "resources": ["endpointslices"],
                "verbs": ["list", "watch"],
            },
        ],
    }
    binding = {
        "apiVersion": "rbac.authorization.k8s.io/v1",
        "kind": "RoleBinding",
        "metadata": {"name": ACCOUNT},
        "roleRef": {"apiGroup": "rbac.authorization.k8s.io", "kind": "Role", "name": ACCOUNT},
        "subjects": [{"kind": "ServiceAccount", "name": ACCOUNT, "namespace": "default"}],
    }
    accounts = [
        {"apiVersion": "v1", "kind": "ServiceAccount", "metadata": {"name": name}}
        for name in (ACCOUNT, NO_ROLE_ACCOUNT)
    ]
    return [*accounts, role, binding]


def events_pod(
    cluster: KubeCluster, name: str, account: str, *, hook_token: bool
) -> dict[str, Any]:
    """A Python HTTP server as the app, whose preStop hook calls the agent (with the token or
    without it), and the agent as a classic sidecar with PRESTOP_TOKEN and the downward API's
    POD_NAME and POD_NAMESPACE."""
    prepared = cluster.prepared
    agent = agent_container(
        prepared,
        {
            "PRESTOP_DRAIN_MODE": "fixed",
            "PRESTOP_DRAIN_SECONDS": str(DRAIN_SECONDS),
            "PRESTOP_GRACE_PERIOD_SECONDS": "30",
            "PRESTOP_APP_PORT": str(APP_PORT),
            "PRESTOP_TOKEN": TOKEN,
        },
    )
    agent["env"] += [
        {"name": "POD_NAME", "valueFrom": {"fieldRef": {"fieldPath": "metadata.name"}}},
        {"name": "POD_NAMESPACE", "valueFrom": {"fieldRef": {"fieldPath": "metadata.namespace"}}},
    ]
    hook: dict[str, Any] = {"port": AGENT_PORT, "path": "/prestop"}
    if hook_token:
        hook["httpHeaders"] = [{"name": "X-Prestop-Token", "value": TOKEN}]
    app = {
        "name": "app",
        "image": prepared.java_image,
        "imagePullPolicy": "Never",
        "command": ["python3", "-m", "http.server", str(APP_PORT), "--directory", "/etc"],
        "ports": [{"containerPort": APP_PORT}],
        "lifecycle": {"preStop": {"httpGet": hook}},
        "readinessProbe": {"httpGet": {"port": AGENT_PORT, "path": "/ready"}, "periodSeconds": 1},
    }
    spec = {
        "serviceAccountName": account,
        "terminationGracePeriodSeconds": 30,
        "containers": [app, agent],
    }
    return pod_manifest(name, spec)


def pod_events(cluster: KubeCluster, pod: str, uid: str) -> dict[str, dict[str, Any]]:
    """``kubectl get events --field-selector involvedObject.name=POD``, this pod's (its uid: not
    an earlier run's pod of the same name), by reason (the first of each), as core/v1 Events
    (what kubectl shows: the note is the message)."""
    found: dict[str, dict[str, Any]] = {}
    for event in cluster.events(f"--field-selector=involvedObject.name={pod}"):
        if event["involvedObject"].get("uid") in (uid, None, ""):
            found.setdefault(event["reason"], event)
    return found


def agent_log(cluster: KubeCluster, pod: str) -> list[dict[str, Any]]:
    return [e for _, e in iter_agent_events(cluster.node.log_lines(pod, "prestop-agent"))]


def failed_count(metrics: str, reason: str) -> float | None:
    pattern = rf'^prestop_kube_events_failed_total{{reason="{reason}"}} (\S+)$'
    found = re.search(pattern, metrics, re.MULTILINE)
    return None if found is None else float(found.group(1))


def test_the_termination_shows_as_events_on_the_pod(cluster: KubeCluster) -> None:
    kube = cluster.node
    cluster.apply(*rbac())
    try:
        names = {"events-ok": ACCOUNT, "events-refused": ACCOUNT, "events-norole": NO_ROLE_ACCOUNT}
        for name, account in names.items():
            pod = events_pod(cluster, name, account, hook_token=name != "events-refused")
            cluster.apply_pod(pod)
        for name in names:
            kube.wait_ready(name, START_TIMEOUT)
        uids = {name: cluster.get("pod", name)["metadata"]["uid"] for name in names}
        norole_ip = kube.pod_ip("events-norole")

        # Delete all three at once; meanwhile read `kubectl describe pod` of the first and the
        # metrics of the one without a Role, while their drains hold the pods.
        deleting = threading.Thread(target=cluster.delete_pods, args=tuple(names))
        started = time.monotonic()
        deleting.start()
        described, norole_metrics = "", ""
        while time.monotonic() - started < DRAIN_SECONDS - 2:
            if "PrestopDraining" not in described:
                described = cluster.kubectl("describe", "pod", "events-ok")
            if failed_count(norole_metrics, "PrestopDraining") != 1:
                norole_metrics = http_request("GET", f"http://{norole_ip}:{AGENT_PORT}/metrics")[1]
            if "PrestopDraining" in described and failed_count(norole_metrics, "PrestopDraining"):
                break
            time.sleep(0.5)
        deleting.join(240)
        assert not deleting.is_alive(), "the pods terminate"

        for name in names:  # what the agents said about the API server, for a failed run
            print(name, [e for e in agent_log(cluster, name) if "kube" in str(e.get("event"))])
        # kubectl describe pod lists the agent's Event while the pod drains.
        shown = r"Normal\s+PrestopDraining\s+.*prestop-agent\s+Draining, started by"
        assert re.search(shown, described), described

        # The pod with the token: Draining and Drained, with the plan's and the drain's figures.
        ok = pod_events(cluster, "events-ok", uids["events-ok"])
        draining, drained = ok["PrestopDraining"], ok["PrestopDrained"]
        assert draining["type"] == drained["type"] == "Normal"
        assert draining["involvedObject"]["uid"] == uids["events-ok"], "describe matches on it"
        assert draining["reportingComponent"] == "prestop-agent"
        assert draining["reportingInstance"] == "events-ok"
        note = draining["message"]
        assert re.match(r"Draining, started by (the preStop hook|SIGTERM)", note), note
        assert f"drain fixed, at most {DRAIN_SECONDS}s" in note and "grace period 30s" in note
        note = drained["message"]
        assert note.startswith(f"Drained: held the app serving {DRAIN_SECONDS}."), note
        assert "ended by the fixed drain's length" in note
        assert "PrestopHookRefused" not in ok and "PrestopFloorNotReached" not in ok

        # The hook without the token: refused (401), which the kubelet does not record.
        refused = pod_events(cluster, "events-refused", uids["events-refused"])
        warning = refused["PrestopHookRefused"]
        assert warning["type"] == "Warning"
        assert warning["message"].startswith("/prestop answered HTTP 401 to "), warning
        assert "X-Prestop-Token" in warning["message"]

        # No Role: nothing posted, the failure counted and logged once, the drain not delayed.
        assert "PrestopDraining" not in pod_events(cluster, "events-norole", uids["events-norole"])
        assert failed_count(norole_metrics, "PrestopDraining") == 1, norole_metrics
        log = agent_log(cluster, "events-norole")
        failures = [e for e in log if e.get("event") == "kube_event_failed"]
        assert len(failures) == 1, failures  # later ones at debug
        assert "verbs [create]" in failures[0]["error"], failures[0]
        [answer] = [
            e for e in log if e.get("event") == "http_request" and e.get("path") == "/prestop"
        ]
        assert answer["status"] == 200
        assert DRAIN_SECONDS - 1 <= answer["duration_seconds"] < DRAIN_SECONDS + 2, answer
        assert not [e for e in log if "exception" in e or e.get("level") == "error"], log
        print(
            f"\nno Role: hook held {answer['duration_seconds']:.2f}s for a {DRAIN_SECONDS}s drain"
        )
        for event in (draining, drained, warning):
            print(f"{event['type']} {event['reason']}: {event['message']}")
    finally:
        cluster.delete("rolebinding,role", ACCOUNT)
        cluster.delete("serviceaccount", ACCOUNT, NO_ROLE_ACCOUNT)
