"""Pod manifests for the kubelet tests and benchmarks: the agent and the Java fixtures in the
images ``prepare.sh`` built, and the k8s/examples Deployments turned into pods."""

from __future__ import annotations

import copy
from pathlib import Path
from typing import Any

from tests.harness.javaapps import JAVA_OPTS
from tests.harness.node import Prepared

AGENT_PORT = 8099
APP_PORT = 8080
EUREKA_PORT = 8761

Manifest = dict[str, Any]


def java_command(jar: Path, *args: str) -> list[str]:
    """The JVM command for a fixture jar (mounted at its host path), as javaapps.py runs it."""
    archive = jar.with_suffix(".jsa")  # ignored by -Xshare:auto when made by another JVM build
    cds = [f"-XX:SharedArchiveFile={archive}"] if archive.is_file() else []
    return ["java", *JAVA_OPTS, *cds, "-jar", str(jar), *args]


def demo_app_command(
    jar: Path, port: int, eureka_url: str | None, app_name: str | None
) -> list[str]:
    """The demo app on ``port``, registered in Eureka as ``app_name`` when ``eureka_url`` is
    given. Its liveness and readiness health groups are on, as Spring Boot turns them on when it
    sees Kubernetes' service variables (which a node without an API server does not set)."""
    eureka = ["--eureka.client.enabled=false"]
    if eureka_url:
        eureka = [f"--eureka.client.service-url.defaultZone={eureka_url}"]
        if app_name:
            eureka.append(f"--spring.application.name={app_name.lower()}")
    return java_command(
        jar, f"--server.port={port}", "--management.endpoint.health.probes.enabled=true", *eureka
    )


def jar_volume(jar: Path) -> tuple[Manifest, Manifest]:
    """(volume, mount): the jar's Maven target folder, read-only, at the same path."""
    target = next(p for p in jar.parents if p.name == "target")
    name = f"jar-{target.parent.name}"
    volume = {"name": name, "hostPath": {"path": str(target), "type": "Directory"}}
    return volume, {"name": name, "mountPath": str(target), "readOnly": True}


def pod_ip_env(name: str) -> Manifest:
    return {"name": name, "valueFrom": {"fieldRef": {"fieldPath": "status.podIP"}}}


def agent_container(prepared: Prepared, env: dict[str, str]) -> Manifest:
    """The agent from its image, JSON logs, the given PRESTOP_* settings, POD_IP from the API."""
    return {
        "name": "prestop-agent",
        "image": prepared.agent_image,
        "imagePullPolicy": "Never",
        "ports": [{"name": "agent", "containerPort": AGENT_PORT}],
        "env": [
            {"name": key, "value": value}
            for key, value in {"PRESTOP_LOG_FORMAT": "json", **env}.items()
        ]
        + [pod_ip_env("POD_IP")],
        "livenessProbe": {"httpGet": {"port": AGENT_PORT, "path": "/live"}},
        "securityContext": {
            "runAsNonRoot": True,
            "allowPrivilegeEscalation": False,
            "readOnlyRootFilesystem": True,
            "capabilities": {"drop": ["ALL"]},
        },
    }


def demo_app_container(
    prepared: Prepared,
    jar: Path,
    eureka_url: str | None = None,
    hook_headers: dict[str, str] | None = None,
    probe_period: int = 1,
) -> Manifest:
    """The demo Spring Boot app; its preStop hook calls the agent, its readiness is the agent's
    /ready. Without ``eureka_url`` it does not register anywhere."""
    hook: Manifest = {"port": AGENT_PORT, "path": "/prestop"}
    if hook_headers:
        hook["httpHeaders"] = [{"name": k, "value": v} for k, v in hook_headers.items()]
    return {
        "name": "app",
        "image": prepared.java_image,
        "imagePullPolicy": "Never",
        "command": demo_app_command(jar, APP_PORT, eureka_url, None),
        # The instance registers with the pod's address, which the agent looks up by POD_IP.
        "env": [pod_ip_env("DEMO_IP")],
        "ports": [{"name": "http", "containerPort": APP_PORT}],
        "volumeMounts": [jar_volume(jar)[1]],
        "lifecycle": {"preStop": {"httpGet": hook}},
        "readinessProbe": {
            "httpGet": {"port": AGENT_PORT, "path": "/ready"},
            "periodSeconds": probe_period,
            "failureThreshold": 1,
        },
    }


def pod_manifest(name: str, spec: Manifest, labels: Manifest | None = None) -> Manifest:
    """A bare Pod manifest, as the kubelet runs it from its static-pod folder."""
    metadata: Manifest = {"name": name}
    if labels is not None:
        metadata["labels"] = labels
    return {"apiVersion": "v1", "kind": "Pod", "metadata": metadata, "spec": spec}


def agent_pod(
    name: str,
    prepared: Prepared,
    jar: Path,
    agent_env: dict[str, str],
    *,
    native: bool = False,
    grace: int = 30,
    eureka_url: str | None = None,
    hook_headers: dict[str, str] | None = None,
) -> Manifest:
    """The demo app with the agent as a classic sidecar (a second container) or a native one
    (an init container with ``restartPolicy: Always``)."""
    agent = agent_container(
        prepared,
        {
            "PRESTOP_GRACE_PERIOD_SECONDS": str(grace),
            "PRESTOP_APP_PORT": str(APP_PORT),
            "PRESTOP_APP_HEALTH_URL": f"http://127.0.0.1:{APP_PORT}/actuator/health",
            **agent_env,
        },
    )
    app = demo_app_container(prepared, jar, eureka_url, hook_headers)
    spec: Manifest = {
        "terminationGracePeriodSeconds": grace,
        "containers": [app] if native else [app, agent],
        "volumes": [jar_volume(jar)[0]],
    }
    if native:
        spec["initContainers"] = [{**agent, "restartPolicy": "Always"}]
    return pod_manifest(name, spec)


def eureka_server_pod(name: str, prepared: Prepared, jar: Path) -> Manifest:
    return pod_manifest(
        name,
        {
            "terminationGracePeriodSeconds": 5,
            "containers": [
                {
                    "name": "eureka",
                    "image": prepared.java_image,
                    "imagePullPolicy": "Never",
                    "command": java_command(jar, f"--server.port={EUREKA_PORT}"),
                    "ports": [{"containerPort": EUREKA_PORT}],
                    "volumeMounts": [jar_volume(jar)[1]],
                    "readinessProbe": {
                        "httpGet": {"port": EUREKA_PORT, "path": "/eureka/apps"},
                        "periodSeconds": 1,
                    },
                }
            ],
            "volumes": [jar_volume(jar)[0]],
        },
    )


def pod_from_deployment(
    deployment: Manifest,
    prepared: Prepared,
    app_jar: Path,
    *,
    name: str,
    env_overrides: dict[str, str],
    eureka_url: str | None = None,
    eureka_app: str | None = None,
) -> Manifest:
    """A Deployment's pod template as a Pod that this node can run: the agent's image is the
    locally built one, the app (every container not named prestop-agent) is the demo app, and
    the agent's environment gets ``env_overrides`` (e.g. the test's Eureka URL in place of the
    example's). Secrets and ConfigMaps stay references: apply them beside the Pod. With
    ``eureka_url`` the app registers there under the agent's ``PRESTOP_EUREKA_APP`` (or
    ``eureka_app``, where the agent reads that from a ConfigMap); it gets an emptyDir at /tmp
    (Tomcat's work folder) when its root filesystem is read-only and the manifest mounts
    nothing there."""
    template = copy.deepcopy(deployment["spec"]["template"])
    spec = template["spec"]
    volume, mount = jar_volume(app_jar)
    spec.setdefault("volumes", []).append(volume)
    every = spec.get("initContainers", []) + spec["containers"]
    agent_env = {
        e["name"]: e.get("value")
        for c in every
        if c["name"] == "prestop-agent"
        for e in c.get("env", [])
    }
    for container in every:
        container["imagePullPolicy"] = "Never"
        if container["name"] == "prestop-agent":
            container["image"] = prepared.agent_image
            kept = [e for e in container.get("env", []) if e["name"] not in env_overrides]
            container["env"] = kept + [{"name": k, "value": v} for k, v in env_overrides.items()]
            continue
        container["image"] = prepared.java_image
        ports = [p["containerPort"] for p in container.get("ports", [])] or [APP_PORT]
        container["command"] = demo_app_command(
            app_jar, ports[0], eureka_url, eureka_app or agent_env.get("PRESTOP_EUREKA_APP")
        )
        container["env"] = [*container.get("env", []), pod_ip_env("DEMO_IP")]
        container.setdefault("volumeMounts", []).append(mount)
        read_only = container.get("securityContext", {}).get("readOnlyRootFilesystem")
        has_tmp = any(m["mountPath"] == "/tmp" for m in container["volumeMounts"])
        if read_only and not has_tmp:  # the shipped examples mount their own /tmp
            spec["volumes"].append({"name": "app-tmp", "emptyDir": {}})
            container["volumeMounts"].append({"name": "app-tmp", "mountPath": "/tmp"})
    return pod_manifest(name, spec, labels=template.get("metadata", {}).get("labels", {}))
