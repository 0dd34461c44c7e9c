"""Everything in k8s/: the example manifests, the Helm chart, the kustomize component and the
monitoring pack, checked the way a Kubernetes engineer's review would:

* every Deployment they produce is a configuration the agent itself accepts, whose grace budget
  fits the pod it is in, whose hook and readiness probe reach the agent with the right token;
* every object passes the Kubernetes 1.29-1.34 schemas (kubernetes-validate, strict);
* checkov finds nothing that k8s/lint-waivers.yaml does not waive with a reason;
* ``helm lint`` and ``helm template`` and ``kustomize build`` run, with the tools ``make test``
  builds (helm and kustomize from the Go module proxy, checkov from PyPI, cached on the machine).
"""

from __future__ import annotations

import base64
import copy
import glob
import json
import os
import re
import shutil
import subprocess
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import kubernetes_validate
import pytest
import yaml

from agent import __version__
from agent.config import VARIABLES, load
from agent.plan import ShutdownPlan
from tests.harness.support import skip_or_fail

ROOT = Path(__file__).resolve().parent.parent
K8S = ROOT / "k8s"
CHART = K8S / "helm" / "prestop-agent"
KUSTOMIZE = K8S / "kustomize"
EXAMPLES = sorted((K8S / "examples").glob("*.yaml"))
LAYOUTS = ("native", "classic")
KUBERNETES_VERSIONS = [f"1.{minor}.0" for minor in range(29, 35)]
# What helm template assumes for the cluster: a helm built by `go install` (make k8s-tools) says
# 1.20 by default, where a release binary says its client-go's version.
KUBE_VERSION = KUBERNETES_VERSIONS[-1]
TOKEN = "replace-with-a-random-token"
Object = dict[str, Any]

# The agent's API access (its token, its Role), the same in every packaging.
SERVICE_ACCOUNT_DIRECTORY = "/var/run/secrets/kubernetes.io/serviceaccount"
API_VOLUME = "prestop-agent-kube-api-access"
# What the agent asks the API server, and nothing more: (API group, resource, verb). Its own pod
# (the deletion's grace period), the EndpointSlices that list it, Events on it.
AGENT_PERMISSIONS = {
    ("", "pods", "get"),
    ("discovery.k8s.io", "endpointslices", "list"),
    ("discovery.k8s.io", "endpointslices", "watch"),
    ("events.k8s.io", "events", "create"),
}
# The token (rotated by the kubelet; the lifetime the ServiceAccount admission controller asks
# for), the cluster's CA and the namespace: the files in-cluster clients read.
API_VOLUME_SOURCES = [
    {"serviceAccountToken": {"path": "token", "expirationSeconds": 3607}},
    {"configMap": {"name": "kube-root-ca.crt", "items": [{"key": "ca.crt", "path": "ca.crt"}]}},
    {"downwardAPI": {"items": [{"path": "namespace", "fieldRef": {
        "apiVersion": "v1", "fieldPath": "metadata.namespace"}}]}},
]  # fmt: skip

# Value sets the chart is rendered with: each layout, each drain mode, each registry, the token
# from a value, monitoring on. Every rendered object goes through every check below.
CHART_VALUES: dict[str, Object] = {
    "native": {"token": {"value": TOKEN}},
    "classic": {"layout": "classic", "token": {"value": TOKEN}},
    "fixed-no-registry-no-token": {
        "agent": {"drain": {"mode": "fixed", "seconds": 8}, "appShutdownSeconds": 20},
        "registry": {"type": "none"},
        "podDisruptionBudget": {"enabled": False},
        "gracePeriodSeconds": 30,
    },
    "register-with-every-traffic-setting": {
        "token": {"value": "another-token"},
        "registry": {"type": "register", "eureka": {"app": "PAYMENTS", "status": "OUT_OF_SERVICE"}},
        "agent": {
            "drain": {"maxSeconds": 20, "ignoreCidrs": ["192.168.0.0/24"], "source": "netlink"},
            "allowCidrs": ["192.168.0.0/24", "fd00::/64"],
            "logLevel": "debug",
            "kubeProxySyncSeconds": 2.5,
        },
    },
    # No app health URL: the app keeps its own readiness probe (refused otherwise). A pod of
    # the user's own: nothing of the chart's example pod is merged into it.
    "actuator": {
        "registry": {"type": "actuator"},
        "agent": {"appHealthPath": ""},
        "readinessProbe": {"replace": False},
        "deployment": {
            "pod": {
                "containers": [
                    {
                        "name": "app",
                        "image": "registry.example.com/shop/orders:1.4.2",
                        "ports": [{"name": "http", "containerPort": 8080}],
                        "readinessProbe": {
                            "httpGet": {"port": 8080, "path": "/actuator/health/readiness"}
                        },
                        "livenessProbe": {
                            "httpGet": {"port": 8080, "path": "/actuator/health/liveness"}
                        },
                        "securityContext": {
                            "allowPrivilegeEscalation": False,
                            "readOnlyRootFilesystem": True,
                            "runAsNonRoot": True,
                            "runAsUser": 10002,
                            "capabilities": {"drop": ["ALL"]},
                        },
                        "resources": {
                            "requests": {"cpu": "250m", "memory": "512Mi"},
                            "limits": {"cpu": "2", "memory": "512Mi"},
                        },
                        "volumeMounts": [{"name": "tmp", "mountPath": "/tmp"}],
                    }
                ],
                "volumes": [{"name": "tmp", "emptyDir": {}}],
                "automountServiceAccountToken": False,
            }
        },
    },
    # A private CA for https Eureka, mounted from a Secret.
    "private-ca": {
        "token": {"value": TOKEN},
        "registry": {"eureka": {"ca": {"secret": "eureka-ca", "key": "ca.pem"}}},
    },
    # The pods' own ServiceAccount (one the app needs, say): the Role is bound to it.
    "own-service-account": {
        "token": {"value": TOKEN},
        "serviceAccount": {"create": False, "name": "orders"},
    },
    "monitoring": {
        "token": {"value": TOKEN},
        "monitoring": {
            "podMonitor": {"enabled": True, "labels": {"release": "kube-prometheus-stack"}},
            "prometheusRule": {"enabled": True},
            "dashboard": {"enabled": True},
        },
    },
}


# --- the tools -----------------------------------------------------------------------------------


def _tool(name: str) -> str:
    """The tool ``make k8s-tools`` cached (its path in PRESTOP_<NAME>), else one on PATH."""
    path = os.environ.get(f"PRESTOP_{name.upper()}")
    if not path:
        tools = Path.home() / ".cache" / "prestop-agent" / "tools"
        patterns = (tools / f"{name}-*" / name, tools / f"{name}-*" / "bin" / name)
        cached = sorted(found for pattern in patterns for found in glob.glob(str(pattern)))
        path = cached[-1] if cached else shutil.which(name)
    if not path or not Path(path).exists():
        skip_or_fail(f"{name} is not installed (make k8s-tools builds it)")
    return path  # type: ignore[return-value]


def _run(command: list[str | Path], **kwargs: Any) -> subprocess.CompletedProcess[str]:
    return subprocess.run(command, capture_output=True, text=True, timeout=300, **kwargs)


def _documents(text: str) -> list[Object]:
    return [doc for doc in yaml.safe_load_all(text) if doc]


def helm_template(
    values: Object,
    *extra: str,
    chart: Path = CHART,
    hooks: bool = False,
    release: str = "orders",
) -> list[Object]:
    """The chart's objects; its hooks (the helm test pod) only with ``hooks``."""
    done = _run(
        [_tool("helm"), "template", release, chart, "--values", "-", "--kube-version",
         KUBE_VERSION, *extra],
        input=json.dumps(values),
    )  # fmt: skip
    assert done.returncode == 0, done.stderr
    objects = _documents(done.stdout)
    return [o for o in objects if hooks or not _is_hook(o)]


def _is_hook(obj: Object) -> bool:
    return "helm.sh/hook" in obj["metadata"].get("annotations", {})


def kustomize_build(directory: Path) -> list[Object]:
    done = _run([_tool("kustomize"), "build", directory])
    assert done.returncode == 0, done.stderr
    return _documents(done.stdout)


@pytest.fixture(scope="module")
def chart_renders() -> dict[str, list[Object]]:
    return {name: helm_template(values, hooks=True) for name, values in CHART_VALUES.items()}


def _kustomize_example(tmp: Path, layout: str) -> Path:
    """A copy of k8s/kustomize whose example overlay uses ``layout``."""
    copied = tmp / f"kustomize-{layout}"
    shutil.copytree(KUSTOMIZE, copied)
    overlay = copied / "example" / "kustomization.yaml"
    text = overlay.read_text()
    assert "- ../native" in text
    overlay.write_text(text.replace("- ../native", f"- ../{layout}"))
    return copied / "example"


@pytest.fixture(scope="module")
def kustomize_builds(tmp_path_factory: pytest.TempPathFactory) -> dict[str, list[Object]]:
    tmp = tmp_path_factory.mktemp("kustomize")
    builds = {layout: kustomize_build(_kustomize_example(tmp, layout)) for layout in LAYOUTS}
    builds["monitoring"] = kustomize_build(K8S / "monitoring")
    return builds


# --- the agent's view of a Deployment ------------------------------------------------------------

DOWNWARD_API = {
    "status.podIP": "10.1.2.3",
    "metadata.name": "orders-7f9c",
    "metadata.namespace": "shop",
}


def _secret_data(secret: Object) -> dict[str, str]:
    if "data" in secret:  # a secretGenerator's
        return {key: base64.b64decode(value).decode() for key, value in secret["data"].items()}
    return secret.get("stringData", {})


def _environment(container: Object, objects: list[Object]) -> dict[str, str]:
    """The agent container's environment as the kubelet would fill it in from these objects."""
    secrets = {o["metadata"]["name"]: _secret_data(o) for o in objects if o["kind"] == "Secret"}
    configmaps = {o["metadata"]["name"]: o["data"] for o in objects if o["kind"] == "ConfigMap"}
    environ: dict[str, str] = {}
    for source in container.get("envFrom", []):
        environ.update(configmaps[source["configMapRef"]["name"]])
    for variable in container.get("env", []):
        if "value" in variable:
            environ[variable["name"]] = variable["value"]
            continue
        reference = variable["valueFrom"]
        if "fieldRef" in reference:
            environ[variable["name"]] = DOWNWARD_API[reference["fieldRef"]["fieldPath"]]
        else:
            key = reference["secretKeyRef"]
            if key["name"] not in secrets and key.get("optional"):
                continue
            assert key["name"] in secrets, f"{variable['name']}: no Secret {key['name']} here"
            environ[variable["name"]] = secrets[key["name"]][key["key"]]
    return environ


def _secrets_from_outside(objects: list[Object]) -> list[Object]:
    """The Secrets a user creates out of band (the chart and the component only reference them):
    the Eureka URLs, and the token wherever the build has the hook's copy only."""
    present = {o["metadata"]["name"] for o in objects if o["kind"] == "Secret"}
    urls = "http://eureka:secret@eureka-0:8761/eureka/"
    outside = {
        "eureka-credentials": {"service-urls": urls},
        "prestop-agent-token": {"token": TOKEN},
        "my-token": {"token": TOKEN},
        "eureka-ca": {"ca.pem": "-----BEGIN CERTIFICATE-----"},
    }
    return [
        {"kind": "Secret", "metadata": {"name": name}, "stringData": data}
        for name, data in outside.items()
        if name not in present
    ]


SYSTEM_CAS = "/etc/ssl/certs/ca-certificates.crt"


def _check_ca_is_mounted(path: str, agent: Object, pod: Object) -> None:
    """PRESTOP_EUREKA_CA_FILE is a key of a Secret or ConfigMap mounted into the agent."""
    directory, _, key = path.rpartition("/")
    mounts = [m for m in agent.get("volumeMounts", []) if m["mountPath"] == directory]
    assert len(mounts) == 1, f"{path}: no volume mounted at {directory} in the agent"
    (volume,) = [v for v in pod.get("volumes", []) if v["name"] == mounts[0]["name"]]
    source = volume.get("secret") or volume.get("configMap")
    assert source is not None, volume
    items = source.get("items")
    assert items is None or key in {i["path"] for i in items}, f"{path}: not in {volume}"


def check_agent_deployment(objects: list[Object]) -> Object:
    """The Deployment in ``objects`` as the agent sees it: a configuration it accepts, that fits
    the pod around it. Returns the agent's environment."""
    (deployment,) = [o for o in objects if o["kind"] == "Deployment"]
    pod_template = deployment["spec"]["template"]
    pod = pod_template["spec"]
    agents = [
        c for c in pod.get("initContainers", []) + pod["containers"] if c["name"] == "prestop-agent"
    ]
    assert len(agents) == 1
    (agent,) = agents
    native = agent in pod.get("initContainers", [])
    assert native == (agent.get("restartPolicy") == "Always"), (
        "native: an init container kept running"
    )
    if native:
        assert pod["initContainers"][0] is agent, (
            "the agent starts before the other init containers"
        )

    environ = _environment(agent, objects + _secrets_from_outside(objects))
    assert set(environ) <= set(VARIABLES), f"unknown variables: {set(environ) - set(VARIABLES)}"
    if "PRESTOP_EUREKA_CA_FILE" in environ:
        _check_ca_is_mounted(environ["PRESTOP_EUREKA_CA_FILE"], agent, pod)
        environ["PRESTOP_EUREKA_CA_FILE"] = SYSTEM_CAS  # what the mount would hold: a PEM bundle
    config = load(environ)  # raises on anything invalid, the grace budget included
    assert config.grace_period_seconds == pod["terminationGracePeriodSeconds"]
    assert config.budget().fits
    assert agent["ports"][0]["containerPort"] == config.port
    assert agent["ports"][0]["name"] == "prestop-agent", "what the PodMonitor scrapes"

    for container in pod.get("initContainers", []) + pod["containers"]:
        if container is not agent:
            mounted = {m["mountPath"] for m in container.get("volumeMounts", [])}
            assert SERVICE_ACCOUNT_DIRECTORY not in mounted, f"{container['name']}: a token"

    hooked = [c for c in pod["containers"] if "lifecycle" in c]
    assert len(hooked) == 1, "exactly one container (the app) drains through the agent"
    (app,) = hooked
    hook = app["lifecycle"]["preStop"]["httpGet"]
    assert (hook["port"], hook["path"]) == (config.port, "/prestop")
    assert "host" not in hook, "the kubelet must call the pod IP, where the agent listens"
    headers = {h["name"]: h["value"] for h in hook.get("httpHeaders", [])}
    assert headers.get("X-Prestop-Token") == config.token
    # The app's readiness on the agent's /ready only with the app's health behind it: without
    # PRESTOP_APP_HEALTH_URL the pod would be Ready before the app listens.
    probe = app.get("readinessProbe", {}).get("httpGet", {})
    on_agent = (probe.get("port"), probe.get("path")) == (config.port, "/ready")
    assert on_agent == (config.app_health_url is not None), "readiness follows the app's health"
    assert set(config.app_ports) <= {p["containerPort"] for p in app["ports"]}
    assert pod["securityContext"]["seccompProfile"] == {"type": "RuntimeDefault"}
    assert pod_template["metadata"]["labels"]["prestop-agent/sidecar"] == "true"
    assert "annotations" not in pod_template["metadata"] or not any(
        key.startswith("prometheus.io/") for key in pod_template["metadata"]["annotations"]
    ), "prometheus.io/* annotations would steal the app's own scrape"
    return environ


@pytest.mark.parametrize("manifest", EXAMPLES, ids=lambda m: m.stem)
def test_each_example_is_a_configuration_the_agent_accepts(manifest: Path) -> None:
    check_agent_deployment(_documents(manifest.read_text()))


def test_there_is_an_example_for_each_sidecar_layout() -> None:
    assert {m.name for m in EXAMPLES} == {"classic-sidecar.yaml", "native-sidecar.yaml"}


def test_each_chart_render_is_a_configuration_the_agent_accepts(
    chart_renders: dict[str, list[Object]],
) -> None:
    for name, objects in chart_renders.items():
        environ = check_agent_deployment(objects)
        values = CHART_VALUES[name]
        assert environ["PRESTOP_GRACE_PERIOD_SECONDS"] == str(values.get("gracePeriodSeconds", 150))
        assert ("PRESTOP_TOKEN" in environ) == ("token" in values), name


def test_each_kustomize_build_is_a_configuration_the_agent_accepts(
    kustomize_builds: dict[str, list[Object]],
) -> None:
    for layout in LAYOUTS:
        objects = kustomize_builds[layout]
        environ = check_agent_deployment(objects)
        assert environ["PRESTOP_TOKEN"] == TOKEN, layout
        (deployment,) = [o for o in objects if o["kind"] == "Deployment"]
        pod = deployment["spec"]["template"]["spec"]
        # The user's own init container stays, after the agent (native) or alone (classic).
        names = [c["name"] for c in pod.get("initContainers", [])]
        assert names == (["prestop-agent"] if layout == "native" else []), layout
        assert [c["name"] for c in pod["containers"]] == (
            ["orders"] if layout == "native" else ["orders", "prestop-agent"]
        )


def test_the_grace_period_is_set_once_in_the_kustomize_overlay(tmp_path: Path) -> None:
    overlay = _kustomize_example(tmp_path, "native")
    kustomization = overlay / "kustomization.yaml"
    text = kustomization.read_text()
    kustomization.write_text(
        text.replace("PRESTOP_GRACE_PERIOD_SECONDS=150", "PRESTOP_GRACE_PERIOD_SECONDS=95")
    )
    objects = kustomize_build(overlay)
    (deployment,) = [o for o in objects if o["kind"] == "Deployment"]
    assert deployment["spec"]["template"]["spec"]["terminationGracePeriodSeconds"] == 95
    assert check_agent_deployment(objects)["PRESTOP_GRACE_PERIOD_SECONDS"] == "95"


# --- the examples are what the chart renders -----------------------------------------------------


def _comparable(objects: list[Object]) -> dict[tuple[str, str], Object]:
    """Objects by kind and name, without Helm's bookkeeping labels."""
    found = {}
    for obj in copy.deepcopy(objects):
        labels = obj["metadata"].get("labels", {})
        labels.pop("helm.sh/chart", None)
        labels.pop("app.kubernetes.io/managed-by", None)
        found[(obj["kind"], obj["metadata"]["name"])] = obj
    return found


@pytest.mark.parametrize("layout", ["native", "classic"])
def test_the_examples_are_what_the_chart_renders(
    layout: str, chart_renders: dict[str, list[Object]]
) -> None:
    example = _comparable(_documents((K8S / "examples" / f"{layout}-sidecar.yaml").read_text()))
    rendered = _comparable([o for o in chart_renders[layout] if not _is_hook(o)])
    eureka = example.pop(("Secret", "eureka-credentials"))
    assert eureka["stringData"]["service-urls"], "the example shows the Secret the chart expects"
    assert example == rendered


# --- the chart's own behaviour -------------------------------------------------------------------


def test_helm_lint_finds_nothing_with_any_value_set() -> None:
    for name, values in CHART_VALUES.items():
        done = _run(
            [_tool("helm"), "lint", "--strict", CHART, "--values", "-", "--kube-version",
             KUBE_VERSION],
            input=json.dumps(values),
        )  # fmt: skip
        assert done.returncode == 0 and "0 chart(s) failed" in done.stdout, name + done.stdout


def test_every_agent_variable_has_a_chart_value_named_after_it() -> None:
    """What the chart README promises: a user tunes the agent through values, not extraEnv."""
    helpers = (CHART / "templates" / "_helpers.tpl").read_text()
    values = (CHART / "values.yaml").read_text()
    for variable in (v for v in VARIABLES if v.startswith("PRESTOP_")):
        assert variable in helpers, f"{variable}: the chart never sets it"
        assert variable in values, f"{variable}: no value in values.yaml names it"
    environ = check_agent_deployment(
        helm_template(CHART_VALUES["register-with-every-traffic-setting"])
    )
    assert environ["PRESTOP_KUBE_PROXY_SYNC_SECONDS"] == "2.5"


def test_the_chart_and_its_image_follow_the_agent_version() -> None:
    chart = yaml.safe_load((CHART / "Chart.yaml").read_text())
    values = yaml.safe_load((CHART / "values.yaml").read_text())
    assert chart["version"] == chart["appVersion"] == values["image"]["tag"] == __version__


def test_the_chart_ships_the_monitoring_pack_unchanged(
    chart_renders: dict[str, list[Object]],
) -> None:
    rendered = {o["kind"]: o for o in chart_renders["monitoring"]}
    for kind, source in (
        ("PrometheusRule", "prometheusrule.yaml"),
        ("PodMonitor", "podmonitor.yaml"),
    ):
        shipped = yaml.safe_load((K8S / "monitoring" / source).read_text())
        if kind == "PodMonitor":  # the release's own pods only
            shipped["spec"]["selector"]["matchLabels"]["prestop-agent/release"] = "orders"
        assert rendered[kind]["spec"] == shipped["spec"], kind
    assert rendered["PodMonitor"]["metadata"]["labels"]["release"] == "kube-prometheus-stack"
    dashboard = rendered["ConfigMap"]["data"]["prestop-agent-dashboard.json"]
    assert json.loads(dashboard) == json.loads(
        (K8S / "monitoring" / "prestop-agent-dashboard.json").read_text()
    )
    assert rendered["ConfigMap"]["metadata"]["labels"]["grafana_dashboard"] == "1"
    assert not {"PrometheusRule", "PodMonitor", "ConfigMap"} & {
        o["kind"] for o in chart_renders["native"]
    }, "monitoring objects only behind their switches"


@pytest.mark.parametrize(
    ("values", "message"),
    [
        (
            {"token": {"existingSecret": {"name": "my-token"}}},
            "token.existingSecret needs token.value too",
        ),
        (
            {"agent": {"appHealthPath": ""}},
            "agent.appHealthPath is empty, so the agent's /ready would not follow the app's health",
        ),
        (
            {"registry": {"eureka": {"ca": {"secret": "a", "configMap": "b"}}}},
            "set registry.eureka.ca.secret or registry.eureka.ca.configMap, not both",
        ),
        ({"appContainer": "web"}, 'no container named "web"'),
        ({"layout": "sidecar"}, "at '/layout': value must be one of 'native', 'classic'"),
        ({"agent": {"drain": {"mode": "timer"}}}, "at '/agent/drain/mode': value must be one of"),
        ({"agent": {"drian": {"mode": "fixed"}}}, "at '/agent': additional properties 'drian'"),
        (
            {"deployment": {"pod": {"terminationGracePeriodSeconds": 30,
                                    "containers": [{"name": "app", "image": "x"}]}}},
            "set gracePeriodSeconds, not the pod's terminationGracePeriodSeconds",
        ),
        (
            {"deployment": {"pod": {"containers": [{
                "name": "app", "image": "x", "lifecycle": {"preStop": {"sleep": {"seconds": 5}}},
            }]}}},
            'container "app" already has a preStop hook',
        ),
        (
            {"deployment": {"pod": {"serviceAccountName": "orders",
                                    "containers": [{"name": "app", "image": "x"}]}}},
            'the pod spec runs as ServiceAccount "orders", the chart\'s Role is bound to'
            ' "orders-prestop-agent"',
        ),
        (
            {"serviceAccount": {"create": False}},
            "rbac.create needs a ServiceAccount to bind the Role to",
        ),
    ],
    ids=["existing-secret", "no-health", "ca", "no-app-container", "layout", "mode", "typo",
         "grace", "prestop", "two-accounts", "no-account-to-bind"],
)  # fmt: skip
def test_a_wrong_value_fails_the_render_with_a_message_naming_it(
    values: Object, message: str
) -> None:
    done = _run(
        [_tool("helm"), "template", "orders", CHART, "--values", "-", "--kube-version",
         KUBE_VERSION],
        input=json.dumps(values),
    )  # fmt: skip
    assert done.returncode != 0
    assert message in done.stderr, done.stderr


def test_a_parent_chart_adds_the_agent_to_its_own_deployment(tmp_path: Path) -> None:
    """The helper route: a chart of the user's own, with prestop-agent as a dependency."""
    parent = tmp_path / "orders"
    (parent / "templates").mkdir(parents=True)
    shutil.copytree(CHART, parent / "charts" / "prestop-agent", symlinks=True)
    (parent / "Chart.yaml").write_text(
        "apiVersion: v2\nname: orders\nversion: 1.0.0\n"
        "dependencies:\n- {name: prestop-agent, version: " + __version__ + "}\n"
    )
    (parent / "values.yaml").write_text(
        yaml.safe_dump(
            {
                "prestop-agent": {"deployment": {"enabled": False}, "token": {"value": TOKEN}},
                "image": "registry.example.com/shop/orders:1.4.2",
            }
        )
    )
    (parent / "templates" / "deployment.yaml").write_text(
        """\
{{- $pod := dict "containers" (list (dict "name" "app" "image" .Values.image
     "ports" (list (dict "name" "http" "containerPort" 8080)))) }}
{{- $agent := dict "Values" (index .Values "prestop-agent") "Release" .Release }}
apiVersion: apps/v1
kind: Deployment
metadata:
  name: {{ .Release.Name }}
spec:
  selector:
    matchLabels: {app: {{ .Release.Name }}}
  template:
    metadata:
      labels:
        app: {{ .Release.Name }}
        {{- include "prestop-agent.podLabels" $agent | nindent 8 }}
    spec:
      {{- include "prestop-agent.podSpec" (merge (dict "pod" $pod) $agent) | nindent 6 }}
"""
    )
    objects = helm_template({}, chart=parent)
    assert sorted(o["kind"] for o in objects) == [
        "Deployment", "PodDisruptionBudget", "Role", "RoleBinding", "Secret", "ServiceAccount"
    ]  # fmt: skip
    assert check_api_access(objects) == "orders-prestop-agent"
    assert check_agent_deployment(objects)["PRESTOP_TOKEN"] == TOKEN
    # The subchart's PodDisruptionBudget covers the parent's pods.
    (budget,) = [o for o in objects if o["kind"] == "PodDisruptionBudget"]
    (deployment,) = [o for o in objects if o["kind"] == "Deployment"]
    selector = budget["spec"]["selector"]["matchLabels"]
    assert selector.items() <= deployment["spec"]["template"]["metadata"]["labels"].items()


# --- the agent's API access: least privilege, the token in the agent container only -------------


def granted(role: Object) -> set[tuple[str, str, str]]:
    """Every (API group, resource, verb) the Role grants. A wildcard, a rule on named resources
    or on non-resource URLs fails: none of them is least privilege here."""
    found = set()
    for rule in role["rules"]:
        assert set(rule) == {"apiGroups", "resources", "verbs"}, rule
        for group in rule["apiGroups"]:
            for resource in rule["resources"]:
                for verb in rule["verbs"]:
                    assert "*" not in (group, resource, verb), rule
                    found.add((group, resource, verb))
    return found


def check_api_access(objects: list[Object]) -> str:
    """The agent's API access in ``objects`` as the API server and the kubelet take it: the
    agent container, and no other, mounts the projected token read-only where in-cluster clients
    read it; the pod runs as a ServiceAccount whose own token the admission controller mounts
    nowhere (when these objects create it), bound by a RoleBinding in its namespace to a Role
    that grants exactly AGENT_PERMISSIONS; no cluster-wide grant. Returns the account's name."""
    (deployment,) = [o for o in objects if o["kind"] == "Deployment"]
    pod = deployment["spec"]["template"]["spec"]
    containers = pod.get("initContainers", []) + pod["containers"]
    (agent,) = [c for c in containers if c["name"] == "prestop-agent"]
    (mount,) = [
        m for m in agent.get("volumeMounts", []) if m["mountPath"] == SERVICE_ACCOUNT_DIRECTORY
    ]
    assert mount == {"name": API_VOLUME, "mountPath": SERVICE_ACCOUNT_DIRECTORY, "readOnly": True}
    (volume,) = [v for v in pod["volumes"] if v["name"] == API_VOLUME]
    assert volume == {"name": API_VOLUME, "projected": {"sources": API_VOLUME_SOURCES}}
    # Which pod to read, which namespace's slices to watch, which address they list.
    downward = {
        e["name"]: e["valueFrom"]["fieldRef"]["fieldPath"]
        for e in agent.get("env", [])
        if "fieldRef" in e.get("valueFrom", {})
    }
    assert downward == {"POD_NAME": "metadata.name", "POD_NAMESPACE": "metadata.namespace",
                        "POD_IP": "status.podIP"}, downward  # fmt: skip
    for container in containers:  # check_agent_deployment checks the mount paths
        if container is not agent:
            assert API_VOLUME not in {m["name"] for m in container.get("volumeMounts", [])}
    account = pod["serviceAccountName"]
    for created in (o for o in objects if o["kind"] == "ServiceAccount"):
        assert created["metadata"]["name"] == account
        assert created["automountServiceAccountToken"] is False, "the app would get its token"
    kinds = {o["kind"] for o in objects}
    assert not {"ClusterRole", "ClusterRoleBinding"} & kinds, "the pod's namespace only"
    (role,) = [o for o in objects if o["kind"] == "Role"]
    (binding,) = [o for o in objects if o["kind"] == "RoleBinding"]
    assert binding["roleRef"] == {
        "apiGroup": "rbac.authorization.k8s.io", "kind": "Role", "name": role["metadata"]["name"]
    }  # fmt: skip
    # Without a namespace: the binding's own, wherever it is applied.
    assert binding["subjects"] == [{"kind": "ServiceAccount", "name": account}]
    assert granted(role) == AGENT_PERMISSIONS
    return account


def _packagings(
    chart_renders: dict[str, list[Object]], kustomize_builds: dict[str, list[Object]]
) -> dict[str, list[Object]]:
    """Every way k8s/ installs the agent: the examples, each chart render, each kustomize build."""
    found = {f"{m.name}": _documents(m.read_text()) for m in EXAMPLES}
    for name, objects in chart_renders.items():
        found[f"helm template ({name})"] = [o for o in objects if not _is_hook(o)]
    for layout in LAYOUTS:
        found[f"kustomize build ({layout})"] = kustomize_builds[layout]
    return found


def test_every_packaging_gives_the_agent_alone_a_least_privilege_token(
    chart_renders: dict[str, list[Object]], kustomize_builds: dict[str, list[Object]]
) -> None:
    accounts = {}
    for where, objects in _packagings(chart_renders, kustomize_builds).items():
        try:
            accounts[where] = check_api_access(objects)
        except AssertionError as error:
            raise AssertionError(f"{where}: {error}") from error
    assert accounts["helm template (native)"] == "orders-prestop-agent"
    assert accounts["helm template (own-service-account)"] == "orders"
    assert accounts["kustomize build (native)"] == "prestop-agent"
    assert len(accounts) == len(EXAMPLES) + len(CHART_VALUES) + len(LAYOUTS)


def _api_objects(objects: list[Object]) -> dict[str, Object]:
    """The ServiceAccount, Role and RoleBinding, the token's volume and mount, without the names
    and labels each packaging gives them."""
    found: dict[str, Object] = {}
    for obj in copy.deepcopy(objects):
        if obj["kind"] in ("ServiceAccount", "Role", "RoleBinding"):
            obj["metadata"] = {}
            if obj["kind"] == "RoleBinding":
                obj["roleRef"]["name"] = obj["subjects"][0]["name"] = "NAME"
            found[obj["kind"]] = obj
    (deployment,) = [o for o in objects if o["kind"] == "Deployment"]
    pod = deployment["spec"]["template"]["spec"]
    (agent,) = [c for c in pod.get("initContainers", []) + pod["containers"]
                if c["name"] == "prestop-agent"]  # fmt: skip
    found["volume"] = next(v for v in pod["volumes"] if v["name"] == API_VOLUME)
    found["mount"] = next(m for m in agent["volumeMounts"] if m["name"] == API_VOLUME)
    return found


def test_the_chart_and_kustomize_grant_the_same(
    chart_renders: dict[str, list[Object]], kustomize_builds: dict[str, list[Object]]
) -> None:
    for layout in LAYOUTS:
        chart = _api_objects(chart_renders[layout])
        assert set(chart) == {"ServiceAccount", "Role", "RoleBinding", "volume", "mount"}
        assert chart == _api_objects(kustomize_builds[layout]), layout


def test_the_helm_test_pod_runs_as_the_agent_with_its_token(
    chart_renders: dict[str, list[Object]],
) -> None:
    """``prestop-agent check`` in the helm test pod sees the API as the agent does."""
    objects = chart_renders["native"]
    (check,) = [o for o in objects if _is_hook(o)]
    account = check_api_access([o for o in objects if not _is_hook(o)])
    spec = check["spec"]
    assert spec["serviceAccountName"] == account
    assert spec["volumes"] == [{"name": API_VOLUME, "projected": {"sources": API_VOLUME_SOURCES}}]
    (container,) = spec["containers"]
    assert {"name": API_VOLUME, "mountPath": SERVICE_ACCOUNT_DIRECTORY, "readOnly": True} in (
        container["volumeMounts"]
    )


def test_the_chart_binds_the_role_to_the_users_own_service_account() -> None:
    """A pod spec with its own ServiceAccount (Spring Cloud Kubernetes needs one): no second
    account, the Role bound to the user's, and the pod spec's token mounting left as it was."""
    pod = {"serviceAccountName": "orders", "containers": [{
        "name": "app", "image": "shop/orders:2", "ports": [{"name": "http", "containerPort": 8080}],
    }]}  # fmt: skip
    values = {"serviceAccount": {"create": False, "name": "orders"}, "deployment": {"pod": pod}}
    objects = helm_template(values)
    assert "ServiceAccount" not in {o["kind"] for o in objects}
    assert check_api_access(objects) == "orders"
    (deployment,) = [o for o in objects if o["kind"] == "Deployment"]
    assert "automountServiceAccountToken" not in deployment["spec"]["template"]["spec"]


def test_the_chart_without_api_access_mounts_no_token_and_grants_nothing() -> None:
    """What the agent then does (one warning, the assumed EndpointSlice bound) is the agent's;
    the chart's part is that nothing half-configured is left behind."""
    values = {"serviceAccount": {"create": False, "mountToken": False}, "rbac": {"create": False}}
    objects = helm_template(values, hooks=True)
    assert not {"ServiceAccount", "Role", "RoleBinding"} & {o["kind"] for o in objects}
    check_agent_deployment(objects)
    (deployment,) = [o for o in objects if o["kind"] == "Deployment"]
    (check,) = [o for o in objects if _is_hook(o)]
    for pod in (deployment["spec"]["template"]["spec"], check["spec"]):
        assert "serviceAccountName" not in pod
        assert API_VOLUME not in yaml.safe_dump(pod)


def test_kustomize_binds_the_role_to_the_users_own_service_account(tmp_path: Path) -> None:
    """The recipe of k8s/kustomize/README.md: the overlay's own patches run after the component,
    so they can point the RoleBinding and the pods at the user's account and drop the
    component's."""
    readme = (KUSTOMIZE / "README.md").read_text()
    recipe = readme.split("### Your own ServiceAccount", 1)[1].split("```yaml\n", 1)[1]
    recipe = recipe.split("```", 1)[0]
    assert "name: orders" in recipe
    overlay = _overlay(tmp_path, {})
    kustomization = overlay / "kustomization.yaml"
    kustomization.write_text(kustomization.read_text() + recipe)
    objects = kustomize_build(overlay)
    check_agent_deployment(objects)
    assert "ServiceAccount" not in {o["kind"] for o in objects}
    assert check_api_access(objects) == "orders"


# --- schema validation and the security linter, over everything ----------------------------------


def _every_manifest(
    chart_renders: dict[str, list[Object]], kustomize_builds: dict[str, list[Object]]
) -> Iterator[tuple[str, Object]]:
    """(where it comes from, object) for every Kubernetes object k8s/ holds or produces."""
    for path in sorted(K8S.rglob("*.yaml")):
        relative = path.relative_to(ROOT)
        if CHART in path.parents and path.parent.name != "files":
            continue  # Go templates and values: checked through their renders
        if path.name in ("kustomization.yaml", "rules-test.yaml", "lint-waivers.yaml"):
            continue  # kustomize's own files, promtool's test file, the waivers
        if KUSTOMIZE / "common" in path.parents or path.parent == KUSTOMIZE / "classic":
            continue  # patches: checked through the builds
        for obj in _documents(path.read_text()):
            yield str(relative), obj
    for name, objects in chart_renders.items():
        for obj in objects:
            yield f"helm template ({name})", obj
    for layout, objects in kustomize_builds.items():
        for obj in objects:
            yield f"kustomize build ({layout})", obj


def test_every_app_with_a_read_only_root_gets_a_writable_tmp(
    chart_renders: dict[str, list[Object]], kustomize_builds: dict[str, list[Object]]
) -> None:
    """Spring Boot's embedded Tomcat creates its work folders under java.io.tmpdir and does not
    start without a writable /tmp: every app container shown read-only mounts an emptyDir there."""
    checked = 0
    for where, obj in _every_manifest(chart_renders, kustomize_builds):
        if obj["kind"] != "Deployment":
            continue
        pod = obj["spec"]["template"]["spec"]
        empty_dirs = {v["name"] for v in pod.get("volumes", []) if "emptyDir" in v}
        for container in pod["containers"]:
            if container["name"] == "prestop-agent":
                continue
            if not container.get("securityContext", {}).get("readOnlyRootFilesystem"):
                continue
            tmp = [m["name"] for m in container.get("volumeMounts", []) if m["mountPath"] == "/tmp"]
            assert len(tmp) == 1 and tmp[0] in empty_dirs, f"{where}: {container['name']}"
            checked += 1
    assert checked >= 10  # examples, each chart render with a Deployment, the kustomize builds


CUSTOM_RESOURCES = {"monitoring.coreos.com/v1"}  # no schema shipped; promtool checks the rules


@pytest.mark.slow
def test_every_manifest_passes_the_kubernetes_schemas_from_1_29_to_1_34(
    chart_renders: dict[str, list[Object]], kustomize_builds: dict[str, list[Object]]
) -> None:
    assert set(KUBERNETES_VERSIONS) <= set(kubernetes_validate.utils.all_versions())
    validated = skipped = 0
    failures = []
    for where, obj in _every_manifest(chart_renders, kustomize_builds):
        if obj["apiVersion"] in CUSTOM_RESOURCES:
            skipped += 1
            continue
        for version in KUBERNETES_VERSIONS:
            try:
                kubernetes_validate.validate(obj, version, strict=True)
            except kubernetes_validate.ValidationError as error:
                name = f"{obj['kind']} {obj['metadata']['name']}"
                failures.append(f"{where}: {name} on {version}: {error.message}")
        validated += 1
    assert not failures, "\n".join(failures)
    assert validated >= 30 and skipped >= 4
    versions = len(KUBERNETES_VERSIONS)
    print(f"kubernetes-validate: {validated} objects x {versions} versions, 0 failures;")
    print(f"  {skipped} prometheus-operator objects without a schema (promtool checks the rules)")


def _waivers() -> dict[str, str]:
    return yaml.safe_load((K8S / "lint-waivers.yaml").read_text())["checkov"]


@pytest.mark.slow
def test_checkov_finds_nothing_that_is_not_waived_with_a_reason(
    chart_renders: dict[str, list[Object]],
    kustomize_builds: dict[str, list[Object]],
    tmp_path: Path,
) -> None:
    checkov = _tool("checkov")
    by_source: dict[str, list[Object]] = {}
    for where, obj in _every_manifest(chart_renders, kustomize_builds):
        if _is_hook(obj):
            # The helm test pod runs one command and exits: liveness and readiness probes do not
            # apply. It takes the agent container's image, security context and resources, which
            # checkov does see in the Deployments.
            continue
        by_source.setdefault(where, []).append(obj)
    for index, (where, objects) in enumerate(by_source.items()):
        name = "".join(c if c.isalnum() else "-" for c in where)
        (tmp_path / f"{index:02d}-{name}.yaml").write_text(yaml.safe_dump_all(objects))
    done = _run(
        [checkov, "--directory", tmp_path, "--framework", "kubernetes", "--output", "json",
         "--skip-download"],
        env={**os.environ, "LOG_LEVEL": "ERROR"},
    )  # fmt: skip
    assert done.returncode in (0, 1), done.stderr
    report = json.loads(done.stdout)
    reports = report if isinstance(report, list) else [report]
    failed = [check for r in reports for check in r["results"]["failed_checks"]]
    passed = sum(len(r["results"]["passed_checks"]) for r in reports)
    waivers = _waivers()
    assert all(len(reason) > 40 for reason in waivers.values()), "each waiver says why"
    unwaived = sorted(
        f"{c['check_id']} {c['check_name']}: {c['resource']} in {c['file_path']}"
        for c in failed
        if c["check_id"] not in waivers
    )
    assert not unwaived, "checkov findings:\n" + "\n".join(unwaived)
    stale = set(waivers) - {c["check_id"] for c in failed}
    assert not stale, f"waivers no finding needs any more: {stale}"
    assert passed > 100
    print(
        f"checkov: {passed} checks passed, {len(failed)} findings, all under {len(waivers)} waivers"
    )


# --- the shipped defaults keep the promise ------------------------------------------------------

# How much longer the client bound may grow (a margin on Spring Cloud's 30 s + 35 s) before the
# shipped grace period stops holding the floor: the defaults must not sit on the edge.
FLOOR_HEADROOM_SECONDS = 10.0


def _default_configs(tmp_path: Path) -> dict[str, Any]:
    """The agent's Config as the chart with default values, and the kustomize example, give it."""
    configs = {}
    for name, objects in (
        ("helm default values", helm_template({})),
        ("kustomize example", kustomize_build(_kustomize_example(tmp_path, "native"))),
    ):
        configs[name] = load(check_agent_deployment(objects))
    return configs


def test_the_shipped_defaults_hold_the_propagation_floor_with_room_to_spare(
    tmp_path: Path,
) -> None:
    """Computed from the agent's own Config defaults (not a copied 95): a longer client bound in
    the code shows up here."""
    for name, config in _default_configs(tmp_path).items():
        assert config.registry == "eureka", name
        assert ShutdownPlan.of(config).floor_warning() is None, (
            f"{name}: {ShutdownPlan.of(config).floor_warning()}"
        )
        room = config.drain_limit - ShutdownPlan.of(config).worst_case_floor()
        assert room >= FLOOR_HEADROOM_SECONDS, f"{name}: only {room:g}s above the floor"


def test_the_shipped_defaults_do_not_fire_the_floor_alert(tmp_path: Path) -> None:
    """promtool, on the gauges a default pod exports at start-up (agent/main.py
    _announce_floor), with the pack's own rules: PrestopDrainFloorAboveMax stays silent."""
    promtool = shutil.which("promtool")
    if promtool is None:
        skip_or_fail("promtool is not installed (apt-get install prometheus)")
    rules = yaml.safe_load((K8S / "monitoring" / "prometheusrule.yaml").read_text())["spec"]
    (tmp_path / "rules.yaml").write_text(yaml.safe_dump({"groups": rules["groups"]}))
    series = []
    for index, config in enumerate(_default_configs(tmp_path).values()):
        pod = f'namespace="shop", pod="orders-{index}"'
        series += [
            {"series": f"prestop_drain_floor_seconds{{{pod}}}",
             "values": f"{ShutdownPlan.of(config).worst_case_floor():g}x40"},
            {"series": f"prestop_drain_max_seconds{{{pod}}}",
             "values": f"{config.drain_limit:g}x40"},
        ]  # fmt: skip
    # The same pods with the old defaults (grace 60): the alert does fire, so silence above means
    # the defaults, not a rule that cannot fire.
    old = load({**check_agent_deployment(helm_template({"gracePeriodSeconds": 60}))})
    series += [
        {"series": 'prestop_drain_floor_seconds{namespace="old", pod="orders-0"}',
         "values": f"{ShutdownPlan.of(old).worst_case_floor():g}x40"},
        {"series": 'prestop_drain_max_seconds{namespace="old", pod="orders-0"}',
         "values": f"{old.drain_limit:g}x40"},
    ]  # fmt: skip
    tests = {
        "rule_files": ["rules.yaml"],
        "evaluation_interval": "1m",
        "tests": [
            {
                "interval": "1m",
                "input_series": series,
                # Only the old-defaults pod fires; the default chart and kustomize pods do not.
                "promql_expr_test": [
                    {
                        "expr": 'ALERTS{alertname="PrestopDrainFloorAboveMax"}',
                        "eval_time": "30m",
                        "exp_samples": [
                            {
                                "labels": 'ALERTS{alertname="PrestopDrainFloorAboveMax",'
                                ' alertstate="firing", namespace="old", pod="orders-0",'
                                ' severity="warning"}',
                                "value": 1,
                            }
                        ],
                    }
                ],
            }
        ],
    }  # fmt: skip
    (tmp_path / "test.yaml").write_text(yaml.safe_dump(tests))
    done = _run([promtool, "test", "rules", "test.yaml"], cwd=tmp_path)
    assert done.returncode == 0 and "SUCCESS" in done.stdout, done.stdout + done.stderr


def test_the_tuned_worked_example_of_the_operations_guide_holds_its_floor() -> None:
    text = (ROOT / "docs" / "operations.md").read_text()
    section = text.split("### Worked example: tuned timings", 1)[1].split("\n### ", 1)[0]
    block = section.split("```yaml\n", 1)[1].split("```", 1)[0]
    pod = yaml.safe_load(block)
    (agent,) = pod["spec"]["containers"]
    environ = {e["name"]: e["value"] for e in agent["env"]}
    environ |= {"PRESTOP_EUREKA_URLS": "http://eureka-0:8761/eureka/",
                "PRESTOP_EUREKA_APP": "ORDERS", "POD_IP": "10.1.2.3"}  # fmt: skip
    config = load(environ)
    assert config.grace_period_seconds == pod["spec"]["terminationGracePeriodSeconds"]
    assert ShutdownPlan.of(config).floor_warning() is None, ShutdownPlan.of(config).floor_warning()
    assert config.budget().arithmetic() in section


# --- GitOps: what a Git repository and Argo CD / Flux need ---------------------------------------


def test_a_copied_chart_directory_renders_and_never_reads_the_cluster(tmp_path: Path) -> None:
    links = [p for p in CHART.rglob("*") if p.is_symlink()]
    assert not links, f"a vendored copy of the chart would lose these: {links}"
    for template in (CHART / "templates").rglob("*"):
        if template.is_file():
            # helm's lookup function: empty under helm template, --dry-run and Argo CD.
            calls = re.findall(r"\blookup\s+\"", template.read_text())
            assert not calls, f"{template}: renders differ off-cluster"
    copied = tmp_path / "vendor" / "prestop-agent"
    shutil.copytree(CHART, copied, symlinks=True)
    values = {"monitoring": {"prometheusRule": {"enabled": True}, "dashboard": {"enabled": True}}}
    assert helm_template(values, chart=copied) == helm_template(values)
    for file in (CHART / "files").iterdir():
        shipped = K8S / "monitoring" / file.name
        assert file.read_bytes() == shipped.read_bytes(), f"{file.name}: copy out of date"


def test_an_existing_token_secret_renders_the_same_everywhere() -> None:
    """token.existingSecret: the chart creates no Secret, the agent reads the user's, the hook's
    header comes from token.value; no cluster read (what helm template shows is what installs)."""
    objects = helm_template({"token": {"value": TOKEN, "existingSecret": {"name": "my-token"}}})
    assert "Secret" not in {o["kind"] for o in objects}
    assert check_agent_deployment(objects)["PRESTOP_TOKEN"] == TOKEN


def test_the_users_pod_gets_nothing_of_the_example_pod() -> None:
    pod = {"containers": [{"name": "app", "image": "shop/orders:2", "ports": [
        {"name": "http", "containerPort": 8080}]}]}  # fmt: skip
    (deployment,) = [
        o for o in helm_template({"deployment": {"pod": pod}}) if o["kind"] == "Deployment"
    ]
    spec = deployment["spec"]["template"]["spec"]
    assert "automountServiceAccountToken" not in spec
    assert [v["name"] for v in spec["volumes"]] == [API_VOLUME], "the agent's token only"
    (app,) = spec["containers"]
    assert set(app) == {"name", "image", "ports", "lifecycle", "readinessProbe"}


def test_a_private_ca_is_mounted_where_the_agent_reads_it(
    chart_renders: dict[str, list[Object]],
) -> None:
    environ = check_agent_deployment(chart_renders["private-ca"])  # checks the mount itself
    assert environ["PRESTOP_EUREKA_CA_FILE"] == SYSTEM_CAS
    (pod,) = [o for o in chart_renders["private-ca"] if o["kind"] == "Pod"]  # helm test: same
    (check,) = pod["spec"]["containers"]
    _check_ca_is_mounted("/etc/prestop-agent/eureka-ca/ca.pem", check, pod["spec"])


def test_the_native_layout_needs_kubernetes_1_29_and_says_so() -> None:
    old = ["template", "orders", CHART, "--kube-version", "1.28.0"]
    done = _run([_tool("helm"), *old])
    assert done.returncode != 0
    assert "layout native needs Kubernetes 1.29 or later" in done.stderr, done.stderr
    classic = _run([_tool("helm"), *old, "--set", "layout=classic"])
    assert classic.returncode == 0, classic.stderr
    too_old = _run([_tool("helm"), *old[:-1], "1.20.0", "--set", "layout=classic"])
    assert "chart requires kubeVersion" in too_old.stderr, too_old.stderr


def test_labels_follow_the_conventions_and_the_selector_survives_a_rename() -> None:
    chart = yaml.safe_load((CHART / "Chart.yaml").read_text())
    objects = helm_template({"token": {"value": TOKEN}})
    renamed = helm_template({"token": {"value": TOKEN}, "fullnameOverride": "orders-v2"})
    for obj in objects:
        labels = obj["metadata"]["labels"]
        assert labels["app.kubernetes.io/name"] == chart["name"], obj["kind"]
        assert labels["app.kubernetes.io/instance"] == "orders"
        assert labels["app.kubernetes.io/version"] == chart["appVersion"]
        assert labels["helm.sh/chart"] == f"{chart['name']}-{chart['version']}".replace("+", "_")
    (before,) = [o for o in objects if o["kind"] == "Deployment"]
    (after,) = [o for o in renamed if o["kind"] == "Deployment"]
    assert before["spec"]["selector"] == after["spec"]["selector"], "the selector is immutable"


def test_the_monitoring_objects_shared_by_every_release_carry_no_release_name() -> None:
    values = {"monitoring": {"podMonitor": {"enabled": True},
                             "prometheusRule": {"enabled": True, "runbookBaseUrl":
                                                "https://wiki.example.org/ops.md"},
                             "dashboard": {"enabled": True}}}  # fmt: skip
    names = {
        release: {o["kind"]: o for o in helm_template(values, release=release)}
        for release in ("orders", "payments")
    }
    for kind in ("PrometheusRule", "ConfigMap"):  # one copy per namespace: a second one collides
        assert (
            names["orders"][kind]["metadata"]["name"] == names["payments"][kind]["metadata"]["name"]
        )
    assert (
        names["orders"]["PodMonitor"]["metadata"]["name"]
        != names["payments"]["PodMonitor"]["metadata"]["name"]
    ), "each release scrapes its own pods"
    rules = yaml.safe_dump(names["orders"]["PrometheusRule"])
    assert "docs.example.com" not in rules and "https://wiki.example.org/ops.md#" in rules


def test_helm_test_runs_check_with_the_agents_settings_and_fails_on_a_floor_above_max(
    capsys: pytest.CaptureFixture[str],
) -> None:
    """The helm test pod's command, run here with the environment the kubelet would give it:
    default values pass; a grace period too short for the floor fails (exit 4)."""
    from agent.cli import EXIT_FLOOR_ABOVE_MAX, main

    for values, expected in (({}, 0), ({"gracePeriodSeconds": 60}, EXIT_FLOOR_ABOVE_MAX)):
        objects = helm_template(values, hooks=True)
        (pod,) = [o for o in objects if _is_hook(o)]
        assert pod["metadata"]["annotations"]["helm.sh/hook"] == "test"
        assert pod["spec"]["restartPolicy"] == "Never"
        (check,) = pod["spec"]["containers"]
        (deployment,) = [o for o in objects if o["kind"] == "Deployment"]
        (agent,) = deployment["spec"]["template"]["spec"]["initContainers"]
        assert (check["image"], check["env"]) == (agent["image"], agent["env"])
        environ = _environment(check, objects + _secrets_from_outside(objects))
        assert main(check["args"], environ) == expected, capsys.readouterr().out
        out = capsys.readouterr().out
        assert "Propagation floor, by stage" in out
        assert ("WARNING: propagation floor" in out) == bool(expected)


def _notes(tmp_path: Path, values: Object) -> str:
    """templates/NOTES.txt as `helm install` prints it (helm template skips it, and a dry-run
    install needs a cluster): rendered with tpl inside a ConfigMap of a copied chart."""
    chart = tmp_path / "prestop-agent"
    if not chart.exists():
        shutil.copytree(CHART, chart)
        shutil.copy(chart / "templates" / "NOTES.txt", chart / "notes-under-test.txt")
        (chart / "templates" / "notes-under-test.yaml").write_text(
            "apiVersion: v1\nkind: ConfigMap\nmetadata: {name: notes}\n"
            'data: {notes: {{ tpl (.Files.Get "notes-under-test.txt") . | quote }}}\n'
        )
    objects = helm_template(values, "--namespace", "shop", chart=chart)
    (notes,) = [o for o in objects if o["metadata"]["name"] == "notes"]
    deployments = [o["metadata"]["name"] for o in objects if o["kind"] == "Deployment"]
    text: str = notes["data"]["notes"]
    for name in re.findall(r"deploy/([\w-]+)", text):
        assert name in deployments, f"NOTES name deploy/{name}, rendered: {deployments}"
    return text


def test_the_notes_give_commands_that_work_for_the_release_as_installed(tmp_path: Path) -> None:
    for values, deployment in (({}, True), ({"deployment": {"enabled": False}}, False)):
        text = _notes(tmp_path, values)
        commands = [line.strip() for line in text.splitlines() if line.startswith("  ")]
        assert commands and all(" -n shop" in c for c in commands), commands
        assert "helm test orders -n shop --logs" in commands
        assert ("deploy/orders" in text) == deployment, text
        assert "no floor\nWARNING" in text, "what check's output should (not) show"
    text = _notes(tmp_path, {"helmTest": {"enabled": False}})
    assert "helm test" not in text


# --- kustomize: Secrets from anywhere, hooks kept, one port -------------------------------------


def _overlay(tmp_path: Path, edit: dict[str, str], files: dict[str, str] | None = None) -> Path:
    """The native example overlay with text replaced in its files (name -> (old, new))."""
    overlay = _kustomize_example(tmp_path, "native")
    for name, change in edit.items():
        path = overlay / name
        old, new = change
        text = path.read_text()
        assert old in text, (name, old)
        path.write_text(text.replace(old, new))
    for name, content in (files or {}).items():
        (overlay / name).write_text(content)
    return overlay


def test_kustomize_takes_the_token_secret_from_outside_the_build(tmp_path: Path) -> None:
    overlay = _overlay(tmp_path, {"kustomization.yaml": ("- secrets.yaml\n", "")})
    objects = kustomize_build(overlay)
    assert "Secret" not in {o["kind"] for o in objects}
    assert check_agent_deployment(objects)["PRESTOP_TOKEN"] == TOKEN  # the out-of-band one


def test_kustomize_takes_the_secrets_from_a_secret_generator(tmp_path: Path) -> None:
    generator = (
        "secretGenerator:\n"
        f"- {{name: prestop-agent-token, literals: [token={TOKEN}]}}\n"
        "- {name: eureka-credentials, literals: [service-urls=http://eureka-0:8761/eureka/]}\n"
    )
    overlay = _overlay(tmp_path, {"kustomization.yaml": ("- secrets.yaml\n", "")})
    kustomization = overlay / "kustomization.yaml"
    kustomization.write_text(kustomization.read_text() + generator)
    objects = kustomize_build(overlay)
    secrets = [o for o in objects if o["kind"] == "Secret"]
    assert len(secrets) == 2 and all("data" in s for s in secrets)
    environ = check_agent_deployment(objects)  # the hashed names, resolved from the build
    assert environ["PRESTOP_TOKEN"] == TOKEN
    assert environ["PRESTOP_EUREKA_URLS"] == "http://eureka-0:8761/eureka/"


def test_kustomize_keeps_the_apps_other_lifecycle_hooks(tmp_path: Path) -> None:
    post_start = "        lifecycle:\n          postStart: {exec: {command: [/bin/warm-up]}}\n"
    overlay = _overlay(
        tmp_path,
        {"deployment.yaml": ("        ports:\n", post_start + "        ports:\n")},
    )
    objects = kustomize_build(overlay)
    check_agent_deployment(objects)
    (deployment,) = [o for o in objects if o["kind"] == "Deployment"]
    lifecycle = deployment["spec"]["template"]["spec"]["containers"][0]["lifecycle"]
    assert lifecycle["postStart"] == {"exec": {"command": ["/bin/warm-up"]}}
    assert lifecycle["preStop"] == {"httpGet": {
        "port": 8099, "path": "/prestop",
        "httpHeaders": [{"name": "X-Prestop-Token", "value": TOKEN}]}}  # fmt: skip
    assert set(lifecycle) == {"postStart", "preStop"}


@pytest.mark.parametrize("layout", LAYOUTS)
def test_kustomize_refuses_an_app_prestop_hook_it_would_replace(
    layout: str, tmp_path: Path
) -> None:
    """A pod has one preStop per container: the app's own would vanish under the agent's."""
    own = (
        "        lifecycle:\n"
        "          postStart: {exec: {command: [/bin/warm-up]}}\n"
        "          preStop: {exec: {command: [sh, -c, 'sleep 30']}}\n"
    )
    ports = "        ports:\n"
    overlay = _overlay(tmp_path, {"deployment.yaml": (ports, own + ports)})
    kustomization = overlay / "kustomization.yaml"
    kustomization.write_text(kustomization.read_text().replace("- ../native", f"- ../{layout}"))
    done = _run([_tool("kustomize"), "build", overlay])
    assert done.returncode != 0, done.stdout
    assert "has a preStop hook of its own, which prestop-agent's would replace" in done.stderr, (
        done.stderr
    )


def test_kustomize_carries_prestop_port_to_the_hook_and_the_probes(tmp_path: Path) -> None:
    overlay = _overlay(tmp_path, {"kustomization.yaml": ("PRESTOP_PORT=8099", "PRESTOP_PORT=9000")})
    objects = kustomize_build(overlay)
    environ = check_agent_deployment(objects)  # hook and readiness probe on config.port
    assert environ["PRESTOP_PORT"] == "9000"
    (deployment,) = [o for o in objects if o["kind"] == "Deployment"]
    (agent,) = deployment["spec"]["template"]["spec"]["initContainers"]
    ports = {agent["ports"][0]["containerPort"], agent["livenessProbe"]["httpGet"]["port"],
             agent["readinessProbe"]["httpGet"]["port"]}  # fmt: skip
    assert ports == {9000}
    assert "8099" not in yaml.safe_dump(deployment)


def test_kustomize_refuses_a_readiness_probe_without_the_apps_health(tmp_path: Path) -> None:
    overlay = _overlay(
        tmp_path,
        {"kustomization.yaml": (
            "  - PRESTOP_APP_HEALTH_URL=http://127.0.0.1:8080/actuator/health/readiness\n", "")},
    )  # fmt: skip
    done = _run([_tool("kustomize"), "build", overlay])
    assert done.returncode != 0
    assert "data.PRESTOP_APP_HEALTH_URL` is missing" in done.stderr, done.stderr


def test_the_readmes_pod_snippet_keeps_readiness_on_the_apps_health() -> None:
    text = (ROOT / "README.md").read_text()
    block = text.split("## How a pod uses it", 1)[1].split("```yaml\n", 1)[1].split("```", 1)[0]
    pod = yaml.safe_load(block)["spec"]
    (app,) = [c for c in pod["containers"] if c["name"] == "app"]
    (agent,) = [c for c in pod["containers"] if c["name"] == "prestop-agent"]
    config = load({e["name"]: e.get("value", "10.1.2.3") for e in agent["env"]})
    assert app["readinessProbe"]["httpGet"] == {"port": config.port, "path": "/ready"}
    assert config.app_health_url, "a readiness probe on /ready needs PRESTOP_APP_HEALTH_URL"
