"""Suite-wide fixtures: the pending-task check for every async test, and logging isolation."""

from __future__ import annotations

import asyncio
import logging
from collections.abc import Iterator

import pytest
import pytest_asyncio
import structlog

pytest_plugins = ["pytester", "tests.javaapps"]


def pytest_collection_modifyitems(items: list[pytest.Item]) -> None:
    for item in items:
        if pytest_asyncio.is_async_test(item) and isinstance(item, pytest.Function):
            item.fixturenames.insert(0, "no_pending_tasks")


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
