# Two commands matter (see README): `make run` and `make test`. Both work on a fresh machine.
VENV   := .venv
PYTHON := $(VENV)/bin/python
CKSUM  := $(shell cksum pyproject.toml | cut -d' ' -f1)
# What is installed in the venv, redone when pyproject.toml changes: the package alone (enough to
# run it), or the package and its test tools.
RUN_STAMP  := $(VENV)/.installed-run-$(CKSUM)
TEST_STAMP := $(VENV)/.installed-test-$(CKSUM)

.PHONY: run test system-deps lint bench reference

$(PYTHON):
	python3 -m venv $(VENV)
	$(VENV)/bin/pip install --quiet --upgrade pip

$(RUN_STAMP): pyproject.toml | $(PYTHON)
	$(VENV)/bin/pip install --quiet -e .
	rm -f $(VENV)/.installed-run-*
	touch $@

$(TEST_STAMP): pyproject.toml | $(PYTHON)
	$(VENV)/bin/pip install --quiet -e '.[test]'
	rm -f $(VENV)/.installed-*
	touch $@ $(RUN_STAMP)

## Run the agent with its embedded defaults: :8099, traffic drain watching port 8080, no registry.
run: $(RUN_STAMP)
	$(VENV)/bin/prestop-agent

## What the suite needs from Debian: promtool/prometheus (metrics checked by the real thing),
## iproute2 (network namespaces). Java 17 and Maven come with the machine; the Java fixtures
## are built by the tests themselves.
system-deps:
	@if command -v promtool >/dev/null && command -v prometheus >/dev/null && command -v ip >/dev/null; then :; \
	elif [ "$$(id -u)" = 0 ]; then \
		apt-get update -qq && DEBIAN_FRONTEND=noninteractive apt-get install -y -qq prometheus iproute2 >/dev/null; \
	else echo "not root: prometheus/iproute2 not installed; tests that need them skip (fail under CI=true)"; fi

lint: $(TEST_STAMP)
	$(VENV)/bin/ruff check .
	$(VENV)/bin/ruff format --check .

## Every test: lint, unit, process, traffic, Prometheus, and the real Eureka/Spring Boot ones.
test: $(TEST_STAMP) system-deps lint
	$(PYTHON) -m pytest

bench: $(TEST_STAMP)
	@command -v wrk >/dev/null || { apt-get update -qq && apt-get install -y -qq wrk >/dev/null; }
	$(PYTHON) bench/bench_agent.py
	$(PYTHON) bench/bench_sockdiag.py

## Regenerate docs/reference.md from the code (Config's field docstrings, agent/metrics.py).
reference: $(RUN_STAMP)
	$(PYTHON) -m agent.reference
