"""Suite-wide fixtures: the pending-task check for every async test, and logging isolation."""

from __future__ import annotations

import asyncio
import logging
import subprocess
from collections.abc import Callable, Iterator
from pathlib import Path

import pytest
import pytest_asyncio
import structlog

from tests.harness.agent_process import AgentProcess
from tests.harness.support import SUMMARY_LINES, skip_or_fail

pytest_plugins = ["pytester", "tests.harness.javaapps"]


# Tests that need what tests/kube/prepare.sh installs and builds (containerd, buildah, the
# kubelet, the control plane, the images) form one group, so that one worker prepares the machine
# and runs them while the other runs everything else (make test: -n 2). The suite mostly waits on
# timers (Eureka's caches, drains, rollouts), not on the CPU.
KUBE_GROUP = "kube"
KUBE_MODULES = ("tests/kube/", "tests/test_release.py")
# The first test of the kube group pays prepare.sh, up to its own 30-minute bound on a fresh
# machine (the kubelet and the control plane built from the Go module proxy) on top of its run.
FIRST_KUBE_TEST_TIMEOUT = 1800 + 300


def _group_of(nodeid: str) -> str:
    """The xdist work unit of a test: the kube group, or its module (whose fixtures, e.g. a
    Eureka server, then start once)."""
    path = nodeid.split("::", 1)[0]
    return KUBE_GROUP if path.startswith(KUBE_MODULES) else path


def _start_order(item: pytest.Item) -> int:
    """Longest first: the kube group, then modules that start JVMs, then the rest."""
    if _group_of(item.nodeid) == KUBE_GROUP:
        return 0
    return 1 if item.get_closest_marker("java") else 2


# Before pytest's own hook deselects by marker (-m), so that the slow mark added here counts.
@pytest.hookimpl(tryfirst=True)
def pytest_collection_modifyitems(items: list[pytest.Item]) -> None:
    for item in items:
        if pytest_asyncio.is_async_test(item) and isinstance(item, pytest.Function):
            item.fixturenames.insert(0, "no_pending_tasks")
        # A real agent process costs its start-up and a drain: no test using one is quick.
        if "new_agent" in getattr(item, "fixturenames", ()):
            item.add_marker(pytest.mark.slow)
    # xdist hands out node ids: of items sharing one, only the first would ever run.
    seen: set[str] = set()
    shared = sorted({item.nodeid for item in items if item.nodeid in seen or seen.add(item.nodeid)})
    if shared:
        raise pytest.UsageError(f"tests sharing a node id (make test would run one each): {shared}")
    # A module's order within itself is kept; every xdist worker collects the same order.
    modules = {}
    for item in items:
        group = _group_of(item.nodeid)
        modules[group] = min(modules.get(group, 2), _start_order(item))
    items.sort(key=lambda item: modules[_group_of(item.nodeid)])


@pytest.hookimpl(optionalhook=True)
def pytest_xdist_make_scheduler(config: pytest.Config, log: object) -> object | None:
    """Work units by ``_group_of``, handed out in collection order (longest first). xdist's own
    ``loadgroup`` needs an ``xdist_group`` mark rewritten into the node id, which pytest 9 no
    longer lets it do: the kube tests ended up on both workers, each starting a cluster."""
    if config.getvalue("dist") not in ("load", "loadscope", "loadfile", "loadgroup"):
        return None
    from xdist.scheduler import LoadScopeScheduling

    class ByGroup(LoadScopeScheduling):
        def _split_scope(self, nodeid: str) -> str:
            return _group_of(nodeid)

    config.option.loadscopereorder = False
    return ByGroup(config, log)


_kube_group_started = False
_WORKER_LINES = "prestop_summary_lines"


# Outside pytest-timeout's own wrapper, which reads the timeout marker when the test starts: the
# first kube test this process runs (whatever -k, -m or xdist left it) gets prepare.sh's bound.
@pytest.hookimpl(hookwrapper=True, tryfirst=True)
def pytest_runtest_protocol(item: pytest.Item) -> Iterator[None]:
    global _kube_group_started
    if not _kube_group_started and item.nodeid.startswith(KUBE_MODULES):
        _kube_group_started = True
        item.add_marker(pytest.mark.timeout(FIRST_KUBE_TEST_TIMEOUT))
    yield


# The summary lines (tests/harness/support.summary_line): an xdist worker hands its own to the
# controller when it finishes (its session fixtures, the cluster's included, are torn down by
# then), and the controller prints them all.
def pytest_sessionfinish(session: pytest.Session) -> None:
    if hasattr(session.config, "workeroutput"):
        session.config.workeroutput[_WORKER_LINES] = session.config.stash.get(SUMMARY_LINES, [])


@pytest.hookimpl(optionalhook=True)
def pytest_testnodedown(node: object, error: object) -> None:
    config: pytest.Config = node.config  # type: ignore[attr-defined]
    lines = getattr(node, "workeroutput", {}).get(_WORKER_LINES, [])
    config.stash.setdefault(SUMMARY_LINES, []).extend(lines)


def pytest_terminal_summary(terminalreporter: pytest.TerminalReporter) -> None:
    lines = terminalreporter.config.stash.get(SUMMARY_LINES, [])
    if lines:
        terminalreporter.section("prestop-agent suite")
        for line in lines:
            terminalreporter.write_line(line)


@pytest_asyncio.fixture
async def no_pending_tasks() -> object:
    """Fail a test that leaves an asyncio task running: every task must be awaited or cancelled
    by whoever started it."""
    yield
    await asyncio.sleep(0)  # let tasks that were cancelled or finished on the last step settle
    current = asyncio.current_task()
    leftover = [task for task in asyncio.all_tasks() if task is not current and not task.done()]
    for task in leftover:
        task.cancel()
    await asyncio.gather(*leftover, return_exceptions=True)
    if leftover:
        names = ", ".join(sorted(task.get_name() for task in leftover))
        pytest.fail(f"test left {len(leftover)} asyncio task(s) pending: {names}")


@pytest.fixture(autouse=True)
def isolated_logging() -> Iterator[None]:
    """``prestop-agent`` configures logging for the process; a test that runs the CLI in-process
    must not leave structlog writing to a captured stream that pytest has since closed."""
    root = logging.getLogger()
    handlers, level = root.handlers[:], root.level
    yield
    structlog.reset_defaults()
    root.handlers[:] = handlers
    root.setLevel(level)


@pytest.fixture
def new_agent(tmp_path: Path) -> Iterator[Callable[..., AgentProcess]]:
    """Factory of real agent processes (``.start()`` or ``.run()`` them), each logging to its own
    file under tmp_path; every one still running is killed at teardown."""
    made: list[AgentProcess] = []

    def make(env: dict[str, str], *, port: int | None = None) -> AgentProcess:
        agent = AgentProcess(env, tmp_path / f"agent-{len(made)}.log", port=port)
        made.append(agent)
        return agent

    yield make
    for agent in made:
        agent.stop()


@pytest.fixture(scope="session")
def certificate(tmp_path_factory: pytest.TempPathFactory) -> tuple[Path, Path]:
    """A self-signed certificate for 127.0.0.1 (its own CA), made with the openssl CLI."""
    directory = tmp_path_factory.mktemp("tls")
    cert, key = directory / "cert.pem", directory / "key.pem"
    try:
        subprocess.run(
            [
                "openssl",
                "req",
                "-x509",
                "-newkey",
                "rsa:2048",
                "-nodes",
                "-days",
                "1",
                "-subj",
                "/CN=127.0.0.1",
                "-addext",
                "subjectAltName=IP:127.0.0.1",
                "-keyout",
                str(key),
                "-out",
                str(cert),
            ],
            check=True,
            capture_output=True,
            timeout=60,
        )
    except (OSError, subprocess.CalledProcessError) as err:
        skip_or_fail(f"openssl cannot make a certificate: {err}")
    return cert, key
