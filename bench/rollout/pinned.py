"""What happens to the keep-alive connections pinned to a terminating pod through its Service:
``kubectl rollout restart`` on the rig of ``bench/rollout/deployment.py``, with each old pod's
sockets on the app's port sampled from its network namespace (``ss -ti``: peer, bytes received)
and its agent's ``/status`` (the drain's ``pinned`` count), every few tenths of a second.

    flock /tmp/prestop-heavy.lock .venv/bin/python -m bench.rollout.pinned \\
        [--layouts traffic,native] [--keep-alive-requests 10] [--out DIR]

Prints, per old pod: how long the hook held, the pooled Service caller's connections open at the
trigger, how many requests each carried after it, when Tomcat rotated them (the answers with
``Connection: close``), how many were still open when the hook was answered, the caller's failed
requests on them, and what the agent's drain showed last. The raw samples and records go to
``DIR/<layout>.json``. Root only (the kubelet); one rollout per layout.
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import re
import subprocess
import threading
import time
import urllib.request
from collections import defaultdict
from pathlib import Path
from typing import Any

from bench.rollout.deployment import SERVICE_CALLERS, DeploymentRig, Rollout
from bench.rollout.rig import SCALED, scenarios
from tests.harness.cluster import KubeCluster
from tests.harness.javaapps import build
from tests.harness.node import prepare
from tests.harness.pods import AGENT_PORT, APP_PORT

_OPENER = urllib.request.build_opener(urllib.request.ProxyHandler({}))
_COUNTERS = ("bytes_received", "lastrcv")
SAMPLE_PERIOD = 0.2


def pod_netns(ip: str) -> str | None:
    """The network namespace (``ip netns`` name) holding ``ip``: the pod's."""
    for netns in Path("/run/netns").glob("cni-*"):
        listing = subprocess.run(
            ["ip", "-n", netns.name, "-j", "addr"], capture_output=True, text=True, check=False
        ).stdout
        if f'"{ip}"' in listing:
            return netns.name
    return None


def established(netns: str) -> list[dict[str, Any]]:
    """The established connections on the app's port in ``netns``: peer IP and port, and the
    kernel's counters (``ss -ti``)."""
    listing = subprocess.run(
        ["ip", "netns", "exec", netns, "ss", "-tinHOn", "state", "established",
         f"( sport = :{APP_PORT} )"],
        capture_output=True, text=True, timeout=5, check=False,
    ).stdout  # fmt: skip
    connections = []
    for line in listing.splitlines():
        fields = line.split()
        if len(fields) < 4:
            continue
        host, port = fields[3].rsplit(":", 1)
        connection: dict[str, Any] = {
            "peer": host.strip("[]").removeprefix("::ffff:"),
            "port": int(port),
        }
        for counter in _COUNTERS:
            found = re.search(rf"\b{counter}:(\d+)", line)
            if found:
                connection[counter] = int(found.group(1))
        connections.append(connection)
    return connections


def agent_seen(ip: str) -> dict[str, Any] | None:
    """What the agent's traffic drain showed at its last poll (``/status``)."""
    try:
        with _OPENER.open(f"http://{ip}:{AGENT_PORT}/status", timeout=0.5) as response:
            return dict(json.load(response)["drain"]["seen"]) or None
    except (OSError, ValueError, KeyError, TypeError):
        return None


class Sampler:
    """Samples every old pod's connections and agent in a thread of its own."""

    def __init__(self, pods: dict[str, str]) -> None:
        self.pods = pods
        self.netns: dict[str, str | None] = {}
        self.samples: list[dict[str, Any]] = []
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._run, daemon=True)

    def _run(self) -> None:
        while not self._stop.is_set():
            for name, ip in self.pods.items():
                if self.netns.get(name) is None:
                    self.netns[name] = pod_netns(ip)
                netns = self.netns[name]
                sockets = established(netns) if netns else []
                self.samples.append(
                    {"t": time.time(), "pod": name, "sockets": sockets, "agent": agent_seen(ip)}
                )
            self._stop.wait(SAMPLE_PERIOD)

    def __enter__(self) -> Sampler:
        self._thread.start()
        return self

    def __exit__(self, *exc: object) -> None:
        self._stop.set()
        self._thread.join(10)


def pod_lines(run: Rollout, samples: list[dict[str, Any]], pooled_ip: str) -> list[str]:
    """Per old pod, the pooled Service caller's connections pinned at the trigger and their end."""
    by_connection: dict[int, list[dict[str, Any]]] = defaultdict(list)
    for record in run.records["pooled"]:
        if "conn" in record:
            by_connection[record["conn"]].append(record)
    lines = []
    for end in run.old:
        if end.hook_started is None or end.hook_answered is None:
            lines.append(f"  {end.name}: hook not seen in the kubelet's log")
            continue
        trigger, answered = end.hook_started, end.hook_answered
        seen: dict[int, list[float]] = defaultdict(list)
        last_agent = None
        for sample in samples:
            if sample["pod"] != end.name:
                continue
            last_agent = sample["agent"] or last_agent
            for connection in sample["sockets"]:
                if connection["peer"] == pooled_ip:
                    seen[connection["port"]].append(sample["t"])
        # Open at the trigger: seen before it and at a sample after it (samples 0.2-0.7 s apart).
        pinned = [port for port, times in seen.items() if times[0] <= trigger <= times[-1] + 0.7]
        after = {port: [r for r in by_connection[port] if r["t"] > trigger] for port in pinned}
        rotated = sorted(
            round(r["t"] - trigger, 1) for rs in after.values() for r in rs if r.get("close")
        )
        failed = sum(1 for rs in after.values() for r in rs if r["outcome"] != "200")
        still_open = sum(1 for port in pinned if seen[port][-1] >= answered - 0.3)
        lines.append(
            f"  {end.name}: hook held {answered - trigger:.2f} s; pooled connections open at the"
            f" trigger {len(pinned)}, requests on each after it"
            f" {sorted(len(rs) for rs in after.values())}, rotated (Connection: close) at"
            f" {rotated} s, open at the answer {still_open}, failed {failed};"
            f" the drain's last poll {last_agent}"
        )
    return lines


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--layouts", default="traffic,native", help="scenarios, in order")
    parser.add_argument(
        "--keep-alive-requests",
        type=int,
        default=SCALED.keep_alive_requests,
        help="the replicas' server.tomcat.max-keep-alive-requests",
    )
    parser.add_argument("--out", type=Path, default=Path("/var/lib/prestop-agent/pinned"))
    args = parser.parse_args(argv)
    timings = dataclasses.replace(SCALED, keep_alive_requests=args.keep_alive_requests)
    cluster = KubeCluster(prepare())
    try:
        cluster.start()
        rig = DeploymentRig(
            cluster, build("eureka-server"), build("demo-app"), args.out / "records", timings
        )
        rig.start_eureka()
        layouts = args.layouts.split(",")
        for index, layout in enumerate(layouts):
            # The scenarios are the scaled ones: equal timings but for the keep-alive limit.
            rig.deploy(scenarios(SCALED)[layout])
            if index == 0:
                rig.start_callers()
            pods = {p["metadata"]["name"]: p["status"]["podIP"] for p in rig._app_pods()}
            with Sampler(pods) as sampler:
                run = rig.rollout()
            pooled_ip = cluster.get("pod", "pooled")["status"]["podIP"]
            print(f"{layout}: sent {run.sent}, failed {run.failed}")
            print("\n".join(pod_lines(run, sampler.samples, pooled_ip)), flush=True)
            raw = {
                "layout": layout,
                "keep_alive_requests": args.keep_alive_requests,
                "old": [dataclasses.asdict(end) for end in run.old],
                "records": {caller: run.records[caller] for caller in SERVICE_CALLERS},
                "samples": sampler.samples,
            }
            args.out.mkdir(parents=True, exist_ok=True)
            (args.out / f"{layout}.json").write_text(json.dumps(raw))
    finally:
        cluster.stop()


if __name__ == "__main__":
    main()
