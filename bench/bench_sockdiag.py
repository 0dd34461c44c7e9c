"""Cost of one socket-watcher poll at 100 / 1,000 / 10,000 established connections.

Why: the traffic-aware drain polls the app's sockets every few hundred ms while the pod is
terminating, inside a sidecar with a small CPU limit. A poll must stay cheap even for a busy
gateway: targets are < 5 ms CPU per poll at 1,000 sockets, < 50 ms at 10,000, and < 20 MB RSS
growth for the watcher.

What: opens N loopback connections to a listener on the watched port (this process holds both
ends, so the kernel filter must report only the N server-side sockets -- checked), then times
50 polls of the netlink and /proc watchers (CPU = time.process_time(), user + system, which
includes the kernel's work for the dump; wall = time.perf_counter()), and reads VmRSS before
the watcher is created and after the polls.

Usage: python bench/bench_sockdiag.py [--sizes 100,1000,10000] [--polls 50]
(The client ends are held by a forked child, so each process needs N file descriptors;
RLIMIT_NOFILE is raised as far as allowed.)
"""

from __future__ import annotations

import argparse
import gc
import importlib.util
import os
import resource
import socket
import statistics
import sys
import time
import traceback
from collections.abc import Callable
from functools import partial
from pathlib import Path
from types import ModuleType
from typing import Any

MODULE_PATH = Path(__file__).resolve().parent.parent / "agent" / "drain" / "sockdiag.py"
# IP_BIND_ADDRESS_NO_PORT (linux/in.h): bind() picks the source address only; the port is chosen
# at connect() per 4-tuple, so ephemeral ports are not exhausted by bind().
IP_BIND_ADDRESS_NO_PORT = 24
# Clients are spread over 127.0.0.2 .. 127.0.0.17: 16 x ~28k ephemeral ports is ample.
SOURCE_ADDRESSES = [f"127.0.0.{i}" for i in range(2, 18)]
CONNECT_BATCH = 1000  # below the default somaxconn (4096): accept between batches
TARGET_CPU_MS = {1000: 5.0, 10000: 50.0}
TARGET_RSS_GROWTH_KB = 20 * 1024


def rss_kb() -> int:
    """Resident set size now, from /proc/self/status (VmRSS is in kB)."""
    with open("/proc/self/status") as status:
        for line in status:
            if line.startswith("VmRSS:"):
                return int(line.split()[1])
    raise RuntimeError("no VmRSS in /proc/self/status")


def load_sockdiag() -> ModuleType:
    """Load the module by path: measures the watcher alone, without the agent package's
    __init__ (config, metrics, prometheus-client) that is not part of the cost being measured."""
    spec = importlib.util.spec_from_file_location("sockdiag_bench", MODULE_PATH)
    if spec is None or spec.loader is None:
        raise SystemExit(f"cannot load {MODULE_PATH}")
    module = importlib.util.module_from_spec(spec)
    sys.modules[spec.name] = module  # dataclasses resolve annotations through sys.modules
    spec.loader.exec_module(module)
    return module


def raise_fd_limit(needed: int) -> None:
    """Raise the soft limit; the hard limit too when allowed (CAP_SYS_RESOURCE), else cap it."""
    soft, hard = resource.getrlimit(resource.RLIMIT_NOFILE)
    if soft >= needed:
        return
    try:
        resource.setrlimit(resource.RLIMIT_NOFILE, (needed, max(hard, needed)))
    except (ValueError, OSError):
        resource.setrlimit(resource.RLIMIT_NOFILE, (hard, hard))
    if resource.getrlimit(resource.RLIMIT_NOFILE)[0] < needed:
        raise SystemExit(f"need {needed} file descriptors, RLIMIT_NOFILE allows {hard}")


class Connections:
    """A listener in this process, plus N established connections grown on demand.

    The client ends live in a forked child process: the kernel still holds both ends in this
    network namespace (so the watcher must filter the client sockets out), but each process
    needs only N file descriptors -- containers often cap the hard RLIMIT_NOFILE, even for root.
    """

    def __init__(self) -> None:
        self.listener = socket.socket(socket.AF_INET, socket.SOCK_STREAM)
        self.listener.bind(("127.0.0.1", 0))
        self.listener.listen(4096)
        self.port: int = self.listener.getsockname()[1]
        self.servers: list[socket.socket] = []
        self._commands, self._replies, self._child = self._start_client_process(self.port)

    @staticmethod
    def _start_client_process(port: int) -> tuple[socket.socket, socket.socket, int]:
        parent_end, child_end = socket.socketpair()
        pid = os.fork()
        if pid == 0:  # child: opens clients on command, answers when they are connected
            parent_end.close()
            status = 1
            try:
                _client_process(child_end, port)
                status = 0
            except Exception:
                traceback.print_exc()
                raise
            finally:
                os._exit(status)  # never return into the parent's code, error or not
        child_end.close()
        return parent_end, parent_end, pid

    def grow_to(self, count: int) -> None:
        while len(self.servers) < count:
            batch = min(CONNECT_BATCH, count - len(self.servers))
            self._commands.sendall(b"%d\n" % batch)
            if self._replies.recv(16) != b"ok\n":
                raise SystemExit("client process failed")
            for _ in range(batch):
                server, _ = self.listener.accept()
                self.servers.append(server)

    def close(self) -> None:
        self._commands.sendall(b"0\n")
        self._commands.close()
        os.waitpid(self._child, 0)
        for sock in self.servers:
            sock.close()
        self.listener.close()


def _client_process(control: socket.socket, port: int) -> None:
    """Child: for each "N\\n" command, connect N more clients; "0\\n" closes all and returns."""
    clients: list[socket.socket] = []
    lines = control.makefile("rb")
    for line in lines:
        batch = int(line)
        if batch == 0:
            break
        raise_fd_limit(len(clients) + batch + 64)
        for _ in range(batch):
            client = socket.socket(socket.AF_INET, socket.SOCK_STREAM)
            client.setsockopt(socket.IPPROTO_IP, IP_BIND_ADDRESS_NO_PORT, 1)
            client.bind((SOURCE_ADDRESSES[len(clients) % len(SOURCE_ADDRESSES)], 0))
            client.connect(("127.0.0.1", port))
            # One byte, so that tcp_info has received data to report (counts do not need it).
            client.send(b"x")
            clients.append(client)
        control.sendall(b"ok\n")
    for client in clients:
        client.close()


def percentile(values: list[float], fraction: float) -> float:
    ordered = sorted(values)
    return ordered[min(len(ordered) - 1, round(fraction * (len(ordered) - 1)))]


def measure(make_watcher: Callable[[], Any], polls: int, expected: int) -> dict[str, float]:
    """Poll `polls` times; every poll must see exactly `expected` sockets."""
    gc.collect()
    rss_before = rss_kb()
    watcher = make_watcher()
    cpu_ms: list[float] = []
    wall_ms: list[float] = []
    seen = -1
    try:
        for _ in range(polls):
            cpu0 = time.process_time()
            wall0 = time.perf_counter()
            result = watcher.poll()
            wall_ms.append((time.perf_counter() - wall0) * 1000)
            cpu_ms.append((time.process_time() - cpu0) * 1000)
            seen = len(result.sockets)
            if seen != expected:
                raise SystemExit(f"{watcher.source}: saw {seen} sockets, expected {expected}")
            del result
        rss_after = rss_kb()
    finally:
        watcher.close()
    return {
        "seen": seen,
        "cpu_med": statistics.median(cpu_ms),
        "cpu_p95": percentile(cpu_ms, 0.95),
        "wall_med": statistics.median(wall_ms),
        "wall_p95": percentile(wall_ms, 0.95),
        "rss_before": rss_before,
        "rss_after": rss_after,
    }


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--sizes", default="100,1000,10000")
    parser.add_argument("--polls", type=int, default=50)
    args = parser.parse_args()
    sizes = sorted(int(size) for size in args.sizes.split(","))

    rss_start = rss_kb()
    sockdiag = load_sockdiag()
    rss_imported = rss_kb()
    raise_fd_limit(sizes[-1] + 256)
    connections = Connections()
    failures: list[str] = []
    header = (
        f"{'sockets':>8} {'source':>8} {'seen':>6} {'cpu med':>8} {'cpu p95':>8} "
        f"{'wall med':>9} {'wall p95':>9} {'RSS before':>11} {'RSS after':>10} {'growth':>8}"
    )
    print(
        f"RSS at start {rss_start} kB, after importing sockdiag {rss_imported} kB "
        f"(+{rss_imported - rss_start} kB); watched port {connections.port}"
    )
    print(f"CPU and wall time in ms per poll, over {args.polls} polls; RSS in kB")
    print(header)
    print("-" * len(header))
    try:
        for size in sizes:
            connections.grow_to(size)
            ports = [connections.port]
            for name, make in (
                ("netlink", partial(sockdiag.NetlinkWatcher, ports)),
                ("proc", partial(sockdiag.ProcWatcher, ports)),
            ):
                row = measure(make, args.polls, size)
                growth = row["rss_after"] - row["rss_before"]
                print(
                    f"{size:>8} {name:>8} {row['seen']:>6} {row['cpu_med']:>8.2f} "
                    f"{row['cpu_p95']:>8.2f} {row['wall_med']:>9.2f} {row['wall_p95']:>9.2f} "
                    f"{row['rss_before']:>11} {row['rss_after']:>10} {growth:>+8}"
                )
                target = TARGET_CPU_MS.get(size)
                if name == "netlink" and target is not None and row["cpu_med"] > target:
                    failures.append(f"netlink at {size}: {row['cpu_med']:.2f} ms > {target} ms")
                if name == "netlink" and growth > TARGET_RSS_GROWTH_KB:
                    failures.append(f"netlink at {size}: RSS grew {growth} kB")
    finally:
        connections.close()
    print(
        "targets (netlink): < 5 ms at 1,000, < 50 ms at 10,000, RSS growth < 20 MB: "
        + ("met" if not failures else "MISSED: " + "; ".join(failures))
    )
    return 1 if failures else 0


if __name__ == "__main__":
    sys.exit(main())
