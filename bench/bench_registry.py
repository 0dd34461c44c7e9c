"""How fast does ``/prestop`` make the instance DOWN on a real Eureka server?

Starts one Spring Cloud Eureka server (tests/fixtures/eureka-server), registers a fake instance
with it (a POST, as a client would; no second JVM needed), then 20 times: starts the real agent
in ``eureka`` mode, sends ``/prestop`` and polls ``GET apps/{APP}/{id}`` (the registry itself, not
the response cache) until it shows DOWN; clears the override before the next run.

Prints the median and the worst of the 20 runs, measured from the moment ``/prestop`` was sent,
and the agent's own ``mark_down`` step duration from its timeline (the hook's answer). Target:
under 50 ms on loopback.

    .venv/bin/python bench/bench_registry.py [runs]
"""

from __future__ import annotations

import argparse
import json
import statistics
import sys
import tempfile
import threading
import time
import urllib.request
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from tests.harness.agent_process import AgentProcess
from tests.harness.javaapps import EurekaServer, build, http_get, http_request
from tests.harness.support import free_port

APP = "BENCH-APP"
IP = "127.0.0.1"
PORT = 18080
INSTANCE_ID = f"{IP}:bench-app:{PORT}"
TARGET_MS = 50.0


def register(server: EurekaServer) -> None:
    now = int(time.time() * 1000)
    instance = {
        "instanceId": INSTANCE_ID,
        "hostName": IP,
        "app": APP,
        "ipAddr": IP,
        "status": "UP",
        "port": {"$": PORT, "@enabled": "true"},
        "securePort": {"$": 443, "@enabled": "false"},
        "dataCenterInfo": {
            "@class": "com.netflix.appinfo.InstanceInfo$DefaultDataCenterInfo",
            "name": "MyOwn",
        },
        # Long enough that the lease outlives the benchmark without renewals.
        "leaseInfo": {"renewalIntervalInSecs": 30, "durationInSecs": 600},
        "vipAddress": "bench-app",
        "lastDirtyTimestamp": str(now),
    }
    status, body = http_request(
        "POST",
        f"{server.url}apps/{APP}",
        json.dumps({"instance": instance}).encode(),
        {"Content-Type": "application/json"},
    )
    if status != 204:
        raise RuntimeError(f"register answered {status}: {body}")


def status_of(server: EurekaServer) -> str | None:
    code, body = http_get(f"{server.url}apps/{APP}/{INSTANCE_ID}", timeout=1.0)
    return json.loads(body)["instance"]["status"] if code == 200 else None


def one_run(server: EurekaServer, workdir: Path, index: int) -> tuple[float, float]:
    """Seconds from sending /prestop to the server showing DOWN; the agent's step duration."""
    agent = AgentProcess(
        {
            "PRESTOP_REGISTRY": "eureka",
            "PRESTOP_EUREKA_URLS": server.url,
            "PRESTOP_EUREKA_APP": APP,
            "POD_IP": IP,
            "PRESTOP_APP_PORT": str(PORT),
            "PRESTOP_DRAIN_MODE": "fixed",
            "PRESTOP_DRAIN_SECONDS": "0.3",
            "PRESTOP_REGISTRY_TIMEOUT_SECONDS": "3",
        },
        workdir / f"agent-{index}.log",
        port=free_port(),
    )
    agent.start()
    try:
        agent.wait_ready()
        time.sleep(0.3)  # let the start-up lookup finish, as it has long before a real shutdown
        answer: list[bytes] = []
        caller = threading.Thread(
            target=lambda: answer.append(
                urllib.request.urlopen(f"{agent.url}/prestop", timeout=30).read()
            )
        )
        sent = time.perf_counter()
        caller.start()
        while status_of(server) != "DOWN":
            if time.perf_counter() - sent > 5:
                raise RuntimeError(f"not DOWN after 5 s:\n{agent.log_text()}")
        seen = time.perf_counter() - sent
        caller.join(30)
        # The hook's answer carries the timeline (shutdown_complete is logged only at exit).
        [step] = [
            s
            for timeline in map(json.loads, answer)
            for s in timeline.get("steps", [])
            if s.get("name") == "mark_down"
        ] or [{"duration_seconds": float("nan")}]
        return seen, float(step.get("duration_seconds") or float("nan"))
    finally:
        agent.stop()
        # Clear the override for the next run; the status goes back to UNKNOWN, then UP below.
        http_request("DELETE", f"{server.url}apps/{APP}/{INSTANCE_ID}/status")
        http_request("PUT", f"{server.url}apps/{APP}/{INSTANCE_ID}/status?value=UP", b"")
        http_request("DELETE", f"{server.url}apps/{APP}/{INSTANCE_ID}/status")


def main(runs: int = 20) -> int:
    jar = build("eureka-server")
    with tempfile.TemporaryDirectory() as tmp:
        workdir = Path(tmp)
        server = EurekaServer(jar, workdir, "bench-eureka", IP, free_port())
        server.start()
        try:
            register(server)
            seen, steps = [], []
            for index in range(runs):
                register(server)  # fresh UP status and no override
                s, step = one_run(server, workdir, index)
                seen.append(s * 1000)
                steps.append(step * 1000)
        finally:
            server.stop()
    median, worst = statistics.median(seen), max(seen)
    print(f"/prestop -> DOWN readable on the server, {runs} runs (ms):")
    print(f"  median {median:.1f}  worst {worst:.1f}  best {min(seen):.1f}")
    logged = [ms for ms in steps if ms == ms]  # NaN: the answer had no step timing
    if logged:
        print(
            f"agent mark_down+verify step from its timeline ({len(logged)} runs, ms):"
            f" median {statistics.median(logged):.1f}  worst {max(logged):.1f}"
        )
    verdict = "meets" if median < TARGET_MS else "misses"
    print(f"target: median under {TARGET_MS:g} ms on loopback: {verdict}")
    return 0


if __name__ == "__main__":
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("runs", nargs="?", type=int, default=20, help="terminations to time")
    sys.exit(main(parser.parse_args().runs))
