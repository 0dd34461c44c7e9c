"""Figures of the rollout benchmark: per ``kubectl rollout restart``, per scenario, caller and
side, the tables in ``bench/results/rollout.md`` and the plot in ``bench/results/rollout.png``."""

from __future__ import annotations

import math
import statistics
from collections import Counter
from collections.abc import Iterable
from dataclasses import asdict, dataclass, field
from typing import Any

from bench.rollout.deployment import (
    EUREKA_CALLERS,
    SERVICE_CALLERS,
    STARTUP,
    TERMINATION,
    PodEnd,
    Rollout,
)
from bench.rollout.rig import OK

CALLERS = (*EUREKA_CALLERS, *SERVICE_CALLERS)
SIDES = (TERMINATION, STARTUP)
# Per-pod moments, seconds after the pod's deletion, in the order the tables show them.
MOMENTS = (
    ("hook_held", "hook held"),
    ("down_visible_first", "DOWN visible, first peer"),
    ("down_visible", "DOWN visible, every peer"),
    ("endpoint_not_ready", "endpoint not ready"),
    ("endpoint_removed", "endpoint removed"),
    ("proxy_dropped", "kube-proxy dropped the IP"),
    ("last_sent", "last request sent"),
    ("last_served", "last request served"),
    ("gone", "pod gone"),
)
# Plot codes: answered by a pod not being replaced, by an old (terminating) one, failed on the
# termination side, failed on the start-up side.
OTHER, OLD, FAILED_TERMINATION, FAILED_STARTUP = 0, 1, 2, 3


@dataclass(frozen=True)
class PodFigures:
    """One old pod's end, seconds after its deletion (None: not seen)."""

    name: str
    deleted: float
    """Seconds after the restart that the Deployment controller deleted it."""
    hook_held: float | None
    """The preStop hook's start to its answer (the kubelet's log)."""
    hook_answered: float | None
    """Deletion to the hook's answer: how long the hook held the app from the deletion."""
    down_visible_first: float | None
    down_visible: float | None
    endpoint_not_ready: float | None
    endpoint_removed: float | None
    proxy_dropped: float | None
    last_sent: float | None
    """The send time of the last request an Eureka caller aimed at the pod, answered or not:
    when the slowest Eureka caller's view dropped it."""
    last_served: float | None
    gone: float | None
    agent_peers: dict[str, str] | None = None


@dataclass(frozen=True)
class RolloutFigures:
    """One ``kubectl rollout restart``, reduced to what the report shows."""

    scenario: str
    label: str
    """``scaled`` or ``production``."""
    restarted: float
    """Epoch seconds of the restart."""
    complete: float
    """Restart to ``kubectl rollout status`` returning, s."""
    grace: int
    pods: list[PodFigures]
    sent: dict[str, int]
    failed: dict[str, dict[str, dict[str, int]]]
    """caller -> side -> failure kind -> count."""
    watch_period: float = 0.0
    """The watcher's mean time between samples of the pods and Eureka's views, s."""
    fast_watch_period: float = 0.0
    """Its mean time between samples of the EndpointSlices and kube-proxy's rules, s."""
    points: dict[str, list[tuple[float, int]]] = field(default_factory=dict)
    """Per caller: (send time after the restart, plot code) for the plot."""

    def failures(self, callers: Iterable[str] = CALLERS, sides: Iterable[str] = SIDES) -> int:
        sides = tuple(sides)
        return sum(
            sum(self.failed.get(c, {}).get(side, {}).values()) for c in callers for side in sides
        )


def _after(value: float | None, base: float) -> float | None:
    return None if value is None else round(value - base, 3)


def _pod(end: PodEnd, restarted: float) -> PodFigures:
    base = end.deleted or restarted
    held = (
        round(end.hook_answered - end.hook_started, 3)
        if end.hook_started is not None and end.hook_answered is not None
        else None
    )
    return PodFigures(
        name=end.name,
        deleted=round(base - restarted, 3),
        hook_held=held,
        hook_answered=_after(end.hook_answered, base),
        down_visible_first=_after(end.down_visible_first, base),
        down_visible=_after(end.down_visible, base),
        endpoint_not_ready=_after(end.endpoint_not_ready, base),
        endpoint_removed=_after(end.endpoint_removed, base),
        proxy_dropped=_after(end.proxy_dropped, base),
        last_sent=_after(end.last_sent, base),
        last_served=_after(end.last_served, base),
        gone=_after(end.gone, base),
        agent_peers=end.agent_peers,
    )


def figures(rollout: Rollout, label: str) -> RolloutFigures:
    failed = rollout.failed
    old = {f"{end.ip}" for end in rollout.old}
    ending = [
        (end.deleted or rollout.restarted, (end.gone or rollout.complete) + 5.0)
        for end in rollout.old
    ]

    def code(caller: str, record: dict[str, Any]) -> int:
        if record["outcome"] == OK:
            return OLD if record["target"].split(":")[0] in old else OTHER
        if caller in SERVICE_CALLERS:
            terminating = any(start <= record["t"] <= end for start, end in ending)
        else:
            terminating = record["target"].split(":")[0] in old
        return FAILED_TERMINATION if terminating else FAILED_STARTUP

    return RolloutFigures(
        scenario=rollout.scenario,
        label=label,
        restarted=rollout.restarted,
        complete=round(rollout.complete - rollout.restarted, 3),
        grace=rollout.grace,
        pods=[_pod(end, rollout.restarted) for end in rollout.old],
        sent=rollout.sent,
        failed=failed,
        watch_period=round(rollout.watch_period, 3),
        fast_watch_period=round(rollout.fast_watch_period, 3),
        points={
            caller: [(round(r["t"] - rollout.restarted, 3), code(caller, r)) for r in records]
            for caller, records in rollout.records.items()
        },
    )


def to_json(run: RolloutFigures) -> dict[str, Any]:
    return asdict(run)


def from_json(data: dict[str, Any]) -> RolloutFigures:
    data = dict(data)
    data["pods"] = [PodFigures(**pod) for pod in data["pods"]]
    data["points"] = {c: [tuple(p) for p in ps] for c, ps in data.get("points", {}).items()}
    return RolloutFigures(**data)


# ---------------------------------------------------------------------------------- tables


def stats(values: Iterable[float | None]) -> str:
    """mean (min-max) of the values measured, ``-`` with none."""
    found = [v for v in values if v is not None]
    if not found:
        return "-"
    if len(found) == 1:
        return f"{found[0]:.1f}"
    return f"{statistics.mean(found):.1f} ({min(found):.1f}-{max(found):.1f})"


def _kinds(runs: list[RolloutFigures], caller: str, side: str) -> str:
    total: Counter[str] = Counter()
    for run in runs:
        total.update(run.failed.get(caller, {}).get(side, {}))
    return ", ".join(f"{k} {n}" for k, n in total.most_common())


def _order(key: str, titles: dict[str, str]) -> tuple[float, str]:
    """Scenarios by their number (the titles start with it), searched sleeps by length."""
    if key.startswith("classic-"):
        return float(key.split("-", 1)[1]), ""
    return 0.0, titles.get(key, key)


def by_scenario(
    runs: list[RolloutFigures], titles: dict[str, str]
) -> list[tuple[str, list[RolloutFigures]]]:
    grouped: dict[str, list[RolloutFigures]] = {}
    for run in runs:
        grouped.setdefault(run.scenario, []).append(run)
    return sorted(grouped.items(), key=lambda item: _order(item[0], titles))


def failure_rows(runs: list[RolloutFigures], titles: dict[str, str]) -> list[str]:
    """Per scenario and caller: rollouts, requests, and the failed requests per side (total,
    rollouts with any, kinds)."""
    rows = [
        "| scenario | caller | rollouts | requests | failed, termination side"
        " | failed, start-up side | rollouts with failures |",
        "|---|---|---|---|---|---|---|",
    ]
    for key, group in by_scenario(runs, titles):
        for index, caller in enumerate(c for c in CALLERS if c in group[0].sent):
            sent = sum(r.sent.get(caller, 0) for r in group)
            cells = []
            for side in SIDES:
                count = sum(r.failures([caller], [side]) for r in group)
                kinds = _kinds(group, caller, side)
                cells.append(f"**{count}** ({kinds})" if count else "0")
            bad = sum(1 for r in group if r.failures([caller]))
            name = titles.get(key, key) if index == 0 else ""
            rows.append(
                f"| {name} | {caller} | {len(group)} | {sent} | {cells[0]} | {cells[1]}"
                f" | {bad} of {len(group)} |"
            )
    return rows


def moment_rows(runs: list[RolloutFigures], titles: dict[str, str]) -> list[str]:
    """Per scenario: restart to complete, and each per-pod moment (mean (min-max) over every
    old pod of its rollouts, seconds after the pod's deletion)."""
    rows = [
        "| scenario | old pods | restart to complete s | "
        + " | ".join(f"{title} s" for _, title in MOMENTS)
        + " |",
        "|---|---|---|" + "---|" * len(MOMENTS),
    ]
    for key, group in by_scenario(runs, titles):
        pods = [pod for run in group for pod in run.pods]
        cells = [stats(getattr(pod, name) for pod in pods) for name, _ in MOMENTS]
        rows.append(
            f"| {titles.get(key, key)} | {len(pods)} | {stats(r.complete for r in group)} | "
            + " | ".join(cells)
            + " |"
        )
    return rows


def proxy_delays(runs: list[RolloutFigures]) -> list[float]:
    """Per old pod: its EndpointSlice endpoint turning not ready (terminating) to its address
    leaving kube-proxy's rules on the node, s."""
    return [
        round(pod.proxy_dropped - pod.endpoint_not_ready, 3)
        for run in runs
        for pod in run.pods
        if pod.proxy_dropped is not None and pod.endpoint_not_ready is not None
    ]


def run_rows(runs: list[RolloutFigures]) -> list[str]:
    rows = [
        "| # | scenario | timings | restart to complete s | failed termination side "
        + "/".join(CALLERS)
        + " | failed start-up side "
        + "/".join(CALLERS)
        + " | hook held s (per pod) | last sent s (per pod) | pod gone s (per pod) |",
        "|---|---|---|---|---|---|---|---|---|",
    ]

    def per_pod(values: Iterable[float | None]) -> str:
        return ", ".join("-" if v is None else f"{v:.1f}" for v in values)

    for index, run in enumerate(runs, 1):
        sides = [
            "/".join(str(run.failures([c], [side])) if c in run.sent else "-" for c in CALLERS)
            for side in SIDES
        ]
        rows.append(
            f"| {index} | {run.scenario} | {run.label} | {run.complete:.1f} | {sides[0]}"
            f" | {sides[1]} | {per_pod(p.hook_held for p in run.pods)}"
            f" | {per_pod(p.last_sent for p in run.pods)} | {per_pod(p.gone for p in run.pods)} |"
        )
    return rows


# Scenarios whose hook marks the replica DOWN at the trigger: in each, an Eureka caller's last
# request to a pod shows how long after its deletion the slowest caller's view still held it.
MARKS_DOWN_AT_TRIGGER = ("classic", "fixed", "traffic", "native")


def marks_down_at_trigger(run: RolloutFigures) -> bool:
    return run.scenario.split("-", 1)[0] in MARKS_DOWN_AT_TRIGGER


@dataclass(frozen=True)
class SleepSearch:
    """The shortest fixed sleep (classic hook: DOWN, then sleep) that fails no request of the
    Eureka callers on the termination side (what a sleep is for; the Service path's failures
    come at the app's SIGTERM whatever the sleep, and are reported per scenario).

    Two kinds of evidence, both needed: the rollouts of each sleep tried, and every old pod of a
    scenario that marks DOWN at the trigger, whose ``last_sent`` says how long a hook that pod
    needed. A sleep of S holds the app ``S + overhead`` after the deletion, so it fails a pod
    whose callers still sent to it later than that."""

    rows: list[tuple[float, int, int, int]]
    """Per whole-second sleep: (seconds, rollouts of it, of those with failures, measured pods
    that needed longer)."""
    measured: int
    """Old pods whose ``last_sent`` was measured."""
    overhead: float
    """Deletion to the hook's answer beyond the sleep itself (the kubelet noticing the deletion,
    bash starting, the DOWN request): the median over the sleeps' own pods, s."""
    needed_max: float | None
    shortest: float | None


def sleep_search(runs: list[RolloutFigures]) -> SleepSearch:
    """Whole seconds: Kubernetes' preStop.sleep takes whole seconds, and so do the hooks people
    write. The shortest is the first sleep from which on every longer one is clean too."""
    tried: dict[float, tuple[int, int]] = {}
    extra: list[float] = []
    for run in runs:
        if run.scenario.startswith("classic-"):
            seconds = float(run.scenario.split("-", 1)[1])
            count, bad = tried.get(seconds, (0, 0))
            failed = run.failures(EUREKA_CALLERS, [TERMINATION]) > 0
            tried[seconds] = (count + 1, bad + int(failed))
            extra += [p.hook_answered - seconds for p in run.pods if p.hook_answered is not None]
    overhead = statistics.median(extra) if extra else 0.0
    needed = [
        pod.last_sent
        for run in runs
        if marks_down_at_trigger(run)
        for pod in run.pods
        if pod.last_sent is not None
    ]
    if not tried and not needed:
        return SleepSearch([], 0, overhead, None, None)
    top = max([*tried, math.ceil(max(needed, default=0.0) - overhead)])
    low = min([*tried, top])
    rows = []
    for seconds in range(math.floor(low), math.ceil(top) + 1):
        count, bad = tried.get(float(seconds), (0, 0))
        longer = sum(1 for n in needed if n > seconds + overhead)
        rows.append((float(seconds), count, bad, longer))
    shortest = next(
        (
            seconds
            for index, (seconds, _, _, _) in enumerate(rows)
            if all(bad == longer == 0 for _, _, bad, longer in rows[index:])
        ),
        None,
    )
    return SleepSearch(rows, len(needed), overhead, max(needed, default=None), shortest)


# ----------------------------------------------------------------------------------- plot


def plot(runs: list[RolloutFigures], titles: dict[str, str], path: str) -> None:
    """One panel per scenario (its rollout with the most failures, else its first): every
    request of every caller by send time after the restart, one row per caller; grey =
    answered by a pod not being replaced, blue = by an old pod, red x = failed on the
    termination side, purple + = failed on the start-up side. Lines: each old pod's deletion
    (black) and end (green)."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    groups = by_scenario(runs, titles)
    fig, axes = plt.subplots(len(groups), 1, figsize=(11, 2.1 * len(groups) + 0.7), sharex=True)
    axes = [axes] if len(groups) == 1 else list(axes)
    right = 0.0
    for ax, (key, group) in zip(axes, groups, strict=True):
        shown = max(group, key=lambda r: r.failures())
        callers = [c for c in CALLERS if c in shown.points]
        for row, caller in enumerate(callers):
            points = shown.points[caller]
            for kind, colour in ((OTHER, "0.75"), (OLD, "tab:blue")):
                xs = [t for t, k in points if k == kind]
                ax.scatter(xs, [row] * len(xs), s=4, c=colour, marker="|", linewidths=0.6)
            for kind, colour, marker in (
                (FAILED_TERMINATION, "tab:red", "x"),
                (FAILED_STARTUP, "tab:purple", "+"),
            ):
                xs = [t for t, k in points if k == kind]
                ax.scatter(xs, [row] * len(xs), s=24, c=colour, marker=marker, linewidths=1.0)
        for pod in shown.pods:
            ax.axvline(pod.deleted, color="k", linewidth=0.8)
            if pod.gone is not None:
                ax.axvline(pod.deleted + pod.gone, color="tab:green", linestyle="-.", lw=0.9)
                right = max(right, pod.deleted + pod.gone)
        ax.set_yticks(range(len(callers)), callers)
        ax.set_ylim(-0.6, len(callers) - 0.4)
        ax.set_title(
            f"{titles.get(key, key)} ({shown.label}): failed"
            f" {shown.failures(sides=[TERMINATION])} termination side,"
            f" {shown.failures(sides=[STARTUP])} start-up side;"
            f" restart to complete {shown.complete:.0f} s",
            fontsize=9,
            loc="left",
        )
    axes[-1].set_xlim(-3, right + 8)
    axes[-1].set_xlabel(
        "seconds after `kubectl rollout restart`; black: an old pod deleted, green -.: it is"
        " gone. grey: served by a pod not being replaced, blue: by an old pod, red x: failed"
        " (termination side), purple +: failed (start-up side)",
        fontsize=7,
    )
    fig.tight_layout()
    fig.savefig(path, dpi=100)
    plt.close(fig)
