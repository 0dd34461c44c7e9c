"""``make bench-rollout``: ``kubectl rollout restart`` of a 3-replica Deployment on a real
cluster, scenario by scenario.

    python -m bench.rollout [--runs 3] [--scenarios none,classic,...] [--search 8,9,10]
                            [--search-runs 2] [--no-production] [--report-only] [--reset]

Each invocation starts the cluster of tests/harness/cluster.py (under the machine's lock), sets up
bench/rollout/deployment.py's rig (two Eureka peers behind one Service, the app's Deployment,
five callers), runs its rollouts (every scenario's ``--runs`` rollouts in a row, one Deployment
set-up per scenario), adds their figures to ``bench/results/rollout.json`` (kept out of git) as
each ends, and rewrites ``bench/results/rollout.md`` and ``rollout.png`` from every rollout
recorded there. Run it in several invocations to share the machine (``COMMANDS``: scenarios in
two halves, then the sleep search with the unscaled rollout); ``--reset`` forgets earlier runs.
Root only (the kubelet).
"""

from __future__ import annotations

import argparse
import datetime as dt
import json
import os
import platform
import statistics
import sys
import time
from collections import Counter
from pathlib import Path

from bench.rollout import report
from bench.rollout.deployment import EUREKA_CALLERS, SERVICE_CALLERS, DeploymentRig
from bench.rollout.rig import (
    BUSY_RATE,
    FRESH_RATE,
    PRODUCTION,
    SCALED,
    SLOW_RATE,
    Scenario,
    Timings,
    classic_sleep,
    scenarios,
)
from tests.harness.cluster import KubeCluster
from tests.harness.javaapps import build
from tests.harness.node import prepare

ROOT = Path(__file__).resolve().parents[2]
RESULTS = ROOT / "bench" / "results"
RAW = RESULTS / "rollout.json"
RECORDS = Path("/var/lib/prestop-agent/rollout-records")
COMMANDS = (
    "make bench-rollout ROLLOUT_ARGS='--reset --scenarios none,classic,sleep --search="
    " --no-production'",
    "make bench-rollout ROLLOUT_ARGS='--scenarios fixed,traffic,native --search= --no-production'",
    "make bench-rollout ROLLOUT_ARGS='--runs 0 --search 8,9,10'",
)


def run_cluster(
    timings: Timings, order: list[tuple[Scenario, int]], label: str, raw: dict[str, object]
) -> None:
    """Start the cluster and the rig; per entry of ``order``, set up the Deployment for the
    scenario and restart it that many times; save each rollout as it ends."""
    setup: dict[str, float] = {}
    started = time.monotonic()
    cluster = KubeCluster(prepare())
    try:
        cluster.start()
        setup["cluster"] = round(time.monotonic() - started, 1)
        step = time.monotonic()
        rig = DeploymentRig(
            cluster,
            build("eureka-server"),
            build("demo-app"),
            RECORDS,
            timings,
            callers=(*EUREKA_CALLERS, *SERVICE_CALLERS),
        )
        rig.start_eureka()
        setup["eureka peers"] = round(time.monotonic() - step, 1)
        for index, (scenario, runs) in enumerate(order):
            step = time.monotonic()
            rig.deploy(scenario)
            if index == 0:
                setup["first deployment"] = round(time.monotonic() - step, 1)
                step = time.monotonic()
                rig.start_callers()
                setup["callers"] = round(time.monotonic() - step, 1)
                raw.setdefault("setup", []).append(  # type: ignore[union-attr]
                    {"label": label, "seconds": setup, "cluster_steps": cluster.setup_seconds}
                )
                print(f"{label} set-up: {setup}, cluster {cluster.setup_seconds}", flush=True)
            for _ in range(runs):
                run = report.figures(rig.rollout(), label)
                raw.setdefault("runs", []).append(report.to_json(run))  # type: ignore[union-attr]
                RAW.write_text(json.dumps(raw))
                print(summary(run), flush=True)
    except Exception:
        print(cluster.tails())
        print(cluster.node.tails(80))
        raise
    finally:
        cluster.stop()


def summary(run: report.RolloutFigures) -> str:
    lines = [
        f"{run.label} {run.scenario}: restart to complete {run.complete:.1f} s, sent {run.sent},"
        f" failed {run.failed}, watch periods {run.watch_period:.2f}"
        f" / {run.fast_watch_period:.2f} s"
    ]
    for pod in run.pods:
        moments = ", ".join(
            f"{title} {'-' if getattr(pod, name) is None else f'{getattr(pod, name):.2f}'}"
            for name, title in report.MOMENTS
        )
        lines.append(f"  {pod.name} (deleted +{pod.deleted:.1f} s): {moments}")
        if pod.agent_peers:
            lines.append(f"    agent on the Eureka URL: {pod.agent_peers}")
    return "\n".join(lines)


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
    found: report.SleepSearch,
    scaled: list[report.RolloutFigures],
    search: list[report.RolloutFigures],
) -> list[str]:
    """The search for the shortest fixed sleep, and the agent against it."""
    lines = ["## Shortest safe fixed sleep (classic hook: DOWN, then sleep)", ""]
    if not found.rows:
        return [*lines, "Not measured in this report."]
    lines += [
        "Safe here means: no failed request of the Eureka callers on the termination side (what"
        " a sleep is for; the Service callers' failures are in the tables above and below)."
        " Two kinds of evidence. Each sleep tried has rollouts of its own. And every old pod of"
        " a scenario whose hook marks the replica DOWN at the deletion (2, 4, 5, 6 and the"
        f" sleeps tried; {found.measured} pods) measured how long after its deletion an Eureka"
        " caller still sent to it (*last request sent*). A sleep of S holds the app until"
        f" S + {found.overhead:.2f} s after the deletion (the kubelet noticing the deletion, the"
        " DOWN request, bash; median of the sleeps' own pods), so it would have failed a pod"
        " whose callers sent later than that. Sleeps are whole seconds, as `preStop.sleep`"
        " takes them. A small search: a few sleeps, 2 rollouts (6 pods) each, so a sleep's own"
        " rollouts say little; the evidence of every measured pod carries most of the weight.",
        "",
        "| sleep s | rollouts of it | with failures | old pods (of every scenario) that needed"
        " longer |",
        "|---|---|---|---|",
        *(
            f"| {s:g} | {n} | {bad} | {longer} of {found.measured} |"
            for s, n, bad, longer in found.rows
        ),
        "",
    ]
    if found.shortest is None:
        lines.append("No sleep tried was clean in every rollout and for every measured pod.")
    else:
        lines.append(
            f"Shortest sleep clean in every rollout and for every measured pod:"
            f" **{found.shortest:g} s** (the longest any pod needed: {found.needed_max:.2f} s)."
        )
    agent = [r for r in scaled if r.scenario in ("traffic", "native")]
    if agent:
        held = [p.hook_held for r in agent for p in r.pods if p.hook_held is not None]
        gone = [p.gone for r in agent for p in r.pods if p.gone is not None]
        lines += [
            "",
            f"Against it, the agent's traffic drain (scenarios 5 and 6, {len(agent)} rollouts,"
            f" {len(held)} pods): hook held {report.stats(held)} s, pod gone"
            f" {report.stats(gone)} s after the deletion; the searched sleeps' pods: hook held"
            f" {report.stats(p.hook_held for r in search for p in r.pods)} s, pod gone"
            f" {report.stats(p.gone for r in search for p in r.pods)} s.",
        ]
    bound = SCALED.server_cache + SCALED.client_refresh
    lines += [
        "",
        "DOWN reaches clients after the server's response cache (up to"
        f" {SCALED.server_cache:g} s scaled) plus a client's fetch and LoadBalancer cache (up"
        f" to {SCALED.client_refresh:g} s), so the only sleep safe in every case is {bound:g} s;"
        " a search with few rollouts converges to it from below.",
    ]
    return lines


def agent_peer_lines(runs: list[report.RolloutFigures]) -> list[str]:
    """How many old pods' agents said what, per scenario and timings."""
    said: Counter[tuple[str, str]] = Counter()
    texts: dict[str, str] = {}
    for run in runs:
        for pod in run.pods:
            for url, text in (pod.agent_peers or {}).items():
                peers = text.split(":", 1)[0]
                said[(f"{run.scenario} ({run.label})", peers)] += 1
                texts[peers] = f"`{url}`: {text}"
    if not said:
        return ["No agent answered /status before a rollout (no agent scenario measured)."]
    return [
        "| scenario | peers | old pods |",
        "|---|---|---|",
        *(f"| {scenario} | {peers} | {n} |" for (scenario, peers), n in sorted(said.items())),
        "",
        "What each answer said in full:",
        "",
        *(f"- {text}" for text in texts.values()),
    ]


def write_report(raw: dict[str, object]) -> None:
    runs = [report.from_json(r) for r in raw.get("runs", [])]  # type: ignore[union-attr]
    titles = {k: s.title for k, s in scenarios(SCALED).items()}
    scaled = [r for r in runs if r.label == "scaled" and not r.scenario.startswith("classic-")]
    search = [r for r in runs if r.label == "scaled" and r.scenario.startswith("classic-")]
    production = [r for r in runs if r.label == "production"]
    found = report.sleep_search([*scaled, *search])
    for run in search:
        titles[run.scenario] = f"exec DOWN + sleep {run.scenario.split('-', 1)[1]}"
    fine = [r for r in runs if r.fast_watch_period]
    delays = report.proxy_delays(fine)
    coarse = report.proxy_delays([r for r in runs if not r.fast_watch_period])
    periods = [r.watch_period for r in runs if r.watch_period]
    fast_periods = [r.fast_watch_period for r in fine]
    setups = raw.get("setup", [])
    lines = [
        "# Rollouts on a real cluster: `kubectl rollout restart`",
        "",
        f"Measured {raw.get('date', '?')} on {raw.get('machine', '?')} (shared with other"
        " jobs), Kubernetes v1.34 (etcd, kube-apiserver, kube-controller-manager,"
        " kube-scheduler, a kubelet on containerd, kube-proxy in iptables mode) by"
        " `bench/rollout/`. Rerun (root), in three invocations so that the machine's heavy-job"
        " lock is released in between:",
        "",
        *(f"    {command}" for command in COMMANDS),
        "",
        "Rig (bench/rollout/deployment.py): every rollout is a `kubectl rollout restart` of the"
        " Deployment `demo-app` (3 replicas, `maxSurge: 1`, `maxUnavailable: 0`, the chart's"
        " `minReadySeconds` 30, scaled to 3), done by the Deployment controller; the"
        " EndpointSlice controller and kube-proxy move the Service. Eureka as users deploy it on"
        " Kubernetes: two replicating peers (`eureka-a`, `eureka-b`, each naming the other's"
        " Service as its peer) behind one Service `eureka`; every client's `defaultZone` and the"
        " agent's `PRESTOP_EUREKA_URLS` is that Service's ClusterIP. Five callers as pods, every"
        " request recorded: **busy** (Spring Cloud LoadBalancer over Boot's pooled keep-alive"
        f" Apache HttpClient 5, {BUSY_RATE:g} req/s, no retries), **slow** (the same at"
        f" {SLOW_RATE:g} req/s), **fresh** (Python, a new TCP connection per request,"
        f" {FRESH_RATE:g} req/s, instances from Eureka's REST API with its own fetch and cache"
        " timers), and through the app's ClusterIP Service and kube-proxy, as a gateway or"
        " another team's service: **pooled** (Python `http.client`, kept-alive connections,"
        f" one per sender thread, {FRESH_RATE:g} req/s) and **perconn** (a new connection per"
        f" request, {FRESH_RATE:g} req/s). Connect timeout 1 s, read timeout 5 s, no retries.",
        "",
        "Timings: Spring Cloud's production values scaled 10x down: server read-only response"
        f" cache {SCALED.server_cache:g} s, client fetch {SCALED.client_fetch:g} s, LoadBalancer"
        f" cache {SCALED.balancer_cache:g} s, lease renewal {SCALED.renewal:g} s / expiration"
        f" {SCALED.expiration:g} s, grace period {SCALED.grace} s. Agent:"
        " PRESTOP_EUREKA_SERVER_CACHE_SECONDS=3, PRESTOP_EUREKA_CLIENT_REFRESH_SECONDS=6.5,"
        " traffic drain quiet 1 s.",
        "",
        "Sides: a failure of an Eureka caller is on the *termination side* when it named an old"
        " pod, on the *start-up side* otherwise (a new pod, or no instance at all). The Service"
        " callers only know the ClusterIP: their failures count on the termination side while an"
        " old pod is between its deletion and 5 s after it is gone, on the start-up side"
        " otherwise.",
        "",
        "## Failed requests per scenario, caller and side (scaled timings)",
        "",
        *report.failure_rows(scaled, titles),
        "",
        "## Per old pod and per rollout (scaled timings)",
        "",
        *report.moment_rows(scaled, titles),
        "",
        "Per-pod moments are seconds after the pod's deletion (first seen with a"
        " deletionTimestamp), mean (min-max) over every old pod of the scenario's rollouts."
        " hook held: the kubelet's log, preStop hook start to answer. DOWN visible: the peer's"
        " client-facing view (`GET apps/DEMO-APP` on the peer pod's own address) stopped listing"
        " the pod UP, on the first peer / on both. endpoint not ready / removed: the pod's"
        " endpoint in the `demo-app` EndpointSlice. kube-proxy dropped the IP: the pod's"
        " address gone from `iptables-save -t nat` on the node. last request sent / served: by an"
        " Eureka caller to the pod. pod gone: the pod object gone from the API. The watcher"
        " samples the pods and the peers' views in turn, mean period"
        f" {report.stats(periods)} s (the resolution of deleted, DOWN visible and gone), and"
        " the EndpointSlice and the rules in a thread of their own, mean period"
        f" {report.stats(fast_periods)} s (rollouts before that thread existed: the slow"
        " period).",
        "",
        "## kube-proxy's sync delay",
        "",
        (
            "EndpointSlice endpoint not ready (terminating) to the pod IP gone from the node's"
            f" rules (`iptables-save -t nat`), over {len(delays)} old pods sampled every"
            f" {report.stats(fast_periods)} s: min {min(delays):.2f} s, median"
            f" {statistics.median(delays):.2f} s, max {max(delays):.2f} s."
            if delays
            else "Not measured at the fine period."
        ),
        (
            f" Over {len(coarse)} old pods sampled at the slow period only (both in one sample):"
            f" min {min(coarse):.2f} s, median {statistics.median(coarse):.2f} s, max"
            f" {max(coarse):.2f} s."
            if coarse
            else ""
        ),
        "",
        "## What the agent said of the two peers behind one Service",
        "",
        "Each old pod's agent's `/status` (`registry.client_view`), read just before the restart:",
        "",
        *agent_peer_lines(runs),
        "",
    ]
    lines += sleep_section(found, scaled, search)
    if search:
        lines += [
            "",
            *report.failure_rows(search, titles),
            "",
            *report.moment_rows(search, titles),
        ]
    lines += ["", "## Unscaled production timings", ""]
    if production:
        lines += [
            f"Server cache {PRODUCTION.server_cache:g} s, fetch {PRODUCTION.client_fetch:g} s,"
            f" LoadBalancer cache {PRODUCTION.balancer_cache:g} s, `minReadySeconds` 30, grace"
            f" period {PRODUCTION.grace} s; agent PRESTOP_EUREKA_SERVER_CACHE_SECONDS=30,"
            " PRESTOP_EUREKA_CLIENT_REFRESH_SECONDS=65.",
            "",
            *report.failure_rows(production, titles),
            "",
            *report.moment_rows(production, titles),
        ]
    else:
        lines.append("Not measured in this report.")
    lines += ["", "## Set-up times", ""]
    lines += [
        f"- {s['label']}: " + ", ".join(f"{k} {v:g} s" for k, v in s["seconds"].items())
        for s in setups  # type: ignore[union-attr]
    ] or ["Not recorded."]
    lines += ["", "## Every rollout", "", *report.run_rows(runs), ""]
    (RESULTS / "rollout.md").write_text("\n".join(lines))
    shown = [*scaled, *search] or runs
    if shown:
        report.plot(shown, titles, str(RESULTS / "rollout.png"))


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--runs", type=int, default=3, help="rollouts per scenario")
    parser.add_argument("--scenarios", default="none,classic,sleep,fixed,traffic,native")
    parser.add_argument(
        "--search", default="8,9,10", help="classic-hook sleeps to try, s ('' for none)"
    )
    parser.add_argument("--search-runs", type=int, default=2)
    parser.add_argument(
        "--no-production",
        dest="production",
        action="store_false",
        help="skip the one rollout of scenario 5 with unscaled timings",
    )
    parser.add_argument("--report-only", action="store_true")
    parser.add_argument("--reset", action="store_true", help="forget earlier runs")
    args = parser.parse_args(argv)
    if os.geteuid() != 0 and not args.report_only:
        print("bench-rollout needs root (it runs a cluster)", file=sys.stderr)
        return 2
    RESULTS.mkdir(parents=True, exist_ok=True)
    raw: dict[str, object] = {} if args.reset or not RAW.exists() else json.loads(RAW.read_text())
    if not args.report_only:
        raw["date"] = dt.datetime.now(dt.UTC).strftime("%Y-%m-%d %H:%M UTC")
        raw["machine"] = machine()
        chosen = scenarios(SCALED)
        order = [(chosen[k], args.runs) for k in args.scenarios.split(",") if k and args.runs]
        order += [(classic_sleep(float(s)), args.search_runs) for s in args.search.split(",") if s]
        if order:
            run_cluster(SCALED, order, "scaled", raw)
        if args.production:
            run_cluster(PRODUCTION, [(scenarios(PRODUCTION)["traffic"], 1)], "production", raw)
    write_report(raw)
    print((RESULTS / "rollout.md").read_text())
    return 0


if __name__ == "__main__":
    sys.exit(main())
