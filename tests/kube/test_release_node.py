"""The release on the kubelet node, as a cluster takes it: the chart from ``oci://`` with default
values, its image pulled by the node's containerd (the kubelet's CRI pull) from the registry
through a ``hosts.toml``, and the chart's ``helm test`` pod run: ``prestop-agent check
--config-only`` exits 0 with no floor warning.

A standalone kubelet runs static pods, which cannot read Secrets: the test pod's environment is
the one the kubelet would build from the chart's objects and the Secrets a user creates, written
out as values. ``helm install`` and ``helm test`` themselves need an API server.
"""

from __future__ import annotations

from collections.abc import Iterator
from pathlib import Path

import pytest

from agent import __version__
from tests.kube.node import KubeNode
from tests.test_k8s import _environment, _is_hook, _secrets_from_outside
from tests.test_release import hosts_toml, push_chart, push_image, serve_registry, template_from

pytestmark = pytest.mark.kube


@pytest.fixture
def registry(tmp_path_factory: pytest.TempPathFactory) -> Iterator[str]:
    with serve_registry(tmp_path_factory.mktemp("registry")) as address:
        yield address


def test_the_helm_test_pod_from_the_registry_passes_on_the_node(
    kube: KubeNode,
    registry: str,
    tmp_path: Path,
) -> None:
    image = push_image(registry, kube.prepared.archives, kube.prepared.agent_image, tmp_path)
    hosts = kube.registry_hosts / registry
    hosts.mkdir(parents=True, exist_ok=True)
    (hosts / "hosts.toml").write_text(hosts_toml(registry))
    reference = push_chart(registry, tmp_path)

    # Default values; only the image's registry is this one (the tag is the chart's appVersion).
    objects = template_from(reference, {"image": {"repository": f"{registry}/prestop-agent"}},
                            tmp_path)  # fmt: skip
    (pod,) = [o for o in objects if _is_hook(o)]
    (check,) = pod["spec"]["containers"]
    assert check["image"] == image
    environ = _environment(check, objects + _secrets_from_outside(objects))
    check["env"] = [{"name": name, "value": value} for name, value in environ.items()]
    pod["metadata"] = {"name": "helm-test"}
    kube.apply(pod)

    def finished() -> bool:
        status = kube.container_status("helm-test", "prestop-agent") or {}
        return "terminated" in status.get("state", {})

    try:
        kube.wait_until("the helm test pod ran", finished, 180)
        status = kube.container_status("helm-test", "prestop-agent") or {}
        output = kube.logs("helm-test", "prestop-agent")
        assert status["state"]["terminated"]["exitCode"] == 0, output
        assert f"prestop-agent {__version__}: configuration is valid" in output
        assert "Propagation floor, by stage" in output and "WARNING" not in output
        pulled = kube._ctr("images", "list", "--quiet").split()
        assert image in pulled, pulled
        print(f"helm test pod on the node: {image} pulled through hosts.toml, check exited 0")
    finally:
        kube.delete("helm-test")
