"""Soak the running agent: probes and scrapes for a long time, plus hook storms; print slopes.

Issue 9's target: RSS and open files flat over time (slope ~ 0) while the agent answers
kubelet probes (/ready, /live), Prometheus scrapes (/metrics) and, every so often, a storm of
/prestop calls that are refused (wrong token, so the agent keeps serving) or hang up mid-request.
/ready goes through the app health check (PRESTOP_APP_HEALTH_URL, a small local app here), so
the bounded reader is soaked too.

    python bench/bench_soak.py                     # 10 minutes, the issue's run
    python bench/bench_soak.py --duration 60       # a shorter look

Slopes are least-squares fits over the samples after the warm-up (the first tenth of the run),
per minute. Run it under the heavy lock on a shared machine:
``flock /tmp/prestop-heavy.lock .venv/bin/python bench/bench_soak.py``.
"""

from __future__ import annotations

import argparse
import http.client
import http.server
import os
import re
import signal
import socket
import statistics
import sys
import threading
import time
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from bench.bench_agent import start_agent  # the repo root, put on the path above
from tests.harness.support import free_port

TOKEN = "soak-token"
WRONG_TOKEN = {"X-Prestop-Token": "wrong"}


class _Health(http.server.BaseHTTPRequestHandler):
    """The app's health endpoint: 200 with a small JSON body, as Spring's actuator answers."""

    def do_GET(self) -> None:
        body = b'{"status":"UP"}'
        self.send_response(200)
        self.send_header("Content-Type", "application/json")
        self.send_header("Content-Length", str(len(body)))
        self.end_headers()
        self.wfile.write(body)

    def log_message(self, format: str, *args: object) -> None:
        return None


def rss_kib(pid: int) -> int:
    status = Path(f"/proc/{pid}/status").read_text()
    return int(re.search(r"VmRSS:\s+(\d+) kB", status).group(1))  # type: ignore[union-attr]


def open_files(pid: int) -> int:
    return len(os.listdir(f"/proc/{pid}/fd"))


def slope_per_minute(samples: list[tuple[float, float]]) -> float:
    """Least-squares slope of (seconds, value), per minute."""
    if len(samples) < 2:
        return 0.0
    xs = [t for t, _ in samples]
    ys = [v for _, v in samples]
    return statistics.linear_regression(xs, ys).slope * 60


def get(port: int, path: str, headers: dict[str, str] | None = None) -> tuple[int, float]:
    """One request on a fresh connection: (status, seconds); status 0 when it failed."""
    started = time.monotonic()
    connection = http.client.HTTPConnection("127.0.0.1", port, timeout=5)
    try:
        connection.request("GET", path, headers=headers or {})
        response = connection.getresponse()
        response.read()
        return response.status, time.monotonic() - started
    except OSError:
        return 0, time.monotonic() - started
    finally:
        connection.close()


def hang_up_mid_hook(port: int) -> None:
    """A caller that sends half a /prestop request and goes away."""
    with socket.create_connection(("127.0.0.1", port), timeout=5) as sock:
        sock.sendall(b"GET /prestop HTTP/1.1\r\nHost: x\r\nX-Prestop-To")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--duration", type=float, default=600.0, help="seconds (default 600)")
    parser.add_argument("--probe-period", type=float, default=1.0, help="seconds between probes")
    parser.add_argument("--scrape-period", type=float, default=15.0, help="seconds per scrape")
    parser.add_argument("--storm-period", type=float, default=30.0, help="seconds per storm")
    parser.add_argument("--storm-size", type=int, default=300, help="hooks per storm")
    parser.add_argument("--sample-period", type=float, default=5.0, help="seconds per sample")
    args = parser.parse_args()

    health = http.server.ThreadingHTTPServer(("127.0.0.1", 0), _Health)
    threading.Thread(target=health.serve_forever, daemon=True).start()
    port = free_port()
    health_url = f"http://127.0.0.1:{health.server_address[1]}/health"
    agent, _ = start_agent(port, {"PRESTOP_TOKEN": TOKEN, "PRESTOP_APP_HEALTH_URL": health_url})

    started = time.monotonic()
    rss: list[tuple[float, float]] = []
    fds: list[tuple[float, float]] = []
    ready_latency: list[float] = []
    counts = {"probes": 0, "scrapes": 0, "hooks": 0, "hang_ups": 0, "unexpected": 0}
    next_probe = next_scrape = next_storm = next_sample = started
    pool = ThreadPoolExecutor(max_workers=32)
    while (now := time.monotonic()) < started + args.duration:
        if now >= next_sample:
            rss.append((now - started, rss_kib(agent.pid)))
            fds.append((now - started, open_files(agent.pid)))
            next_sample += args.sample_period
        if now >= next_probe:
            status, seconds = get(port, "/ready")
            ready_latency.append(seconds)
            live, _ = get(port, "/live")
            counts["probes"] += 2
            counts["unexpected"] += (status != 200) + (live != 200)
            next_probe += args.probe_period
        if now >= next_scrape:
            status, _ = get(port, "/metrics")
            counts["scrapes"] += 1
            counts["unexpected"] += status != 200
            next_scrape += args.scrape_period
        if now >= next_storm:
            hooks = list(
                pool.map(lambda _: get(port, "/prestop", WRONG_TOKEN)[0], range(args.storm_size))
            )
            list(pool.map(lambda _: hang_up_mid_hook(port), range(args.storm_size // 10)))
            counts["hooks"] += len(hooks)
            counts["hang_ups"] += args.storm_size // 10
            counts["unexpected"] += sum(status != 401 for status in hooks)
            next_storm += args.storm_period
        time.sleep(
            max(0.0, min(next_probe, next_scrape, next_storm, next_sample) - time.monotonic())
        )
    pool.shutdown()
    alive = agent.poll() is None
    agent.send_signal(signal.SIGKILL)
    agent.wait()
    health.shutdown()

    warm = args.duration / 10
    after = [(t, v) for t, v in rss if t >= warm]
    fds_after = [(t, v) for t, v in fds if t >= warm]
    ready_latency.sort()
    print(f"soak: {args.duration:g}s, probes every {args.probe_period:g}s (/ready + /live),")
    print(f"  /metrics every {args.scrape_period:g}s, every {args.storm_period:g}s a storm of")
    print(f"  {args.storm_size} refused /prestop calls and {args.storm_size // 10} hang-ups")
    print(f"requests: {counts}; agent alive at the end: {alive}")
    print(
        f"RSS: first {rss[0][1] / 1024:.1f} MiB, last {rss[-1][1] / 1024:.1f} MiB,"
        f" max {max(v for _, v in rss) / 1024:.1f} MiB;"
        f" slope after warm-up {slope_per_minute(after):+.1f} KiB/min ({len(after)} samples)"
    )
    print(
        f"open files: first {fds[0][1]:.0f}, last {fds[-1][1]:.0f},"
        f" max {max(v for _, v in fds):.0f}; slope after warm-up"
        f" {slope_per_minute(fds_after):+.3f} files/min"
    )
    p50 = ready_latency[len(ready_latency) // 2] * 1000
    p99 = ready_latency[int(len(ready_latency) * 0.99)] * 1000
    print(
        f"/ready latency: p50 {p50:.2f} ms, p99 {p99:.2f} ms, max {ready_latency[-1] * 1000:.2f} ms"
    )


if __name__ == "__main__":
    main()
