# Two commands matter (see README): `make run` and `make test`. Both work on a fresh machine.
VENV   := .venv
PYTHON := $(VENV)/bin/python
STAMP  := $(VENV)/.installed-$(shell cksum pyproject.toml | cut -d' ' -f1)

.PHONY: run test system-deps kube-prepare lint bench

# The package and its test tools, in a venv of their own; redone when pyproject.toml changes.
$(STAMP): pyproject.toml
	python3 -m venv $(VENV)
	$(VENV)/bin/pip install --quiet --upgrade pip
	$(VENV)/bin/pip install --quiet -e '.[test]'
	rm -f $(VENV)/.installed-*
	touch $@

## Run the agent with its embedded defaults: :8099, traffic drain watching port 8080, no registry.
run: $(STAMP)
	$(VENV)/bin/prestop-agent

## What the suite needs from Debian: promtool/prometheus (metrics checked by the real thing),
## iproute2 (network namespaces). Java 17 and Maven come with the machine; the Java fixtures
## are built by the tests themselves.
system-deps:
	@if command -v promtool >/dev/null && command -v prometheus >/dev/null && command -v ip >/dev/null; then :; \
	elif [ "$$(id -u)" = 0 ]; then \
		apt-get update -qq && DEBIAN_FRONTEND=noninteractive apt-get install -y -qq prometheus iproute2 >/dev/null; \
	else echo "not root: prometheus/iproute2 not installed; tests that need them skip (fail under CI=true)"; fi

## The kubelet tests' node (tests/kube/prepare.sh, root only): Debian's containerd, runc, CNI
## plugins, buildah and mmdebstrap; kubelet v1.34.2 built from the Go module proxy (needs go, about
## 5 min and 1.5 GB the first time); the agent image built from docker/Dockerfile on a Debian base.
## All cached under /var/cache/prestop-agent/kube: a warm machine only hashes files.
kube-prepare:
	@if [ "$$(id -u)" = 0 ]; then bash tests/kube/prepare.sh >/dev/null; \
	else echo "not root: no kubelet node; the kube tests skip (fail under CI=true)"; fi

lint: $(STAMP)
	$(VENV)/bin/ruff check .
	$(VENV)/bin/ruff format --check .

## Every test: lint, unit, process, traffic, Prometheus, the real Eureka/Spring Boot ones, and
## the agent's pods under a real kubelet (tests/kube/).
test: $(STAMP) system-deps kube-prepare lint
	$(PYTHON) -m pytest

bench: $(STAMP)
	@command -v wrk >/dev/null || { apt-get update -qq && apt-get install -y -qq wrk >/dev/null; }
	$(PYTHON) bench/bench_agent.py
	$(PYTHON) bench/bench_sockdiag.py
