"""The release as a user's CI and cluster take it: through a real OCI registry (CNCF distribution,
built from the Go module proxy by ``make k8s-tools``, on loopback):

* the chart, packaged and pushed with ``helm push``, renders from ``oci://`` exactly as from the
  repository;
* the agent image (docker/Dockerfile, built by tests/kube/prepare.sh) is pushed with buildah and
  pulled by containerd through a ``hosts.toml`` (not ``ctr import``), then run: its version is the
  release's, and the chart's ``helm test`` command (``check --config-only`` with the environment
  the default values give it) passes in it: no floor warning.

The in-cluster ``helm install`` from ``oci://`` and ``helm test`` need an API server (the control
plane of tests/kube/ in progress); the pieces they use are the ones checked here.
"""

from __future__ import annotations

import contextlib
import json
import os
import shutil
import subprocess
import tempfile
import time
import urllib.request
from collections.abc import Iterator
from pathlib import Path

import pytest

from agent import __version__
from tests.harness.support import free_port, skip_or_fail
from tests.test_k8s import (
    CHART,
    KUBE_VERSION,
    _documents,
    _environment,
    _is_hook,
    _secrets_from_outside,
    _tool,
    helm_template,
)

pytestmark = pytest.mark.root

CHART_VALUES = {"token": {"value": "a-release-token"}}


def _run(*command: str | Path, timeout: float = 300, **kwargs: object) -> str:
    done = subprocess.run(
        [str(c) for c in command], capture_output=True, text=True, timeout=timeout, **kwargs
    )  # type: ignore[call-overload]
    assert done.returncode == 0, f"{' '.join(map(str, command))}:\n{done.stdout}{done.stderr}"
    return done.stdout + done.stderr


@contextlib.contextmanager
def serve_registry(folder: Path) -> Iterator[str]:
    """A CNCF distribution registry on a free loopback port (plain HTTP), storing in
    ``folder``; its host:port."""
    binary = _tool("registry")
    address = f"127.0.0.1:{free_port()}"
    config = folder / "config.yml"
    config.write_text(
        "version: 0.1\n"
        "log: {level: warn}\n"
        f"storage: {{filesystem: {{rootdirectory: {folder / 'data'}}}}}\n"
        f"http: {{addr: {address}}}\n"
    )
    log = (folder / "registry.log").open("wb")
    process = subprocess.Popen([binary, "serve", config], stdout=log, stderr=subprocess.STDOUT)
    try:
        deadline = time.monotonic() + 30
        while True:
            try:
                with urllib.request.urlopen(f"http://{address}/v2/", timeout=2) as answer:
                    assert answer.status == 200
                    break
            except OSError:
                assert process.poll() is None, (folder / "registry.log").read_text()
                assert time.monotonic() < deadline, "the registry did not answer /v2/"
                time.sleep(0.2)
        yield address
    finally:
        process.terminate()
        process.wait(timeout=20)
        log.close()


@pytest.fixture(scope="module")
def registry(tmp_path_factory: pytest.TempPathFactory) -> Iterator[str]:
    with serve_registry(tmp_path_factory.mktemp("registry")) as address:
        yield address


def _catalog(address: str) -> list[str]:
    with urllib.request.urlopen(f"http://{address}/v2/_catalog", timeout=5) as answer:
        return json.loads(answer.read())["repositories"]


def _helm_env(folder: Path) -> dict[str, str]:
    """helm's registry login and cache in ``folder``, not the user's."""
    return {**os.environ, "HELM_REGISTRY_CONFIG": str(folder / "registry.json"),
            "HELM_CACHE_HOME": str(folder / "helm-cache")}  # fmt: skip


def push_chart(registry: str, folder: Path) -> str:
    """``helm package`` the chart and ``helm push`` it; its oci:// reference."""
    helm, env = _tool("helm"), _helm_env(folder)
    _run(helm, "package", CHART, "--destination", folder, env=env)
    package = folder / f"prestop-agent-{__version__}.tgz"
    assert package.exists(), list(folder.iterdir())
    pushed = _run(helm, "push", package, f"oci://{registry}/charts", "--plain-http", env=env)
    assert f"{registry}/charts/prestop-agent:{__version__}" in pushed, pushed
    assert "charts/prestop-agent" in _catalog(registry)
    return f"oci://{registry}/charts/prestop-agent"


def template_from(reference: str, values: dict[str, object], folder: Path) -> list[dict]:
    """``helm template`` of the pushed chart, pulled from the registry; hooks included."""
    done = subprocess.run(
        [_tool("helm"), "template", "orders", reference, "--version", __version__,
         "--plain-http", "--kube-version", KUBE_VERSION, "--values", "-"],
        input=json.dumps(values), capture_output=True, text=True, timeout=300,
        env=_helm_env(folder),
    )  # fmt: skip
    assert done.returncode == 0, done.stderr
    return _documents(done.stdout)


def test_the_chart_pushed_with_helm_push_renders_from_oci(registry: str, tmp_path: Path) -> None:
    reference = push_chart(registry, tmp_path)
    from_registry = template_from(reference, CHART_VALUES, tmp_path)
    assert from_registry == helm_template(CHART_VALUES, hooks=True)
    print(f"chart: helm push -> {reference}, rendered from there as from k8s/")


# --- the image ---------------------------------------------------------------------------------


def push_image(registry: str, archives: tuple[Path, ...], name: str, folder: Path) -> str:
    """CI's step: buildah, with storage of its own in ``folder``, pushes the agent image built
    by tests/kube/prepare.sh (``name`` in its archive) to the registry; the image reference."""
    (archive,) = [a for a in archives if a.name.startswith("agent-")]
    image = f"{registry}/prestop-agent:{__version__}"
    buildah = ["buildah", "--root", str(folder / "buildah"), "--runroot",
               str(folder / "buildah-run"), "--storage-driver", "vfs"]  # fmt: skip
    _run(*buildah, "pull", "--quiet", f"docker-archive:{archive}")
    _run(*buildah, "push", "--quiet", "--tls-verify=false", name, f"docker://{image}")
    assert "prestop-agent" in _catalog(registry)
    return image


def hosts_toml(registry: str) -> str:
    """containerd's registry host configuration for the plain-HTTP loopback registry."""
    return (
        f'server = "http://{registry}"\n'
        f'[host."http://{registry}"]\n  capabilities = ["pull", "resolve"]\n'
    )


def _containerd(folder: Path) -> tuple[subprocess.Popen[bytes], Path]:
    """A containerd of the test's own (its root and state under ``folder``, its sockets in a
    short folder of their own under /run, which the caller removes); no CRI."""
    folder.mkdir(parents=True, exist_ok=True)
    # containerd refuses a socket path over 104 bytes, which a pytest-xdist worker's tmp_path
    # (…/popen-gw0/test_the_image_pushed…/containerd/) exceeds: the sockets go to a short folder.
    sockets = Path(tempfile.mkdtemp(prefix="prestop-ctrd-", dir="/run"))
    socket = sockets / "containerd.sock"
    config = folder / "containerd.toml"
    config.write_text(
        "version = 2\n"
        f'root = "{folder}/root"\n'
        f'state = "{folder}/state"\n'
        'disabled_plugins = ["io.containerd.grpc.v1.cri", "io.containerd.snapshotter.v1.btrfs",'
        ' "io.containerd.snapshotter.v1.zfs", "io.containerd.snapshotter.v1.aufs",'
        ' "io.containerd.snapshotter.v1.devmapper"]\n'
        f'[grpc]\n  address = "{socket}"\n'
        f'[ttrpc]\n  address = "{socket}.ttrpc"\n'
        f'[plugins."io.containerd.internal.v1.opt"]\n  path = "{folder}/opt"\n'
    )
    log = (folder / "containerd.log").open("wb")
    process = subprocess.Popen(
        ["containerd", "--config", str(config)], stdout=log, stderr=subprocess.STDOUT
    )
    # A socket that exists before containerd serves it keeps ctr waiting (it has no connect
    # timeout of its own by default): each try is bounded, a try that hangs counts as "not yet".
    deadline = time.monotonic() + 60
    while not _answers(socket):
        assert process.poll() is None, (folder / "containerd.log").read_text()
        assert time.monotonic() < deadline, "containerd did not answer"
        time.sleep(0.2)
    return process, socket


def _answers(socket: Path) -> bool:
    try:
        return subprocess.run(
            ["ctr", "--address", str(socket), "--connect-timeout", "2s", "--timeout", "5s",
             "version"], capture_output=True, timeout=10,
        ).returncode == 0  # fmt: skip
    except subprocess.TimeoutExpired:
        return False


def test_the_image_pushed_with_buildah_is_pulled_by_containerd_and_runs(
    registry: str, tmp_path: Path
) -> None:
    if os.geteuid() != 0:
        skip_or_fail("buildah and containerd need root here")
    for tool in ("buildah", "containerd", "ctr"):
        if shutil.which(tool) is None:
            skip_or_fail(f"{tool} is not installed (make kube-prepare installs it)")
    from tests.harness.node import NodeError, prepare

    try:
        prepared = prepare()
    except NodeError as err:
        pytest.fail(str(err))
    image = push_image(registry, prepared.archives, prepared.agent_image, tmp_path)

    # The cluster: containerd pulls it through its registry host configuration (hosts.toml).
    hosts = tmp_path / "certs.d" / registry
    hosts.mkdir(parents=True)
    (hosts / "hosts.toml").write_text(hosts_toml(registry))
    process, socket = _containerd(tmp_path / "containerd")
    ctr = ["ctr", "--address", str(socket), "--namespace", "release"]
    try:
        pulled = _run(*ctr, "images", "pull", "--hosts-dir", tmp_path / "certs.d", image)
        assert "done" in pulled or "unpacking" in pulled, pulled
        listed = _run(*ctr, "images", "list", "--quiet")
        assert image in listed.split(), listed

        version = _run(*ctr, "run", "--rm", image, "release-version", "prestop-agent",
                       "--version")  # fmt: skip
        assert version.strip() == f"prestop-agent {__version__}"

        # The chart's helm test command, with the environment its pod gets from default values.
        objects = helm_template(CHART_VALUES, hooks=True)
        (pod,) = [o for o in objects if _is_hook(o)]
        (check,) = pod["spec"]["containers"]
        environ = _environment(check, objects + _secrets_from_outside(objects))
        env_flags = [f"--env={name}={value}" for name, value in environ.items()]
        done = subprocess.run(
            [*ctr, "run", "--rm", *env_flags, image, "release-check", "prestop-agent",
             *check["args"]],
            capture_output=True, text=True, timeout=120,
        )  # fmt: skip
        assert done.returncode == 0, done.stdout + done.stderr
        assert "configuration is valid" in done.stdout and "WARNING" not in done.stdout
        print(f"image: buildah push -> {image} -> containerd pull (hosts.toml) -> runs {version}")
    finally:
        process.terminate()
        process.wait(timeout=30)
        shutil.rmtree(socket.parent, ignore_errors=True)
