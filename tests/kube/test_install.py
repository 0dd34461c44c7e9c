"""The chart and the kustomize component installed for real through the cluster's API server
(``helm install``, ``kubectl apply -k``): the objects pass the real schema and admission, the
pods run (the agent from its image, the app the demo app), and a ``kubectl rollout restart`` of
what they rendered completes with every pod replaced."""

from __future__ import annotations

import json
import shutil
import subprocess
from pathlib import Path
from typing import Any

import pytest
import yaml

from tests.kube.cluster import KubeCluster
from tests.kube.pods import APP_PORT, demo_app_command, jar_volume
from tests.test_k8s import CHART, KUSTOMIZE, _tool

# A JVM start, an install and a rollout, on a loaded machine: more than the suite's 300 s.
pytestmark = [pytest.mark.kube, pytest.mark.java, pytest.mark.timeout(900)]

START_TIMEOUT = 300.0  # a JVM and the agent starting on a loaded 2-core machine
# The app as the shipped pods describe it, made runnable here: the demo app's jar in the JRE
# image, no CPU request (the node has 2 cores, and a rollout runs two pods at once).
APP_RESOURCES = {"requests": {"memory": "256Mi"}, "limits": {"memory": "512Mi"}}


def agent_image(cluster: KubeCluster) -> tuple[str, str]:
    repository, _, tag = cluster.prepared.agent_image.rpartition(":")
    return repository, tag


def demo_app(cluster: KubeCluster, jar: Path) -> dict[str, Any]:
    """The fields of the app container that the demo app needs (merged into the shipped one)."""
    return {
        "image": cluster.prepared.java_image,
        "imagePullPolicy": "Never",
        "command": demo_app_command(jar, APP_PORT, None, None),
        "resources": APP_RESOURCES,
    }


def restart_replaces_every_pod(cluster: KubeCluster, deployment: str) -> float:
    """Roll the Deployment out again; returns how long the rollout took."""
    cluster.wait_rollout(deployment, START_TIMEOUT)
    selector = cluster.get("deployment", deployment)["spec"]["selector"]["matchLabels"]
    label = "-l=" + ",".join(f"{k}={v}" for k, v in selector.items())
    before = {p["metadata"]["name"] for p in cluster.pods(label)}
    cluster.rollout_restart(deployment)
    took = cluster.wait_rollout(deployment, 2 * START_TIMEOUT)
    after = {
        p["metadata"]["name"]
        for p in cluster.pods(label)
        if not p["metadata"].get("deletionTimestamp")
    }
    assert before and after and not before & after, (before, after)
    for pod in cluster.pods(label):
        statuses = pod["status"].get("containerStatuses", []) + pod["status"].get(
            "initContainerStatuses", []
        )
        assert all(s.get("ready") for s in statuses if s["name"] in ("app", "orders")), statuses
    return took


@pytest.mark.parametrize("layout", ["native", "classic"])
def test_helm_install_and_a_rollout_restart(
    cluster: KubeCluster, demo_app_jar: Path, layout: str
) -> None:
    repository, tag = agent_image(cluster)
    volume, mount = jar_volume(demo_app_jar)
    values = {
        "layout": layout,
        "image": {"repository": repository, "tag": tag, "pullPolicy": "Never"},
        "gracePeriodSeconds": 30,
        "registry": {"type": "none"},
        "agent": {"appShutdownSeconds": 10, "drain": {"quietSeconds": 1}},
        "deployment": {
            "replicas": 1,
            "minReadySeconds": 1,
            "pod": {
                "automountServiceAccountToken": False,
                "containers": [
                    {
                        "name": "app",
                        **demo_app(cluster, demo_app_jar),
                        "ports": [{"name": "http", "containerPort": APP_PORT}],
                        "securityContext": {
                            "runAsNonRoot": True,
                            "runAsUser": 10002,
                            "allowPrivilegeEscalation": False,
                            "readOnlyRootFilesystem": True,
                            "capabilities": {"drop": ["ALL"]},
                        },
                        "volumeMounts": [{"name": "tmp", "mountPath": "/tmp"}, mount],
                    }
                ],
                "volumes": [{"name": "tmp", "emptyDir": {"sizeLimit": "128Mi"}}, volume],
            },
        },
    }
    helm = [_tool("helm"), f"--kubeconfig={cluster.kubeconfig}"]
    done = subprocess.run(
        [*helm, "install", "orders", str(CHART), "--values", "-", "--wait",
         f"--timeout={int(START_TIMEOUT)}s"],
        input=json.dumps(values), capture_output=True, text=True, timeout=START_TIMEOUT + 60,
        check=False,
    )  # fmt: skip
    try:
        assert done.returncode == 0, done.stderr + cluster.kubectl("get", "pods", "-o=wide")
        names = cluster.kubectl(
            "get", "deployments", "-l=app.kubernetes.io/instance=orders", "-o=name"
        ).split()
        assert len(names) == 1, names
        took = restart_replaces_every_pod(cluster, names[0].split("/", 1)[1])
        print(f"\nhelm {layout}: rollout restart complete in {took:.1f} s")
    finally:
        subprocess.run(
            [*helm, "uninstall", "orders", "--wait", "--timeout=120s"],
            capture_output=True, timeout=180, check=False,
        )  # fmt: skip


@pytest.mark.parametrize("layout", ["native", "classic"])
def test_kubectl_apply_k_and_a_rollout_restart(
    cluster: KubeCluster, demo_app_jar: Path, tmp_path: Path, layout: str
) -> None:
    """The example as shipped (its Deployment, Secrets, ConfigMap and the component), with the
    app's Deployment made runnable here (the demo app, one replica) as a user's own file would
    be, and an overlay for the agent's image and no registry.

    The app's changes go into its file, not into an overlay patch: a strategic-merge patch of
    the Deployment above the component turns the terminationGracePeriodSeconds its replacement
    wrote into the string "60" (kustomize 5.7.1 and 5.8.2), which the API server refuses."""
    copied = tmp_path / "kustomize"
    shutil.copytree(KUSTOMIZE, copied)
    example = copied / "example" / "kustomization.yaml"
    example.write_text(example.read_text().replace("- ../native", f"- ../{layout}"))
    repository, tag = agent_image(cluster)
    volume, mount = jar_volume(demo_app_jar)
    app_file = copied / "example" / "deployment.yaml"
    documents = [d for d in yaml.safe_load_all(app_file.read_text()) if d]
    for document in documents:
        if document["kind"] != "Deployment":
            continue
        spec = document["spec"]
        spec["replicas"], spec["minReadySeconds"] = 1, 1
        pod = spec["template"]["spec"]
        pod["volumes"].append(volume)
        app = next(c for c in pod["containers"] if c["name"] == "orders")
        app.update(demo_app(cluster, demo_app_jar))
        app["volumeMounts"].append(mount)
    app_file.write_text(yaml.safe_dump_all(documents))
    overlay = copied / "ci"
    overlay.mkdir()
    (overlay / "kustomization.yaml").write_text(
        yaml.safe_dump(
            {
                "apiVersion": "kustomize.config.k8s.io/v1beta1",
                "kind": "Kustomization",
                "resources": ["../example"],
                "images": [{"name": "prestop-agent", "newName": repository, "newTag": tag}],
                "configMapGenerator": [
                    {
                        "name": "prestop-agent",
                        "behavior": "merge",
                        "literals": ["PRESTOP_REGISTRY=none", "PRESTOP_DRAIN_QUIET_SECONDS=1"],
                    }
                ],
            }
        )
    )
    cluster.apply(kustomization=overlay)
    try:
        took = restart_replaces_every_pod(cluster, "orders")
        print(f"\nkustomize {layout}: rollout restart complete in {took:.1f} s")
    finally:
        cluster.kubectl("delete", "-k", str(overlay), "--wait=true", timeout=300)
