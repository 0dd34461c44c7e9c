"""A standalone Kubernetes node for tests and benchmarks: a real kubelet on Debian's containerd.

``prepare()`` runs ``tests/kube/prepare.sh`` (Debian packages, the kubelet built from the Go
module proxy, the images; all cached on the machine). ``KubeNode`` starts containerd and a
kubelet that runs static pods from a manifest folder (no API server), with every piece of state
under one folder, a bridge of its own with no route out, and logs under that folder. Its API:

- ``apply(manifest)`` (a dict or YAML) writes a pod manifest; ``delete(name)`` removes it and
  waits until the kubelet has torn the pod down;
- ``wait_running(name, container)``, ``wait_ready(name)``, ``pod(name)``: the kubelet's own view;
- ``logs(name, container)``: the container's log as the kubelet wrote it (``kubectl logs``);
- ``timeline(name)``: what happened during a termination, with timestamps, from the kubelet's
  log and the containers' logs (``Event``).

Root only. ``stop()`` stops what ``start()`` started, by PID, and removes what it created;
``start()`` first clears whatever a killed earlier run left behind.
"""

from __future__ import annotations

import contextlib
import datetime as dt
import fcntl
import hashlib
import ipaddress
import json
import os
import re
import shutil
import signal
import subprocess
import time
import urllib.error
import urllib.request
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import IO, Any

import yaml

from tests.harness.support import free_port

ROOT = Path(__file__).resolve().parent.parent.parent
PREPARE = ROOT / "tests" / "kube" / "prepare.sh"
DEFAULT_STATE = Path(os.environ.get("PRESTOP_KUBE_STATE", "/var/lib/prestop-agent/kube-node"))
# A subnet no usual tool picks (Docker 172.17+, kind/flannel 10.244, CNI examples 10.88/10.22).
DEFAULT_SUBNET = "10.207.88.0/24"
BRIDGE = "prestop-kube0"
NETWORK_NAME = "prestop-kube"
NODE_NAME = "prestop-node"
CNI_BIN = "/usr/lib/cni"
# Paths the kubelet or containerd write outside the state folder whatever they are told.
KUBELET_OUTSIDE = (Path("/var/lib/kubelet/device-plugins"), Path("/var/log/pods"))
CONTAINER_LOG_LINKS = Path("/var/log/containers")

# urllib without proxies from the environment: every target is on this machine.
_OPENER = urllib.request.build_opener(urllib.request.ProxyHandler({}))


class NodeError(RuntimeError):
    """The node could not be set up, or a pod did not do what was waited for."""


@dataclass(frozen=True)
class Prepared:
    """What ``prepare.sh`` built or found in its cache."""

    kubelet: Path
    """The kubelet binary (cached by version)."""
    pause_image: str
    """The pod sandbox image's name, as containerd knows it."""
    agent_image: str
    """The agent's image, built from docker/Dockerfile."""
    java_image: str
    """Debian with a headless JRE: runs the Java fixtures' jars, mounted from the host."""
    archives: tuple[Path, ...]
    """docker-archive tars of those images, imported into containerd at start-up."""
    seconds: float
    """How long the preparation took, seconds (a warm machine: hashing only)."""
    controlplane: Path | None = None
    """The folder of etcd, kube-apiserver, ... and kubectl (tests/harness/cluster.py)."""


def prepare(timeout: float = 1800.0) -> Prepared:
    """Run ``prepare.sh``: install, build and cache what the node needs (see the script)."""
    started = time.monotonic()
    done = subprocess.run(
        ["bash", str(PREPARE)],
        capture_output=True,
        text=True,
        timeout=timeout,
        check=False,
        stdin=subprocess.DEVNULL,
    )
    if done.returncode != 0:
        raise NodeError(f"prepare.sh failed ({done.returncode}):\n{done.stderr[-4000:]}")
    values = dict(line.split("=", 1) for line in done.stdout.splitlines() if "=" in line)
    return Prepared(
        kubelet=Path(values["KUBELET"]),
        pause_image=values["PAUSE_IMAGE"],
        agent_image=values["AGENT_IMAGE"],
        java_image=values["JAVA_IMAGE"],
        archives=tuple(Path(p) for p in values["IMAGE_ARCHIVES"].split()),
        seconds=time.monotonic() - started,
        controlplane=Path(values["CONTROLPLANE"]) if "CONTROLPLANE" in values else None,
    )


@dataclass(frozen=True, order=True)
class Event:
    """One thing that happened to a pod, at ``at`` (seconds since the epoch)."""

    at: float
    what: str
    """From the kubelet: ``hook_started``, ``hook_completed`` (answered), ``hook_failed``,
    ``grace_exceeded`` (the hook outlived the grace period), ``kill`` (SIGTERM sent to the
    container), ``exited`` (the kubelet saw it stop), ``event:REASON`` (a recorded event, e.g.
    ``event:FailedPreStopHook``); from containerd: ``finished`` (the container's exact exit time,
    ``exit CODE`` in ``detail``); ``log``: a container's own log line (text in ``detail``)."""
    container: str = ""
    detail: str = field(default="", compare=False)


# ------------------------------------------------------------------------------ log parsing

# klog: "I1128 02:10:11.123456   12345 file.go:123] message key=value ..."
_KLOG = re.compile(r"^([IWEF])(\d\d)(\d\d) (\d\d):(\d\d):(\d\d)\.(\d+)\s+\d+ [^\]]+\] (.*)$")


def _klog_time(match: re.Match[str]) -> float:
    now = dt.datetime.now(dt.UTC)
    month, day, hour, minute, second = (int(match.group(i)) for i in range(2, 7))
    micro = int(match.group(7).ljust(6, "0")[:6])
    # klog has no year: the one that puts the line closest to now.
    stamp = dt.datetime(now.year, month, day, hour, minute, second, micro, tzinfo=dt.UTC)
    if stamp - now > dt.timedelta(days=1):
        stamp = stamp.replace(year=now.year - 1)
    return stamp.timestamp()


def _klog_value(message: str, key: str) -> str:
    found = re.search(rf'\b{key}="((?:[^"\\]|\\.)*)"', message) or re.search(
        rf"\b{key}=(\S+)", message
    )
    return found.group(1) if found else ""


def kubelet_events(log_text: str, pod_full_name: str) -> list[Event]:
    """The termination steps the kubelet logged for one pod (``name-node``, namespace default):
    its own log lines (``pod=...``) and the events it recorded (``object=...``, logged at -v=3)."""
    events: list[Event] = []
    wanted = (f'pod="default/{pod_full_name}"', f'object="default/{pod_full_name}"')
    for line in log_text.splitlines():
        match = _KLOG.match(line)
        if match is None or not any(key in line for key in wanted):
            continue
        message = match.group(8)
        container = _klog_value(message, "containerName")
        at = _klog_time(match)
        if message.startswith('"Event occurred"'):
            field_path = re.search(r"\{([^}]*)\}", _klog_value(message, "fieldPath"))
            container = field_path.group(1) if field_path else ""
            reason = _klog_value(message, "reason")
            events.append(Event(at, f"event:{reason}", container, _klog_value(message, "message")))
        elif message.startswith('"Killing container with a grace period" '):
            events.append(Event(at, "kill", container, _klog_value(message, "gracePeriod")))
        elif "Running preStop hook" in message:
            events.append(Event(at, "hook_started", container))
        elif "PreStop hook completed" in message:
            events.append(Event(at, "hook_completed", container))
        elif "PreStop hook failed" in message:
            events.append(Event(at, "hook_failed", container, _klog_value(message, "err")))
        elif "PreStop hook not completed in grace period" in message:
            events.append(Event(at, "grace_exceeded", container))
        elif "Container exited normally" in message:
            events.append(Event(at, "exited", container))
    return events


def cri_log_lines(path: Path) -> list[tuple[float, str]]:
    """A CRI container log file: ``(epoch seconds, text)`` per line, partial lines joined."""
    lines: list[tuple[float, str]] = []
    partial = ""
    for raw in path.read_text(errors="replace").splitlines():
        parts = raw.split(" ", 3)
        if len(parts) < 3:
            continue
        stamp, _stream, tag = parts[:3]
        text = parts[3] if len(parts) > 3 else ""
        if tag == "P":
            partial += text
            continue
        lines.append((dt.datetime.fromisoformat(stamp).timestamp(), partial + text))
        partial = ""
    return lines


# --------------------------------------------------------------------------- host clean-up


def _run(*cmd: str, check: bool = True, timeout: float = 60.0) -> str:
    done = subprocess.run(
        cmd, capture_output=True, text=True, timeout=timeout, check=False, stdin=subprocess.DEVNULL
    )
    if check and done.returncode != 0:
        raise NodeError(f"{' '.join(cmd)}: exit {done.returncode}: {done.stderr.strip()}")
    return done.stdout


def _pids_with_cmdline(fragment: str) -> list[int]:
    pids = []
    for proc in Path("/proc").iterdir():
        if not proc.name.isdigit():
            continue
        with contextlib.suppress(OSError):
            if fragment.encode() in (proc / "cmdline").read_bytes():
                pids.append(int(proc.name))
    return pids


def _kubepods_cgroups() -> list[Path]:
    """The kubelet's cgroups (``kubepods`` in every v1 hierarchy), deepest first."""
    found: list[Path] = []
    for hierarchy in Path("/sys/fs/cgroup").iterdir():
        top = hierarchy / "kubepods"
        if top.is_dir():
            found += [Path(d) for d, _, _ in os.walk(top)]
    return sorted(found, key=lambda p: len(p.parts), reverse=True)


def _mounts_under(folder: Path) -> list[str]:
    mounts = []
    for line in Path("/proc/self/mountinfo").read_text().splitlines():
        point = line.split()[4].replace("\\040", " ")
        if point == str(folder) or point.startswith(f"{folder}/"):
            mounts.append(point)
    return sorted(mounts, key=len, reverse=True)


def _kill_and_wait(pids: list[int], timeout: float = 10.0) -> None:
    for pid in pids:
        with contextlib.suppress(ProcessLookupError):
            os.kill(pid, signal.SIGKILL)
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline and any(Path(f"/proc/{pid}").exists() for pid in pids):
        time.sleep(0.05)


def clean_host(
    state: Path, subnet: str = DEFAULT_SUBNET, bridge: str = BRIDGE, keep_logs: bool = False
) -> None:
    """Remove everything a node with this state folder, subnet and bridge may have left behind,
    running or not: its processes (containerd shims and pods), network namespaces, bridge,
    mounts, cgroups and files (``keep_logs``: all but ``state/logs``). Idempotent."""
    ids = _runtime_ids(state)
    # 1. Processes: the shims of our containerd (their command line names our socket) and every
    # process in the kubelet's cgroups; then the kubelet and containerd themselves if still up.
    victims = _pids_with_cmdline(str(state / "containerd.sock"))
    for group in _kubepods_cgroups():
        with contextlib.suppress(OSError):
            victims += [int(p) for p in (group / "cgroup.procs").read_text().split()]
    victims += _pids_with_cmdline(str(state / "kubelet.yaml"))
    victims += _pids_with_cmdline(str(state / "containerd.toml"))
    _kill_and_wait(sorted(set(victims) - {os.getpid()}))
    # 2. Pod network namespaces (containerd makes them under /run/netns): those on our subnet,
    # and those our sandboxes left with nothing but a loopback and nobody inside.
    network = ipaddress.ip_network(subnet)
    netns_dir = Path("/run/netns")
    for netns in sorted(netns_dir.glob("cni-*")) if netns_dir.is_dir() else []:
        if _netns_is_ours_or_dead(netns, network):
            _run("ip", "netns", "delete", netns.name, check=False)
    if Path(f"/sys/class/net/{bridge}").exists():
        _run("ip", "link", "delete", bridge, check=False)
    # 3. Mounts under the state folder (container root filesystems, pod volumes, shm).
    for point in _mounts_under(state):
        _run("umount", "--lazy", point, check=False)
    # 4. Cgroups, deepest first (empty now that their processes are gone).
    for group in _kubepods_cgroups():
        with contextlib.suppress(OSError):
            group.rmdir()
    # 5. Files: the state folder (only once nothing is mounted in it) and what lives outside it.
    if _mounts_under(state):
        raise NodeError(f"still mounted under {state}: {_mounts_under(state)}")
    for entry in state.iterdir() if state.is_dir() else []:
        if keep_logs and entry.name == "logs":
            continue
        if entry.is_dir() and not entry.is_symlink():
            shutil.rmtree(entry, ignore_errors=True)
        else:
            entry.unlink()
    for outside in KUBELET_OUTSIDE:
        shutil.rmtree(outside, ignore_errors=True)
    with contextlib.suppress(OSError):
        Path("/var/lib/kubelet").rmdir()
    if CONTAINER_LOG_LINKS.is_dir():
        for link in CONTAINER_LOG_LINKS.iterdir():
            if link.is_symlink() and f"-{NODE_NAME}_default_" in link.name:
                link.unlink()
    with contextlib.suppress(OSError):
        CONTAINER_LOG_LINKS.rmdir()  # when empty
    for result in Path("/var/lib/cni/results").glob(f"{NETWORK_NAME}-*"):
        result.unlink(missing_ok=True)
    # containerd keeps shim sockets and the CNI loopback results under fixed paths, named after
    # our sandboxes and containers.
    address = state / "containerd.sock"
    for cid in ids:
        digest = hashlib.sha256(f"{address}/k8s.io/{cid}".encode()).hexdigest()
        Path(f"/run/containerd/s/{digest}").unlink(missing_ok=True)
        Path(f"/var/lib/cni/results/cni-loopback-{cid}-lo").unlink(missing_ok=True)


def _netns_is_ours_or_dead(
    netns: Path, network: ipaddress.IPv4Network | ipaddress.IPv6Network
) -> bool:
    try:
        infos = json.loads(_run("ip", "-n", netns.name, "-j", "addr", "show", check=False) or "[]")
        inode = netns.stat().st_ino
    except (ValueError, OSError):
        return False
    addresses = [a for i in infos for a in i.get("addr_info", []) if a.get("family") == "inet"]
    if any(ipaddress.ip_address(a["local"]) in network for a in addresses):
        return True
    if any(i.get("ifname") != "lo" for i in infos):
        return False
    for proc in Path("/proc").iterdir():
        if proc.name.isdigit():
            with contextlib.suppress(OSError):
                if (proc / "ns" / "net").stat().st_ino == inode:
                    return False
    return True


def _runtime_ids(state: Path) -> set[str]:
    """Ids of every sandbox and container containerd knows under ``state``."""
    folders = (
        state / "containerd/state/io.containerd.runtime.v2.task/k8s.io",
        state / "containerd/root/io.containerd.grpc.v1.cri/sandboxes",
        state / "containerd/root/io.containerd.grpc.v1.cri/containers",
    )
    return {entry.name for folder in folders if folder.is_dir() for entry in folder.iterdir()}


# ------------------------------------------------------------------------------------ node


@dataclass(frozen=True)
class ApiAccess:
    """What a kubelet registered with an API server needs (tests/harness/cluster.py makes it)."""

    kubeconfig: Path
    """Its kubeconfig: the API server and a client certificate for ``system:node:NODE``."""
    client_ca: Path
    """The CA whose client certificates (the API server's) the kubelet's port accepts."""
    service_cidr: str
    """The Services' ClusterIP range: the pods route it through the node (kube-proxy)."""


class KubeNode:
    """containerd + a standalone kubelet running static pods; see the module docstring."""

    def __init__(
        self,
        prepared: Prepared,
        state: Path = DEFAULT_STATE,
        subnet: str = DEFAULT_SUBNET,
        api: ApiAccess | None = None,
    ) -> None:
        self.prepared = prepared
        self.state = state
        self.api = api
        """None: a standalone kubelet; otherwise it registers as a Node with that API server."""
        self.subnet = ipaddress.ip_network(subnet)
        self.host_ip = str(next(self.subnet.hosts()))
        """The node's own address on the pod bridge (pods reach the host only there)."""
        self.manifests = state / "manifests"
        # Pods created through the API server (KubeCluster.apply_pod): the kubelet knows them by
        # their own name, where a static pod's name gets the node's appended.
        self.api_pods: set[str] = set()
        self.registry_hosts = state / "certs.d"
        """containerd's registry host configuration (``config_path``): a registry's settings go
        in ``registry_hosts / "HOST:PORT" / "hosts.toml"``, read at each pull."""
        self.pod_logs = state / "logs" / "pods"
        self.containerd_log = state / "logs" / "containerd.log"
        self.kubelet_log = state / "logs" / "kubelet.log"
        self.read_only_port = 0
        self.setup_seconds = 0.0
        self._containerd: subprocess.Popen[bytes] | None = None
        self._kubelet: subprocess.Popen[bytes] | None = None
        self._ended: dict[str, dict[str, dict[str, Any]]] = {}
        self._lock: IO[str] | None = None

    # --- start / stop ---------------------------------------------------------------------

    def start(self, lock_timeout: float = 240.0) -> KubeNode:
        """Bring the node up (clearing what an earlier run left); waits up to ``lock_timeout``
        seconds while another session on this machine runs its node."""
        started = time.monotonic()
        if self._lock is None:  # a cluster takes it before its control plane starts
            self._take_machine_lock(lock_timeout)
        clean_host(self.state, str(self.subnet))
        for folder in (self.manifests, self.pod_logs, self.state / "cni", self.state / "logs",
                       self.registry_hosts):  # fmt: skip
            folder.mkdir(parents=True, exist_ok=True)
        self._make_bridge()
        self._start_containerd()
        for archive in self.prepared.archives:
            self._ctr("images", "import", "--no-unpack=false", str(archive), timeout=300)
        self._start_kubelet()
        self.setup_seconds = time.monotonic() - started
        return self

    def take_machine_lock(self, timeout: float) -> None:
        """The machine lock ``start`` takes, for a caller that starts more before the node."""
        self._take_machine_lock(timeout)

    def _take_machine_lock(self, timeout: float) -> None:
        """One node per state folder on the machine: a second one would clean the first one's
        processes and bridge away. Wait for the holder (another test session) to finish."""
        self.state.parent.mkdir(parents=True, exist_ok=True)
        lock = (self.state.parent / f".{self.state.name}.lock").open("w")
        deadline = time.monotonic() + timeout
        while True:
            try:
                fcntl.flock(lock, fcntl.LOCK_EX | fcntl.LOCK_NB)
                self._lock = lock
                return
            except BlockingIOError:
                if time.monotonic() > deadline:
                    lock.close()
                    raise NodeError(f"another session runs a node in {self.state}") from None
                time.sleep(1)

    def stop(self, keep_lock: bool = False) -> None:
        """Delete every pod (the kubelet runs its termination), stop the kubelet and containerd
        by PID, then remove what the node created. ``keep_lock``: the machine lock stays held
        (a cluster stops its control plane next, then calls ``release_lock``)."""
        if self._lock is None:
            return  # never started: the state folder may be another session's
        left = [manifest.stem for manifest in self.manifests.glob("*.yaml")]
        if left and self._kubelet is not None and self._kubelet.poll() is None:
            with contextlib.suppress(NodeError):  # what is still running gets killed below
                self.delete(*left, timeout=90)
        for proc in (self._kubelet, self._containerd):
            if proc is not None and proc.poll() is None:
                proc.terminate()
                try:
                    proc.wait(15)
                except subprocess.TimeoutExpired:
                    proc.kill()
                    proc.wait(5)
        self._kubelet = self._containerd = None
        # The logs stay (until the next start) for whoever looks into a failure.
        clean_host(self.state, str(self.subnet), keep_logs=True)
        if not keep_lock:
            self.release_lock()

    def release_lock(self) -> None:
        """Release the machine lock (another session may start its node)."""
        if self._lock is not None:
            self._lock.close()
            self._lock = None

    def _make_bridge(self) -> None:
        # The bridge has the node's address and nothing else: no gateway for the pods, no NAT,
        # forwarding untouched, so pod traffic reaches this host and the other pods only.
        _run("ip", "link", "add", BRIDGE, "type", "bridge")
        _run("ip", "addr", "add", f"{self.host_ip}/{self.subnet.prefixlen}", "dev", BRIDGE)
        _run("ip", "link", "set", BRIDGE, "up")
        conflist = {
            "cniVersion": "0.4.0",
            "name": NETWORK_NAME,
            "plugins": [
                {
                    "type": "bridge",
                    "bridge": BRIDGE,
                    "isGateway": False,
                    "isDefaultGateway": False,
                    "ipMasq": False,
                    "hairpinMode": True,
                    "ipam": {
                        "type": "host-local",
                        "ranges": [[{"subnet": str(self.subnet), "gateway": self.host_ip}]],
                        "dataDir": str(self.state / "cni-ipam"),
                        # ClusterIPs only, through the node where kube-proxy's rules are: still
                        # no default route, so pods reach nothing beyond this host.
                        "routes": (
                            [{"dst": self.api.service_cidr, "gw": self.host_ip}] if self.api else []
                        ),
                    },
                }
            ],
        }
        (self.state / "cni" / "10-prestop.conflist").write_text(json.dumps(conflist, indent=1))

    def _start_containerd(self) -> None:
        state = self.state
        config = f"""\
version = 2
root = "{state}/containerd/root"
state = "{state}/containerd/state"
disabled_plugins = ["io.containerd.snapshotter.v1.btrfs", "io.containerd.snapshotter.v1.zfs",
  "io.containerd.snapshotter.v1.aufs", "io.containerd.snapshotter.v1.devmapper"]
[grpc]
  address = "{state}/containerd.sock"
[ttrpc]
  address = "{state}/containerd.sock.ttrpc"
[plugins."io.containerd.internal.v1.opt"]
  path = "{state}/containerd/opt"
[plugins."io.containerd.grpc.v1.cri"]
  sandbox_image = "{self.prepared.pause_image}"
  # Root here lacks CAP_SYS_RESOURCE: runc cannot lower oom_score_adj to the kubelet's -998.
  restrict_oom_score_adj = true
  stream_server_address = "127.0.0.1"
  [plugins."io.containerd.grpc.v1.cri".containerd]
    snapshotter = "overlayfs"
    default_runtime_name = "runc"
    [plugins."io.containerd.grpc.v1.cri".containerd.runtimes.runc]
      runtime_type = "io.containerd.runc.v2"
      [plugins."io.containerd.grpc.v1.cri".containerd.runtimes.runc.options]
        SystemdCgroup = false
        Root = "{state}/runc"
  [plugins."io.containerd.grpc.v1.cri".cni]
    bin_dir = "{CNI_BIN}"
    conf_dir = "{state}/cni"
  [plugins."io.containerd.grpc.v1.cri".registry]
    config_path = "{self.registry_hosts}"
"""
        (state / "containerd.toml").write_text(config)
        with self.containerd_log.open("ab") as log:
            self._containerd = subprocess.Popen(
                ["containerd", "--config", str(state / "containerd.toml")],
                stdin=subprocess.DEVNULL,
                stdout=log,
                stderr=subprocess.STDOUT,
                start_new_session=True,
            )
        self.wait_until(
            "containerd answers",
            lambda: self._ctr("version", check=False, timeout=5) != "",
            30,
            self._containerd,
        )

    def _ctr(self, *args: str, check: bool = True, timeout: float = 60.0) -> str:
        sock = str(self.state / "containerd.sock")
        return _run("ctr", "--address", sock, "-n", "k8s.io", *args, check=check, timeout=timeout)

    def _start_kubelet(self) -> None:
        state = self.state
        self.read_only_port = free_port()
        sock = f"unix://{state}/containerd.sock"
        config = {
            "apiVersion": "kubelet.config.k8s.io/v1beta1",
            "kind": "KubeletConfiguration",
            "staticPodPath": str(self.manifests),
            "fileCheckFrequency": "1s",
            "containerRuntimeEndpoint": sock,
            "imageServiceEndpoint": sock,
            "cgroupDriver": "cgroupfs",
            "failCgroupV1": False,
            "failSwapOn": False,
            # Every port on loopback only.
            "address": "127.0.0.1",
            "port": free_port(),
            "readOnlyPort": self.read_only_port,
            "healthzBindAddress": "127.0.0.1",
            "healthzPort": free_port(),
            "authentication": {"anonymous": {"enabled": True}, "webhook": {"enabled": False}},
            "authorization": {"mode": "AlwaysAllow"},
            "podLogsDir": str(self.pod_logs),
            "resolvConf": "",
            "serializeImagePulls": False,
            # A test machine's disk is not the kubelet's business.
            "evictionHard": {"memory.available": "1Mi", "nodefs.available": "1%"},
            "imageGCHighThresholdPercent": 100,
            "imageGCLowThresholdPercent": 99,
        }
        flags = []
        if self.api is not None:
            # The API server reaches the kubelet (logs, exec) at the Node's address, which must
            # not be loopback: the bridge's. Only the API server's client certificates get in.
            config |= {
                "address": self.host_ip,
                "authentication": {
                    "anonymous": {"enabled": False},
                    "webhook": {"enabled": False},
                    "x509": {"clientCAFile": str(self.api.client_ca)},
                },
            }
            flags = [f"--kubeconfig={self.api.kubeconfig}", f"--node-ip={self.host_ip}"]
        (state / "kubelet.yaml").write_text(yaml.safe_dump(config))
        with self.kubelet_log.open("ab") as log:
            self._kubelet = subprocess.Popen(
                [
                    str(self.prepared.kubelet),
                    f"--config={state}/kubelet.yaml",
                    f"--root-dir={state}/kubelet",
                    f"--cert-dir={state}/kubelet-pki",
                    f"--volume-plugin-dir={state}/volume-plugins",
                    f"--hostname-override={NODE_NAME}",
                    "--v=4",
                    *flags,
                ],
                stdin=subprocess.DEVNULL,
                stdout=log,
                stderr=subprocess.STDOUT,
                start_new_session=True,
            )
        self.wait_until("the kubelet answers /pods", lambda: self._get("/pods") is not None, 60)

    def _get(self, path: str) -> Any:
        address = self.host_ip if self.api is not None else "127.0.0.1"
        url = f"http://{address}:{self.read_only_port}{path}"
        try:
            with _OPENER.open(url, timeout=2) as response:
                return json.load(response)
        except (OSError, urllib.error.URLError, ValueError):
            return None

    def wait_until(
        self,
        what: str,
        check: Callable[[], bool],
        timeout: float,
        proc: subprocess.Popen[bytes] | None = None,
    ) -> float:
        """Poll ``check`` every 0.1 s until it holds; returns seconds waited. NodeError after
        ``timeout`` s, or at once when ``proc`` (default: the kubelet) has exited."""
        started = time.monotonic()
        proc = proc or self._kubelet
        while not check():
            if proc is not None and proc.poll() is not None:
                raise NodeError(f"{what}: the process exited ({proc.returncode})\n{self.tails()}")
            if time.monotonic() - started > timeout:
                raise NodeError(f"not within {timeout} s: {what}")
            time.sleep(0.1)
        return time.monotonic() - started

    # --- pods -----------------------------------------------------------------------------

    def full_name(self, name: str) -> str:
        """The pod's name as the kubelet knows it: a static pod's is its manifest's name and the
        node's; a pod created through the API server (``track_api_pod``) keeps its own."""
        return name if name in self.api_pods else f"{name}-{NODE_NAME}"

    def track_api_pod(self, name: str) -> None:
        """From now on ``name`` is a pod created through the API server: ``pod``, ``delete``'s
        wait, ``exit_codes``, ``logs`` and ``timeline`` look it up by its own name. Logs kept
        from an earlier pod of that name are dropped, as ``apply`` does."""
        self.api_pods.add(name)
        self._ended.pop(name, None)
        shutil.rmtree(self.state / "logs" / "kept" / name, ignore_errors=True)

    def apply(self, manifest: dict[str, Any] | str) -> str:
        """Write a pod manifest (a dict or YAML) for the kubelet; returns the manifest's name."""
        pod = yaml.safe_load(manifest) if isinstance(manifest, str) else manifest
        if pod.get("kind") != "Pod":
            raise NodeError(f"not a Pod manifest: kind {pod.get('kind')!r}")
        name = pod["metadata"]["name"]
        shutil.rmtree(self.state / "logs" / "kept" / name, ignore_errors=True)
        partial = self.manifests / f".{name}.tmp"
        partial.write_text(yaml.safe_dump(pod))
        partial.rename(self.manifests / f"{name}.yaml")  # the kubelet never reads half a file
        return str(name)

    def pods(self) -> list[dict[str, Any]]:
        found = self._get("/pods")
        return list(found.get("items") or []) if found else []

    def pod(self, name: str) -> dict[str, Any] | None:
        """The kubelet's view of a pod (spec and status), None when it has none."""
        full = self.full_name(name)
        return next((p for p in self.pods() if p["metadata"]["name"] == full), None)

    def container_status(self, name: str, container: str) -> dict[str, Any] | None:
        pod = self.pod(name) or {}
        status = pod.get("status", {})
        every = status.get("containerStatuses", []) + status.get("initContainerStatuses", [])
        return next((c for c in every if c["name"] == container), None)

    def ready(self, name: str) -> bool:
        pod = self.pod(name) or {}
        conditions = pod.get("status", {}).get("conditions", [])
        return any(c["type"] == "Ready" and c["status"] == "True" for c in conditions)

    def pod_ip(self, name: str) -> str:
        return str((self.pod(name) or {}).get("status", {}).get("podIP", ""))

    def wait_running(self, name: str, container: str, timeout: float = 120.0) -> float:
        """Wait until the kubelet reports ``container`` running; returns seconds waited."""

        def running() -> bool:
            status = self.container_status(name, container)
            return bool(status and "running" in status.get("state", {}))

        return self.wait_until(f"{name}/{container} running", running, timeout)

    def wait_ready(self, name: str, timeout: float = 120.0) -> float:
        """Wait until the pod's Ready condition is True; returns seconds waited."""
        return self.wait_until(f"{name} Ready", lambda: self.ready(name), timeout)

    def delete(
        self, *names: str, timeout: float = 120.0, remove: Callable[[], object] | None = None
    ) -> float:
        """Remove the pods' manifests at once (the kubelet runs each whole termination) and wait
        until every one is gone; returns the monotonic time the manifests were removed. How
        each container ended is kept for ``exit_codes`` and ``timeline``, and its log for
        ``logs`` (the kubelet removes containers and their logs soon after a pod stops).
        ``remove``: what deletes the pods instead (pods created through the API server)."""
        containers = {
            cid: (name, c) for name in names for cid, c in self._containers_of(name).items()
        }
        deleted = time.monotonic()
        if remove is not None:
            remove()
        for name in names if remove is None else ():
            (self.manifests / f"{name}.yaml").unlink()
        # A pod leaves the kubelet's list at once; its containers stop when the termination is
        # over. Done when both hold for every pod.
        while True:
            for name in names:
                self._keep_logs(name)
            statuses = {cid: self._cri_status(cid) or {} for cid in containers}
            for cid, status in sorted(statuses.items(), key=lambda i: i[1].get("CreatedAt", 0)):
                if status.get("FinishedAt"):
                    name, container = containers[cid]
                    # The last attempt of each container wins.
                    self._ended.setdefault(name, {})[container] = status
            finished = all(s.get("FinishedAt") or not s for s in statuses.values())
            if finished and all(self.pod(name) is None for name in names):
                return deleted
            if time.monotonic() - deleted > timeout:
                raise NodeError(f"not within {timeout} s: {', '.join(names)} gone")
            time.sleep(0.05)

    def _containers_of(self, name: str) -> dict[str, str]:
        """containerd's ids of the pod's containers (every attempt): id -> container name."""
        found = {}
        full = self.full_name(name)
        for cid in self._ctr("containers", "ls", "-q").split():
            with contextlib.suppress(NodeError, ValueError):
                labels = json.loads(self._ctr("containers", "info", cid)).get("Labels") or {}
                if labels.get("io.kubernetes.pod.name") == full:
                    container = labels.get("io.kubernetes.container.name")
                    if container:
                        found[cid] = container
        return found

    def _cri_status(self, cid: str) -> dict[str, Any] | None:
        """The CRI plugin's status record of a container (exit code, finish time in ns)."""
        path = self.state / "containerd/root/io.containerd.grpc.v1.cri/containers" / cid / "status"
        try:
            record = json.loads(path.read_text())
        except (OSError, ValueError):
            return None
        return dict(record.get("Status", record))

    def exit_codes(self, name: str) -> dict[str, int]:
        """Each container's exit code in the termination ``delete`` waited for."""
        return {c: int(s.get("ExitCode", -1)) for c, s in self._ended.get(name, {}).items()}

    # --- logs and the timeline ------------------------------------------------------------

    def _keep_logs(self, name: str) -> None:
        """Hard-link the pod's container log files into ``logs/kept/NAME``: the kubelet deletes
        them with the containers, soon after the pod stops; the links keep every line."""
        for source in self.pod_logs.glob(f"default_{self.full_name(name)}_*/*/*.log"):
            kept = self.state / "logs" / "kept" / name / source.parent.name / source.name
            if not kept.exists():
                kept.parent.mkdir(parents=True, exist_ok=True)
                with contextlib.suppress(FileNotFoundError):
                    os.link(source, kept)

    def log_files(self, name: str, container: str) -> list[Path]:
        """The container's log files, one per start (0.log, 1.log, ...), oldest first."""
        self._keep_logs(name)
        folder = self.state / "logs" / "kept" / name / container
        return sorted(folder.glob("*.log"), key=lambda f: int(f.stem))

    def log_lines(self, name: str, container: str) -> list[tuple[float, str]]:
        """Every line the container wrote, across its restarts: ``(epoch seconds, text)``."""
        return [line for f in self.log_files(name, container) for line in cri_log_lines(f)]

    log_lines_of = staticmethod(cri_log_lines)

    def logs(self, name: str, container: str) -> str:
        """What ``kubectl logs`` would show (every start, in order)."""
        return "\n".join(text for _, text in self.log_lines(name, container))

    def timeline(self, name: str, containers: tuple[str, ...] = ()) -> list[Event]:
        """The kubelet's termination steps for the pod, plus each named container's log lines
        (JSON lines from the agent are kept whole in ``detail``), sorted by time."""
        events = kubelet_events(self.kubelet_log.read_text(errors="replace"), self.full_name(name))
        events += [
            Event(status["FinishedAt"] / 1e9, "finished", container, f"exit {status['ExitCode']}")
            for container, status in self._ended.get(name, {}).items()
        ]
        for container in containers:
            events += [
                Event(at, "log", container, text) for at, text in self.log_lines(name, container)
            ]
        return sorted(events)

    def tails(self, lines: int = 60) -> str:
        """The last lines of the kubelet's and containerd's logs (for a failed test)."""
        out = []
        for log in (self.kubelet_log, self.containerd_log):
            text = log.read_text(errors="replace").splitlines() if log.exists() else []
            out.append(f"----- last {lines} lines of {log} -----")
            out += text[-lines:]
        return "\n".join(out)

    def __enter__(self) -> KubeNode:
        return self.start()

    def __exit__(self, *exc: object) -> None:
        self.stop()


def iter_agent_events(lines: list[tuple[float, str]]) -> Iterator[tuple[float, dict[str, Any]]]:
    """The agent's JSON log lines: ``(epoch seconds, event dict)``; other lines are skipped."""
    for at, text in lines:
        with contextlib.suppress(ValueError):
            event = json.loads(text)
            if isinstance(event, dict):
                yield at, event
