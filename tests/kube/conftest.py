"""The ``kube_node`` fixture: one real kubelet node for the session (see tests/kube/node.py)."""

from __future__ import annotations

import os
import time
from collections.abc import Iterator

import pytest

from tests.kube.node import KubeNode, NodeError, prepare
from tests.support import skip_or_fail


@pytest.fixture(scope="session")
def kube_node() -> Iterator[KubeNode]:
    """containerd and a standalone kubelet, images imported, torn down after the session.

    Skips without root (fails under CI=true). The first use on a machine installs Debian's
    packages and builds the kubelet and the images (cached: later sessions only start them)."""
    if os.geteuid() != 0:
        skip_or_fail("the kubelet tests need root")
    started = time.monotonic()
    try:
        prepared = prepare()
    except NodeError as err:
        pytest.fail(str(err))
    node = KubeNode(prepared)
    try:
        node.start()
    except NodeError:
        print(node.tails())
        node.stop()
        raise
    print(
        f"\nkube node: prepare {prepared.seconds:.1f} s, start {node.setup_seconds:.1f} s,"
        f" set-up {time.monotonic() - started:.1f} s"
    )
    try:
        yield node
    finally:
        node.stop()


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
