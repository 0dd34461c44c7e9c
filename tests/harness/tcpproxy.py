"""A TCP proxy that spreads connections over several targets, as a Kubernetes Service spreads
them over the pods behind it: one address in front of several Eureka peers.

Connections go to the targets in turn (round robin), so a client that opens a fresh connection
per request reaches every target, and one that keeps its connection stays on one. It runs its
own event loop in a thread, so synchronous and asyncio tests can both use it.
"""

from __future__ import annotations

import asyncio
import contextlib
import threading
from collections.abc import Sequence
from types import TracebackType

CHUNK = 64 * 1024


class SpreadingProxy:
    """``with SpreadingProxy([(host, port), ...]) as proxy``: listens on ``proxy.host:port``."""

    def __init__(self, targets: Sequence[tuple[str, int]], host: str = "127.0.0.1") -> None:
        self.targets = list(targets)
        self.host = host
        self.port = 0
        self.connections: list[tuple[str, int]] = []
        """The target each accepted connection went to, in order."""
        self._next = 0
        self._loop = asyncio.new_event_loop()
        self._thread = threading.Thread(target=self._loop.run_forever, daemon=True)
        self._server: asyncio.Server | None = None

    def url(self, path: str = "/eureka/") -> str:
        return f"http://{self.host}:{self.port}{path}"

    def __enter__(self) -> SpreadingProxy:
        self._thread.start()
        self._server = asyncio.run_coroutine_threadsafe(
            asyncio.start_server(self._serve, self.host, 0), self._loop
        ).result(timeout=10)
        self.port = self._server.sockets[0].getsockname()[1]
        return self

    def __exit__(
        self,
        exc_type: type[BaseException] | None,
        exc: BaseException | None,
        traceback: TracebackType | None,
    ) -> None:
        async def stop() -> None:
            assert self._server is not None
            self._server.close()
            for task in asyncio.all_tasks() - {asyncio.current_task()}:
                task.cancel()

        asyncio.run_coroutine_threadsafe(stop(), self._loop).result(timeout=10)
        self._loop.call_soon_threadsafe(self._loop.stop)
        self._thread.join(timeout=10)
        self._loop.close()

    async def _serve(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        target = self.targets[self._next % len(self.targets)]
        self._next += 1
        self.connections.append(target)
        try:
            upstream_reader, upstream_writer = await asyncio.open_connection(*target)
        except OSError:
            writer.close()  # a dead target: the client sees its connection closed
            return
        await asyncio.gather(
            _pipe(reader, upstream_writer), _pipe(upstream_reader, writer), return_exceptions=True
        )


async def _pipe(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
    try:
        while data := await reader.read(CHUNK):
            writer.write(data)
            await writer.drain()
    finally:
        with contextlib.suppress(OSError):
            writer.close()
