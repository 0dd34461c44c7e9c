"""The harness's boundary (tests/harness/__init__.py): bench/ takes nothing from tests/ but the
harness, and the harness takes nothing from the tests themselves (no ``tests.test_*``, no
conftest), so that a test can change without breaking a benchmark and the harness can be read on
its own. Every import counts: module-level, function-level (lazy), relative, and module names
given as strings (``pytest_plugins`` entries, ``python -m`` arguments)."""

from __future__ import annotations

import ast
import re
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parent.parent
HARNESS = "tests.harness"
# A string that is a whole dotted module name under tests/ (``pytest_plugins = ["tests.x"]``,
# ``[python, "-m", "tests.x"]``); prose that merely mentions one is not an import.
MODULE_NAME = re.compile(r"tests(\.\w+)+")


def module_name(path: Path) -> str:
    parts = path.relative_to(ROOT).with_suffix("").parts
    return ".".join(parts[:-1] if parts[-1] == "__init__" else parts)


def imported_names(source: str, module: str, *, is_package: bool = False) -> set[str]:
    """Every module (or module attribute) ``source`` imports or names, as absolute dotted names."""
    names: set[str] = set()
    for node in ast.walk(ast.parse(source)):
        if isinstance(node, ast.Import):
            names.update(alias.name for alias in node.names)
        elif isinstance(node, ast.ImportFrom):
            if node.level:
                package = module.split(".") if is_package else module.split(".")[:-1]
                base_parts = package[: len(package) - (node.level - 1)]
                base = ".".join([*base_parts, *([node.module] if node.module else [])])
            else:
                base = node.module or ""
            names.add(base)
            # `from tests import test_k8s` imports a module the base alone does not name.
            names.update(f"{base}.{alias.name}" for alias in node.names)
        elif (
            isinstance(node, ast.Constant)
            and isinstance(node.value, str)
            and MODULE_NAME.fullmatch(node.value)
        ):
            names.add(node.value)
    return names


def outside_the_harness(names: set[str]) -> set[str]:
    """The names under tests/ that are not the harness (``tests`` alone is the empty parent)."""
    return {
        name
        for name in names
        if name.startswith("tests.") and name != HARNESS and not name.startswith(HARNESS + ".")
    }


def crossings(folder: Path) -> list[str]:
    found = []
    for path in sorted(folder.rglob("*.py")):
        is_package = path.name == "__init__.py"
        names = imported_names(path.read_text(), module_name(path), is_package=is_package)
        where = path.relative_to(ROOT)
        found += [f"{where}: {name}" for name in sorted(outside_the_harness(names))]
    return found


def test_bench_takes_nothing_from_tests_but_the_harness() -> None:
    assert list((ROOT / "bench").rglob("*.py")), "no benchmark found: the check would check nothing"
    assert crossings(ROOT / "bench") == []


def test_the_harness_takes_nothing_from_the_tests() -> None:
    assert (ROOT / "tests" / "harness" / "__init__.py").is_file()
    assert crossings(ROOT / "tests" / "harness") == []


@pytest.mark.parametrize(
    ("source", "crossing"),
    [
        ("from tests.test_k8s import CHART", "tests.test_k8s"),
        ("def later():\n    from tests.kube.conftest import kube_node", "tests.kube.conftest"),
        ("from tests import test_release", "tests.test_release"),
        ("from .. import conftest", "tests.conftest"),
        ("from ..test_k8s import _tool", "tests.test_k8s"),
        ('pytest_plugins = ["tests.test_floor"]', "tests.test_floor"),
        ('CMD = ["python", "-m", "tests.kube.test_rollout"]', "tests.kube.test_rollout"),
    ],
)
def test_the_check_sees_every_kind_of_import(source: str, crossing: str) -> None:
    names = imported_names(source, "tests.harness.javaapps")
    assert crossing in outside_the_harness(names)


def test_the_check_lets_the_harness_and_prose_through() -> None:
    source = (
        '"""Uses tests.harness.node; never tests.test_k8s."""\n'
        "from tests.harness.support import free_port\n"
        "from . import pods\n"
        "from tests import harness\n"
        "import tests.harness.cluster\n"
    )
    assert outside_the_harness(imported_names(source, "tests.harness.node")) == set()


def test_the_javaapps_fixtures_load_suite_wide(java_log_dir: Path) -> None:
    """A fixture of tests/harness/javaapps.py, taken by a module that does not import it: the
    plugin is registered for the whole suite (tests/conftest.py), not per module."""
    assert java_log_dir.is_dir()
