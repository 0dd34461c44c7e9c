"""The kube fixtures: one real cluster for the session (tests/harness/cluster.py), whose node
(tests/harness/node.py) also runs the tests' static pods."""

from __future__ import annotations

import os
import time
from collections.abc import Iterator

import pytest

from tests.harness.cluster import KubeCluster
from tests.harness.node import KubeNode, NodeError, prepare
from tests.harness.support import skip_or_fail, summary_line


@pytest.fixture(scope="session")
def kube_cluster(request: pytest.FixtureRequest) -> Iterator[KubeCluster]:
    """etcd, the API server, the controller-manager, the scheduler, containerd and a kubelet
    registered as a Node, kube-proxy; torn down after the session.

    Skips without root (fails under CI=true). The first use on a machine installs Debian's
    packages and builds the kubelet, the control plane and the images (cached: later sessions
    only start them). Set-up and teardown times are in the run's summary."""
    if os.geteuid() != 0:
        skip_or_fail("the kube tests need root")
    started = time.monotonic()
    try:
        prepared = prepare()
    except NodeError as err:
        pytest.fail(str(err))
    cluster = KubeCluster(prepared)
    try:
        cluster.start()
    except NodeError:
        print(cluster.tails())
        print(cluster.node.tails())
        cluster.stop()
        raise
    summary_line(
        request.config,
        f"kube cluster: prepare {prepared.seconds:.1f} s, start {cluster.setup_seconds},"
        f" set-up {time.monotonic() - started:.1f} s",
    )
    try:
        yield cluster
    finally:
        cluster.stop()
        summary_line(request.config, f"kube cluster: teardown {cluster.teardown_seconds:.1f} s")


@pytest.fixture(scope="session")
def kube_node(kube_cluster: KubeCluster) -> KubeNode:
    """The cluster's node: static pods (manifest files) run there as under a standalone
    kubelet, with mirror pods in the API."""
    return kube_cluster.node


@pytest.fixture
def kube(kube_node: KubeNode, request: pytest.FixtureRequest) -> Iterator[KubeNode]:
    """The session's node; after a failed test, the kubelet's and containerd's log tails are
    printed. The pods the test applied and left are deleted."""
    failed_before = request.session.testsfailed
    before = set(kube_node.manifests.glob("*.yaml"))  # e.g. a module's Eureka server pod
    yield kube_node
    if request.session.testsfailed > failed_before:
        print(kube_node.tails(80))
    left = [m.stem for m in set(kube_node.manifests.glob("*.yaml")) - before]
    if left:
        kube_node.delete(*left)


@pytest.fixture
def cluster(kube_cluster: KubeCluster, request: pytest.FixtureRequest) -> Iterator[KubeCluster]:
    """The session's cluster; after a failed test, the components' log tails are printed. The
    pods the test applied (``apply_pod``) and left are deleted; so are the Deployments,
    StatefulSets and Services it left in ``default``, with their pods (static pods are the
    ``kube`` fixture's)."""
    failed_before = request.session.testsfailed
    pods_before = set(kube_cluster.node.api_pods)  # e.g. a module's Eureka server pod
    yield kube_cluster
    if request.session.testsfailed > failed_before:
        print(kube_cluster.tails())
        print(kube_cluster.node.tails(80))
    left = [
        name
        for name in sorted(kube_cluster.node.api_pods - pods_before)
        if kube_cluster.get("pod", name, check=False)
    ]
    if left:
        kube_cluster.delete_pods(*left)
    kube_cluster.kubectl(
        "delete", "deployments,statefulsets,services", "--cascade=foreground",
        "--field-selector=metadata.name!=kubernetes", "--wait=true", "--timeout=240s",
        timeout=300,
    )  # fmt: skip
