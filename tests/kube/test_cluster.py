"""The cluster itself (tests/harness/cluster.py), with throwaway pods: a Deployment rolled out by
the Deployment controller, a Service's EndpointSlice, kube-proxy's rules, pods reaching a
ClusterIP (their own Service's included: hairpin), and the fixture's kubectl API."""

from __future__ import annotations

import json
from typing import Any

import pytest

from tests.harness.cluster import KubeCluster
from tests.harness.node import NODE_NAME

# The session's cluster may first wait for another session's node (up to 600 s).
pytestmark = [pytest.mark.kube, pytest.mark.timeout(900)]

SERVER_PORT = 8000


def web_deployment(cluster: KubeCluster, name: str, replicas: int) -> list[dict[str, Any]]:
    """``python3 -m http.server`` pods (the JRE image has python3) behind a Service."""
    labels = {"app": name}
    server = {
        "name": "web",
        "image": cluster.prepared.java_image,
        "imagePullPolicy": "Never",
        "command": ["python3", "-m", "http.server", str(SERVER_PORT), "--directory", "/etc"],
        "ports": [{"containerPort": SERVER_PORT}],
        "readinessProbe": {"tcpSocket": {"port": SERVER_PORT}, "periodSeconds": 1},
    }
    deployment = {
        "apiVersion": "apps/v1",
        "kind": "Deployment",
        "metadata": {"name": name},
        "spec": {
            "replicas": replicas,
            "selector": {"matchLabels": labels},
            "strategy": {"rollingUpdate": {"maxSurge": 1, "maxUnavailable": 0}},
            "template": {
                "metadata": {"labels": labels},
                "spec": {"terminationGracePeriodSeconds": 2, "containers": [server]},
            },
        },
    }
    service = {
        "apiVersion": "v1",
        "kind": "Service",
        "metadata": {"name": name},
        "spec": {"selector": labels, "ports": [{"port": 80, "targetPort": SERVER_PORT}]},
    }
    return [deployment, service]


def fetch_in(cluster: KubeCluster, pod: str, url: str) -> str:
    """GET ``url`` from inside ``pod`` (kubectl exec, python3 in the image)."""
    script = f"import urllib.request; print(urllib.request.urlopen({url!r}, timeout=5).status)"
    return cluster.exec(pod, "python3", "-c", script).strip()


def test_a_rollout_restart_replaces_every_pod_and_the_service_follows(
    cluster: KubeCluster,
) -> None:
    cluster.apply(*web_deployment(cluster, "web", 2))
    cluster.wait_rollout("web", 180)
    node = cluster.get("node", NODE_NAME)
    assert node["status"]["nodeInfo"]["kubeletVersion"] == "v1.34.2"
    before = {p["metadata"]["name"]: p["status"]["podIP"] for p in cluster.pods("-l=app=web")}
    assert len(before) == 2 and all(before.values()), before
    cluster_ip = cluster.get("service", "web")["spec"]["clusterIP"]

    def ready() -> set[str]:
        return {
            e["addresses"][0]
            for s in cluster.endpoint_slices("web")
            for e in s.get("endpoints") or []
            if e["conditions"].get("ready")
        }

    # The EndpointSlice controller publishes a moment after the rollout completes (its informer
    # can lag: "EndpointSlice informer cache is out of date", then a retry).
    cluster.wait_until(
        "both pods ready in the EndpointSlice", lambda: ready() == set(before.values()), 30
    )
    # kube-proxy follows the EndpointSlice (a moment later).
    cluster.wait_until(
        "both pods in kube-proxy's rules",
        lambda: all(f"{ip}:{SERVER_PORT}" in cluster.proxy_rules() for ip in before.values()),
        30,
    )

    # A pod reaches the Service by its ClusterIP, its own pod included (hairpin), many times
    # so that kube-proxy's random choice lands on each backend.
    one = next(iter(before))
    answers = [fetch_in(cluster, one, f"http://{cluster_ip}/hostname") for _ in range(6)]
    assert answers == ["200"] * 6
    # kubectl logs, through the API server and the kubelet: the servers logged every request.
    served = sum(cluster.logs(pod).count("GET /hostname") for pod in before)
    assert served == 6, served

    restarted = cluster.rollout_restart("web")
    took = cluster.wait_rollout("web", 240)
    after = {p["metadata"]["name"]: p for p in cluster.pods("-l=app=web")}
    live = {n for n, p in after.items() if not p["metadata"].get("deletionTimestamp")}
    assert len(live) == 2 and not live & set(before), (before, list(after))
    scaled = [
        e
        for e in cluster.events("--field-selector=involvedObject.kind=Deployment")
        if e.get("reason") == "ScalingReplicaSet"
    ]
    assert scaled, "the Deployment controller did the rollout"
    cluster.wait_until(
        "the old pods gone from the Service's rules",
        lambda: not any(f"{ip}:{SERVER_PORT}" in cluster.proxy_rules() for ip in before.values()),
        60,
    )
    print(
        f"\nrollout restart at {restarted:.1f}: complete in {took:.1f} s;"
        f" events {json.dumps([e['message'] for e in scaled][-4:])}"
    )
