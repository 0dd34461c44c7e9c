"""The release as a cluster takes it: the chart from ``oci://`` with default values, its image
pulled by the node's containerd (the kubelet's CRI pull) from the registry through a
``hosts.toml``, and the chart's ``helm test`` pod run: ``prestop-agent check --config-only`` exits
0 with no floor warning.

Through the cluster's API server, as a user runs it: ``helm install`` from ``oci://``, then
``helm test``. (A static-pod twin of this test, the test pod written out with the Secrets' values,
was dropped: it proved nothing the API server's run does not, and no static pod is what a user
runs.)
"""

from __future__ import annotations

import json
import re
import subprocess
from collections.abc import Iterator
from pathlib import Path

import pytest

from agent import __version__
from tests.harness.cluster import KubeCluster
from tests.harness.node import KubeNode
from tests.kube.test_install import (
    START_TIMEOUT,
    UNUSED_EUREKA_URL,
    assert_no_floor_warning,
    helm_app_pod,
    live_pods,
)
from tests.test_k8s import _tool
from tests.test_release import (
    _helm_env,
    hosts_toml,
    push_chart,
    push_image,
    serve_registry,
)

pytestmark = pytest.mark.kube


@pytest.fixture
def registry(tmp_path_factory: pytest.TempPathFactory) -> Iterator[str]:
    with serve_registry(tmp_path_factory.mktemp("registry")) as address:
        yield address


def publish(node: KubeNode, registry: str, folder: Path) -> tuple[str, str]:
    """CI's release: the agent image pushed with buildah, the chart with ``helm push``; the
    node's containerd told how to pull from the registry. (image, the chart's oci:// reference)

    Each test's registry is new (a new port), so the image is not on the node yet: the kubelet
    must pull it."""
    image = push_image(registry, node.prepared.archives, node.prepared.agent_image, folder)
    assert image not in node._ctr("images", "list", "--quiet").split()
    hosts = node.registry_hosts / registry
    hosts.mkdir(parents=True, exist_ok=True)
    (hosts / "hosts.toml").write_text(hosts_toml(registry))
    return image, push_chart(registry, folder)


@pytest.mark.java
@pytest.mark.timeout(900)  # buildah's push, a JVM start, the install and the test pod
def test_helm_install_from_oci_with_default_values_then_helm_test(
    cluster: KubeCluster, registry: str, demo_app_jar: Path, tmp_path: Path
) -> None:
    """The user's steps: the Secret the default registry (eureka) names, ``helm install`` from
    ``oci://`` with default values but the image's registry and the app (the demo app, one
    replica, Ready after 1 s rather than 30: what runs on a 2-core machine), then ``helm test``.

    No Eureka server: ``check --config-only`` does not ask it, and the agent starts without it
    (its registry health check fails, which is not this test's business)."""
    image, reference = publish(cluster.node, registry, tmp_path)
    cluster.kubectl(
        "create", "secret", "generic", "eureka-credentials",
        f"--from-literal=service-urls={UNUSED_EUREKA_URL}",
    )  # fmt: skip
    values = {
        "image": {"repository": f"{registry}/prestop-agent"},
        "deployment": {
            "replicas": 1,
            "minReadySeconds": 1,
            "pod": helm_app_pod(cluster, demo_app_jar),
        },
    }
    helm = [_tool("helm"), f"--kubeconfig={cluster.kubeconfig}"]
    release = "-l=app.kubernetes.io/instance=orders"

    def run_helm(*args: str, stdin: str | None = None) -> subprocess.CompletedProcess[str]:
        return subprocess.run(
            [*helm, *args], input=stdin, capture_output=True, text=True,
            timeout=START_TIMEOUT + 60, check=False, env=_helm_env(tmp_path),
        )  # fmt: skip

    installed = run_helm(
        "install", "orders", reference, "--version", __version__, "--plain-http",
        "--values", "-", "--wait", f"--timeout={int(START_TIMEOUT)}s", stdin=json.dumps(values),
    )  # fmt: skip
    try:
        assert installed.returncode == 0, installed.stderr + cluster.kubectl("get", "pods")
        (pod,) = live_pods(cluster, f"{release},prestop-agent/sidecar=true")
        name = pod["metadata"]["name"]
        pulled = [
            e["message"]
            for e in cluster.events(f"--field-selector=involvedObject.name={name}")
            if e["reason"] == "Pulled" and image in e["message"]
        ]
        # The kubelet's CRI pull of a reference the node did not have, resolved through the
        # registry's hosts.toml. Its layers are content-addressed and already in containerd's
        # store (the pre-imported image the other tests run has the same ones): from the
        # registry come the manifest and the config, as for a user whose node cached the base.
        assert pulled and "already present" not in pulled[0], pulled
        agent_log = cluster.logs(name, "prestop-agent")
        assert '"agent_started"' in agent_log, agent_log
        assert "drain_floor_exceeds_max" not in agent_log, agent_log

        tested = run_helm("test", "orders", "--logs", f"--timeout={int(START_TIMEOUT)}s")
        assert tested.returncode == 0, tested.stdout + tested.stderr
        assert re.search(r"^Phase: +Succeeded$", tested.stdout, re.MULTILINE), tested.stdout
        # The test pod's own output (the release's NOTES above it name the WARNING too).
        _, marker, check_output = tested.stdout.partition("POD LOGS: orders-check")
        assert marker, tested.stdout
        assert_no_floor_warning(check_output)
        print(f"\nhelm install {reference} (defaults): {pulled[0]}; helm test passed")
    finally:
        # The default grace period (150 s) and an unreachable Eureka would hold each pod's
        # termination for the whole propagation floor: the pods go with 1 s instead, once
        # nothing recreates them.
        run_helm("uninstall", "orders", "--cascade=orphan", "--wait")
        cluster.kubectl("delete", "replicasets", release, "--cascade=orphan")
        cluster.kubectl("delete", "pods", release, "--grace-period=1", "--wait=true",
                        timeout=180)  # fmt: skip
        cluster.kubectl("delete", "secret", "eureka-credentials", "--ignore-not-found")
