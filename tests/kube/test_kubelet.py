"""The agent under a real kubelet: the hook, the probes and the signals come from the kubelet
itself (v1.34, on containerd and runc), the agent runs from its image, the app is the demo
Spring Boot app, and Eureka is the fixture server, each in its own pod on the node's bridge.
The pods are created and deleted through the API server (``kubectl apply``, ``kubectl delete``)
as users do; only the token test runs static pods, being about the kubelet's own hook request."""

from __future__ import annotations

import contextlib
import threading
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest
import yaml

from tests.harness.cluster import KubeCluster
from tests.harness.javaapps import eureka_status, http_request
from tests.harness.node import Event, KubeNode, iter_agent_events
from tests.harness.pods import (
    AGENT_PORT,
    APP_PORT,
    EUREKA_PORT,
    agent_pod,
    eureka_server_pod,
    pod_from_deployment,
)

pytestmark = [pytest.mark.kube, pytest.mark.java]

EXAMPLES = sorted((Path(__file__).resolve().parents[2] / "k8s" / "examples").glob("*.yaml"))
FIXED_DRAIN = {"PRESTOP_DRAIN_MODE": "fixed", "PRESTOP_DRAIN_SECONDS": "5"}
# The demo app's log line when Spring's shutdown hook runs, i.e. when it got its SIGTERM.
APP_SIGTERM = "Commencing graceful shutdown"
START_TIMEOUT = 240.0  # two JVMs and the agent starting on a loaded 2-core machine


def first(events: list[Event], what: str, container: str = "") -> Event:
    found = [e for e in events if e.what == what and (not container or e.container == container)]
    assert found, f"no {what} {container} in the timeline:\n" + "\n".join(map(str, events))
    return found[0]


def agent_log(kube: KubeNode, pod: str, container: str = "prestop-agent") -> list[Any]:
    return list(iter_agent_events(kube.log_lines(pod, container)))


def logged(
    events: list[tuple[float, dict[str, Any]]], **match: Any
) -> tuple[float, dict[str, Any]]:
    """The first agent log event with all of ``match``'s fields."""
    for at, event in events:
        if all(event.get(k) == v for k, v in match.items()):
            return at, event
    raise AssertionError(f"the agent never logged {match}: {[e for _, e in events]}")


def app_sigterm_at(kube: KubeNode, pod: str) -> float:
    lines = [at for at, text in kube.log_lines(pod, "app") if APP_SIGTERM in text]
    assert lines, f"the app never logged {APP_SIGTERM!r}:\n{kube.logs(pod, 'app')[-3000:]}"
    return lines[0]


def terminate(cluster: KubeCluster, pod: str) -> tuple[float, list[Event]]:
    """Delete the pod through the API server (``kubectl delete pod``), wait until it is gone;
    (wall-clock time of the deletion, timeline)."""
    deleted_at = time.time()
    cluster.delete_pods(pod)
    return deleted_at, cluster.node.timeline(pod)


def test_classic_layout_hook_then_app_sigterm(cluster: KubeCluster, demo_app_jar: Path) -> None:
    """Classic sidecar: the kubelet calls /prestop and SIGTERMs the agent together; the hook's
    200 comes after the drain, and only then does the app get its SIGTERM."""
    kube = cluster.node
    cluster.apply_pod(agent_pod("classic", kube.prepared, demo_app_jar, FIXED_DRAIN))
    kube.wait_ready("classic", START_TIMEOUT)
    _, timeline = terminate(cluster, "classic")
    agent = agent_log(kube, "classic")

    hook = first(timeline, "hook_started", "app")
    agent_kill = first(timeline, "kill", "prestop-agent")
    assert abs(agent_kill.at - hook.at) < 1.0, "the agent's SIGTERM comes with the hook"
    # The hook and the SIGTERM race (either may reach the agent first): one starts the shutdown,
    # the other joins it.
    report = logged(agent, event="shutdown_complete")[1]
    joined = {j["trigger"]: j["after_seconds"] for j in report["joined"]}
    assert {report["trigger"], *joined} == {"prestop", "sigterm"}, report
    assert all(after < 1.0 for after in joined.values()), report
    answered_at, answer = logged(agent, event="http_request", path="/prestop")
    # The 5 s drain counts from the first trigger: a hook that joined a SIGTERM's shutdown is
    # answered that much sooner after its own request.
    drain_left = 5.0 - joined.get("prestop", 0.0)
    assert answer["status"] == 200 and answer["duration_seconds"] >= drain_left, "after the drain"
    assert answer["user_agent"].startswith("kube-lifecycle/"), answer
    completed = first(timeline, "hook_completed", "app")
    assert completed.at - hook.at >= 5.0
    app_kill = first(timeline, "kill", "app")
    assert app_kill.at >= completed.at, "the app's SIGTERM only after the hook's answer"
    assert app_sigterm_at(kube, "classic") >= completed.at
    exiting_at, _ = logged(agent, event="shutdown_complete")  # logged at exit
    assert exiting_at >= answered_at, "the agent exits after its answer went out"
    assert kube.exit_codes("classic")["prestop-agent"] == 0
    assert not [e for e in timeline if e.what in ("hook_failed", "event:FailedPreStopHook")]


def test_native_layout_agent_stops_after_the_app(cluster: KubeCluster, demo_app_jar: Path) -> None:
    """Native sidecar: hook 200 after the drain, then the app's SIGTERM, and the agent's SIGTERM
    only once the app has exited; the agent then exits 0 within a second."""
    kube = cluster.node
    cluster.apply_pod(agent_pod("native", kube.prepared, demo_app_jar, FIXED_DRAIN, native=True))
    kube.wait_ready("native", START_TIMEOUT)
    _, timeline = terminate(cluster, "native")
    agent = agent_log(kube, "native")

    hook = first(timeline, "hook_started", "app")
    answer = logged(agent, event="http_request", path="/prestop")[1]
    assert answer["status"] == 200 and answer["duration_seconds"] >= 5.0, "200 after the drain"
    completed = first(timeline, "hook_completed", "app")
    assert completed.at - hook.at >= 5.0
    app_kill = first(timeline, "kill", "app")
    assert app_kill.at >= completed.at
    assert app_sigterm_at(kube, "native") >= completed.at
    app_exit = first(timeline, "finished", "app")
    agent_kill = first(timeline, "kill", "prestop-agent")
    assert agent_kill.at >= app_exit.at, "the agent is signalled only after the app exited"
    agent_exit = first(timeline, "finished", "prestop-agent")
    assert agent_exit.at - agent_kill.at < 1.0, "the agent exits within a second of its SIGTERM"
    assert kube.exit_codes("native")["prestop-agent"] == 0
    assert not [e for e in timeline if e.what in ("hook_failed", "event:FailedPreStopHook")]


def test_ready_goes_false_within_one_probe_period(cluster: KubeCluster, demo_app_jar: Path) -> None:
    """The kubelet's own Ready condition drops within one probe period (1 s) of the trigger,
    while the app container is still running and serving."""
    kube = cluster.node
    cluster.apply_pod(agent_pod("ready", kube.prepared, demo_app_jar, FIXED_DRAIN))
    kube.wait_ready("ready", START_TIMEOUT)
    pod_ip = kube.pod_ip("ready")
    # The trigger is the hook's request, sent by hand so that nothing else changes.
    caller = threading.Thread(
        target=http_request, args=("GET", f"http://{pod_ip}:{AGENT_PORT}/prestop"), daemon=True
    )
    triggered = time.monotonic()
    caller.start()
    took = kube.wait_until("Ready false", lambda: not kube.ready("ready"), 10)
    assert time.monotonic() - triggered <= 1.0 + 0.3, f"Ready went false after {took:.2f} s"
    status = kube.container_status("ready", "app")
    assert status is not None and "running" in status["state"]
    assert http_request("GET", f"http://{pod_ip}:{APP_PORT}/actuator/health")[0] == 200
    caller.join(15)


def test_the_token_header_as_the_kubelet_sends_it(kube: KubeNode, demo_app_jar: Path) -> None:
    """With httpHeaders X-Prestop-Token the hook gets 200 after the drain. Without it the agent
    answers 401 at once, and the kubelet (1.34) does NOT count that as a failed hook: an HTTP
    hook fails only when no answer comes, whatever the status. So the app gets SIGTERM at once,
    undrained: the agent's refusal is visible in its log only."""
    env = {**FIXED_DRAIN, "PRESTOP_TOKEN": "s3cret"}
    with_token = agent_pod(
        "token-ok",
        kube.prepared,
        demo_app_jar,
        env,
        native=True,
        hook_headers={"X-Prestop-Token": "s3cret"},
    )
    kube.apply(with_token)
    kube.apply(agent_pod("token-missing", kube.prepared, demo_app_jar, env, native=True))
    kube.wait_ready("token-ok", START_TIMEOUT)
    kube.wait_ready("token-missing", START_TIMEOUT)
    kube.delete("token-ok", "token-missing")  # both terminate at once

    ok = kube.timeline("token-ok")
    answer = logged(agent_log(kube, "token-ok"), event="http_request", path="/prestop")[1]
    assert answer["status"] == 200 and answer["duration_seconds"] >= 5.0
    assert not [e for e in ok if e.what in ("hook_failed", "event:FailedPreStopHook")]

    missing = kube.timeline("token-missing")
    agent = agent_log(kube, "token-missing")
    logged(agent, event="prestop_refused")
    refusal = logged(agent, event="http_request", path="/prestop")[1]
    assert refusal["status"] == 401 and refusal["user_agent"].startswith("kube-lifecycle/")
    hook = first(missing, "hook_started", "app")
    assert first(missing, "hook_completed", "app").at - hook.at < 1.0
    assert not [e for e in missing if e.what in ("hook_failed", "event:FailedPreStopHook")]
    assert first(missing, "kill", "app").at - hook.at < 1.0, "no drain without the token"


def test_a_drain_longer_than_the_grace_period_is_refused_at_start_up(
    cluster: KubeCluster, demo_app_jar: Path
) -> None:
    """A drain the grace period cannot hold: the agent's container log shows the one-line budget
    error at every start (what `kubectl logs` shows), and the kubelet restarts the container."""
    kube = cluster.node
    env = {"PRESTOP_DRAIN_MODE": "fixed", "PRESTOP_DRAIN_SECONDS": "40"}
    cluster.apply_pod(agent_pod("budget", kube.prepared, demo_app_jar, env, grace=30))

    def starts_logged() -> list[list[str]]:
        # Each start writes its own log file; the kubelet deletes the one before the last soon
        # after a restart, so the files are kept (log_files) while this polls.
        logs = [kube.log_lines_of(f) for f in kube.log_files("budget", "prestop-agent")]
        return [[text for _, text in lines] for lines in logs if lines]

    kube.wait_until("two starts logged", lambda: len(starts_logged()) >= 2, START_TIMEOUT)
    for lines in starts_logged():
        assert len(lines) == 1, lines
        # The grace period first, then the variable that does not fit it, with the arithmetic.
        assert lines[0].startswith(
            "prestop-agent: configuration error: PRESTOP_GRACE_PERIOD_SECONDS=30 is too short"
            " for PRESTOP_DRAIN_SECONDS=40"
        )
        assert "> grace period 30s" in lines[0]

    def restarted() -> dict[str, Any]:
        status = kube.container_status("budget", "prestop-agent") or {}
        return status if status.get("restartCount", 0) >= 1 else {}

    kube.wait_until("the kubelet reports a restart", lambda: bool(restarted()), START_TIMEOUT)
    status = restarted()
    ended = status["state"].get("terminated") or status["lastState"].get("terminated") or {}
    assert ended.get("exitCode") == 2, status  # the agent's configuration-error exit code
    cluster.delete_pods("budget")


@pytest.fixture(scope="module")
def eureka_pod(kube_cluster: KubeCluster, eureka_jar: Path) -> Any:
    """A Eureka server pod for this module's tests, created through the API server: its URL as
    seen from the pods and the host."""
    node = kube_cluster.node
    kube_cluster.apply_pod(eureka_server_pod("eureka", node.prepared, eureka_jar))
    node.wait_ready("eureka", START_TIMEOUT)
    yield f"http://{node.pod_ip('eureka')}:{EUREKA_PORT}/eureka/"
    kube_cluster.delete_pods("eureka")


@pytest.mark.parametrize("example", EXAMPLES, ids=lambda p: p.stem)
def test_the_k8s_examples_run(
    cluster: KubeCluster, demo_app_jar: Path, eureka_pod: str, example: Path
) -> None:
    """Every Deployment in k8s/examples/, as a pod created through the API server beside the
    file's other objects (its Secrets and PodDisruptionBudget, applied as they are), with the
    local images, the demo app for the app and the Eureka pod's URL in place of the example's:
    it starts, becomes Ready and terminates cleanly."""
    documents = [d for d in yaml.safe_load_all(example.read_text()) if d]
    deployments = [d for d in documents if d["kind"] == "Deployment"]
    assert deployments, f"{example} has no Deployment"
    with applied(cluster, [d for d in documents if d["kind"] != "Deployment"]):
        for index, deployment in enumerate(deployments):
            name = f"example-{example.stem}-{index}"
            _run_and_terminate(cluster, deployment, name, demo_app_jar, eureka_pod)


@contextlib.contextmanager
def applied(cluster: KubeCluster, objects: list[dict[str, Any]]) -> Iterator[None]:
    """The objects ``kubectl apply``-ed for the block, deleted after it (the next test's
    objects may share their names)."""
    text = "\n---\n".join(yaml.safe_dump(o) for o in objects)
    cluster.kubectl("apply", "-f", "-", stdin=text)
    try:
        yield
    finally:
        cluster.kubectl("delete", "--ignore-not-found", "-f", "-", stdin=text)


def _run_and_terminate(
    cluster: KubeCluster,
    deployment: dict[str, Any],
    name: str,
    demo_app_jar: Path,
    eureka_pod: str,
    eureka_app: str | None = None,
) -> None:
    """The Deployment's pod through the API server (its Secrets and ConfigMaps, applied before,
    read by the kubelet as for any pod): it becomes Ready, and its termination drains through
    the agent (the hook answered 200, so the token matched) and ends cleanly."""
    kube = cluster.node
    pod = pod_from_deployment(
        deployment,
        kube.prepared,
        demo_app_jar,
        name=name,
        # The examples' grace period holds Spring Cloud's 95 s floor; the only Eureka client
        # here is the demo app itself (1 s fetches, no LoadBalancer cache), so the client bound
        # is told as it is, keeping each termination well inside the deletion timeout.
        env_overrides={
            "PRESTOP_EUREKA_URLS": eureka_pod,
            "PRESTOP_EUREKA_CLIENT_REFRESH_SECONDS": "2",
        },
        eureka_url=eureka_pod,
        eureka_app=eureka_app,
    )
    cluster.apply_pod(pod)
    kube.wait_ready(name, START_TIMEOUT)
    _, timeline = terminate(cluster, name)
    agent = agent_log(kube, name)
    logged(agent, event="shutdown_complete")
    answered = logged(agent, event="http_request", path="/prestop")[1]
    assert answered["status"] == 200
    app = deployment["spec"]["template"]["spec"]["containers"][0]["name"]
    assert first(timeline, "hook_completed", app)
    assert not [e for e in timeline if e.what in ("hook_failed", "event:FailedPreStopHook")]
    codes = kube.exit_codes(name)
    # The agent exits 0; the JVM exits 143 after its SIGTERM (137 would be a SIGKILL).
    assert codes.pop("prestop-agent") == 0 and set(codes.values()) <= {0, 143}, codes


def test_the_kustomize_example_runs_with_the_token_from_an_out_of_band_secret(
    cluster: KubeCluster, demo_app_jar: Path, eureka_pod: str, tmp_path: Path
) -> None:
    """``kustomize build`` of the example without its secrets.yaml, applied through the API
    server with the Secrets created out of band: the hook's header (from the build) matches the
    agent's token, which the kubelet reads from the out-of-band Secret (and the rest of the
    agent's environment from the build's ConfigMap)."""
    from tests.test_k8s import _environment, _overlay, _secrets_from_outside, kustomize_build

    overlay = _overlay(tmp_path, {"kustomization.yaml": ("- secrets.yaml\n", "")})
    objects = kustomize_build(overlay)
    assert "Secret" not in {o["kind"] for o in objects}
    (deployment,) = [o for o in objects if o["kind"] == "Deployment"]
    out_of_band = [{"apiVersion": "v1", **s} for s in _secrets_from_outside(objects)]
    others = [o for o in objects if o["kind"] != "Deployment"]
    # The app registers under the agent's PRESTOP_EUREKA_APP, which the build puts in a
    # ConfigMap: read there, as the kubelet will for the agent.
    (agent,) = deployment["spec"]["template"]["spec"]["initContainers"]
    app_name = _environment(agent, objects + out_of_band)["PRESTOP_EUREKA_APP"]
    with applied(cluster, others + out_of_band):
        _run_and_terminate(
            cluster, deployment, "kustomize-example", demo_app_jar, eureka_pod, app_name
        )


def test_eureka_marks_the_instance_down_before_the_app_sigterm(
    cluster: KubeCluster, demo_app_jar: Path, eureka_pod: str
) -> None:
    """Eureka in the node: the agent (eureka mode, instance found by POD_IP) marks the demo app's
    instance DOWN at the trigger; the server shows it before the app gets SIGTERM."""
    kube = cluster.node
    env = {
        **FIXED_DRAIN,
        "PRESTOP_REGISTRY": "eureka",
        "PRESTOP_EUREKA_URLS": eureka_pod,
        "PRESTOP_EUREKA_APP": "DEMO-APP",
    }
    cluster.apply_pod(
        agent_pod("orders", kube.prepared, demo_app_jar, env, native=True, eureka_url=eureka_pod)
    )
    kube.wait_ready("orders", START_TIMEOUT)
    instance = f"{kube.pod_ip('orders')}:demo-app:{APP_PORT}"
    kube.wait_until(
        "UP in Eureka", lambda: eureka_status(eureka_pod, "DEMO-APP", instance) == "UP", 60
    )

    seen: list[tuple[float, str | None]] = []
    watching = threading.Event()

    def watch() -> None:
        watching.set()
        while not seen or seen[-1][1] != "DOWN":
            seen.append((time.time(), eureka_status(eureka_pod, "DEMO-APP", instance)))
            time.sleep(0.05)

    watcher = threading.Thread(target=watch, daemon=True)
    watcher.start()
    watching.wait()
    _, timeline = terminate(cluster, "orders")
    watcher.join(5)
    down_at = next((at for at, status in seen if status == "DOWN"), None)
    assert down_at is not None, seen[-5:]
    hook = first(timeline, "hook_started", "app")
    app_kill = first(timeline, "kill", "app")
    assert hook.at <= down_at < app_kill.at
    assert down_at < app_sigterm_at(kube, "orders")
    marked = logged(agent_log(kube, "orders"), event="eureka_marked")
    assert marked[1].get("instance_id") == instance, marked
