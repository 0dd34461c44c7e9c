"""The benchmark's claim, once, in CI: a rolling replacement under a real kubelet with the agent's
traffic drain (classic sidecar, scenario 5 of ``bench/rollout/``) fails no request of a busy
pooled Spring Cloud caller nor of a caller that opens a connection per request, and the pod is
gone well before its grace period runs out. ``make bench-rollout`` runs every scenario."""

from __future__ import annotations

from pathlib import Path

import pytest

from bench.rollout.report import figures
from bench.rollout.rig import SCALED, Rig, scenarios
from tests.kube.node import KubeNode

pytestmark = [pytest.mark.kube, pytest.mark.java]


def test_a_rolling_replacement_with_the_traffic_drain_fails_no_request(
    kube: KubeNode, eureka_jar: Path, demo_app_jar: Path, tmp_path: Path
) -> None:
    chosen = scenarios(SCALED)
    rig = Rig(kube, eureka_jar, demo_app_jar, tmp_path / "records", SCALED, ("busy", "fresh"))
    # The first replica goes with the traffic drain; the others stay until the test's end.
    rig.start(chosen["traffic"], chosen["none"])
    replaced = rig.replace(chosen["none"])
    run = figures(replaced, "ci")

    assert run.failed == {"busy": {}, "fresh": {}}, run.failed
    assert sum(run.sent.values()) >= 500, run.sent
    # The replica really was in use until its drain: both callers were answered by it after
    # the trigger, and no request got to it after its pod was gone.
    assert run.last_served is not None and 0 < run.last_served < run.termination, run
    assert not run.grace_exceeded
    assert run.termination < SCALED.grace, run.termination
    exit_codes = kube.exit_codes(replaced.pod)
    assert exit_codes["prestop-agent"] == 0 and exit_codes["app"] in (0, 143), exit_codes
    print(
        f"\nrollout: sent {run.sent}, termination {run.termination:.2f} s,"
        f" DOWN visible {run.down_visible} s, last served {run.last_served} s"
    )
