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
from tests.harness.support import skip_or_fail

pytest_plugins = ["pytester", "tests.harness.javaapps"]


# Before pytest's own hook deselects by marker (-m), so that the slow mark added here counts.
@pytest.hookimpl(tryfirst=True)
def pytest_collection_modifyitems(items: list[pytest.Item]) -> None:
    for item in items:
        if pytest_asyncio.is_async_test(item) and isinstance(item, pytest.Function):
            item.fixturenames.insert(0, "no_pending_tasks")
        # A real agent process costs its start-up and a drain: no test using one is quick.
        if "new_agent" in getattr(item, "fixturenames", ()):
            item.add_marker(pytest.mark.slow)


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
