"""A one-node Kubernetes cluster for tests and benchmarks: the node of tests/harness/node.py with
the control plane users run over it.

``KubeCluster`` starts, under the node's machine lock and with its state beside the node's:

- a PKI made with openssl (a CA; the API server's serving certificate; client certificates for
  an admin, the kubelet as ``system:node:NODE``, the controller-manager, the scheduler,
  kube-proxy, and the API server towards the kubelet; the service-account signing key);
- etcd on loopback; kube-apiserver with the Node and RBAC authorizers and NodeRestriction;
  kube-controller-manager with the controllers a Deployment, a Service and its EndpointSlices
  need; kube-scheduler;
- the node's kubelet registered as a Node (``KubeNode`` with ``ApiAccess``);
- kube-proxy in iptables mode, with IPv4 forwarding on while the cluster runs, so that pods on
  the node's bridge reach ClusterIPs (the pods route only the Service range through the node,
  hairpin is on for a pod reaching its own Service).

Its API (``kubectl`` underneath, as a user types it): ``apply``, ``apply_pod``, ``delete``,
``delete_pods``, ``rollout_restart``, ``wait_rollout``, ``get``, ``pods``, ``events``,
``endpoint_slices``, ``logs``, ``follow_logs``, ``exec``. A pod made with ``apply_pod`` is
known to the node's ``wait_ready``, ``exit_codes``, ``logs`` and ``timeline`` as a static pod
is. ``stop()`` stops everything by PID, removes kube-proxy's rules (``kube-proxy --cleanup``),
restores forwarding and removes the files by exact path.
"""

from __future__ import annotations

import http.client
import json
import os
import shutil
import ssl
import subprocess
import time
from collections.abc import Callable
from pathlib import Path
from typing import IO, Any

import yaml

from tests.harness.node import (
    DEFAULT_STATE,
    DEFAULT_SUBNET,
    NODE_NAME,
    ApiAccess,
    KubeNode,
    NodeError,
    Prepared,
    _kill_and_wait,
    _pids_with_cmdline,
)
from tests.harness.support import free_port

# The Services' range: next to the node's pod subnet, as unusual (Kubernetes' default is
# 10.96.0.0/12, which a machine's other clusters may use).
DEFAULT_SERVICE_CIDR = "10.207.96.0/24"
KUBERNETES_SERVICE_IP = "10.207.96.1"
COMPONENTS = ("etcd", "kube-apiserver", "kube-controller-manager", "kube-scheduler", "kube-proxy")
# What a Deployment behind a Service needs, plus the node life cycle (it removes the not-ready
# taint the kubelet registers with) and the root CA's ConfigMap (service-account volumes).
CONTROLLERS = (
    "deployment",
    "replicaset",
    "statefulset",
    "endpoint",
    "endpointslice",
    "serviceaccount",
    "serviceaccount-token",
    "garbagecollector",
    "nodelifecycle",
    "root-ca-cert-publisher",
    "podgc",
)
FORWARDING = Path("/proc/sys/net/ipv4/ip_forward")


class ClusterError(NodeError):
    """The cluster could not be set up, or kubectl failed."""


class KubeCluster:
    """The node's kubelet under a control plane; see the module docstring."""

    def __init__(
        self,
        prepared: Prepared,
        node_state: Path = DEFAULT_STATE,
        subnet: str = DEFAULT_SUBNET,
        service_cidr: str = DEFAULT_SERVICE_CIDR,
    ) -> None:
        if prepared.controlplane is None:
            raise ClusterError("prepare.sh built no control plane (CONTROLPLANE missing)")
        self.prepared = prepared
        self.bin = prepared.controlplane
        self.state = node_state.parent / f"{node_state.name}-cluster"
        self.pki = self.state / "pki"
        self.log_dir = self.state / "logs"
        self.service_cidr = service_cidr
        self.node = KubeNode(
            prepared,
            node_state,
            subnet,
            ApiAccess(self.state / "kubelet.kubeconfig", self.pki / "ca.crt", service_cidr),
        )
        self.api_port = 0
        self.kubeconfig = self.state / "admin.kubeconfig"
        self.setup_seconds: dict[str, float] = {}
        self.teardown_seconds = 0.0
        self._procs: dict[str, subprocess.Popen[bytes]] = {}
        self._forwarding_before: str | None = None
        self._logs: list[IO[bytes]] = []
        self._tls: ssl.SSLContext | None = None

    # --- start / stop ---------------------------------------------------------------------

    def start(self, lock_timeout: float = 600.0) -> KubeCluster:
        """PKI, etcd, API server, controllers, scheduler, the node, kube-proxy; the seconds
        each step took are in ``setup_seconds``."""
        step = time.monotonic()

        def lap(name: str) -> None:
            nonlocal step
            now = time.monotonic()
            self.setup_seconds[name] = round(now - step, 2)
            step = now

        self.node.take_machine_lock(lock_timeout)
        lap("lock")
        self._clean()
        for folder in (self.pki, self.log_dir, self.state / "etcd"):
            folder.mkdir(parents=True, exist_ok=True)
        self._make_pki()
        lap("pki")
        self._start_etcd()
        self._start_apiserver()
        lap("etcd+apiserver")
        self._start_controllers()
        lap("controllers")
        self.node.start()
        self.wait_until("the Node is Ready", self._node_ready, 120)
        lap("node")
        self._start_proxy()
        lap("kube-proxy")
        self.wait_until("the default ServiceAccount", self._has_default_account, 60)
        lap("service account")
        return self

    def stop(self) -> None:
        """Stop everything by PID, remove kube-proxy's rules, restore forwarding, remove the
        files (logs stay until the next start); then the machine lock is released."""
        started = time.monotonic()
        if self.node._lock is None:
            return  # never started: the state may be another session's
        proxy = self._procs.pop("kube-proxy", None)
        self._terminate(proxy)
        self.node.stop(keep_lock=True)
        for name in reversed(COMPONENTS):
            self._terminate(self._procs.pop(name, None))
        self._clean(keep_logs=True)
        self.node.release_lock()
        self.teardown_seconds = round(time.monotonic() - started, 2)

    @staticmethod
    def _terminate(proc: subprocess.Popen[bytes] | None) -> None:
        if proc is None or proc.poll() is not None:
            return
        proc.terminate()
        try:
            proc.wait(10)
        except subprocess.TimeoutExpired:
            proc.kill()
            proc.wait(5)

    def _clean(self, keep_logs: bool = False) -> None:
        """What a killed earlier run may have left: its processes (their command lines name
        this state folder), kube-proxy's rules, forwarding, the files."""
        _kill_and_wait(sorted(set(_pids_with_cmdline(str(self.state))) - {os.getpid()}))
        for log in self._logs:
            log.close()
        self._logs = []
        proxy = self.bin / "kube-proxy"
        if proxy.exists() and shutil.which("iptables"):
            subprocess.run(
                [str(proxy), "--cleanup"],
                capture_output=True,
                timeout=60,
                check=False,
                stdin=subprocess.DEVNULL,
            )
        saved = self.state / "ip_forward.before"
        if saved.exists():
            FORWARDING.write_text(saved.read_text())
            saved.unlink()
        for entry in self.state.iterdir() if self.state.is_dir() else []:
            if keep_logs and entry.name == "logs":
                continue
            if entry.is_dir() and not entry.is_symlink():
                shutil.rmtree(entry, ignore_errors=True)
            else:
                entry.unlink()

    def _launch(self, name: str, args: list[str]) -> subprocess.Popen[bytes]:
        log = (self.log_dir / f"{name}.log").open("ab")
        self._logs.append(log)
        proc = subprocess.Popen(
            args,
            stdin=subprocess.DEVNULL,
            stdout=log,
            stderr=subprocess.STDOUT,
            start_new_session=True,
        )
        self._procs[name] = proc
        return proc

    def wait_until(self, what: str, check: Callable[[], bool], timeout: float) -> float:
        """Poll ``check`` every 0.2 s; ClusterError after ``timeout`` s or when a component
        exited."""
        started = time.monotonic()
        while not check():
            for name, proc in self._procs.items():
                if proc.poll() is not None:
                    raise ClusterError(
                        f"{what}: {name} exited ({proc.returncode})\n{self.tails(name)}"
                    )
            if time.monotonic() - started > timeout:
                raise ClusterError(f"not within {timeout} s: {what}\n{self.tails()}")
            time.sleep(0.2)
        return time.monotonic() - started

    # --- PKI ------------------------------------------------------------------------------

    def _openssl(self, *args: str) -> None:
        done = subprocess.run(
            ["openssl", *args],
            capture_output=True,
            text=True,
            timeout=60,
            check=False,
            stdin=subprocess.DEVNULL,
            cwd=self.pki,
        )
        if done.returncode != 0:
            raise ClusterError(f"openssl {' '.join(args)}: {done.stderr.strip()}")

    def _certificate(self, name: str, subject: str, sans: list[str] | None = None) -> None:
        """``name.key`` and ``name.crt`` signed by the CA (EC P-256: fast to make)."""
        self._openssl("ecparam", "-name", "prime256v1", "-genkey", "-noout", "-out", f"{name}.key")
        self._openssl("req", "-new", "-key", f"{name}.key", "-subj", subject, "-out", f"{name}.csr")
        extensions = (self.pki / f"{name}.ext").open("w")
        with extensions:
            usage = "serverAuth" if sans else "clientAuth"
            extensions.write(f"keyUsage=critical,digitalSignature\nextendedKeyUsage={usage}\n")
            if sans:
                extensions.write(f"subjectAltName={','.join(sans)}\n")
        self._openssl(
            "x509", "-req", "-in", f"{name}.csr", "-CA", "ca.crt", "-CAkey", "ca.key",
            "-CAcreateserial", "-days", "2", "-sha256", "-extfile", f"{name}.ext",
            "-out", f"{name}.crt",
        )  # fmt: skip

    def _make_pki(self) -> None:
        self._openssl("ecparam", "-name", "prime256v1", "-genkey", "-noout", "-out", "ca.key")
        self._openssl(
            "req", "-x509", "-new", "-key", "ca.key", "-subj", "/CN=prestop-kube-ca",
            "-days", "2", "-sha256", "-out", "ca.crt",
        )  # fmt: skip
        node_ip = self.node.host_ip
        self._certificate(
            "apiserver",
            "/CN=kube-apiserver",
            [
                "IP:127.0.0.1",
                f"IP:{node_ip}",
                f"IP:{KUBERNETES_SERVICE_IP}",
                "DNS:localhost",
                "DNS:kubernetes",
                "DNS:kubernetes.default",
                "DNS:kubernetes.default.svc",
            ],
        )
        identities = {
            "admin": "/O=system:masters/CN=prestop-admin",
            "kubelet": f"/O=system:nodes/CN=system:node:{NODE_NAME}",
            "controller-manager": "/CN=system:kube-controller-manager",
            "scheduler": "/CN=system:kube-scheduler",
            "kube-proxy": "/CN=system:kube-proxy",
            "apiserver-kubelet-client": "/O=system:masters/CN=kube-apiserver-kubelet-client",
        }
        for name, subject in identities.items():
            self._certificate(name, subject)
        # The service-account token signing key (RSA: what every consumer of tokens accepts).
        self._openssl("genrsa", "-out", "sa.key", "2048")
        self._openssl("rsa", "-in", "sa.key", "-pubout", "-out", "sa.pub")

    def _kubeconfig(self, path: Path, identity: str) -> Path:
        config = {
            "apiVersion": "v1",
            "kind": "Config",
            "clusters": [
                {
                    "name": "prestop",
                    "cluster": {
                        "server": f"https://127.0.0.1:{self.api_port}",
                        "certificate-authority": str(self.pki / "ca.crt"),
                    },
                }
            ],
            "users": [
                {
                    "name": identity,
                    "user": {
                        "client-certificate": str(self.pki / f"{identity}.crt"),
                        "client-key": str(self.pki / f"{identity}.key"),
                    },
                }
            ],
            "contexts": [{"name": "prestop", "context": {"cluster": "prestop", "user": identity}}],
            "current-context": "prestop",
        }
        path.write_text(yaml.safe_dump(config))
        return path

    # --- components -----------------------------------------------------------------------

    def _start_etcd(self) -> None:
        client, peer = free_port(), free_port()
        self.etcd_url = f"http://127.0.0.1:{client}"
        self._launch(
            "etcd",
            [
                str(self.bin / "etcd"),
                "--name=prestop",
                f"--data-dir={self.state}/etcd",
                f"--listen-client-urls={self.etcd_url}",
                f"--advertise-client-urls={self.etcd_url}",
                f"--listen-peer-urls=http://127.0.0.1:{peer}",
                f"--initial-advertise-peer-urls=http://127.0.0.1:{peer}",
                f"--initial-cluster=prestop=http://127.0.0.1:{peer}",
                # A test's cluster: durability of each write is not worth the fsyncs.
                "--unsafe-no-fsync",
            ],
        )

    def _start_apiserver(self) -> None:
        self.api_port = free_port()
        pki = self.pki
        self._launch(
            "kube-apiserver",
            [
                str(self.bin / "kube-apiserver"),
                f"--etcd-servers={self.etcd_url}",
                # Every address: pods reach it through the kubernetes Service, whose endpoint is
                # the advertise address (the node's bridge address), the host on loopback.
                "--bind-address=0.0.0.0",
                f"--advertise-address={self.node.host_ip}",
                f"--secure-port={self.api_port}",
                f"--cert-dir={self.state}/apiserver-certs",
                f"--tls-cert-file={pki}/apiserver.crt",
                f"--tls-private-key-file={pki}/apiserver.key",
                f"--client-ca-file={pki}/ca.crt",
                "--authorization-mode=Node,RBAC",
                "--enable-admission-plugins=NodeRestriction",
                f"--service-account-key-file={pki}/sa.pub",
                f"--service-account-signing-key-file={pki}/sa.key",
                "--service-account-issuer=https://kubernetes.default.svc",
                f"--service-cluster-ip-range={self.service_cidr}",
                f"--kubelet-client-certificate={pki}/apiserver-kubelet-client.crt",
                f"--kubelet-client-key={pki}/apiserver-kubelet-client.key",
                # The Node's hostname (prestop-node) resolves nowhere: its bridge address does.
                "--kubelet-preferred-address-types=InternalIP",
                "--allow-privileged=true",
                "--profiling=false",
            ],
        )
        self._kubeconfig(self.kubeconfig, "admin")
        self.wait_until("the API server's /readyz", self._api_ready, 120)

    def _api_ready(self) -> bool:
        done = self._kubectl_run(["get", "--raw", "/readyz"], timeout=10)
        return done.returncode == 0 and done.stdout.strip() == "ok"

    def _start_controllers(self) -> None:
        state, pki = self.state, self.pki
        self._launch(
            "kube-controller-manager",
            [
                str(self.bin / "kube-controller-manager"),
                f"--kubeconfig={self._kubeconfig(state / 'cm.kubeconfig', 'controller-manager')}",
                "--bind-address=127.0.0.1",
                f"--secure-port={free_port()}",
                "--leader-elect=false",
                "--use-service-account-credentials=true",
                f"--service-account-private-key-file={pki}/sa.key",
                f"--root-ca-file={pki}/ca.crt",
                f"--controllers={','.join(CONTROLLERS)}",
            ],
        )
        self._launch(
            "kube-scheduler",
            [
                str(self.bin / "kube-scheduler"),
                f"--kubeconfig={self._kubeconfig(state / 'sched.kubeconfig', 'scheduler')}",
                "--bind-address=127.0.0.1",
                f"--secure-port={free_port()}",
                "--leader-elect=false",
            ],
        )
        self._kubeconfig(state / "kubelet.kubeconfig", "kubelet")

    def _start_proxy(self) -> None:
        # Routing from the bridge back onto it (pod -> ClusterIP -> pod) is forwarding; the pods
        # have no route but the subnet and the Service range, so nothing else goes anywhere.
        saved = self.state / "ip_forward.before"
        saved.write_text(FORWARDING.read_text())
        FORWARDING.write_text("1\n")
        config = {
            "apiVersion": "kubeproxy.config.k8s.io/v1alpha1",
            "kind": "KubeProxyConfiguration",
            "mode": "iptables",
            "clientConnection": {
                "kubeconfig": str(self._kubeconfig(self.state / "proxy.kubeconfig", "kube-proxy"))
            },
            "hostnameOverride": NODE_NAME,
            "bindAddress": "127.0.0.1",
            "healthzBindAddress": f"127.0.0.1:{free_port()}",
            "metricsBindAddress": f"127.0.0.1:{free_port()}",
            "clusterCIDR": str(self.node.subnet),
            # The machine's conntrack table and timeouts, and route_localnet, are not this test
            # cluster's business: kube-proxy leaves those sysctls as they are.
            "conntrack": {
                "maxPerCore": 0,
                "tcpEstablishedTimeout": "0s",
                "tcpCloseWaitTimeout": "0s",
            },
            # Rules rewritten as soon as an EndpointSlice changes, as on a quiet production node.
            "iptables": {
                "syncPeriod": "30s",
                "minSyncPeriod": "0s",
                "localhostNodePorts": False,
            },
        }
        (self.state / "kube-proxy.yaml").write_text(yaml.safe_dump(config))
        self._launch(
            "kube-proxy",
            [str(self.bin / "kube-proxy"), f"--config={self.state}/kube-proxy.yaml", "--v=2"],
        )
        self.wait_until(
            "kube-proxy's rules for the kubernetes Service",
            lambda: KUBERNETES_SERVICE_IP in self.proxy_rules(),
            60,
        )

    def proxy_rules(self) -> str:
        """The node's NAT rules as iptables-save prints them (kube-proxy's KUBE-* chains)."""
        done = subprocess.run(
            ["iptables-save", "-t", "nat"],
            capture_output=True,
            text=True,
            timeout=20,
            check=False,
            stdin=subprocess.DEVNULL,
        )
        return done.stdout

    def _node_ready(self) -> bool:
        node = self.get("node", NODE_NAME, check=False)
        if not node:
            return False
        conditions = node.get("status", {}).get("conditions", [])
        ready = any(c["type"] == "Ready" and c["status"] == "True" for c in conditions)
        taints = node.get("spec", {}).get("taints") or []
        return ready and not any(t.get("effect") == "NoSchedule" for t in taints)

    def _has_default_account(self) -> bool:
        return bool(self.get("serviceaccount", "default", check=False))

    def tails(self, *names: str, lines: int = 40) -> str:
        """The last lines of the components' logs (all without ``names``)."""
        out = []
        for name in names or COMPONENTS:
            log = self.log_dir / f"{name}.log"
            text = log.read_text(errors="replace").splitlines() if log.exists() else []
            out.append(f"----- last {lines} lines of {log} -----")
            out += text[-lines:]
        return "\n".join(out)

    # --- kubectl --------------------------------------------------------------------------

    def _kubectl_run(
        self, args: list[str], stdin: str | None = None, timeout: float = 120.0
    ) -> subprocess.CompletedProcess[str]:
        return subprocess.run(
            [str(self.bin / "kubectl"), f"--kubeconfig={self.kubeconfig}", *args],
            input=stdin,
            capture_output=True,
            text=True,
            timeout=timeout,
            check=False,
            stdin=None if stdin is not None else subprocess.DEVNULL,
        )

    def kubectl(self, *args: str, stdin: str | None = None, timeout: float = 120.0) -> str:
        """Run kubectl as the admin; its output, ClusterError (with stderr) on failure."""
        done = self._kubectl_run(list(args), stdin, timeout)
        if done.returncode != 0:
            raise ClusterError(f"kubectl {' '.join(args)}: exit {done.returncode}: {done.stderr}")
        return done.stdout

    def apply(self, *documents: dict[str, Any] | str, kustomization: Path | None = None) -> str:
        """``kubectl apply`` of manifests (dicts or YAML text), or ``kubectl apply -k`` of a
        kustomization folder."""
        if kustomization is not None:
            return self.kubectl("apply", "-k", str(kustomization))
        text = "\n---\n".join(d if isinstance(d, str) else yaml.safe_dump(d) for d in documents)
        return self.kubectl("apply", "-f", "-", stdin=text)

    def apply_pod(self, pod: dict[str, Any]) -> str:
        """``kubectl apply`` of a bare Pod, which the scheduler binds to the node; from then on
        the node's ``wait_ready``, ``pod_ip``, ``exit_codes``, ``logs`` and ``timeline`` know it
        by its name. Returns the name."""
        if pod.get("kind") != "Pod":
            raise ClusterError(f"not a Pod manifest: kind {pod.get('kind')!r}")
        name = str(pod["metadata"]["name"])
        self.node.track_api_pod(name)
        self.apply(pod)
        return name

    def delete_pods(self, *names: str, timeout: float = 120.0) -> float:
        """``kubectl delete pod`` (the API server marks them terminating, the kubelet runs each
        whole termination), then the node's wait until every one is gone, keeping how each
        container ended and its logs, as ``KubeNode.delete`` does for static pods; returns the
        monotonic time the deletion was sent."""

        def remove() -> None:
            self.kubectl("delete", "pod", *names, "--wait=false")

        return self.node.delete(*names, timeout=timeout, remove=remove)

    def delete(self, kind: str, *names: str, wait: bool = True, timeout: float = 180) -> None:
        self.kubectl(
            "delete", kind, *names, "--ignore-not-found", f"--wait={str(wait).lower()}",
            f"--timeout={int(timeout)}s", timeout=timeout + 30,
        )  # fmt: skip

    def get(self, kind: str, name: str = "", *selector: str, check: bool = True) -> Any:
        """The object (or the list, without ``name``) as JSON; None when absent and not
        ``check``."""
        done = self._kubectl_run(["get", kind, *([name] if name else []), *selector, "-o=json"])
        if done.returncode != 0:
            if check:
                raise ClusterError(f"kubectl get {kind} {name}: {done.stderr}")
            return None
        return json.loads(done.stdout)

    def api_get(self, path: str, timeout: float = 5.0) -> Any:
        """GET ``path`` from the API server as the admin (JSON), without a kubectl process:
        cheap enough to poll several times a second on a loaded machine."""
        if self._tls is None:
            self._tls = ssl.create_default_context(cafile=str(self.pki / "ca.crt"))
            self._tls.load_cert_chain(self.pki / "admin.crt", self.pki / "admin.key")
        connection = http.client.HTTPSConnection(
            "127.0.0.1", self.api_port, context=self._tls, timeout=timeout
        )
        try:
            connection.request("GET", path)
            response = connection.getresponse()
            body = response.read()
            if response.status != 200:
                raise ClusterError(f"GET {path}: {response.status} {body[:300]!r}")
            return json.loads(body)
        finally:
            connection.close()

    def pods(self, *selector: str) -> list[dict[str, Any]]:
        """The pods (e.g. ``-l``, ``app=x``) with their status."""
        return list(self.get("pods", "", *selector)["items"])

    def rollout_restart(self, deployment: str) -> float:
        """``kubectl rollout restart deployment/NAME``; returns the epoch time it was sent."""
        at = time.time()
        self.kubectl("rollout", "restart", f"deployment/{deployment}")
        return at

    def wait_rollout(self, deployment: str, timeout: float = 600) -> float:
        """``kubectl rollout status`` until complete; returns seconds waited."""
        started = time.monotonic()
        self.kubectl(
            "rollout", "status", f"deployment/{deployment}", f"--timeout={int(timeout)}s",
            timeout=timeout + 30,
        )  # fmt: skip
        return time.monotonic() - started

    def events(self, *selector: str) -> list[dict[str, Any]]:
        """The Events (e.g. ``--field-selector=involvedObject.name=x``), oldest first."""
        items = self.get("events", "", *selector)["items"]
        return sorted(items, key=lambda e: e.get("lastTimestamp") or e.get("eventTime") or "")

    def endpoint_slices(self, service: str) -> list[dict[str, Any]]:
        """The Service's EndpointSlices (``kubernetes.io/service-name=SERVICE``)."""
        selector = f"-l=kubernetes.io/service-name={service}"
        return list(self.get("endpointslices", "", selector)["items"])

    def logs(self, pod: str, container: str = "", previous: bool = False) -> str:
        """``kubectl logs`` (through the API server and the kubelet)."""
        args = ["logs", pod] + ([f"-c={container}"] if container else [])
        return self.kubectl(*args, *(["--previous"] if previous else []))

    def follow_logs(self, pod: str, container: str) -> subprocess.Popen[str]:
        """``kubectl logs --follow``, started: the container's whole log up to its exit (the
        stream ends then), also after the pod has gone, which ``logs`` cannot read any more.
        The caller waits for it (or kills it)."""
        return subprocess.Popen(
            [str(self.bin / "kubectl"), f"--kubeconfig={self.kubeconfig}", "logs", "--follow",
             pod, f"-c={container}"],
            stdin=subprocess.DEVNULL, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True,
        )  # fmt: skip

    def exec(self, pod: str, *command: str, container: str = "", timeout: float = 60) -> str:
        """``kubectl exec POD -- COMMAND``; its standard output."""
        args = ["exec", pod] + ([f"-c={container}"] if container else [])
        return self.kubectl(*args, "--", *command, timeout=timeout)

    def __enter__(self) -> KubeCluster:
        return self.start()

    def __exit__(self, *exc: object) -> None:
        self.stop()
