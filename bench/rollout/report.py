"""Figures of the rolling-replacement benchmark: per run, per scenario and caller, the table in
``bench/results/rollout.md`` and the plot in ``bench/results/rollout.png``."""

from __future__ import annotations

import math
import statistics
from collections import Counter
from collections.abc import Iterable
from dataclasses import asdict, dataclass
from typing import Any

from bench.rollout.rig import CALLERS, OK, Replacement


@dataclass(frozen=True)
class RunFigures:
    """One replacement, reduced to what the report shows (seconds are after the trigger)."""

    scenario: str
    label: str
    """Which set of runs: ``scaled``, ``search`` or ``production``."""
    pod: str
    started: float
    """Epoch seconds of the trigger (the pod's deletion)."""
    termination: float
    """Deletion to the last container's exit (containerd's time)."""
    grace: int
    down_visible: float | None
    """Deletion to Eureka's client-facing view no longer listing the replica UP."""
    last_served: float | None
    """Deletion to the end of the last request the replica answered."""
    last_sent: float | None
    """Deletion to the send time of the last request any caller aimed at the replica, answered
    or not: when the slowest caller's view dropped it. A hook that marks the replica DOWN at the
    trigger must hold its app at least this long, or this run fails requests."""
    app_signalled: float | None
    """Deletion to the kubelet's SIGTERM to the app container: how long the hook held it."""
    sent: dict[str, int]
    failed: dict[str, dict[str, int]]
    """Per caller: failure kind (status or exception class) -> count."""
    grace_exceeded: bool
    """The kubelet logged that the hook outlived the grace period."""
    points: dict[str, list[tuple[float, int]]]
    """Per caller: (send time after the trigger, 0 = ok elsewhere / 1 = ok to the replica /
    2 = failed) for the plot."""

    @property
    def failures(self) -> int:
        return sum(sum(kinds.values()) for kinds in self.failed.values())


def figures(replacement: Replacement, label: str) -> RunFigures:
    trigger = replacement.deleted_at
    served = [
        r["t"] + r["ms"] / 1000
        for records in replacement.records.values()
        for r in records
        if r["target"] == replacement.target and r["outcome"] == OK
    ]
    aimed = [
        r["t"]
        for records in replacement.records.values()
        for r in records
        if r["target"] == replacement.target
    ]
    signalled = [e.at for e in replacement.timeline if e.what == "kill" and e.container == "app"]
    points = {
        caller: [
            (
                round(r["t"] - trigger, 3),
                2 if r["outcome"] != OK else int(r["target"] == replacement.target),
            )
            for r in records
        ]
        for caller, records in replacement.records.items()
    }
    return RunFigures(
        scenario=replacement.scenario,
        label=label,
        pod=replacement.pod,
        started=trigger,
        termination=round(replacement.gone_at - trigger, 3),
        grace=replacement.grace,
        down_visible=(
            None
            if replacement.down_visible_at is None
            else round(replacement.down_visible_at - trigger, 3)
        ),
        last_served=round(max(served) - trigger, 3) if served else None,
        last_sent=round(max(aimed) - trigger, 3) if aimed else None,
        app_signalled=round(min(signalled) - trigger, 3) if signalled else None,
        sent={c: len(records) for c, records in replacement.records.items()},
        failed={
            c: dict(Counter(r["outcome"] for r in records if r["outcome"] != OK))
            for c, records in replacement.records.items()
        },
        grace_exceeded=any(e.what == "grace_exceeded" for e in replacement.timeline),
        points=points,
    )


def to_json(run: RunFigures) -> dict[str, Any]:
    return asdict(run)


def from_json(data: dict[str, Any]) -> RunFigures:
    data = dict(data)
    data["points"] = {c: [tuple(p) for p in ps] for c, ps in data["points"].items()}
    return RunFigures(**data)


# ---------------------------------------------------------------------------------- table


def _stats(values: Iterable[float | None]) -> str:
    found = [v for v in values if v is not None]
    if not found:
        return "-"
    if len(found) == 1:
        return f"{found[0]:.1f}"
    return f"{statistics.mean(found):.1f} ({min(found):.1f}-{max(found):.1f})"


def _kinds(runs: list[RunFigures], caller: str) -> str:
    total: Counter[str] = Counter()
    for run in runs:
        total.update(run.failed.get(caller, {}))
    return ", ".join(f"{k} {n}" for k, n in total.most_common()) or "-"


def _order(key: str, titles: dict[str, str]) -> tuple[float, str]:
    """Scenarios by their number (the titles start with it), searched sleeps by length."""
    if key.startswith("classic-"):
        return float(key.split("-", 1)[1]), ""
    return 0.0, titles.get(key, key)


def scenario_rows(runs: list[RunFigures], titles: dict[str, str]) -> list[str]:
    """One row per scenario and caller: runs, requests, failures (runs with any), kinds, and
    the scenario's hook, termination, DOWN-visible, last-sent and last-served times (mean
    (min-max), s)."""
    rows = [
        "| scenario | caller | runs | requests | failed | runs with failures | kinds"
        " | hook held s | termination s | DOWN visible s | last request sent s"
        " | last request served s |",
        "|---|---|---|---|---|---|---|---|---|---|---|---|",
    ]
    by_scenario: dict[str, list[RunFigures]] = {}
    for run in runs:
        by_scenario.setdefault(run.scenario, []).append(run)
    for key, group in sorted(by_scenario.items(), key=lambda item: _order(item[0], titles)):
        for index, caller in enumerate(c for c in CALLERS if c in group[0].sent):
            sent = sum(r.sent.get(caller, 0) for r in group)
            failed = sum(sum(r.failed.get(caller, {}).values()) for r in group)
            bad_runs = sum(1 for r in group if sum(r.failed.get(caller, {}).values()))
            times = (
                [
                    _stats(r.app_signalled for r in group),
                    _stats(r.termination for r in group),
                    _stats(r.down_visible for r in group),
                    _stats(r.last_sent for r in group),
                    _stats(r.last_served for r in group),
                ]
                if index == 0
                else ["", "", "", "", ""]
            )
            name = titles.get(key, key) if index == 0 else ""
            rows.append(
                f"| {name} | {caller} | {len(group)} | {sent} | {failed} | {bad_runs}"
                f" | {_kinds(group, caller)} | " + " | ".join(times) + " |"
            )
    return rows


def run_rows(runs: list[RunFigures]) -> list[str]:
    rows = [
        "| run | scenario | failed busy/slow/fresh | hook held s | termination s"
        " | DOWN visible s | last sent s | last served s | grace exceeded |",
        "|---|---|---|---|---|---|---|---|---|",
    ]
    for index, run in enumerate(runs, 1):
        failed = "/".join(
            str(sum(run.failed[c].values())) if c in run.failed else "-" for c in CALLERS
        )
        held, down, sent, served = (
            "-" if value is None else f"{value:.2f}"
            for value in (run.app_signalled, run.down_visible, run.last_sent, run.last_served)
        )
        rows.append(
            f"| {index} | {run.scenario} | {failed} | {held} | {run.termination:.2f} | {down}"
            f" | {sent} | {served} | {'yes' if run.grace_exceeded else 'no'} |"
        )
    return rows


# Scenarios whose hook marks the replica DOWN at the trigger: in each, a caller's last request to
# the replica shows how long after the trigger its view still held it.
MARKS_DOWN_AT_TRIGGER = ("classic", "fixed", "traffic", "native")


def marks_down_at_trigger(run: RunFigures) -> bool:
    return run.scenario.split("-", 1)[0] in MARKS_DOWN_AT_TRIGGER


@dataclass(frozen=True)
class SleepSearch:
    """The shortest fixed sleep (classic hook: DOWN, then sleep) that fails no request.

    Two kinds of evidence, both needed: the runs of each sleep tried, and every run of a
    scenario that marks DOWN at the trigger, whose ``last_sent`` says how long a hook that run
    needed. A sleep of S holds the app ``S + overhead`` after the deletion, so it fails a run in
    which a caller still sent to the replica later than that."""

    rows: list[tuple[float, int, int, int]]
    """Per whole-second sleep: (seconds, runs of it, of those with failures, measured runs that
    needed longer)."""
    measured: int
    """Runs whose ``last_sent`` was measured."""
    overhead: float
    """Deletion to SIGTERM beyond the sleep itself (the kubelet noticing the deletion, bash
    starting): the median over the sleeps' own runs, s."""
    needed_max: float | None
    shortest: float | None


def sleep_search(runs: list[RunFigures]) -> SleepSearch:
    """Whole seconds: Kubernetes' preStop.sleep takes whole seconds, and so do the hooks people
    write. The shortest is the first sleep from which on every longer one is clean too."""
    tried: dict[float, tuple[int, int]] = {}
    extra: list[float] = []
    for run in runs:
        if run.scenario.startswith("classic-"):
            seconds = float(run.scenario.split("-", 1)[1])
            count, bad = tried.get(seconds, (0, 0))
            tried[seconds] = (count + 1, bad + int(run.failures > 0))
            if run.app_signalled is not None:
                extra.append(run.app_signalled - seconds)
    overhead = statistics.median(extra) if extra else 0.0
    needed = [r.last_sent for r in runs if marks_down_at_trigger(r) and r.last_sent is not None]
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


def plot(runs: list[RunFigures], titles: dict[str, str], path: str) -> None:
    """One panel per scenario (its run with the most failures, else its first): every request
    by send time after the trigger, one row per caller; grey = answered by another replica,
    blue = answered by the terminating one, red x = failed. Lines: DOWN visible, pod gone."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    by_scenario: dict[str, list[RunFigures]] = {}
    for run in runs:
        by_scenario.setdefault(run.scenario, []).append(run)
    keys = sorted(by_scenario, key=lambda key: _order(key, titles))
    fig, axes = plt.subplots(len(keys), 1, figsize=(10, 1.7 * len(keys) + 0.6), sharex=True)
    axes = [axes] if len(keys) == 1 else list(axes)
    colours = {0: "0.75", 1: "tab:blue"}
    for ax, key in zip(axes, keys, strict=True):
        shown = max(by_scenario[key], key=lambda r: r.failures)
        for row, caller in enumerate(c for c in CALLERS if c in shown.points):
            for kind in (0, 1):
                xs = [t for t, k in shown.points[caller] if k == kind]
                ax.scatter(xs, [row] * len(xs), s=4, c=colours[kind], marker="|", linewidths=0.6)
            bad = [t for t, k in shown.points[caller] if k == 2]
            ax.scatter(bad, [row] * len(bad), s=22, c="tab:red", marker="x", linewidths=1.0)
        ax.axvline(0, color="k", linewidth=0.8)
        if shown.down_visible is not None:
            ax.axvline(shown.down_visible, color="tab:orange", linestyle="--", linewidth=0.9)
        ax.axvline(shown.termination, color="tab:green", linestyle="-.", linewidth=0.9)
        callers = [c for c in CALLERS if c in shown.points]
        ax.set_yticks(range(len(callers)), callers)
        ax.set_ylim(-0.6, len(callers) - 0.4)
        ax.set_title(
            f"{titles.get(key, key)}: {shown.failures} failed, pod gone after"
            f" {shown.termination:.1f} s",
            fontsize=9,
            loc="left",
        )
    axes[-1].set_xlim(-4, max(r.termination for r in runs) + 8)
    axes[-1].set_xlabel(
        "seconds after the pod's deletion (black); orange --: DOWN visible to clients;"
        " green -.: pod gone. grey: served by another replica, blue: by the terminating one,"
        " red x: failed",
        fontsize=7,
    )
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)
