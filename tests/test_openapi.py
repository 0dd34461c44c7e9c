"""docs/openapi.yaml against the real agent, with schemathesis: every documented operation is
called with generated requests (positive and negative), and every answer must conform to the
description (status codes, content types, JSON schemas, 405 with Allow) and never be a 5xx
other than the documented 500 of a /prestop whose registry step failed.

The agent runs with a token (so most generated hooks are refused: 401) and a drain of 0 s (so a
hook that gets through is answered at once, and later ones see the drained timeline). Bounded:
MAX_EXAMPLES per operation.
"""

from __future__ import annotations

import signal
from collections.abc import Iterator
from pathlib import Path

import pytest
import schemathesis
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st
from schemathesis.generation import GenerationMode

from tests.harness.agent_process import AgentProcess

SPEC = Path(__file__).resolve().parent.parent / "docs" / "openapi.yaml"
MAX_EXAMPLES = 30

schema = schemathesis.openapi.from_path(SPEC)


@pytest.fixture(scope="module")
def agent_url(tmp_path_factory: pytest.TempPathFactory) -> Iterator[str]:
    env = {"PRESTOP_DRAIN_MODE": "fixed", "PRESTOP_DRAIN_SECONDS": "0", "PRESTOP_TOKEN": "t-1"}
    agent = AgentProcess(env, tmp_path_factory.mktemp("openapi") / "agent.log")
    agent.start()
    agent.wait_ready()
    yield agent.url
    agent.signal(signal.SIGTERM)
    assert agent.proc is not None and agent.proc.wait(timeout=10) == 0
    assert "Traceback" not in agent.log_text()


# One test per documented operation, as schemathesis' own parametrize would make them, but with
# node ids of their own: its items all share one node id under pytest 9, and pytest-xdist (make
# test) runs one item per node id, so five of the six never ran.
OPERATIONS = [result.ok() for result in schema.get_all_operations()]


@pytest.mark.slow
@pytest.mark.parametrize(
    "operation", OPERATIONS, ids=[f"{op.method.upper()} {op.path}" for op in OPERATIONS]
)
def test_the_agent_conforms_to_its_openapi_description(
    operation: schemathesis.APIOperation, agent_url: str
) -> None:
    modes = (GenerationMode.POSITIVE, GenerationMode.NEGATIVE)

    @given(case=st.one_of(*(operation.as_strategy(generation_mode=mode) for mode in modes)))
    @settings(
        max_examples=MAX_EXAMPLES,
        deadline=None,
        suppress_health_check=[HealthCheck.function_scoped_fixture, HealthCheck.too_slow],
    )
    def conforms(case: schemathesis.Case) -> None:
        case.call_and_validate(base_url=agent_url)

    conforms()


def test_the_description_covers_every_route() -> None:
    from prometheus_client import CollectorRegistry

    from agent.config import load
    from agent.lifecycle import Lifecycle
    from agent.metrics import Metrics
    from agent.server import make_app

    app = make_app(load({}), Lifecycle(), Metrics(CollectorRegistry()))
    routes = {
        (route.method.lower(), route.resource.canonical)
        for route in app.router.routes()
        if route.method != "HEAD"
    }
    documented = {
        (method, path)
        for path, operations in schema.raw_schema["paths"].items()
        for method in operations
    }
    assert routes == documented
