"""The generated reference (docs/reference.md) agrees with the code, and covers all of it."""

from __future__ import annotations

import dataclasses
import subprocess
import sys
import types
from pathlib import Path

import pytest

from agent import reference
from agent.config import VARIABLE, VARIABLES, Config
from agent.metrics import Metrics

ROOT = Path(__file__).resolve().parent.parent
COMMITTED = ROOT / "docs" / "reference.md"


def test_the_committed_reference_is_what_the_code_generates() -> None:
    assert COMMITTED.read_text() == reference.render(), (
        "docs/reference.md disagrees with agent/config.py or agent/metrics.py:"
        " run `make reference` (python -m agent.reference) and commit the result"
    )


def test_every_variable_and_field_is_documented_once() -> None:
    settings = reference.settings()
    assert sorted(s.variable for s in settings) == sorted(VARIABLES)
    assert len({s.variable for s in settings}) == len(settings)
    assert {s.field for s in settings} == {f.name for f in dataclasses.fields(Config)}
    text = COMMITTED.read_text()
    for setting in settings:
        assert f"| `{setting.variable}` | `{setting.default}` |" in text
        assert setting.doc, f"{setting.variable} has no description"


def test_every_metric_is_documented() -> None:
    declared = Metrics()
    families = {
        family.name for family in declared.collectors.collect() if family.name.startswith("prestop")
    }
    documented = {m.name.removesuffix("_total").removesuffix("_info") for m in reference.metrics()}
    # prometheus-client names a counter's family without _total and an Info's without _info.
    assert families == documented
    text = COMMITTED.read_text()
    for metric in reference.metrics():
        assert f"| `{metric.name}` | {metric.kind} |" in text
    assert "`prestop_registry_ready` | gauge | `backend`" in text
    assert "`prestop_drains_total` | counter | `reason`" in text


def test_check_mode_fails_on_a_stale_file_and_passes_on_a_fresh_one(tmp_path: Path) -> None:
    stale = tmp_path / "reference.md"
    stale.write_text(reference.render().replace("PRESTOP_DRAIN_QUIET_SECONDS", "PRESTOP_QUIET"))
    command = [sys.executable, "-m", "agent.reference", "--check", "--path"]
    done = subprocess.run([*command, str(stale)], capture_output=True, text=True, timeout=60)
    assert done.returncode == 1 and "is stale: run python -m agent.reference" in done.stderr
    fresh = tmp_path / "fresh.md"
    assert reference.main(["--path", str(fresh)]) == 0
    done = subprocess.run([*command, str(fresh)], capture_output=True, text=True, timeout=60)
    assert done.returncode == 0, done.stderr


def test_a_field_without_a_description_is_refused(monkeypatch: pytest.MonkeyPatch) -> None:
    # The descriptions are facts on the fields (agent.config.Variable), not docstrings read from
    # the source: a field whose facts have no description is refused all the same.
    port = Config.__dataclass_fields__["port"]
    bare = dataclasses.replace(port.metadata[VARIABLE], doc="")
    monkeypatch.setattr(port, "metadata", types.MappingProxyType({VARIABLE: bare}))
    reference.settings.cache_clear()
    try:
        with pytest.raises(ValueError, match=r"Config\.port has no description"):
            reference.settings()
    finally:
        reference.settings.cache_clear()
