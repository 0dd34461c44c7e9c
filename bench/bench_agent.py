"""Measure the running agent: start-up time, idle RSS, /ready and /metrics throughput, idle CPU.

Targets (issue 2): idle RSS <= 45 MB, process start to /ready 200 <= 0.5 s, idle CPU ~ 0.
Throughput is reported, with the agent pinned to one core and wrk on the other.

    python bench/bench_agent.py                 # full run (60 s idle CPU window)
    python bench/bench_agent.py --idle-seconds 10 --load-seconds 5
"""

from __future__ import annotations

import argparse
import os
import re
import shutil
import signal
import statistics
import subprocess
import sys
import time
import urllib.request
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from tests.harness.support import free_port  # the repo root, put on the path above

CLOCK_TICKS = os.sysconf("SC_CLK_TCK")


def start_agent(port: int, env: dict[str, str]) -> tuple[subprocess.Popen[bytes], float]:
    """Start the agent; return the process and the seconds from spawn to the first /ready 200."""
    started = time.monotonic()
    proc = subprocess.Popen(
        [sys.executable, "-m", "agent.cli"],
        env={
            "PATH": os.environ.get("PATH", "/usr/bin:/bin"),
            "PRESTOP_HOST": "127.0.0.1",
            "PRESTOP_PORT": str(port),
            "PRESTOP_LOG_FORMAT": "json",
            "PRESTOP_LOG_LEVEL": "warning",
            **env,
        },
        stdout=subprocess.DEVNULL,
        stderr=subprocess.DEVNULL,
    )
    while True:
        try:
            with urllib.request.urlopen(f"http://127.0.0.1:{port}/ready", timeout=1) as answer:
                if answer.status == 200:
                    return proc, time.monotonic() - started
        except OSError:
            if proc.poll() is not None:
                raise SystemExit(f"agent exited with {proc.returncode}") from None
        time.sleep(0.002)


def stop(proc: subprocess.Popen[bytes]) -> None:
    proc.send_signal(signal.SIGINT)
    proc.send_signal(signal.SIGKILL)
    proc.wait()


def rss_mib(pid: int) -> float:
    status = Path(f"/proc/{pid}/status").read_text()
    return int(re.search(r"VmRSS:\s+(\d+) kB", status).group(1)) / 1024  # type: ignore[union-attr]


def cpu_seconds(pid: int) -> float:
    fields = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()
    return (int(fields[11]) + int(fields[12])) / CLOCK_TICKS  # utime + stime


def wrk(url: str, seconds: int) -> str:
    """Requests/s and latency from wrk, pinned to the second core."""
    done = subprocess.run(
        ["taskset", "-c", "1", "wrk", "-t1", "-c16", f"-d{seconds}s", "--latency", url],
        capture_output=True,
        text=True,
        check=True,
    )
    rate = re.search(r"Requests/sec:\s+([\d.]+)", done.stdout)
    p50 = re.search(r"50%\s+(\S+)", done.stdout)
    p99 = re.search(r"99%\s+(\S+)", done.stdout)
    errors = re.search(r"Non-2xx or 3xx responses: (\d+)", done.stdout)
    return (
        f"{float(rate.group(1)) if rate else 0:,.0f} req/s, p50 {p50.group(1) if p50 else '?'},"
        f" p99 {p99.group(1) if p99 else '?'}, non-2xx {errors.group(1) if errors else 0}"
    )


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--runs", type=int, default=7, help="start-up measurements")
    parser.add_argument("--idle-seconds", type=float, default=60.0)
    parser.add_argument("--load-seconds", type=int, default=10)
    args = parser.parse_args()

    print(f"python {sys.version.split()[0]}, {os.cpu_count()} cores")
    for mode in ("fixed", "traffic"):
        env = {"PRESTOP_DRAIN_MODE": mode}
        startups, rss = [], []
        for _ in range(args.runs):
            proc, seconds = start_agent(free_port(), env)
            time.sleep(1.0)  # let start-up garbage settle before reading RSS
            startups.append(seconds)
            rss.append(rss_mib(proc.pid))
            stop(proc)
        print(
            f"[{mode:7}] start to /ready 200: median {statistics.median(startups) * 1000:.0f} ms,"
            f" worst {max(startups) * 1000:.0f} ms (target <= 500 ms);"
            f" idle RSS median {statistics.median(rss):.1f} MiB (target <= 45 MB)"
        )

    port = free_port()
    proc, _ = start_agent(port, {})
    try:
        subprocess.run(["taskset", "-pc", "0", str(proc.pid)], check=True, capture_output=True)
        time.sleep(1.0)
        before = cpu_seconds(proc.pid)
        time.sleep(args.idle_seconds)
        used = cpu_seconds(proc.pid) - before
        print(
            f"idle CPU over {args.idle_seconds:g} s: {used * 1000:.0f} ms"
            f" ({used / args.idle_seconds * 100:.3f} % of one core)"
        )
        if shutil.which("wrk") is None:
            print("wrk not installed (apt-get install wrk): throughput not measured")
            return
        for path in ("/ready", "/metrics"):
            figures = wrk(f"http://127.0.0.1:{port}{path}", args.load_seconds)
            print(f"{path:9} on one core: {figures}")
        print(f"RSS after the load: {rss_mib(proc.pid):.1f} MiB")
    finally:
        stop(proc)


if __name__ == "__main__":
    main()
