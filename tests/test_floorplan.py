"""The propagation floor by stage and the settings ``check`` proposes (agent/floorplan.py): pure
arithmetic here; tests/test_floorplan_eureka.py holds the proposals against a real Eureka server
and Spring Cloud caller."""

from __future__ import annotations

import pytest

from agent import floorplan
from agent.cli import EXIT_FLOOR_ABOVE_MAX, main
from agent.config import Config
from agent.plan import ShutdownPlan

SPRING_DEFAULTS = floorplan.stages_of(30, 65)
EUREKA = {
    "PRESTOP_REGISTRY": "eureka",
    "PRESTOP_EUREKA_URLS": "http://127.0.0.1:9/eureka/",
    "PRESTOP_EUREKA_APP": "ORDERS",
    "POD_IP": "10.1.2.3",
}


def test_the_stages_add_up_to_the_agents_worst_case_floor() -> None:
    config = Config(registry="eureka")
    stages = floorplan.stages_of(
        config.eureka_server_cache_seconds, config.eureka_client_refresh_seconds
    )
    assert stages.floor == pytest.approx(ShutdownPlan.of(config).worst_case_floor())
    assert stages.client_refresh == pytest.approx(config.eureka_client_refresh_seconds)
    assert (SPRING_DEFAULTS.server_cache, SPRING_DEFAULTS.client_fetch) == (30, 30)
    assert (SPRING_DEFAULTS.loadbalancer_ttl, SPRING_DEFAULTS.margin) == (35, 0)


@pytest.mark.parametrize("target", [3, 8, 9, 10, 24, 50, 94.5])
@pytest.mark.parametrize("margin", [0, 5])
def test_every_proposal_is_under_the_target_and_keeps_the_margin(
    target: float, margin: float
) -> None:
    current = floorplan.stages_of(30, 65 + margin)
    found = floorplan.proposals(current, target)
    # Turning the server cache off needs a second for each client stage, plus the margin.
    assert bool(found) == (target >= margin + 2), found
    for proposal in found:
        stages = proposal.stages
        assert stages.floor <= target
        assert stages.margin == margin
        assert min(stages.client_fetch, stages.loadbalancer_ttl) >= 1
        assert (stages.server_cache == 0) == (not proposal.read_only_cache)
        variables = dict(v.split("=") for v in proposal.agent_variables())
        assert float(variables["PRESTOP_EUREKA_CLIENT_REFRESH_SECONDS"]) == stages.client_refresh
        assert float(variables["PRESTOP_EUREKA_SERVER_CACHE_SECONDS"]) == stages.server_cache


def test_no_proposal_when_the_floor_fits_or_cannot_be_reached() -> None:
    assert floorplan.proposals(SPRING_DEFAULTS, 95) == []
    assert floorplan.proposals(SPRING_DEFAULTS, 1.5) == []
    lines = floorplan.describe(SPRING_DEFAULTS, 1.5)
    assert "cannot be reached by shorter caches" in lines[-1]


def test_the_cost_is_one_fetch_per_interval_per_client() -> None:
    (keep, off) = floorplan.proposals(SPRING_DEFAULTS, 9)
    assert keep.stages == floorplan.Stages(3, 3, 3, 0)
    assert keep.server_properties() == ["eureka.server.response-cache-update-interval-ms=3000"]
    assert keep.client_properties() == [
        "eureka.client.registry-fetch-interval-seconds=3",
        "spring.cloud.loadbalancer.cache.ttl=3s",
    ]
    assert keep.stages.fetches_per_second == pytest.approx(1 / 3)
    assert off.stages == floorplan.Stages(0, 4, 4, 0)
    assert off.server_properties() == ["eureka.server.use-read-only-response-cache=false"]
    text = "\n".join(floorplan.describe(SPRING_DEFAULTS, 9))
    assert "0.333 registry fetches/s to each Eureka server (10x today's 0.0333/s)" in text


def test_a_client_refresh_below_fetch_plus_ttl_is_called_out() -> None:
    stages = floorplan.stages_of(30, 20, client_fetch_seconds=30, loadbalancer_ttl_seconds=35)
    assert floorplan.underestimate(stages) == 45
    assert any("45s shorter than the clients' fetch + TTL" in line for line in
               floorplan.describe(stages, 100))  # fmt: skip


def test_check_prints_the_stages_and_config_only_fails_on_a_floor_above_max(
    capsys: pytest.CaptureFixture[str],
) -> None:
    short = {**EUREKA, "PRESTOP_GRACE_PERIOD_SECONDS": "60", "PRESTOP_APP_SHUTDOWN_SECONDS": "30"}
    assert main(["check", "--config-only"], short) == EXIT_FLOOR_ABOVE_MAX
    out = capsys.readouterr().out
    # Default target: the drain maximum (60 - 5 - 30 - 1 = 24) less QUIET (3). The client
    # refresh's 5 s margin stays as it is, so the three stages share the other 16 s.
    assert "Propagation floor, by stage (worst case 100s; target 21s):" in out
    assert "eureka.server.response-cache-update-interval-ms=5000" in out
    assert "PRESTOP_EUREKA_CLIENT_REFRESH_SECONDS=15" in out
    long = {**short, "PRESTOP_GRACE_PERIOD_SECONDS": "150"}
    assert main(["check", "--config-only", "--floor-target", "20"], long) == 0
    out = capsys.readouterr().out
    assert "WARNING" not in out and "target 20s" in out and "option 1:" in out
    tuned = ["check", "--config-only", "--client-fetch-seconds", "5",
             "--loadbalancer-ttl-seconds", "5"]  # fmt: skip
    env = {**long, "PRESTOP_EUREKA_CLIENT_REFRESH_SECONDS": "10",
           "PRESTOP_EUREKA_SERVER_CACHE_SECONDS": "3"}  # fmt: skip
    assert main(tuned, env) == 0
    assert "under the target; registry fetches cost 0.2 requests/s per client" in (
        capsys.readouterr().out
    )


@pytest.mark.parametrize("value", ["0", "-1", "soon", "nan"])
def test_a_bad_check_flag_is_named_without_a_traceback(
    value: str, capsys: pytest.CaptureFixture[str]
) -> None:
    with pytest.raises(SystemExit) as stopped:
        main(["check", "--floor-target", value], EUREKA)
    assert stopped.value.code == 2
    err = capsys.readouterr().err
    assert "--floor-target" in err and "Traceback" not in err
