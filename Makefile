# Two commands matter (see README): `make run` and `make test`. Both work on a fresh machine.
# `make test-unit` is the quick subset for the edit-run loop; CI runs `make test`.
VENV   := .venv
PYTHON := $(VENV)/bin/python
CKSUM  := $(shell cksum pyproject.toml | cut -d' ' -f1)
# What is installed in the venv, redone when pyproject.toml changes: the package alone (enough to
# run it), or the package and its test tools.
RUN_STAMP  := $(VENV)/.installed-run-$(CKSUM)
TEST_STAMP := $(VENV)/.installed-test-$(CKSUM)

.PHONY: run test test-unit system-deps k8s-tools kube-prepare lint bench bench-rollout reference

# Kubernetes tools the suite runs on k8s/ (chart, component, manifests). Built or installed once
# per version into a cache on the machine (never into git), so a fresh machine pays once.
# kube-linter is not served by the Go module proxy, so the security linter is checkov, in a venv
# of its own: its dependency tree would clash with the test venv's.
GO                := /usr/local/go/bin/go
TOOLS             := $(HOME)/.cache/prestop-agent/tools
HELM_VERSION      := v3.22.0
KUSTOMIZE_VERSION := v5.8.2
CHECKOV_VERSION   := 3.3.30
# CNCF distribution: the OCI registry the release test pushes the image and the chart to.
REGISTRY_VERSION  := v3.1.2
HELM              := $(TOOLS)/helm-$(HELM_VERSION)/helm
KUSTOMIZE         := $(TOOLS)/kustomize-$(KUSTOMIZE_VERSION)/kustomize
CHECKOV           := $(TOOLS)/checkov-$(CHECKOV_VERSION)/bin/checkov
REGISTRY          := $(TOOLS)/registry-$(REGISTRY_VERSION)/registry
TOOLS_ENV         := PRESTOP_HELM=$(HELM) PRESTOP_KUSTOMIZE=$(KUSTOMIZE) PRESTOP_CHECKOV=$(CHECKOV)

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

## The kube tests' cluster (tests/kube/prepare.sh, root only): Debian's containerd, runc, CNI
## plugins, buildah, mmdebstrap, iptables and conntrack; kubelet v1.34.2 built from the Go module
## proxy (needs go, about 5 min and 1.5 GB the first time), the control plane at the same version
## and etcd v3.6.16 (about 8 min more, at low CPU priority); the agent image built from
## docker/Dockerfile on a Debian base. All cached under /var/cache/prestop-agent/kube: a warm
## machine only hashes files.
kube-prepare:
	@if [ "$$(id -u)" = 0 ]; then bash tests/kube/prepare.sh >/dev/null; \
	else echo "not root: no kubelet node; the kube tests skip (fail under CI=true)"; fi

## helm, kustomize, the OCI registry (Go module proxy) and checkov (PyPI), each cached under its
## version. A lock
## keeps two checkouts on one machine from filling the same cache at once.
k8s-tools: $(HELM) $(KUSTOMIZE) $(CHECKOV) $(REGISTRY)

$(HELM):
	flock /tmp/prestop-tools.lock env GOBIN=$(@D) $(GO) install helm.sh/helm/v3/cmd/helm@$(HELM_VERSION)

$(KUSTOMIZE):
	flock /tmp/prestop-tools.lock env GOBIN=$(@D) $(GO) install \
		sigs.k8s.io/kustomize/kustomize/v5@$(KUSTOMIZE_VERSION)

$(REGISTRY):
	flock /tmp/prestop-tools.lock env GOBIN=$(@D) $(GO) install \
		github.com/distribution/distribution/v3/cmd/registry@$(REGISTRY_VERSION)

$(CHECKOV):
	flock /tmp/prestop-tools.lock sh -c 'python3 -m venv $(TOOLS)/checkov-$(CHECKOV_VERSION) \
		&& $(TOOLS)/checkov-$(CHECKOV_VERSION)/bin/pip install --quiet checkov==$(CHECKOV_VERSION)'

lint: $(TEST_STAMP)
	$(VENV)/bin/ruff check .
	$(VENV)/bin/ruff format --check .

## Every test: lint, unit, process, traffic, Prometheus, the real Eureka/Spring Boot ones, the
## k8s/ checks, and the agent's pods under a real kubelet (tests/kube/). Two pytest workers: the
## kube group (tests/conftest.py) runs on one of them, whose first kube test also prepares the
## node (tests/kube/prepare.sh, what `make kube-prepare` runs), while the other worker runs the
## rest; most of the suite waits on timers (Eureka's caches, drains, rollouts), not on the CPU.
TEST_WORKERS ?= 2
test: $(TEST_STAMP) system-deps k8s-tools lint
	$(TOOLS_ENV) $(PYTHON) -m pytest -n $(TEST_WORKERS)

## The edit-run loop, under a minute: the tests that need no Java, no root, no kubelet and are not
## marked slow (no agent process, no build). Installs nothing beyond the test venv; the k8s/
## checks skip until `make k8s-tools` has built their tools. Not a substitute for `make test`.
test-unit: $(TEST_STAMP)
	$(TOOLS_ENV) $(PYTHON) -m pytest -q -m "not java and not root and not kube and not slow"

bench: $(TEST_STAMP)
	@command -v wrk >/dev/null || { apt-get update -qq && apt-get install -y -qq wrk >/dev/null; }
	$(PYTHON) bench/bench_agent.py
	$(PYTHON) bench/bench_sockdiag.py
	$(PYTHON) bench/bench_kube.py

## The rollout benchmark on a real cluster (root; bench/rollout/): `kubectl rollout restart` of a
## 3-replica Deployment, every scenario several times, the sleep search, one unscaled rollout, then
## bench/results/rollout.md and rollout.png (adds to the rollouts recorded before; --reset starts
## afresh; the report names the three invocations it was made of). Heavy (JVMs, ~1 h in all): each
## invocation waits for the machine's heavy-job lock.
bench-rollout: $(TEST_STAMP) kube-prepare
	$(VENV)/bin/pip install --quiet -e '.[test,bench]'
	flock /tmp/prestop-heavy.lock $(PYTHON) -m bench.rollout $(ROLLOUT_ARGS)

## Regenerate docs/reference.md from the code (Config's field docstrings, agent/metrics.py).
reference: $(RUN_STAMP)
	$(PYTHON) -m agent.reference
