"""What ships: the Dockerfile (linted, its steps replayed with pip) and the Quick start. The
Kubernetes material in k8s/ has its own tests: tests/test_k8s.py and tests/test_monitoring.py."""

from __future__ import annotations

import re
import shutil
import subprocess
import sys
import tomllib
from pathlib import Path

from packaging.requirements import Requirement
from packaging.utils import canonicalize_name

from agent import __version__
from agent.config import VARIABLES
from agent.lifecycle import Phase

ROOT = Path(__file__).resolve().parent.parent
DOCKERFILE = ROOT / "docker" / "Dockerfile"
CONSTRAINTS = ROOT / "docker" / "constraints.txt"
PYPROJECT = tomllib.loads((ROOT / "pyproject.toml").read_text())["project"]


def _pins() -> dict[str, str]:
    """docker/constraints.txt as {canonical name: version}."""
    pins = {}
    for line in CONSTRAINTS.read_text().splitlines():
        if line.strip() and not line.startswith("#"):
            name, _, version = line.partition("==")
            pins[canonicalize_name(name)] = version.strip()
    return pins


def test_the_dockerfile_passes_hadolint() -> None:
    hadolint = shutil.which("hadolint") or str(Path(sys.executable).with_name("hadolint"))
    done = subprocess.run([hadolint, str(DOCKERFILE)], capture_output=True, text=True)
    assert done.returncode == 0, done.stdout + done.stderr


def test_the_dockerfile_matches_the_package() -> None:
    text = DOCKERFILE.read_text()
    pinned = re.search(r"prestop-agent==([\w.]+)", text)
    assert pinned is not None and pinned.group(1) == __version__
    bases = re.findall(r"^FROM python:(\d+\.\d+)", text, re.MULTILINE)
    required = tomllib.loads((ROOT / "pyproject.toml").read_text())["project"]["requires-python"]
    assert bases and all(f">={base}" == required or base >= required[2:] for base in bases)
    for source in re.findall(r"^COPY (?!--from)(.+) \S+$", text, re.MULTILINE):
        for path in source.split():
            assert (ROOT / path).exists(), f"COPY {path}: not in the repository"
    assert re.search(r"^USER 10001$", text, re.MULTILINE), "the runtime stage runs unprivileged"
    assert 'ENTRYPOINT ["prestop-agent"]' in text
    assert "EXPOSE 8099" in text
    labels = dict(re.findall(r'(org\.opencontainers\.image\.\w+)="([^"]*)"', text))
    assert labels["org.opencontainers.image.version"] == __version__
    assert labels["org.opencontainers.image.licenses"] == PYPROJECT["license"]
    assert labels["org.opencontainers.image.source"] == "${SOURCE_URL}"
    assert re.search(r"^ARG SOURCE_URL", text, re.MULTILINE)
    assert "-c constraints.txt" in text, "the wheels are built from the pinned versions"


def test_the_constraints_pin_every_dependency_within_pyproject_ranges() -> None:
    pins = _pins()
    for dependency in PYPROJECT["dependencies"]:
        requirement = Requirement(dependency)
        pinned = pins.get(canonicalize_name(requirement.name))
        assert pinned is not None, f"{requirement.name} is not pinned in {CONSTRAINTS.name}"
        assert requirement.specifier.contains(pinned), (
            f"{requirement.name}=={pinned}: {requirement}"
        )


def test_the_dockerignore_lets_in_only_what_the_image_copies() -> None:
    """An allow-list: everything out (the 100+ MB .venv first), then what COPY names back in."""
    lines = [
        line
        for line in (ROOT / ".dockerignore").read_text().splitlines()
        if line.strip() and not line.startswith("#")
    ]
    assert lines[0] == "*"
    allowed = {line[1:].rstrip("/") for line in lines if line.startswith("!")}
    copied = {
        path
        for source in re.findall(r"^COPY (?!--from)(.+) \S+$", DOCKERFILE.read_text(), re.MULTILINE)
        for path in source.split()
    }
    assert allowed == copied


def test_the_dockerfile_steps_build_a_working_command(tmp_path: Path) -> None:
    """The image's two RUN steps, replayed: wheels of the package and its dependencies at the
    pinned versions, then an offline install of exactly those wheels into a fresh environment,
    which then holds exactly what docker/constraints.txt pins (nothing unpinned crept in)."""
    wheels = tmp_path / "wheels"
    subprocess.run(
        [
            sys.executable,
            "-m",
            "pip",
            "wheel",
            "-q",
            "--wheel-dir",
            str(wheels),
            "-c",
            str(CONSTRAINTS),
            str(ROOT),
        ],
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
    frozen = subprocess.run(
        [pip, "freeze", "--exclude", "prestop-agent"], capture_output=True, text=True, check=True
    ).stdout.split()
    installed = {canonicalize_name(n): v for n, _, v in (line.partition("==") for line in frozen)}
    assert installed == _pins()


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
