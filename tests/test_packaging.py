"""What ships: the Dockerfile (linted, its steps replayed with pip) and the Quick start. The
Kubernetes material in k8s/ has its own tests: tests/test_k8s.py and tests/test_monitoring.py."""

from __future__ import annotations

import re
import shutil
import subprocess
import sys
import tomllib
from pathlib import Path

import pytest
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
    # Every stage starts from BASE_IMAGE, whose default is the official image of a Python the
    # package supports (the kubelet tests pass a Debian base built on the machine instead).
    default = re.search(r"^ARG BASE_IMAGE=python:(\d+\.\d+)\.\d+-slim", text, re.MULTILINE)
    assert default is not None and f">={default.group(1)}" == PYPROJECT["requires-python"]
    stages = re.findall(r"^FROM (\S+)", text, re.MULTILINE)
    assert stages and set(stages) == {"${BASE_IMAGE}"}, stages
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


def test_nothing_claims_a_reproducible_image_the_build_does_not_make() -> None:
    """The image is not byte-reproducible (a base image by tag, pip and setuptools unpinned, no
    hashes, no SOURCE_DATE_EPOCH): every mention of reproducibility must say it is not."""
    places = [DOCKERFILE, CONSTRAINTS, ROOT / "README.md", ROOT / "pyproject.toml",
              *(ROOT / "docs").glob("*.md"), *(ROOT / "k8s").rglob("*.md")]  # fmt: skip
    for path in places:
        text = " ".join(path.read_text().replace("#", " ").split())
        for found in re.finditer(r"reproducib\w*", text, re.IGNORECASE):
            before = text[max(0, found.start() - 40) : found.start()].lower()
            context = text[max(0, found.start() - 60) : found.end() + 20]
            assert re.search(r"\b(not|no|nor)\b", before), f"{path.relative_to(ROOT)}: {context}"


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


@pytest.mark.slow
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


def test_the_readme_documents_every_phase_and_links_the_reference_of_every_variable() -> None:
    readme = (ROOT / "README.md").read_text()
    for phase in Phase:
        assert f"`{phase}`" in readme
    assert "(docs/reference.md)" in readme
    generated = (ROOT / "docs" / "reference.md").read_text()  # tests/test_reference.py: current
    for variable in VARIABLES:
        assert f"`{variable}`" in generated, f"{variable} is missing from docs/reference.md"


DOCUMENTS = [ROOT / "README.md", ROOT / "CHANGELOG.md", *sorted((ROOT / "docs").glob("*.md"))]
LINK = re.compile(r"\]\(([^)\s]+)\)")


@pytest.mark.parametrize("document", DOCUMENTS, ids=lambda p: str(p.relative_to(ROOT)))
def test_documents_link_only_into_the_repository(document: Path) -> None:
    text = document.read_text()
    assert "shared/" not in text, "a developer-only path leaks into the repository's docs"
    for target in LINK.findall(text):
        if target.startswith(("https://", "http://")):
            continue  # external references (Keep a Changelog, ...) are fine
        path, _, anchor = target.partition("#")
        resolved = (document.parent / path).resolve() if path else document
        assert resolved.is_relative_to(ROOT), f"{target}: outside the repository"
        assert resolved.exists(), f"{target}: no such file"
        if anchor:
            headings = re.findall(r"^#+ (.+)$", resolved.read_text(), re.MULTILINE)
            slugs = {re.sub(r"[^\w\- ]", "", h.lower()).replace(" ", "-") for h in headings}
            assert anchor in slugs, f"{target}: no such heading"


def test_the_license_file_matches_pyproject() -> None:
    assert PYPROJECT["license"] == "Apache-2.0"
    text = (ROOT / "LICENSE").read_text()
    assert text.split()[:4] == ["Apache", "License", "Version", "2.0,"]
    assert "TERMS AND CONDITIONS FOR USE, REPRODUCTION, AND DISTRIBUTION" in text
    assert "END OF TERMS AND CONDITIONS" in text
    assert len(text.split()) > 1500, "the whole license text, not a pointer to it"


def test_the_readme_says_which_python_it_needs() -> None:
    assert PYPROJECT["requires-python"] == ">=3.11"
    assert "Python 3.11 or newer" in (ROOT / "README.md").read_text()


def _make_dry_run(target: str, tmp_path: Path) -> str:
    if shutil.which("make") is None:
        pytest.skip("make is not installed")
    return subprocess.run(
        ["make", "-n", target, f"VENV={tmp_path / 'venv'}"],
        cwd=ROOT,
        capture_output=True,
        text=True,
        check=True,
        timeout=30,
    ).stdout


def test_make_run_installs_the_package_and_make_test_its_test_tools(tmp_path: Path) -> None:
    run = _make_dry_run("run", tmp_path)
    assert "pip install --quiet -e .\n" in run
    assert "[test]" not in run, "running the agent needs no test tools"
    test = _make_dry_run("test", tmp_path)
    assert "pip install --quiet -e '.[test]'" in test
    assert "-m pytest" in test


def test_one_version_names_the_release_everywhere() -> None:
    """The package's version is the newest release in the CHANGELOG, dated, and the version of
    the image, the chart (version and appVersion), its image tag, the kustomize component's image
    and the README's pod snippet."""
    root = Path(__file__).resolve().parent.parent
    releases = re.findall(r"^## \[(\d+\.\d+\.\d+)\] - (\d{4}-\d\d-\d\d)$", (
        root / "CHANGELOG.md").read_text(), re.MULTILINE)  # fmt: skip
    assert releases and releases[0][0] == __version__, releases
    headings = re.findall(r"^## \[([^\]]+)\]", (root / "CHANGELOG.md").read_text(), re.MULTILINE)
    released = [h for h in headings if h != "Unreleased"]
    assert len(released) == len(releases), f"every release heading carries its date: {headings}"
    chart = root / "k8s" / "helm" / "prestop-agent"
    meta = (chart / "Chart.yaml").read_text()
    assert re.search(rf"^version: {re.escape(__version__)}$", meta, re.MULTILINE)
    assert re.search(rf'^appVersion: "{re.escape(__version__)}"$', meta, re.MULTILINE)
    assert f'tag: "{__version__}"' in (chart / "values.yaml").read_text()
    image = f"prestop-agent:{__version__}"
    assert f"image: {image}" in (root / "k8s" / "kustomize" / "common" / "pod.yaml").read_text()
    assert f"image: {image}" in (root / "README.md").read_text()
