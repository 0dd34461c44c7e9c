"""The import graph of ``agent/``: no cycles, and the arrows the design forbids stay absent.

Every import counts: module-level, function-level (lazy) and under ``TYPE_CHECKING``, because a
lazy import is still a dependency, only a late one. An import names the module it imports
(``from agent.registry.base import X`` is an arrow to ``agent.registry.base``), not the packages
Python loads on the way there.
"""

from __future__ import annotations

import ast
from collections.abc import Iterator
from pathlib import Path

AGENT = Path(__file__).resolve().parent.parent / "agent"


def module_name(path: Path) -> str:
    parts = list(path.relative_to(AGENT.parent).with_suffix("").parts)
    if parts[-1] == "__init__":
        parts.pop()
    return ".".join(parts)


MODULES = {module_name(path): path for path in sorted(AGENT.rglob("*.py"))}


def imported(module: str) -> Iterator[str]:
    """The agent modules ``module`` imports, anywhere in its source."""
    path = MODULES[module]
    package = module if path.name == "__init__.py" else module.rpartition(".")[0]
    for node in ast.walk(ast.parse(path.read_text(), str(path))):
        if isinstance(node, ast.Import):
            for alias in node.names:
                if alias.name in MODULES:
                    yield alias.name
        elif isinstance(node, ast.ImportFrom):
            base = node.module or ""
            if node.level:
                anchor = package.rsplit(".", node.level - 1)[0] if node.level > 1 else package
                base = f"{anchor}.{base}" if base else anchor
            for alias in node.names:
                if f"{base}.{alias.name}" in MODULES:
                    yield f"{base}.{alias.name}"  # a submodule: from agent.drain import sockdiag
                elif base in MODULES:
                    yield base


GRAPH = {module: set(imported(module)) - {module} for module in MODULES}


def cycles() -> list[list[str]]:
    """Every strongly connected set of more than one module (Tarjan), each sorted."""
    index: dict[str, int] = {}
    low: dict[str, int] = {}
    stack: list[str] = []
    on_stack: set[str] = set()
    found: list[list[str]] = []

    def visit(module: str) -> None:
        index[module] = low[module] = len(index)
        stack.append(module)
        on_stack.add(module)
        for target in GRAPH[module]:
            if target not in index:
                visit(target)
                low[module] = min(low[module], low[target])
            elif target in on_stack:
                low[module] = min(low[module], index[target])
        if low[module] == index[module]:
            component = []
            while True:
                member = stack.pop()
                on_stack.discard(member)
                component.append(member)
                if member == module:
                    break
            if len(component) > 1:
                found.append(sorted(component))

    for module in GRAPH:
        if module not in index:
            visit(module)
    return found


def test_the_graph_is_read() -> None:
    # The reader itself: it must see lazy and TYPE_CHECKING imports, or the checks below pass
    # on an empty graph.
    assert "agent.registry.eureka" in GRAPH["agent.registry"]  # lazy, in open_registry
    assert "agent.config" in GRAPH["agent.registry.eureka"]  # under TYPE_CHECKING
    assert "agent.drain.sockdiag" in GRAPH["agent.drain"]  # lazy, a submodule by name


def test_no_import_cycles_between_agent_modules() -> None:
    assert cycles() == []


def test_the_server_and_the_registry_do_not_import_each_other() -> None:
    registry = {m for m in MODULES if m == "agent.registry" or m.startswith("agent.registry.")}
    assert not GRAPH["agent.server"] & registry
    assert not [m for m in registry if "agent.server" in GRAPH[m]]


def test_main_reaches_the_socket_reader_only_through_the_drain_package() -> None:
    assert "agent.drain.sockdiag" not in GRAPH["agent.main"]
