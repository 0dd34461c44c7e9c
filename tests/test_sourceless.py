"""``prestop-agent --help`` and ``check`` work from a package installed without its ``.py``
source (only compiled ``.pyc`` files, as some images ship it): nothing reads the source at run
time."""

from __future__ import annotations

import compileall
import os
import shutil
import subprocess
import sys
from pathlib import Path

AGENT = Path(__file__).resolve().parent.parent / "agent"


def sourceless_copy(root: Path) -> Path:
    """A copy of the agent package with every ``.py`` compiled next to itself and removed."""
    package = root / "agent"
    shutil.copytree(AGENT, package, ignore=shutil.ignore_patterns("__pycache__"))
    assert compileall.compile_dir(package, legacy=True, quiet=1)
    for source in package.rglob("*.py"):
        source.unlink()
    return package


def run_cli(root: Path, *args: str) -> subprocess.CompletedProcess[str]:
    program = (
        "import sys, agent; assert agent.__file__.endswith('.pyc'), agent.__file__;"
        " from agent.cli import main; sys.exit(main(sys.argv[1:]))"
    )
    env = {**os.environ, "PYTHONPATH": str(root), "PYTHONDONTWRITEBYTECODE": "1"}
    env = {k: v for k, v in env.items() if not k.startswith("PRESTOP_")}
    return subprocess.run(
        [sys.executable, "-c", program, *args],
        cwd=root,
        env=env,
        capture_output=True,
        text=True,
        timeout=60,
    )


def test_help_and_check_work_without_the_source(tmp_path: Path) -> None:
    package = sourceless_copy(tmp_path)
    assert not list(package.rglob("*.py")) and list(package.rglob("*.pyc"))
    helped = run_cli(tmp_path, "--help")
    assert helped.returncode == 0, helped.stderr
    text = " ".join(helped.stdout.split())
    assert "sets PRESTOP_DRAIN_QUIET_SECONDS: the traffic drain ends after" in text
    checked = run_cli(tmp_path, "check", "--config-only", "--drain-mode", "fixed")
    assert checked.returncode == 0, checked.stderr
    assert "configuration is valid" in checked.stdout
    assert "Shutdown plan, from the first trigger" in checked.stdout
    assert "PRESTOP_DRAIN_SECONDS" in checked.stdout
