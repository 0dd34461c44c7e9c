"""The test harness: the real parts the suite (``tests/``) and the benchmarks (``bench/``) run.

One module per real part:

- ``agent_process``: the agent as a real process (``AgentProcess``).
- ``prometheus``: a real Prometheus server (``PrometheusServer``).
- ``support``: the small helpers every part and most tests use (``free_port``, ``wait_for``,
  ``skip_or_fail``).
- ``javaapps``: the Eureka server and the Spring Boot demo app, built by Maven from
  ``tests/fixtures/``; also a pytest plugin (its fixtures), loaded suite-wide by
  ``tests/conftest.py``.
- ``node``: containerd and a standalone kubelet (``tests/kube/prepare.sh`` builds and caches
  them); ``cluster``: the control plane around that node; ``pods``: the pod manifests run on it.
- ``tcpproxy``: a TCP proxy that spreads connections over several servers (one URL in front of
  several Eureka peers).
- ``per_request_drain``: one termination with callers that open a connection per request (an
  app, the agent process, the callers), run as ``python -m tests.harness.per_request_drain``
  inside a network namespace of its own.

The boundary: ``tests/`` and ``bench/`` import these modules; ``bench/`` imports nothing else
from ``tests/``, and the harness imports nothing from ``tests/`` outside itself (no test module,
no ``conftest``); tests/test_harness_boundary.py checks both. It is not shipped: the wheel holds
``agent`` alone.
"""
