"""The shutdown plan is one object: what ``check`` prints is the plan the running agent executes.

``check`` prints :meth:`ShutdownPlan.describe`; the agent builds its plan from the same
configuration and executes it (deadlines, floor, linger). They must be equal for every kind of
configuration, and the design doc's sequence must list the plan's steps in order.
"""

from __future__ import annotations

import re
from pathlib import Path

import pytest

from agent.cli import check
from agent.config import Config, load
from agent.lifecycle import GracePeriod
from agent.main import Agent
from agent.metrics import Metrics
from agent.plan import ShutdownPlan

EUREKA = {
    "PRESTOP_REGISTRY": "eureka",
    "PRESTOP_EUREKA_URLS": "http://127.0.0.1:1/eureka/",
    "PRESTOP_EUREKA_APP": "orders",
    "POD_IP": "10.1.2.3",
}
CONFIGURATIONS = {
    "defaults": {},
    "fixed": {"PRESTOP_DRAIN_MODE": "fixed", "PRESTOP_DRAIN_SECONDS": "7"},
    "eureka-traffic": {**EUREKA, "PRESTOP_GRACE_PERIOD_SECONDS": "120"},
    "eureka-fixed-short": {**EUREKA, "PRESTOP_DRAIN_MODE": "fixed"},
    "eureka-small-floor": {
        **EUREKA,
        "PRESTOP_EUREKA_SERVER_CACHE_SECONDS": "2",
        "PRESTOP_EUREKA_CLIENT_REFRESH_SECONDS": "5",
    },
    "actuator-blind": {"PRESTOP_REGISTRY": "actuator", "PRESTOP_DRAIN_MAX_SECONDS": "15"},
    "register": {**EUREKA, "PRESTOP_REGISTRY": "register", "PRESTOP_MARGIN_SECONDS": "2"},
    "in-cluster": {"KUBERNETES_SERVICE_HOST": "10.96.0.1", "POD_IP": "10.1.2.3"},
    "eureka-in-cluster": {
        **EUREKA,
        "KUBERNETES_SERVICE_HOST": "10.96.0.1",
        "PRESTOP_KUBE_PROXY_SYNC_SECONDS": "2",
        "PRESTOP_GRACE_PERIOD_SECONDS": "120",
    },
}
IN_CLUSTER = {"KUBERNETES_SERVICE_HOST": "10.96.0.1", "POD_IP": "10.1.2.3"}
DESIGN = Path(__file__).resolve().parent.parent / "docs" / "design.md"


def printed_plan(config: Config, capsys: pytest.CaptureFixture[str]) -> list[str]:
    check(config, config_only=True)
    lines = capsys.readouterr().out.splitlines()
    start = next(i for i, line in enumerate(lines) if line.startswith("Shutdown plan"))
    end = next(i for i, line in enumerate(lines) if line.startswith("Time budget:"))
    return lines[start : end + 1]


@pytest.mark.parametrize("name", CONFIGURATIONS)
def test_check_prints_the_plan_the_agent_executes(
    name: str, capsys: pytest.CaptureFixture[str]
) -> None:
    config = load(CONFIGURATIONS[name])
    agent = Agent(config, metrics=Metrics())
    assert agent.plan == ShutdownPlan.of(config)
    assert printed_plan(config, capsys) == agent.plan.describe()


def test_configurations_differ_in_their_plans() -> None:
    # The comparison above is worth something only if the plans it compares differ.
    plans = {name: ShutdownPlan.of(load(env)) for name, env in CONFIGURATIONS.items()}
    assert len({tuple(plan.describe()) for plan in plans.values()}) == len(plans)


def test_every_deadline_comes_from_the_one_budget() -> None:
    plan = ShutdownPlan.of(load({**EUREKA, "PRESTOP_GRACE_PERIOD_SECONDS": "120"}))
    # grace 120 - app shutdown 5 - margin 1; less the registry deadline 5 for the drain
    budget = plan.budget
    assert (budget.answer_by, budget.linger_until, budget.drain) == (114.0, 119.0, 109.0)
    assert plan.drain_limit(0.0) == 109.0
    assert plan.drain_limit(7.5) == 106.5  # a slow mark-down eats into the drain
    assert plan.worst_case_floor() == 100.0  # server cache 30 + client refresh 70
    assert [source.name for source in plan.sources] == ["eureka"]
    assert plan.propagation().floor(0.0) == 100.0


def test_without_a_registry_the_floor_is_the_drains_minimum() -> None:
    plan = ShutdownPlan.of(load({}))
    assert plan.sources == () and plan.worst_case_floor() == 2.0
    assert plan.floor_warning() is None
    assert plan.propagation().floor(5.0) == 0.0


def test_the_linger_rule_follows_the_sidecar_layout() -> None:
    plan = ShutdownPlan.of(load({}))
    assert plan.lingers(exit_requested=True)  # classic: SIGTERM came with the trigger
    assert not plan.lingers(exit_requested=False)  # native: SIGTERM comes after the app


def test_the_design_doc_lists_the_plans_steps_in_order() -> None:
    text = DESIGN.read_text()
    block = text.split("## The shutdown sequence", 1)[1].split("```", 2)[1]
    named = re.findall(r"^ *\d+\. (\w+)", block, re.MULTILINE)
    for name in CONFIGURATIONS:
        steps = [step.name for step in ShutdownPlan.of(load(CONFIGURATIONS[name])).steps()]
        assert named == steps, name


def test_every_drain_mode_has_its_own_strategy_and_words() -> None:
    from agent.config import DRAIN_MODES
    from agent.drain import STRATEGIES

    assert tuple(STRATEGIES) == DRAIN_MODES
    plans = {mode: ShutdownPlan.of(load({"PRESTOP_DRAIN_MODE": mode})) for mode in STRATEGIES}
    steps = {mode: plan.steps() for mode, plan in plans.items()}
    drains = {mode: next(s.what for s in plan if s.name == "drain") for mode, plan in steps.items()}
    assert len(set(drains.values())) == len(drains)


def test_in_a_cluster_the_endpointslices_are_a_source_beside_the_registry() -> None:
    # Not in a cluster without the API server, or without the pod's IP that the slices list.
    assert ShutdownPlan.of(load({"POD_IP": "10.1.2.3"})).sources == ()
    assert ShutdownPlan.of(load({"KUBERNETES_SERVICE_HOST": "10.96.0.1"})).sources == ()
    small = {
        **EUREKA,
        **IN_CLUSTER,
        "PRESTOP_EUREKA_SERVER_CACHE_SECONDS": "2",
        "PRESTOP_EUREKA_CLIENT_REFRESH_SECONDS": "5",
    }
    plan = ShutdownPlan.of(load(small))
    assert [source.name for source in plan.sources] == ["eureka", "endpointslices"]
    # slices assumed 10 s after the trigger + kube-proxy sync 5 s, later than Eureka's 2 + 5
    assert plan.worst_case_floor() == 15.0
    # The mark-down's record is the registry's, however slow the other source is.
    propagation = plan.propagation()
    assert (propagation.registry, propagation.floor(0.0)) == (True, 7.0)
    described = "\n".join(plan.describe())
    assert "never before endpointslices callers can have dropped the instance" in described
    assert "kube-proxy sync 5s; at worst 15s after the trigger" in described
    [slices] = [row for row in plan.as_dict()["sources"] if row["name"] == "endpointslices"]
    assert (slices["blind_seconds"], slices["refresh_seconds"]) == (10.0, 5.0)
    # Without a registry the slices alone set the floor, and the record counts for nothing.
    alone = ShutdownPlan.of(load(IN_CLUSTER))
    assert alone.worst_case_floor() == 15.0 and not alone.propagation().registry


def test_a_shorter_grace_period_recomputes_the_budget() -> None:
    plan = ShutdownPlan.of(load({**EUREKA, "PRESTOP_GRACE_PERIOD_SECONDS": "120"}))
    configured = "PRESTOP_GRACE_PERIOD_SECONDS"
    # Not shorter: the same plan (a longer grace period is not the agent's to use).
    assert plan.with_grace(GracePeriod(120.0, configured, 120.0)) is plan
    short = plan.with_grace(GracePeriod(20.0, "metadata.deletionGracePeriodSeconds", 120.0))
    budget = short.budget
    # grace 20 - app shutdown 5 - margin 1 = 14; less the registry deadline 5 for the drain
    assert (budget.answer_by, budget.linger_until, budget.drain) == (14.0, 19.0, 9.0)
    assert short.grace_from == "metadata.deletionGracePeriodSeconds"
    assert short.as_dict()["grace_period_seconds"] == 20.0
    warning = short.floor_warning()
    assert warning is not None and "= 100s >" in warning  # Eureka's floor no longer fits
    # Less than the registry deadline and the app's shutdown take: the drain is 0, not negative.
    tiny = plan.with_grace(GracePeriod(3.0, "metadata.deletionGracePeriodSeconds", 120.0))
    assert tiny.budget.drain == 0.0 and tiny.drain_limit(0.0) == 0.0
