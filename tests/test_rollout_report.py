"""The rollout benchmark's report (bench/rollout/): the search for the shortest safe fixed
sleep, failures by caller and side, the per-pod figures and kube-proxy's sync delay."""

from __future__ import annotations

import pytest

from bench.rollout.deployment import STARTUP, TERMINATION, PodEnd, Rollout, classify
from bench.rollout.report import (
    FAILED_STARTUP,
    FAILED_TERMINATION,
    OLD,
    OTHER,
    PodFigures,
    RolloutFigures,
    figures,
    from_json,
    proxy_delays,
    sleep_search,
    to_json,
)


def pod(last_sent: float | None, answered: float | None = None) -> PodFigures:
    return PodFigures(
        name="demo-app-old",
        deleted=5.0,
        hook_held=answered,
        hook_answered=answered,
        down_visible_first=1.0,
        down_visible=1.5,
        endpoint_not_ready=0.3,
        endpoint_removed=12.0,
        proxy_dropped=0.8,
        last_sent=last_sent,
        last_served=last_sent,
        gone=12.0,
    )


def run(
    scenario: str,
    last_sent: float | None,
    failures: int = 0,
    held: float | None = None,
    caller: str = "busy",
    side: str = TERMINATION,
) -> RolloutFigures:
    """A rollout whose one old pod an Eureka caller last sent to ``last_sent`` s after its
    deletion, with ``failures`` failed requests of ``caller`` on ``side``."""
    return RolloutFigures(
        scenario=scenario,
        label="scaled",
        restarted=0.0,
        complete=60.0,
        grace=30,
        pods=[pod(last_sent, held)],
        sent={"busy": 100, "pooled": 100},
        failed={caller: {side: {"ResourceAccessException": failures} if failures else {}}},
    )


def test_a_sleep_whose_own_runs_were_clean_still_fails_if_another_run_needed_longer() -> None:
    runs = [
        run("classic-7", 6.1),
        run("classic-7", 5.0),
        run("classic-8", 6.5),
        run("traffic", 7.4),  # a caller sent to the replica 7.4 s after the trigger
        run("native", 5.5),
    ]
    found = sleep_search(runs)
    assert found.rows == [(7.0, 2, 0, 1), (8.0, 1, 0, 0)]
    assert found.measured == 5
    assert found.needed_max == 7.4
    assert found.shortest == 8.0


def test_a_failing_longer_sleep_rules_out_every_shorter_one() -> None:
    runs = [run("classic-6", 5.0), run("classic-7", 8.2, failures=3), run("classic-9", 8.0)]
    found = sleep_search(runs)
    assert [row[0] for row in found.rows] == [6.0, 7.0, 8.0, 9.0]
    assert found.rows[2] == (8.0, 0, 0, 1)  # never tried, but run 2 needed 8.2 s
    assert found.shortest == 9.0


def test_scenarios_that_do_not_mark_down_at_the_trigger_are_not_evidence() -> None:
    # With no hook or a bare preStop.sleep, the status changes at SIGTERM, not at the trigger.
    found = sleep_search([run("classic-7", 6.0), run("none", 9.0), run("sleep", 9.5)])
    assert found.measured == 1
    assert found.shortest == 7.0


def test_a_failed_run_still_tells_how_long_it_needed() -> None:
    # The callers kept choosing the replica until their views dropped it, failing or not.
    found = sleep_search([run("classic-7", 7.5, failures=2)])
    assert found.rows == [(7.0, 1, 1, 1), (8.0, 0, 0, 0)]
    assert found.shortest == 8.0


def test_when_the_longest_sleep_tried_failed_there_is_no_answer() -> None:
    found = sleep_search([run("classic-9", 8.5, failures=1)])
    assert found.rows == [(9.0, 1, 1, 0)]
    assert found.shortest is None


def test_a_sleep_is_held_to_what_it_really_holds_after_the_deletion() -> None:
    # The 7 s sleep's SIGTERM came 0.2 s after its 7 s (the kubelet noticing the deletion, bash
    # starting): a caller's request at 7.1 s was still served, one at 7.3 s would not be.
    runs = [run("classic-7", 6.0, held=7.2), run("classic-7", 6.5, held=7.2)]
    assert sleep_search([*runs, run("traffic", 7.1)]).shortest == 7.0
    found = sleep_search([*runs, run("traffic", 7.3)])
    assert found.overhead == pytest.approx(0.2)
    assert found.rows[0] == (7.0, 2, 0, 1)
    assert found.shortest == 8.0


# --- bench/rollout/deployment.py: failures by caller and side --------------------------------


def test_only_the_eureka_callers_termination_side_rules_a_sleep_out() -> None:
    # A pooled Service caller loses its kept-alive connections at the app's SIGTERM whatever
    # the sleep, and a start-up-side failure is not the old pod's: neither is the sleep's fault.
    runs = [
        run("classic-7", 6.0, failures=4, caller="pooled"),
        run("classic-7", 6.0, failures=2, side=STARTUP),
    ]
    assert sleep_search(runs).rows == [(7.0, 2, 0, 0)]
    assert sleep_search([*runs, run("classic-7", 6.0, failures=1)]).rows == [(7.0, 3, 1, 0)]


def _rollout(records: dict[str, list[dict[str, object]]]) -> Rollout:
    old = [PodEnd("demo-app-old", "10.0.0.5", deleted=100.0, gone=112.0)]
    return Rollout("traffic", 99.0, 130.0, 30, old, ["demo-app-new"], records)  # type: ignore[arg-type]


def test_eureka_callers_failures_are_sided_by_the_instance_they_named() -> None:
    rollout = _rollout(
        {
            "busy": [
                {"t": 101.0, "target": "10.0.0.5:8080", "outcome": "ResourceAccessException"},
                {"t": 102.0, "target": "10.0.0.9:8080", "outcome": "ResourceAccessException"},
                {"t": 103.0, "target": "", "outcome": "NoInstance"},
                {"t": 104.0, "target": "10.0.0.5:8080", "outcome": "200"},
            ]
        }
    )
    failed = classify(rollout)
    assert failed["busy"] == {
        TERMINATION: {"ResourceAccessException": 1},
        STARTUP: {"ResourceAccessException": 1, "NoInstance": 1},
    }


def test_service_callers_failures_are_sided_by_whether_an_old_pod_was_ending() -> None:
    rollout = _rollout(
        {
            "perconn": [
                {"t": 99.5, "target": "10.1.0.10:80", "outcome": "ConnectionRefusedError"},
                {"t": 110.0, "target": "10.1.0.10:80", "outcome": "ConnectionRefusedError"},
                # Up to 5 s after the old pod is gone still counts as its end (kube-proxy lags).
                {"t": 116.5, "target": "10.1.0.10:80", "outcome": "TimeoutError"},
                {"t": 118.0, "target": "10.1.0.10:80", "outcome": "TimeoutError"},
            ]
        }
    )
    failed = classify(rollout)
    assert failed["perconn"] == {
        TERMINATION: {"ConnectionRefusedError": 1, "TimeoutError": 1},
        STARTUP: {"ConnectionRefusedError": 1, "TimeoutError": 1},
    }
    assert rollout.failures("perconn", TERMINATION) == 2


def test_a_rollout_is_reduced_to_sided_failures_plot_codes_and_per_pod_moments() -> None:
    rollout = _rollout(
        {
            "busy": [
                {"t": 100.5, "target": "10.0.0.5:8080", "outcome": "200"},
                {"t": 101.0, "target": "10.0.0.9:8080", "outcome": "200"},
                {"t": 102.0, "target": "10.0.0.5:8080", "outcome": "ResourceAccessException"},
                {"t": 103.0, "target": "", "outcome": "NoInstance"},
            ],
            "pooled": [{"t": 113.0, "target": "10.1.0.10:80", "outcome": "RemoteDisconnected"}],
        }
    )
    end = rollout.old[0]
    end.hook_started, end.hook_answered = 100.2, 107.2
    end.endpoint_not_ready, end.proxy_dropped = 100.5, 101.25
    figures_ = figures(rollout, "scaled")
    assert figures_.complete == 31.0
    assert figures_.points["busy"] == [
        (1.5, OLD),
        (2.0, OTHER),
        (3.0, FAILED_TERMINATION),
        (4.0, FAILED_STARTUP),
    ]
    assert figures_.points["pooled"] == [(14.0, FAILED_TERMINATION)]
    assert figures_.failures(["busy"], [TERMINATION]) == 1
    assert figures_.failures(sides=[STARTUP]) == 1
    assert figures_.failures() == 3
    (only,) = figures_.pods
    assert only.deleted == 1.0  # after the restart
    assert only.hook_held == pytest.approx(7.0)
    assert only.hook_answered == pytest.approx(7.2)  # after the deletion
    assert only.gone == 12.0
    assert proxy_delays([figures_]) == [0.75]
    assert from_json(to_json(figures_)) == figures_
