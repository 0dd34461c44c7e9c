"""CPU per EndpointSlice watch event, and what the Kubernetes client costs at start-up.

Why: the agent watches every EndpointSlice of its namespace from start-up to exit, in a sidecar
with a small CPU limit, and a busy namespace sends an event for every endpoint change of every
Service. The agent's client is its own (agent/kube.py over the aiohttp it already loads) rather
than kubernetes_asyncio, kr8s or lightkube, whose import adds 38, 20 and 7 MiB of RSS; this
prints what the own client costs per event and at import.

What: each watch line goes through the agent's own path, ``kube._event`` (JSON to a typed
event) then ``EndpointSliceSource.update`` (does the slice list the pod, is it ready), timed
with ``time.process_time`` over many events: the slices recorded from the suite's API server
during a rollout restart (tests/fixtures/endpointslices/rollout-watch.jsonl, 3 endpoints each),
and synthetic slices of 100 endpoints (the EndpointSlice controller's default maximum per
slice). Then, in a fresh interpreter that has already imported aiohttp, structlog and
prometheus_client (as the agent has), the import time and RSS added by agent.kube and
agent.endpointslices.

Usage: python bench/bench_kube.py [--events 20000]
"""

from __future__ import annotations

import argparse
import copy
import json
import subprocess
import sys
import time
from pathlib import Path

from agent.endpointslices import EndpointSliceSource
from agent.kube import _event

ROOT = Path(__file__).resolve().parents[1]
RECORDED = ROOT / "tests" / "fixtures" / "endpointslices" / "rollout-watch.jsonl"

IMPORT_PROBE = """
import resource, time, aiohttp, structlog, prometheus_client
def rss():
    for line in open("/proc/self/status"):
        if line.startswith("VmRSS:"):
            return int(line.split()[1]) / 1024
before, started = rss(), time.perf_counter()
import agent.kube, agent.endpointslices
print(f"{(time.perf_counter() - started) * 1000:.1f} {rss() - before:.2f}")
"""


def wide_lines(recorded: list[bytes], endpoints: int) -> list[bytes]:
    """The recorded events with each slice widened to ``endpoints`` endpoints."""
    lines = []
    for line in recorded:
        event = json.loads(line)
        slice_ = event["object"]
        template = (slice_.get("endpoints") or [None])[0]
        if template is not None:
            extra = []
            for index in range(endpoints - len(slice_["endpoints"])):
                endpoint = copy.deepcopy(template)
                endpoint["addresses"] = [f"10.244.{index // 250}.{index % 250 + 1}"]
                endpoint["targetRef"]["name"] = f"other-{index}"
                extra.append(endpoint)
            slice_["endpoints"] = slice_["endpoints"] + extra
        lines.append(json.dumps(event).encode())
    return lines


def cpu_per_event(lines: list[bytes], pod_ip: str, events: int) -> float:
    """Microseconds of CPU per watch line, parse and source update together."""
    source = EndpointSliceSource(pod_ip=pod_ip)
    source.replace([], at=-1.0)
    started = time.process_time()
    for number in range(events):
        parsed = _event(lines[number % len(lines)], "watch endpointslices")
        if parsed is not None:
            source.update(*parsed, at=number * 0.001)
    return (time.process_time() - started) / events * 1e6


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--events", type=int, default=20000)
    args = parser.parse_args()
    recorded = [line.encode() for line in RECORDED.read_text().splitlines() if line.strip()]
    pod_ip = json.loads(recorded[0])["object"]["endpoints"][0]["addresses"][0]
    print(f"CPU per watch event ({args.events} events, parse + EndpointSliceSource.update):")
    for label, lines in (
        ("recorded slices, 3 endpoints", recorded),
        ("100 endpoints per slice", wide_lines(recorded, 100)),
    ):
        size = sum(len(line) for line in lines) / len(lines)
        micros = cpu_per_event(lines, pod_ip, args.events)
        print(f"  {label:32} {size / 1024:6.1f} KiB/event  {micros:8.1f} us CPU/event")
    runs = []
    for _ in range(3):
        out = subprocess.run(
            [sys.executable, "-c", IMPORT_PROBE], capture_output=True, text=True, check=True
        ).stdout.split()
        runs.append((float(out[0]), float(out[1])))
    millis = sorted(run[0] for run in runs)[1]
    mib = sorted(run[1] for run in runs)[1]
    print(
        "import agent.kube + agent.endpointslices after aiohttp, structlog, prometheus_client:"
        f" {millis:.1f} ms, +{mib:.2f} MiB RSS (median of 3)"
    )
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
