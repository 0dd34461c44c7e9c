"""The chart and the kustomize component installed for real through the cluster's API server
(``helm install``, ``kubectl apply -k``): the objects pass the real schema and admission, the
pods run (the agent from its image, the app the demo app), the agent's ServiceAccount may do
what the agent asks the API and nothing else (``kubectl auth can-i --as``, the RBAC authorizer
itself), only the agent container holds a token (the pod as the API server admitted it, and the
files in the running containers), and a ``kubectl rollout restart`` of what they rendered
completes with every pod replaced."""

from __future__ import annotations

import contextlib
import json
import re
import secrets
import shutil
import subprocess
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest
import yaml

from tests.harness.cluster import KubeCluster
from tests.harness.pods import APP_PORT, demo_app_command, jar_volume
from tests.test_k8s import API_VOLUME, CHART, KUSTOMIZE, SERVICE_ACCOUNT_DIRECTORY, _tool

# A JVM start, an install and a rollout, on a loaded machine: more than the suite's 300 s.
pytestmark = [pytest.mark.kube, pytest.mark.java, pytest.mark.timeout(900)]

START_TIMEOUT = 300.0  # a JVM and the agent starting on a loaded 2-core machine
# The app as the shipped pods describe it, made runnable here: the demo app's jar in the JRE
# image, no CPU request (the node has 2 cores, and a rollout runs two pods at once).
APP_RESOURCES = {"requests": {"memory": "256Mi"}, "limits": {"memory": "512Mi"}}


def agent_image(cluster: KubeCluster) -> tuple[str, str]:
    repository, _, tag = cluster.prepared.agent_image.rpartition(":")
    return repository, tag


def demo_app(cluster: KubeCluster, jar: Path) -> dict[str, Any]:
    """The fields of the app container that the demo app needs (merged into the shipped one)."""
    return {
        "image": cluster.prepared.java_image,
        "imagePullPolicy": "Never",
        "command": demo_app_command(jar, APP_PORT, None, None),
        "resources": APP_RESOURCES,
    }


def restart_replaces_every_pod(cluster: KubeCluster, deployment: str) -> float:
    """Roll the Deployment out again; returns how long the rollout took. Every old pod's
    preStop hook, as the kubelet called it, was answered 200 by its agent (the agent's access
    log, followed until the container exited: the pod is gone by the time anyone could ask)."""
    cluster.wait_rollout(deployment, START_TIMEOUT)
    selector = cluster.get("deployment", deployment)["spec"]["selector"]["matchLabels"]
    label = "-l=" + ",".join(f"{k}={v}" for k, v in selector.items())
    before = {p["metadata"]["name"] for p in live_pods(cluster, label)}
    followed = {name: cluster.follow_logs(name, "prestop-agent") for name in before}
    try:
        cluster.rollout_restart(deployment)
        took = cluster.wait_rollout(deployment, 2 * START_TIMEOUT)
    finally:
        agent_logs = {name: _until_exit(follower) for name, follower in followed.items()}
    after = {p["metadata"]["name"] for p in live_pods(cluster, label)}
    assert before and after and not before & after, (before, after)
    for pod in live_pods(cluster, label):  # the old ones, terminating, are not ready by design
        statuses = pod["status"].get("containerStatuses", []) + pod["status"].get(
            "initContainerStatuses", []
        )
        assert all(s.get("ready") for s in statuses if s["name"] in ("app", "orders")), statuses
    for name, log in agent_logs.items():
        # At least once: the kubelet may call a hook again, and each call gets the answer.
        answers = hook_answers(log)
        assert answers and set(answers) == {200}, f"{name}'s agent:\n{log}"
    return took


def live_pods(cluster: KubeCluster, label: str) -> list[dict[str, Any]]:
    """The selected pods that are not terminating (a previous test's may still be)."""
    return [p for p in cluster.pods(label) if not p["metadata"].get("deletionTimestamp")]


# The old pods' agents exit a few seconds after the rollout is complete (the app's shutdown,
# then the agent's own SIGTERM); a slow machine gets plenty more.
AGENT_EXIT_TIMEOUT = 120.0


def _until_exit(follower: subprocess.Popen[str]) -> str:
    """What ``kubectl logs --follow`` printed until the container exited (or the timeout)."""
    try:
        out, err = follower.communicate(timeout=AGENT_EXIT_TIMEOUT)
    except subprocess.TimeoutExpired:
        follower.kill()
        out, err = follower.communicate()
    return out + err


def hook_answers(agent_log: str) -> list[int]:
    """The statuses the agent answered the kubelet's preStop hook calls with (its JSON access
    log; the kubelet's hook client says ``kube-lifecycle/VERSION``). A refused token is a 401
    here, which the kubelet itself would not report."""
    statuses = []
    for line in agent_log.splitlines():
        try:
            event = json.loads(line)
        except ValueError:
            continue
        if (
            isinstance(event, dict)
            and event.get("event") == "http_request"
            and event.get("path") == "/prestop"
            and str(event.get("user_agent", "")).startswith("kube-lifecycle/")
        ):
            statuses.append(event["status"])
    return statuses


# What the agent's ServiceAccount may do in its namespace (kubectl auth can-i VERB RESOURCE)...
GRANTED = [
    ("get", "pods"),
    ("list", "endpointslices.discovery.k8s.io"),
    ("watch", "endpointslices.discovery.k8s.io"),
    ("create", "events.events.k8s.io"),
]
# ...and a sample of what it may not: other verbs on the same resources, the legacy Events API,
# Secrets, another pod's exec or eviction.
DENIED = [
    ("delete", "pods"),
    ("list", "pods"),
    ("patch", "pods"),
    ("create", "pods/exec"),
    ("create", "pods/eviction"),
    ("update", "endpointslices.discovery.k8s.io"),
    ("create", "events"),
    ("list", "secrets"),
    ("get", "secrets"),
    ("list", "configmaps"),
]
# A namespace the agent does not run in: a Role, not a ClusterRole, grants nothing there.
OTHER_NAMESPACE = "kube-system"

# Run in the agent container (its image has python): what it finds where in-cluster clients
# look for the API's credentials, the token's claims decoded (not verified: the API server does).
READ_CREDENTIALS = f"""
import base64, json, os
directory = {SERVICE_ACCOUNT_DIRECTORY!r}
payload = open(os.path.join(directory, "token")).read().split(".")[1]
claims = json.loads(base64.urlsafe_b64decode(payload + "=" * (-len(payload) % 4)))
print(json.dumps({{
    "files": sorted(f for f in os.listdir(directory) if not f.startswith(".")),
    "subject": claims["sub"],
    "pod": claims["kubernetes.io"]["pod"]["name"],
    "namespace": open(os.path.join(directory, "namespace")).read(),
    "ca": open(os.path.join(directory, "ca.crt")).read().startswith("-----BEGIN CERTIFICATE"),
}}))
"""


def can_i(cluster: KubeCluster, subject: str, verb: str, resource: str, namespace: str) -> bool:
    """``kubectl auth can-i`` as ``subject``: the API server's own authorizers answer."""
    done = subprocess.run(
        [str(cluster.bin / "kubectl"), f"--kubeconfig={cluster.kubeconfig}", "auth", "can-i",
         verb, resource, f"--namespace={namespace}", f"--as={subject}"],
        capture_output=True, text=True, timeout=60, check=False,
    )  # fmt: skip
    answer = done.stdout.strip()
    assert answer in ("yes", "no"), f"can-i {verb} {resource}: {done.stdout} {done.stderr}"
    return answer == "yes"


def assert_api_access(
    cluster: KubeCluster, pod_name: str, app: str, app_token: bool = False
) -> str:
    """The running pod's ServiceAccount may do exactly what the agent asks (GRANTED, in its own
    namespace only); the agent container holds that account's token (from its own projected
    volume), the cluster CA and the namespace; the app container holds a token only with
    ``app_token`` (the user's own account, automounted by the admission controller, which left
    the agent's mount alone). Returns a summary."""
    pod = cluster.get("pod", pod_name)
    namespace, spec = pod["metadata"]["namespace"], pod["spec"]
    account = spec["serviceAccountName"]
    subject = f"system:serviceaccount:{namespace}:{account}"
    answers = {
        (verb, resource, where): can_i(cluster, subject, verb, resource, where)
        for verb, resource in GRANTED + DENIED
        for where in (namespace, OTHER_NAMESPACE)
    }
    expected = {
        (verb, resource, where): (verb, resource) in GRANTED and where == namespace
        for verb, resource, where in answers
    }
    assert answers == expected, {k: v for k, v in answers.items() if v != expected[k]}
    # The pod as admitted: the agent mounts our projected volume; the admission controller's own
    # token volume (kube-api-access-*) exists, and is mounted into the app, only with app_token.
    token_volumes = [
        v["name"]
        for v in spec["volumes"]
        if any("serviceAccountToken" in s for s in v.get("projected", {}).get("sources", []))
    ]
    admitted = [name for name in token_volumes if name != API_VOLUME]
    assert API_VOLUME in token_volumes and len(admitted) == int(app_token), token_volumes
    for container in spec.get("initContainers", []) + spec["containers"]:
        mounts = {m["mountPath"]: m["name"] for m in container.get("volumeMounts", [])}
        if container["name"] == "prestop-agent":
            wanted: str | None = API_VOLUME
        else:
            wanted = admitted[0] if app_token and container["name"] == app else None
        assert mounts.get(SERVICE_ACCOUNT_DIRECTORY) == wanted, (container["name"], mounts)
    # And in the running containers.
    found = json.loads(
        cluster.exec(pod_name, "python3", "-c", READ_CREDENTIALS, container="prestop-agent")
    )
    assert found == {
        "files": ["ca.crt", "namespace", "token"], "subject": subject, "pod": pod_name,
        "namespace": namespace, "ca": True,
    }, found  # fmt: skip
    in_app = cluster.exec(
        pod_name, "sh", "-c", f"test -e {SERVICE_ACCOUNT_DIRECTORY}/token && echo yes || echo no",
        container=app,
    )  # fmt: skip
    assert in_app.strip() == ("yes" if app_token else "no"), in_app
    granted = sum(answers.values())
    where = "in the agent container only"
    if app_token:
        where = "in the agent container and (the user's automount) in the app's"
    return (
        f"{subject}: {granted} of {len(answers)} can-i yes (exactly the Role's, in {namespace});"
        f" token {where}"
    )


def helm_app_pod(cluster: KubeCluster, jar: Path) -> dict[str, Any]:
    """The chart's ``deployment.pod`` for the demo app: the example pod's security context and
    writable /tmp, with the demo app's image, command and jar. Without the example's
    automountServiceAccountToken: false, as a user's pod has it: the chart's ServiceAccount alone
    keeps the token out of the app."""
    volume, mount = jar_volume(jar)
    return {
        "containers": [
            {
                "name": "app",
                **demo_app(cluster, jar),
                "ports": [{"name": "http", "containerPort": APP_PORT}],
                "securityContext": {
                    "runAsNonRoot": True,
                    "runAsUser": 10002,
                    "allowPrivilegeEscalation": False,
                    "readOnlyRootFilesystem": True,
                    "capabilities": {"drop": ["ALL"]},
                },
                "volumeMounts": [{"name": "tmp", "mountPath": "/tmp"}, mount],
            }
        ],
        "volumes": [{"name": "tmp", "emptyDir": {"sizeLimit": "128Mi"}}, volume],
    }


@contextlib.contextmanager
def helm_release(cluster: KubeCluster, values: dict[str, Any]) -> Iterator[None]:
    """``helm install orders`` of the chart with ``values``, waiting for its pods; uninstalled
    (and waited for) on the way out, whatever the test found."""
    helm = [_tool("helm"), f"--kubeconfig={cluster.kubeconfig}"]
    done = subprocess.run(
        [*helm, "install", "orders", str(CHART), "--values", "-", "--wait",
         f"--timeout={int(START_TIMEOUT)}s"],
        input=json.dumps(values), capture_output=True, text=True, timeout=START_TIMEOUT + 60,
        check=False,
    )  # fmt: skip
    try:
        assert done.returncode == 0, done.stderr + cluster.kubectl("get", "pods", "-o=wide")
        yield
    finally:
        subprocess.run(
            [*helm, "uninstall", "orders", "--wait", "--timeout=120s"],
            capture_output=True, timeout=180, check=False,
        )  # fmt: skip


@pytest.mark.parametrize("layout", ["native", "classic"])
def test_helm_install_and_a_rollout_restart(
    cluster: KubeCluster, demo_app_jar: Path, layout: str
) -> None:
    repository, tag = agent_image(cluster)
    values = {
        "layout": layout,
        "image": {"repository": repository, "tag": tag, "pullPolicy": "Never"},
        "gracePeriodSeconds": 30,
        "registry": {"type": "none"},
        "agent": {"appShutdownSeconds": 10, "drain": {"quietSeconds": 1}},
        "deployment": {
            "replicas": 1,
            "minReadySeconds": 1,
            "pod": helm_app_pod(cluster, demo_app_jar),
        },
    }
    with helm_release(cluster, values):
        names = cluster.kubectl(
            "get", "deployments", "-l=app.kubernetes.io/instance=orders", "-o=name"
        ).split()
        assert len(names) == 1, names
        (running,) = live_pods(cluster, "-l=app.kubernetes.io/instance=orders")
        access = assert_api_access(cluster, running["metadata"]["name"], "app")
        took = restart_replaces_every_pod(cluster, names[0].split("/", 1)[1])
        print(f"\nhelm {layout}: {access}; rollout restart complete in {took:.1f} s")


def test_helm_install_binds_the_role_to_the_users_own_service_account(
    cluster: KubeCluster, demo_app_jar: Path
) -> None:
    """A user whose app runs under an account of its own, with its token automounted (Spring
    Cloud Kubernetes): ``serviceAccount.create=false``, ``serviceAccount.name``. The chart binds
    the Role to that account and creates none; the admission controller still mounts the
    account's token into the app, and skips the agent container, which mounts its own."""
    repository, tag = agent_image(cluster)
    account = "orders-app"
    pod = helm_app_pod(cluster, demo_app_jar)
    pod["serviceAccountName"] = account
    values = {
        "layout": "native",
        "image": {"repository": repository, "tag": tag, "pullPolicy": "Never"},
        "gracePeriodSeconds": 30,
        "registry": {"type": "none"},
        "agent": {"appShutdownSeconds": 10, "drain": {"quietSeconds": 1}},
        "serviceAccount": {"create": False, "name": account},
        "deployment": {"replicas": 1, "minReadySeconds": 1, "pod": pod},
    }
    cluster.kubectl("create", "serviceaccount", account)
    try:
        with helm_release(cluster, values):
            accounts = cluster.kubectl("get", "serviceaccounts", "-o=name").split()
            assert "serviceaccount/orders-prestop-agent" not in accounts, accounts
            (running,) = live_pods(cluster, "-l=app.kubernetes.io/instance=orders")
            access = assert_api_access(cluster, running["metadata"]["name"], "app", app_token=True)
            print(f"\nhelm, the user's own ServiceAccount: {access}")
    finally:
        cluster.kubectl("delete", "serviceaccount", account, "--ignore-not-found")


@pytest.mark.parametrize("layout", ["native", "classic"])
def test_kubectl_apply_k_and_a_rollout_restart(
    cluster: KubeCluster, demo_app_jar: Path, tmp_path: Path, layout: str
) -> None:
    """The example as shipped (its Deployment, ConfigMaps and the component), with the app's
    Deployment made runnable here (the demo app, one replica) as a user's own file would be,
    the Secrets created out of band with kubectl before the apply (secrets.yaml dropped from
    ``resources:``, as the example says) and the hook's token set to the Secret's, and an
    overlay for the agent's image and no registry.

    ``prestop-agent check`` in the running agent container, with the example's own registry
    and QUIET put back by flags, reports no floor warning; in the rollout restart, every old
    pod's hook is answered 200 by an agent that holds the Secret's token.

    The app's changes go into its file, not into an overlay patch: a strategic-merge patch of
    the Deployment above the component turns the terminationGracePeriodSeconds its replacement
    wrote into the string "60" (kustomize 5.7.1 and 5.8.2), which the API server refuses."""
    copied = tmp_path / "kustomize"
    shutil.copytree(KUSTOMIZE, copied)
    example_file = copied / "example" / "kustomization.yaml"
    example = yaml.safe_load(example_file.read_text())
    example["components"] = [f"../{layout}"]
    example["resources"].remove("secrets.yaml")
    # The user's own token in the user's own kustomization (the component copies it into the
    # hook's header there: an overlay above could not change it any more).
    token = secrets.token_urlsafe(24)
    generators = {g["name"]: g for g in example["configMapGenerator"]}
    generators["prestop-agent-hook"]["literals"] = [f"token={token}"]
    example_file.write_text(yaml.safe_dump(example))
    shipped = dict(item.split("=", 1) for item in generators["prestop-agent"]["literals"])
    repository, tag = agent_image(cluster)
    volume, mount = jar_volume(demo_app_jar)
    app_file = copied / "example" / "deployment.yaml"
    documents = [d for d in yaml.safe_load_all(app_file.read_text()) if d]
    for document in documents:
        if document["kind"] != "Deployment":
            continue
        spec = document["spec"]
        spec["replicas"], spec["minReadySeconds"] = 1, 1
        pod = spec["template"]["spec"]
        # As a user's pod has it: the component's ServiceAccount alone keeps the app token-less.
        del pod["automountServiceAccountToken"]
        pod["volumes"].append(volume)
        app = next(c for c in pod["containers"] if c["name"] == "orders")
        app.update(demo_app(cluster, demo_app_jar))
        app["volumeMounts"].append(mount)
    app_file.write_text(yaml.safe_dump_all(documents))
    overlay = copied / "ci"
    overlay.mkdir()
    (overlay / "kustomization.yaml").write_text(
        yaml.safe_dump(
            {
                "apiVersion": "kustomize.config.k8s.io/v1beta1",
                "kind": "Kustomization",
                "resources": ["../example"],
                "images": [{"name": "prestop-agent", "newName": repository, "newTag": tag}],
                "configMapGenerator": [
                    {
                        "name": "prestop-agent",
                        "behavior": "merge",
                        "literals": ["PRESTOP_REGISTRY=none", "PRESTOP_DRAIN_QUIET_SECONDS=1"],
                    },
                ],
            }
        )
    )
    out_of_band = {
        "prestop-agent-token": f"--from-literal=token={token}",
        # Only for check's registry eureka below: no Eureka server is asked (--config-only).
        "eureka-credentials": f"--from-literal=service-urls={UNUSED_EUREKA_URL}",
    }
    for name, literal in out_of_band.items():
        cluster.kubectl("create", "secret", "generic", name, literal)
    try:
        cluster.apply(kustomization=overlay)
        cluster.wait_rollout("orders", START_TIMEOUT)
        (running,) = live_pods(cluster, "-l=app=orders")
        report = cluster.exec(
            running["metadata"]["name"], "prestop-agent", "check", "--config-only",
            f"--registry={shipped['PRESTOP_REGISTRY']}",
            f"--drain-quiet-seconds={shipped['PRESTOP_DRAIN_QUIET_SECONDS']}",
            container="prestop-agent",
        )  # fmt: skip
        assert_no_floor_warning(report)
        assert re.search(r"^ *PRESTOP_TOKEN += \*\*\*$", report, re.MULTILINE), report
        name = running["metadata"]["name"]
        access = assert_api_access(cluster, name, "orders")
        took = restart_replaces_every_pod(cluster, "orders")
        print(
            f"\nkustomize {layout}: check in the pod without a floor warning; {access}; rollout"
            f" restart complete in {took:.1f} s, every hook answered 200 with the Secret's token"
        )
    finally:
        cluster.kubectl("delete", "-k", str(overlay), "--wait=true", timeout=300)
        cluster.kubectl("delete", "secret", *out_of_band, "--ignore-not-found")


# The Eureka service URLs a user's Secret would hold, for a check that does not ask them.
UNUSED_EUREKA_URL = "http://127.0.0.1:8761/eureka/"


def assert_no_floor_warning(report: str) -> None:
    """``prestop-agent check`` validated the settings and printed the floor part by part, with
    no warning that it can outlast the drain maximum."""
    assert "configuration is valid" in report, report
    assert "Propagation floor, by stage" in report, report
    assert "WARNING" not in report, report
