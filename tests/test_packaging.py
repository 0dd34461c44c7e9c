"""What ships: the Dockerfile (linted, its steps replayed with pip), the example manifests (their
settings pass the agent's own validation and agree with the pod around them), the Quick start."""

from __future__ import annotations

import re
import shutil
import subprocess
import sys
import tomllib
from pathlib import Path
from typing import Any

import pytest
import yaml

from agent import __version__
from agent.config import VARIABLES, load
from agent.lifecycle import Phase

ROOT = Path(__file__).resolve().parent.parent
DOCKERFILE = ROOT / "docker" / "Dockerfile"
EXAMPLES = ROOT / "k8s" / "examples"
MANIFESTS = sorted(EXAMPLES.glob("*.yaml"))


def test_the_dockerfile_passes_hadolint() -> None:
    hadolint = shutil.which("hadolint") or str(Path(sys.executable).with_name("hadolint"))
    done = subprocess.run([hadolint, str(DOCKERFILE)], capture_output=True, text=True)
    assert done.returncode == 0, done.stdout + done.stderr


def test_the_dockerfile_matches_the_package() -> None:
    text = DOCKERFILE.read_text()
    pinned = re.search(r"prestop-agent==([\w.]+)", text)
    assert pinned is not None and pinned.group(1) == __version__
    # Every stage starts from BASE_IMAGE, whose default is the official image of a Python the
    # package supports (the kubelet tests pass a Debian base built on the machine instead).
    default = re.search(r"^ARG BASE_IMAGE=python:(\d+\.\d+)\.\d+-slim", text, re.MULTILINE)
    required = tomllib.loads((ROOT / "pyproject.toml").read_text())["project"]["requires-python"]
    assert default is not None and f">={default.group(1)}" == required
    stages = re.findall(r"^FROM (\S+)", text, re.MULTILINE)
    assert stages and set(stages) == {"${BASE_IMAGE}"}, stages
    for source in re.findall(r"^COPY (?!--from)(.+) \S+$", text, re.MULTILINE):
        for path in source.split():
            assert (ROOT / path).exists(), f"COPY {path}: not in the repository"
    assert re.search(r"^USER 10001$", text, re.MULTILINE), "the runtime stage runs unprivileged"
    assert 'ENTRYPOINT ["prestop-agent"]' in text
    assert "EXPOSE 8099" in text


def test_the_dockerfile_steps_build_a_working_command(tmp_path: Path) -> None:
    """The image's two RUN steps, replayed: wheels of the package and its dependencies, then an
    offline install of exactly those wheels into a fresh environment."""
    wheels = tmp_path / "wheels"
    subprocess.run(
        [sys.executable, "-m", "pip", "wheel", "-q", "--wheel-dir", str(wheels), str(ROOT)],
        check=True,
        timeout=600,
    )
    subprocess.run([sys.executable, "-m", "venv", str(tmp_path / "venv")], check=True)
    pip = tmp_path / "venv" / "bin" / "pip"
    subprocess.run(
        [
            pip,
            "install",
            "-q",
            "--no-index",
            "--find-links",
            wheels,
            f"prestop-agent=={__version__}",
        ],
        check=True,
        timeout=600,
    )
    version = subprocess.run(
        [tmp_path / "venv" / "bin" / "prestop-agent", "--version"],
        capture_output=True,
        text=True,
        check=True,
    )
    assert version.stdout.strip() == f"prestop-agent {__version__}"


def _pod(manifest: Path) -> dict[str, Any]:
    return yaml.safe_load(manifest.read_text())["spec"]["template"]["spec"]


def _agent_and_app(pod: dict[str, Any]) -> tuple[dict[str, Any], dict[str, Any]]:
    every = pod.get("initContainers", []) + pod["containers"]
    agent = next(c for c in every if c["name"] == "prestop-agent")
    app = next(c for c in pod["containers"] if c["name"] == "app")
    return agent, app


DOWNWARD_API = {
    "status.podIP": "10.1.2.3",
    "metadata.name": "orders-7f9c",
    "metadata.namespace": "shop",
}


def _environment(agent: dict[str, Any]) -> dict[str, str]:
    """The agent container's environment as the kubelet would fill it in."""
    environ: dict[str, str] = {}
    for variable in agent["env"]:
        if "value" in variable:
            environ[variable["name"]] = variable["value"]
        elif "fieldRef" in variable["valueFrom"]:
            environ[variable["name"]] = DOWNWARD_API[variable["valueFrom"]["fieldRef"]["fieldPath"]]
        else:  # a Secret: Eureka URLs with credentials
            environ[variable["name"]] = "http://user:secret@eureka-0:8761/eureka/"
    return environ


def test_there_is_a_manifest_for_each_sidecar_layout() -> None:
    assert {m.name for m in MANIFESTS} == {"classic-sidecar.yaml", "native-sidecar.yaml"}


@pytest.mark.parametrize("manifest", MANIFESTS, ids=lambda m: m.stem)
def test_the_manifest_is_a_valid_agent_configuration_that_fits_its_pod(manifest: Path) -> None:
    pod = _pod(manifest)
    agent, app = _agent_and_app(pod)
    environ = _environment(agent)
    assert set(environ) <= set(VARIABLES), "every variable is one the agent reads"
    config = load(environ)  # raises on anything invalid, the grace budget included
    assert config.grace_period_seconds == pod["terminationGracePeriodSeconds"]
    assert config.budget().fits
    agent_port = agent["ports"][0]["containerPort"]
    assert agent_port == config.port

    hook = app["lifecycle"]["preStop"]["httpGet"]
    assert (hook["port"], hook["path"]) == (agent_port, "/prestop")
    assert "host" not in hook, "the kubelet must call the pod IP, where the agent listens"
    headers = {h["name"]: h["value"] for h in hook.get("httpHeaders", [])}
    assert headers.get("X-Prestop-Token") == config.token
    probe = app["readinessProbe"]["httpGet"]
    assert (probe["port"], probe["path"]) == (agent_port, "/ready")
    app_ports = {p["containerPort"] for p in app["ports"]}
    assert set(config.app_ports) <= app_ports


def test_the_native_layout_is_an_init_container_that_keeps_running() -> None:
    pod = _pod(EXAMPLES / "native-sidecar.yaml")
    agent = next(c for c in pod["initContainers"] if c["name"] == "prestop-agent")
    assert agent["restartPolicy"] == "Always"
    classic = _pod(EXAMPLES / "classic-sidecar.yaml")
    assert "initContainers" not in classic


def test_the_readme_quick_start_is_two_commands_and_ci_runs_the_second() -> None:
    readme = (ROOT / "README.md").read_text()
    quick = readme.split("## Quick start", 1)[1].split("```sh", 1)[1].split("```", 1)[0]
    commands = [line.split("#", 1)[0].strip() for line in quick.strip().splitlines()]
    assert commands == ["make run", "make test"]
    ci = (ROOT / ".ci" / "run").read_text()
    assert [
        line for line in ci.splitlines() if line and not line.startswith(("#", "set", "cd"))
    ] == ["exec make test"]


def test_the_readme_documents_every_variable_and_phase() -> None:
    readme = (ROOT / "README.md").read_text()
    for variable in VARIABLES:
        assert f"`{variable}`" in readme, f"{variable} is missing from the README"
    for phase in Phase:
        assert f"`{phase}`" in readme
