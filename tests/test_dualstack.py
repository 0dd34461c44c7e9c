"""Dual-stack by default, in network namespaces the test creates (root).

Issue 9: the default listen address 0.0.0.0 left an IPv6-only pod's hook unanswered. Now an
unset PRESTOP_HOST listens on every IPv4 and every IPv6 address when the host has IPv6, on IPv4
only when it has not, and an explicit PRESTOP_HOST still wins. Each case runs the real agent in
its own namespace: one whose only non-loopback address is IPv6 (a pod in an IPv6-only cluster),
one with IPv6 disabled.
"""

from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys
import time
from collections.abc import Callable, Iterator
from pathlib import Path

import pytest

from tests.harness.support import skip_or_fail

pytestmark = pytest.mark.root

PORT = 8099
POD_IPV6 = "fd00:9::1"


def _ip(*args: str) -> None:
    subprocess.run(["ip", *args], check=True, capture_output=True, timeout=10)


@pytest.fixture
def netns() -> Iterator[Callable[[bool], str]]:
    """Factory: a fresh network namespace with loopback up and, with ``ipv6``, an
    interface holding only ``POD_IPV6`` (the pod's address); without it, IPv6 disabled."""
    if os.geteuid() != 0 or shutil.which("ip") is None:
        skip_or_fail("network namespaces need root and iproute2")
    made: list[str] = []

    def make(ipv6: bool) -> str:
        name = f"prestop-t9-{os.getpid()}-{len(made)}"
        _ip("netns", "add", name)
        made.append(name)
        if not ipv6:
            for scope in ("all", "default", "lo"):
                _ip("netns", "exec", name, "sysctl", "-qw", f"net.ipv6.conf.{scope}.disable_ipv6=1")
        _ip("-n", name, "link", "set", "lo", "up")
        if ipv6:
            # A veth pair with both ends inside (no dummy module needed); one end is the pod's.
            _ip("-n", name, "link", "add", "pod0", "type", "veth", "peer", "name", "pod1")
            _ip("-n", name, "addr", "add", f"{POD_IPV6}/64", "dev", "pod0", "nodad")
            _ip("-n", name, "link", "set", "pod0", "up")
            _ip("-n", name, "link", "set", "pod1", "up")
        return name

    yield make
    for name in made:
        subprocess.run(["ip", "netns", "del", name], check=False, timeout=10)


def _status_in(namespace: str, url: str) -> int:
    """GET ``url`` from inside the namespace: the HTTP status, 0 when nothing answered."""
    code = (
        "import sys, urllib.request\n"
        "try:\n"
        f"    print(urllib.request.urlopen({url!r}, timeout=2).status)\n"
        "except Exception:\n"
        "    print(0)\n"
    )
    done = subprocess.run(
        ["ip", "netns", "exec", namespace, sys.executable, "-c", code],
        capture_output=True,
        text=True,
        timeout=10,
    )
    return int(done.stdout.strip() or 0)


@pytest.fixture
def agent_in(tmp_path: Path) -> Iterator[Callable[..., tuple[str, list[str]]]]:
    """Start the real agent in a namespace; wait until it listens; return its log path and
    the addresses it says it listens on."""
    procs: list[subprocess.Popen[bytes]] = []

    def start(namespace: str, **env: str) -> tuple[str, list[str]]:
        log = tmp_path / f"{namespace}.log"
        with log.open("wb") as out:
            procs.append(
                subprocess.Popen(
                    ["ip", "netns", "exec", namespace, sys.executable, "-m", "agent.cli"],
                    env={
                        "PATH": os.environ.get("PATH", "/usr/bin:/bin"),
                        "PRESTOP_PORT": str(PORT),
                        "PRESTOP_LOG_FORMAT": "json",
                        "PRESTOP_DRAIN_MODE": "fixed",
                        **env,
                    },
                    stdout=out,
                    stderr=subprocess.STDOUT,
                )
            )
        deadline = time.monotonic() + 10
        while time.monotonic() < deadline:
            for line in log.read_text().splitlines():
                event = json.loads(line)
                if event["event"] == "agent_started":
                    return str(log), event["listen"]
            assert procs[-1].poll() is None, log.read_text()
            time.sleep(0.02)
        raise AssertionError(f"agent did not start:\n{log.read_text()}")

    yield start
    for proc in procs:
        proc.kill()
        proc.wait(timeout=10)


def test_an_ipv6_only_pod_gets_its_hook_by_default(netns, agent_in) -> None:
    namespace = netns(True)
    _, listening = agent_in(namespace)
    assert listening == [f"0.0.0.0:{PORT}", f"[::]:{PORT}"]
    assert _status_in(namespace, f"http://[{POD_IPV6}]:{PORT}/ready") == 200
    assert _status_in(namespace, f"http://[::1]:{PORT}/live") == 200
    assert _status_in(namespace, f"http://127.0.0.1:{PORT}/live") == 200


def test_a_host_without_ipv6_listens_on_ipv4_only(netns, agent_in) -> None:
    namespace = netns(False)
    _, listening = agent_in(namespace)
    assert listening == [f"0.0.0.0:{PORT}"]
    assert _status_in(namespace, f"http://127.0.0.1:{PORT}/ready") == 200


def test_an_explicit_host_still_wins(netns, agent_in) -> None:
    namespace = netns(True)
    _, listening = agent_in(namespace, PRESTOP_HOST="127.0.0.1")
    assert listening == [f"127.0.0.1:{PORT}"]
    assert _status_in(namespace, f"http://127.0.0.1:{PORT}/ready") == 200
    assert _status_in(namespace, f"http://[{POD_IPV6}]:{PORT}/ready") == 0
