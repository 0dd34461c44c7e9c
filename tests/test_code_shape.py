"""The shape of ``agent/``: no function over 60 lines, but the two that are long on purpose.

A long function is where a second responsibility hides; the two exceptions are documented where
they stand: the netlink dump's per-socket loop (a helper call per socket costs the poll's CPU
budget) and the metrics' declarations (one after the other, read as one list).
"""

from __future__ import annotations

import ast
from pathlib import Path

AGENT = Path(__file__).resolve().parent.parent / "agent"
MAX_LINES = 60
LONG_ON_PURPOSE = {
    "agent/drain/sockdiag.py:NetlinkWatcher._read_dump",
    "agent/metrics.py:Metrics.__init__",
}


def functions() -> dict[str, int]:
    """Every function and method in agent/, by ``path:Qualified.name``, with its length in lines
    (from ``def`` to its last line, decorators and docstring included)."""
    found: dict[str, int] = {}

    def visit(node: ast.AST, path: str, prefix: str) -> None:
        for child in ast.iter_child_nodes(node):
            if isinstance(child, ast.FunctionDef | ast.AsyncFunctionDef | ast.ClassDef):
                name = f"{prefix}{child.name}"
                if not isinstance(child, ast.ClassDef):
                    first = min([child.lineno, *(d.lineno for d in child.decorator_list)])
                    found[f"{path}:{name}"] = (child.end_lineno or child.lineno) - first + 1
                visit(child, path, f"{name}.")

    for file in sorted(AGENT.rglob("*.py")):
        visit(ast.parse(file.read_text()), file.relative_to(AGENT.parent).as_posix(), "")
    return found


def test_no_function_in_agent_is_over_60_lines() -> None:
    lengths = functions()
    assert lengths["agent/main.py:Agent.run"] > 0  # the walk sees methods by their class
    too_long = {name: n for name, n in lengths.items() if n > MAX_LINES}
    assert set(too_long) == LONG_ON_PURPOSE, too_long
