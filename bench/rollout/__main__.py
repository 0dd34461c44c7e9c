"""``make bench-rollout``: rolling replacements on a real kubelet, scenario by scenario.

    python -m bench.rollout [--runs 4] [--scenarios none,classic,...] [--search 7,8,9,10]
                            [--search-runs 3] [--no-production] [--report-only] [--reset]

The published report is ``make bench-rollout`` with these defaults on a fresh record (``--reset``):
36 scaled runs and one unscaled, about 30 minutes.

Each invocation starts a node (tests/harness/node.py), runs its replacements and adds their figures
to ``bench/results/rollout.json`` (kept out of git), then rewrites ``bench/results/rollout.md``
and ``bench/results/rollout.png`` from every run recorded there. Root only (the kubelet).
"""

from __future__ import annotations

import argparse
import datetime as dt
import json
import os
import platform
import sys
from pathlib import Path
from statistics import mean

from bench.rollout import report
from bench.rollout.rig import (
    BUSY_RATE,
    FRESH_RATE,
    PRODUCTION,
    SCALED,
    SLOW_RATE,
    Rig,
    Scenario,
    Timings,
    classic_sleep,
    scenarios,
)
from tests.harness.javaapps import build
from tests.harness.node import KubeNode, prepare

ROOT = Path(__file__).resolve().parents[2]
RESULTS = ROOT / "bench" / "results"
RAW = RESULTS / "rollout.json"
RECORDS = Path("/var/lib/prestop-agent/rollout-records")
COMMAND = "make bench-rollout ROLLOUT_ARGS=--reset"


def run_rig(
    timings: Timings, order: list[Scenario], label: str, raw: dict[str, object]
) -> list[report.RunFigures]:
    """Start a node and the rig, replace one replica per entry of ``order``, save as we go."""
    node = KubeNode(prepare())
    node.start()
    done: list[report.RunFigures] = []
    spare = scenarios(timings)["none"]  # replicas left at the end are removed with the node
    try:
        rig = Rig(node, build("eureka-server"), build("demo-app"), RECORDS, timings)
        queue = [*order, spare, spare]
        rig.start(queue[0], queue[1])
        for index, scenario in enumerate(order):
            replaced = rig.replace(queue[index + 2])
            figures = report.figures(replaced, label)
            done.append(figures)
            raw.setdefault("runs", []).append(report.to_json(figures))  # type: ignore[union-attr]
            RAW.write_text(json.dumps(raw))
            print(
                f"{label} {scenario.key}: failed {figures.failed}, sent {figures.sent},"
                f" hook held {figures.app_signalled} s, termination {figures.termination:.2f} s,"
                f" DOWN visible {figures.down_visible}, last sent {figures.last_sent},"
                f" last served {figures.last_served}",
                flush=True,
            )
    finally:
        node.stop()
    return done


def machine() -> str:
    cpu = next(
        (
            line.split(":", 1)[1].strip()
            for line in Path("/proc/cpuinfo").read_text().splitlines()
            if line.startswith("model name")
        ),
        platform.processor(),
    )
    memory = int(Path("/proc/meminfo").read_text().split()[1]) // 1024 // 1024
    return f"{os.cpu_count()} cores ({cpu}), {memory} GiB, Linux {platform.release()}"


def sleep_section(
    found: report.SleepSearch, scaled: list[report.RunFigures], search: list[report.RunFigures]
) -> list[str]:
    """The search for the shortest zero-failure fixed sleep, and the agent against it."""
    lines = ["## Shortest zero-failure fixed sleep (classic hook: DOWN, then sleep)", ""]
    if not found.rows:
        return [*lines, "Not measured in this report."]
    lines += [
        "Two kinds of evidence. Each sleep tried has runs of its own. And every run of a"
        " scenario whose hook marks the replica DOWN at the trigger (2, 4, 5, 6 and the sleeps"
        f" tried; {found.measured} runs) measured how long after the deletion a caller still"
        " sent to the replica (*last request sent*). A sleep of S holds the app until"
        f" S + {found.overhead:.2f} s after the deletion (the kubelet noticing the deletion,"
        " bash starting; median of the sleeps' own runs), so it fails a run whose callers sent"
        " later than that, whatever that run's own hook was. Sleeps are whole seconds, as"
        " Kubernetes' `preStop.sleep` takes them.",
        "",
        "| sleep s | runs of it | with failures | runs (of every scenario) that needed longer |",
        "|---|---|---|---|",
        *(
            f"| {s:g} | {n} | {bad} | {longer} of {found.measured} |"
            for s, n, bad, longer in found.rows
        ),
        "",
    ]
    if found.shortest is None:
        return [*lines, "No sleep tried gave zero failures in every run."]
    lines.append(
        f"Shortest sleep with zero failures in every run: **{found.shortest:g} s** (the longest"
        f" any run needed: {found.needed_max:.2f} s)."
    )
    agent = [r for r in scaled if r.scenario in ("traffic", "native")]
    same = [r for r in search if r.scenario == f"classic-{found.shortest:g}"]
    if not agent:
        return lines
    held = [r.app_signalled for r in agent if r.app_signalled is not None]
    ended = [r.termination for r in agent]
    lines += [
        "",
        f"Against it, the agent's traffic drain (scenarios 5 and 6, {len(agent)} runs,"
        f" {sum(r.failures for r in agent)} failed requests):",
        "",
        "| | hook held the app s | pod terminated s |",
        "|---|---|---|",
        f"| agent, mean (min-max) | {mean(held):.2f} ({min(held):.2f}-{max(held):.2f})"
        f" | {mean(ended):.2f} ({min(ended):.2f}-{max(ended):.2f}) |",
    ]
    if same:
        same_held = mean([r.app_signalled for r in same if r.app_signalled is not None])
        same_ended = mean([r.termination for r in same])
        lines += [
            f"| {found.shortest:g} s sleep, mean of {len(same)} runs | {same_held:.2f}"
            f" | {same_ended:.2f} |",
            "",
            f"The agent held the app less long than the {found.shortest:g} s sleep in"
            f" {sum(1 for h in held if h < same_held)} of {len(held)} runs and ended the pod"
            f" sooner in {sum(1 for e in ended if e < same_ended)} of {len(ended)}.",
        ]
    bound = SCALED.server_cache + SCALED.client_refresh
    lines += [
        "",
        "Why: DOWN reaches clients after the server's response cache (up to"
        f" {SCALED.server_cache:g} s) plus a client's fetch and LoadBalancer cache (up to"
        f" {SCALED.client_refresh:g} s), so the only sleep safe in every run is"
        f" {bound:g} s, and the shortest clean sleep of a search converges to it as runs are"
        " added: a few lucky runs make a shorter one look safe. The agent waits the"
        " visibility it measures in each run plus the client part, so it never waits longer"
        " than that bound by more than its quiet period and is shorter by whatever the server"
        " cache took less than its maximum.",
    ]
    return lines


def write_report(raw: dict[str, object]) -> None:
    runs = [report.from_json(r) for r in raw.get("runs", [])]  # type: ignore[union-attr]
    titles = {k: s.title for k, s in scenarios(SCALED).items()}
    scaled = [r for r in runs if r.label == "scaled" and not r.scenario.startswith("classic-")]
    search = [r for r in runs if r.label == "scaled" and r.scenario.startswith("classic-")]
    production = [r for r in runs if r.label == "production"]
    found = report.sleep_search([*scaled, *search])
    for run in search:
        titles[run.scenario] = f"exec DOWN + sleep {run.scenario.split('-', 1)[1]}"
    lines = [
        "# Rolling replacement on a real kubelet",
        "",
        f"Measured {raw.get('date', '?')} on {raw.get('machine', '?')} (shared with other"
        " jobs), kubelet v1.34.2 on containerd, by `bench/rollout/`. Rerun with"
        f" `{COMMAND}` (root).",
        "",
        "Rig: a Eureka server pod; demo app replicas (Spring Boot, Eureka client), each with",
        "the agent's image as a sidecar where the scenario uses it; three callers as pods, every",
        "request recorded: **busy** (Spring Cloud LoadBalancer over Boot's pooled keep-alive"
        f" Apache HttpClient 5, {BUSY_RATE:g} req/s, no retries), **slow** (the same at"
        f" {SLOW_RATE:g} req/s: ~1 request per 4 s to each of 3 replicas), **fresh** (Python, a"
        f" new TCP connection per request, {FRESH_RATE:g} req/s, instances from Eureka's REST"
        " API with its own fetch and cache timers set like the Spring clients').",
        "",
        "Timings: Spring Cloud's production values scaled 10x down: server read-only response"
        f" cache {SCALED.server_cache:g} s, client fetch {SCALED.client_fetch:g} s, LoadBalancer"
        f" cache {SCALED.balancer_cache:g} s, lease renewal {SCALED.renewal:g} s / expiration"
        f" {SCALED.expiration:g} s, instance-info replication {SCALED.replication:g} s; grace"
        f" period {SCALED.grace} s. Agent: PRESTOP_EUREKA_SERVER_CACHE_SECONDS=3,"
        " PRESTOP_EUREKA_CLIENT_REFRESH_SECONDS=6.5, traffic drain quiet 1 s, poll 0.2 s.",
        "",
        "A rolling replacement as a Deployment with `maxSurge: 1, maxUnavailable: 0` does it,",
        "done by the harness because a standalone kubelet has no Deployment controller: start a",
        "new replica, wait until Eureka's client-facing view lists it UP and every caller has",
        "sent to it, then delete the oldest replica's pod; the kubelet runs its termination.",
        "Requests are counted from 6 s before the deletion to 12 s after the pod was gone.",
        "",
        "## Scenarios (scaled timings)",
        "",
        *report.scenario_rows(scaled, titles),
        "",
        "All times are seconds after the pod's deletion. hook held: until the kubelet sent the"
        " app SIGTERM (its log line after the hook; about 0.2 s with no hook, the kubelet"
        " noticing the deletion). termination: until the last container's exit (containerd);"
        " the app's own shutdown after SIGTERM is about 3 s in every scenario, the Eureka"
        " client's `InstanceInfoReplicator.stop()` waiting up to 3 s for its next scheduled"
        " replication. DOWN visible: until Eureka's client-facing view (its response cache)"
        " no longer listed the replica UP. last request sent: the send time of the last request"
        " any caller aimed at the replica, answered or failed. last request served: the end of"
        " the last request the replica answered.",
        "Times: mean (min-max) over the runs. Failure kinds: the Python caller's exception"
        " class; the Spring callers' exception class with the cause its message names.",
        "",
    ]
    lines += sleep_section(found, scaled, search)
    if search:
        lines += ["", *report.scenario_rows(search, titles)]
    lines += ["", "## Unscaled production timings", ""]
    if production:
        lines += [
            f"Server cache {PRODUCTION.server_cache:g} s, fetch {PRODUCTION.client_fetch:g} s,"
            f" LoadBalancer cache {PRODUCTION.balancer_cache:g} s, grace period"
            f" {PRODUCTION.grace} s.",
            "",
            *report.scenario_rows(production, titles),
        ]
    else:
        lines.append("Not measured in this report.")
    lines += ["", "## Every run", "", *report.run_rows(runs), ""]
    (RESULTS / "rollout.md").write_text("\n".join(lines))
    report.plot(scaled or runs, titles, str(RESULTS / "rollout.png"))


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--runs", type=int, default=4, help="runs per scenario")
    parser.add_argument("--scenarios", default="none,classic,sleep,fixed,traffic,native")
    parser.add_argument(
        "--search", default="7,8,9,10", help="classic-hook sleeps to try, s ('' for none)"
    )
    parser.add_argument("--search-runs", type=int, default=3)
    parser.add_argument(
        "--no-production",
        dest="production",
        action="store_false",
        help="skip the one run of scenario 5 with unscaled timings",
    )
    parser.add_argument("--report-only", action="store_true")
    parser.add_argument("--reset", action="store_true", help="forget earlier runs")
    args = parser.parse_args(argv)
    if os.geteuid() != 0 and not args.report_only:
        print("bench-rollout needs root (it runs a kubelet)", file=sys.stderr)
        return 2
    RESULTS.mkdir(parents=True, exist_ok=True)
    raw: dict[str, object] = {} if args.reset or not RAW.exists() else json.loads(RAW.read_text())
    if not args.report_only:
        raw["date"] = dt.datetime.now(dt.UTC).strftime("%Y-%m-%d %H:%M UTC")
        raw["machine"] = machine()
        chosen = scenarios(SCALED)
        keys = [k for k in args.scenarios.split(",") if k]
        order = [chosen[k] for _ in range(args.runs) for k in keys]
        order += [
            classic_sleep(float(s))
            for s in args.search.split(",")
            if s
            for _ in range(args.search_runs)
        ]
        if order:
            run_rig(SCALED, order, "scaled", raw)
        if args.production:
            run_rig(PRODUCTION, [scenarios(PRODUCTION)["traffic"]], "production", raw)
    write_report(raw)
    print((RESULTS / "rollout.md").read_text())
    return 0


if __name__ == "__main__":
    sys.exit(main())
