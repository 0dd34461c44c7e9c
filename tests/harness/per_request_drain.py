"""One termination with connection-per-request callers, run inside a network namespace of its own.

Started by tests/test_connection_per_request.py as
``unshare -n sh -c 'ip link set lo up && exec python -m tests.harness.per_request_drain ...'``: the
namespace is the pod's (the machine's own would count every other process's connections). Runs
a real aiohttp app, the real agent process and a caller that opens one connection per request,
triggers /prestop after one second of traffic, keeps calling for ``--after`` seconds, then stops,
and prints one JSON line: when the last request was sent, when /prestop answered, the failed
requests, and the agent's answer.

``--close server``: the app closes each connection after its answer (``Connection: close``; the
app's side ends in TIME_WAIT). ``--close client``: the caller closes first once it has read the
answer (the app's side leaves nothing behind).
"""

from __future__ import annotations

import argparse
import asyncio
import json
import os
import subprocess
import sys
import tempfile
import time
import urllib.request

from aiohttp import ClientSession, web

POLL = 0.2
QUIET = 1.5
MIN = 1.0


async def serve(port: int, close: str) -> web.AppRunner:
    async def hello(request: web.Request) -> web.Response:
        headers = {"Connection": "close"} if close == "server" else {}
        return web.Response(text="hello", headers=headers)

    app = web.Application()
    app.router.add_get("/hello", hello)
    runner = web.AppRunner(app, handle_signals=False, access_log=None)
    await runner.setup()
    await web.TCPSite(runner, "127.0.0.1", port).start()
    return runner


async def one_request(port: int, close: str) -> None:
    """A fresh connection, one request, the whole answer read, then closed."""
    reader, writer = await asyncio.open_connection("127.0.0.1", port)
    try:
        header = "Connection: close\r\n" if close == "server" else ""
        writer.write(f"GET /hello HTTP/1.1\r\nHost: app\r\n{header}\r\n".encode())
        status = await reader.readline()
        if not status.startswith(b"HTTP/1.1 200"):
            raise RuntimeError(f"answer {status!r}")
        length = 0
        while (line := await reader.readline()) not in (b"\r\n", b""):
            if line.lower().startswith(b"content-length:"):
                length = int(line.split(b":")[1])
        await reader.readexactly(length)
    finally:
        writer.close()
        await writer.wait_closed()


def start_agent(app_port: int, agent_port: int, log_path: str) -> subprocess.Popen[bytes]:
    env = {
        "PATH": os.environ.get("PATH", "/usr/bin:/bin"),
        "PRESTOP_HOST": "127.0.0.1",
        "PRESTOP_PORT": str(agent_port),
        "PRESTOP_LOG_FORMAT": "json",
        "PRESTOP_DRAIN_MODE": "traffic",
        "PRESTOP_APP_PORTS": str(app_port),
        "PRESTOP_DRAIN_MIN_SECONDS": str(MIN),
        "PRESTOP_DRAIN_QUIET_SECONDS": str(QUIET),
        "PRESTOP_DRAIN_POLL_SECONDS": str(POLL),
        "PRESTOP_DRAIN_MAX_SECONDS": "20",
    }
    with open(log_path, "wb") as log:
        agent = subprocess.Popen(
            [sys.executable, "-m", "agent.cli"], env=env, stdout=log, stderr=subprocess.STDOUT
        )
    deadline = time.monotonic() + 15
    while time.monotonic() < deadline:
        try:
            with urllib.request.urlopen(f"http://127.0.0.1:{agent_port}/ready", timeout=1):
                return agent
        except OSError:
            time.sleep(0.05)
    agent.kill()
    raise RuntimeError("agent not ready")


async def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--close", choices=("server", "client"), required=True)
    parser.add_argument("--rate", type=float, required=True, help="requests per second")
    parser.add_argument("--after", type=float, default=6.0, help="seconds of calls after trigger")
    args = parser.parse_args()
    app_port, agent_port = 18080, 18099
    runner = await serve(app_port, args.close)
    log_path = tempfile.mktemp(prefix="agent-", suffix=".log")
    agent = await asyncio.to_thread(start_agent, app_port, agent_port, log_path)
    failures: list[str] = []
    last_sent = 0.0
    pending: set[asyncio.Task[None]] = set()

    async def call() -> None:
        try:
            await one_request(app_port, args.close)
        except Exception as exc:  # counted, reported
            failures.append(repr(exc))

    async def caller(until: float) -> None:
        nonlocal last_sent
        interval = 1.0 / args.rate
        next_at = time.monotonic()
        while next_at < until:
            await asyncio.sleep(max(0.0, next_at - time.monotonic()))
            last_sent = time.monotonic()
            task = asyncio.create_task(call())
            pending.add(task)
            task.add_done_callback(pending.discard)
            next_at += interval

    async def prestop() -> tuple[float, dict[str, object]]:
        url = f"http://127.0.0.1:{agent_port}/prestop"
        async with ClientSession() as session, session.get(url) as response:
            body = await response.json()
            return time.monotonic(), body

    try:
        started = time.monotonic()
        calls = asyncio.create_task(caller(started + 1.0 + args.after))
        await asyncio.sleep(1.0)
        triggered = time.monotonic()
        hook = asyncio.create_task(prestop())
        await asyncio.sleep(3.0)
        async with (
            ClientSession() as session,
            session.get(f"http://127.0.0.1:{agent_port}/status") as response,
        ):
            seen_mid_drain = (await response.json())["drain"]["seen"]
        await calls
        if pending:
            await asyncio.gather(*pending)
        answered, body = await hook
    finally:
        agent.terminate()
        await asyncio.to_thread(agent.wait, 10)
        await runner.cleanup()
    print(
        json.dumps(
            {
                "triggered": triggered,
                "last_sent": last_sent,
                "answered": answered,
                "failures": failures,
                "body": body,
                "status_seen": seen_mid_drain,
                "poll": POLL,
                "quiet": QUIET,
            }
        )
    )


if __name__ == "__main__":
    asyncio.run(main())
