"""The rollout benchmark's search for the shortest zero-failure fixed sleep (bench/rollout/)."""

from __future__ import annotations

import pytest

from bench.rollout.deployment import STARTUP, TERMINATION, PodEnd, Rollout, classify
from bench.rollout.report import RunFigures, sleep_search


def run(
    scenario: str, last_sent: float | None, failures: int = 0, held: float | None = None
) -> RunFigures:
    return RunFigures(
        scenario=scenario,
        label="scaled",
        pod="replica",
        started=0.0,
        termination=10.0,
        grace=30,
        down_visible=1.0,
        last_sent=last_sent,
        last_served=last_sent,
        app_signalled=held,
        sent={"busy": 100},
        failed={"busy": {"ResourceAccessException": failures} if failures else {}},
        grace_exceeded=False,
        points={"busy": []},
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
