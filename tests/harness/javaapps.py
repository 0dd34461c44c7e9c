"""Real Java parts for integration tests: a Eureka server and a Spring Boot demo app.

The two Maven projects live in ``tests/fixtures/`` (``eureka-server``, ``demo-app``). They are
built once (and rebuilt only when ``pom.xml`` or ``src/`` changed) and run as plain JVMs.

Fixtures (import them into a test module, or make the whole suite see them with
``pytest_plugins = ["tests.harness.javaapps"]`` in the top-level ``tests/conftest.py``):

- ``need_java``: skips (fails under ``CI=true``) when ``java`` or ``mvn`` is missing.
- ``eureka_jar`` / ``demo_app_jar`` (session): the jars to run (``build()``: Maven, then an
  AppCDS archive that halves JVM start-up; ``PRESTOP_JAVA_CDS=0`` skips the archive).
- ``eureka_server`` (session): one standalone server, ``.url == "http://127.0.0.1:PORT/eureka/"``.
- ``cached_eureka_server`` (module): a standalone server whose read-only response cache is on,
  refreshed every 3 s.
- ``eureka_peers`` (per test, servers live per module): a pair of replicating servers
  ``(a, b)``; a test may ``stop()``/``start()`` either one, the next test gets both running.
- ``start_demo_app(eureka_urls, app_name="DEMO-APP", instance_id=None, port=None, ...)``: starts
  the demo app, waits until every given server lists it UP, stops it after the test.
- The demo app's caller mode (``extra_args=["--demo.caller.target=APP", ...]``): a Spring Cloud
  LoadBalancer client over a pooled keep-alive HTTP client calling ``APP``'s ``/whoami``, every
  request recorded (``GET /caller/records``, ``/caller/stats``; ``POST /caller/interval?ms=``).
- ``jvm_logs_on_failure``: prints the tail of every live JVM's log when the test failed
  (``eureka_peers`` and ``start_demo_app`` already do this).

At most ``MAX_JVMS`` (4) JVMs run at once in one pytest process: a fifth start is an error.
"""

from __future__ import annotations

import contextlib
import fcntl
import json
import os
import shutil
import signal
import subprocess
import time
import urllib.error
import urllib.request
from collections.abc import Iterable, Iterator, Sequence
from pathlib import Path
from typing import Any

import pytest

from tests.harness.support import free_port, skip_or_fail

__all__ = [
    "CACHED_EUREKA_UPDATE_SECONDS",
    "FIXTURES",
    "MAX_JVMS",
    "DemoApp",
    "EurekaServer",
    "JavaApp",
    "StartDemoApp",
    "build",
    "cached_eureka_server",
    "demo_app_jar",
    "eureka_instances",
    "eureka_jar",
    "eureka_peers",
    "eureka_server",
    "eureka_set_status",
    "eureka_status",
    "free_port",
    "http_get",
    "http_request",
    "java_log_dir",
    "jvm_logs_on_failure",
    "live_jvms",
    "need_java",
    "print_jvm_logs",
    "start_demo_app",
]

FIXTURES = Path(__file__).resolve().parent.parent / "fixtures"
MAX_JVMS = 4

# Fast start-up on 2 cores matters more than peak speed: C1 only, serial GC, a small heap, the
# JDK's class-data archive.
JAVA_OPTS = (
    "-Xmx256m",
    "-Xss512k",
    "-XX:+UseSerialGC",
    "-XX:TieredStopAtLevel=1",
    "-Xshare:auto",
)
BUILD_TIMEOUT = 900.0
# Build an AppCDS archive next to each jar (see _make_cds); PRESTOP_JAVA_CDS=0 turns it off.
USE_CDS = os.environ.get("PRESTOP_JAVA_CDS", "1") != "0"
# Arguments of the one training start-up that records the archive: no port, no real server.
TRAINING_ARGS = {
    "eureka-server": ["--server.port=0"],
    "demo-app": [
        "--server.port=0",
        "--eureka.client.service-url.defaultZone=http://127.0.0.1:9/eureka/",
    ],
}
START_TIMEOUT = 90.0

# urllib without proxies from the environment: every target is on this machine.
_OPENER = urllib.request.build_opener(urllib.request.ProxyHandler({}))

_live: list[JavaApp] = []  # running JVMs of this pytest process
_history: list[JavaApp] = []  # every start(), in order (a restart appears again)


# --------------------------------------------------------------------------------------- build


def _newest_source_mtime(project: Path) -> float:
    newest = (project / "pom.xml").stat().st_mtime
    for path in (project / "src").rglob("*"):
        if path.is_file():
            newest = max(newest, path.stat().st_mtime)
    return newest


def _run(cmd: Sequence[str], cwd: Path, timeout: float) -> None:
    proc = subprocess.run(
        cmd,
        cwd=cwd,
        stdin=subprocess.DEVNULL,
        stdout=subprocess.PIPE,
        stderr=subprocess.STDOUT,
        text=True,
        timeout=timeout,
        check=False,
    )
    if proc.returncode != 0:
        tail = "\n".join(proc.stdout.splitlines()[-60:])
        raise RuntimeError(f"{' '.join(cmd)} in {cwd} failed (exit {proc.returncode}):\n{tail}")


def _newer(path: Path, than: float) -> bool:
    return path.is_file() and path.stat().st_mtime > than


def _make_cds(fat_jar: Path, cds_dir: Path, training_args: Sequence[str]) -> None:
    """Extract the fat jar and record a class-data archive from one start-up of it.

    A JVM started with the archive loads Spring's classes already parsed and verified: start-up
    takes about half as long. A stale archive is harmless: ``-Xshare:auto`` ignores it.
    """
    shutil.rmtree(cds_dir, ignore_errors=True)
    _run(
        ["java", "-Djarmode=tools", "-jar", str(fat_jar), "extract", "--destination", str(cds_dir)],
        fat_jar.parent,
        120,
    )
    archive = cds_dir / f"{fat_jar.stem}.jsa"
    partial = archive.with_suffix(".jsa.tmp")
    _run(
        [
            "java",
            *JAVA_OPTS,
            f"-XX:ArchiveClassesAtExit={partial}",
            "-Dspring.context.exit=onRefresh",  # stop once the context is up: nothing served
            "-jar",
            str(cds_dir / fat_jar.name),
            *training_args,
        ],
        cds_dir,
        300,
    )
    if not partial.is_file():
        raise RuntimeError(f"the training run wrote no archive {partial}")
    partial.rename(archive)


def _built(project: Path, name: str) -> Path | None:
    """The jar to run when everything is up to date, else None."""
    fat = project / "target" / f"{name}.jar"
    if not _newer(fat, _newest_source_mtime(project)):
        return None
    if not USE_CDS:
        return fat
    fat_mtime = fat.stat().st_mtime
    cds_dir = project / "target" / "cds"
    if _newer(cds_dir / f"{name}.jsa", fat_mtime):
        return cds_dir / f"{name}.jar"
    if _newer(cds_dir / "FAILED", fat_mtime):
        return fat
    return None


def build(name: str) -> Path:
    """Build ``tests/fixtures/<name>`` with Maven unless its jar is newer than every source file.

    Returns the jar to run: ``target/<name>.jar`` or, with a class-data archive (the default;
    ``PRESTOP_JAVA_CDS=0`` turns it off), its extracted copy ``target/cds/<name>.jar``, next to
    ``<name>.jsa`` which ``JavaApp`` picks up. A file lock keeps parallel pytest workers from
    building the same project twice; the one that waited finds everything fresh.
    """
    project = FIXTURES / name
    if not (project / "pom.xml").is_file():
        raise FileNotFoundError(f"no Maven project at {project}")
    jar = _built(project, name)
    if jar is not None:
        return jar
    (project / "target").mkdir(exist_ok=True)
    with open(project / "target" / ".build.lock", "w") as lock:
        fcntl.flock(lock, fcntl.LOCK_EX)
        try:
            jar = _built(project, name)
            if jar is not None:
                return jar
            fat = project / "target" / f"{name}.jar"
            started = time.monotonic()
            if not _newer(fat, _newest_source_mtime(project)):
                cmd = ["mvn", "-B", "-q", "-Dstyle.color=never", "-DskipTests", "package"]
                _run(cmd, project, BUILD_TIMEOUT)
                if not fat.is_file():
                    raise RuntimeError(f"{' '.join(cmd)} in {project} made no {fat}")
                # Maven may leave the jar untouched when nothing compiled changed (say, a
                # touched file): mark it fresh so the next run does not build again.
                os.utime(fat)
            if not USE_CDS:
                jar = fat
            else:
                cds_dir = project / "target" / "cds"
                try:
                    _make_cds(fat, cds_dir, TRAINING_ARGS.get(name, ()))
                    jar = cds_dir / fat.name
                except (RuntimeError, subprocess.TimeoutExpired) as err:
                    print(f"no class-data archive for {name}, JVMs start slower: {err}")
                    cds_dir.mkdir(parents=True, exist_ok=True)
                    (cds_dir / "FAILED").write_text(str(err))
                    jar = fat
            print(f"built {jar} in {time.monotonic() - started:.1f} s")
            return jar
        finally:
            fcntl.flock(lock, fcntl.LOCK_UN)


# ---------------------------------------------------------------------------------------- http


def http_request(
    method: str,
    url: str,
    body: bytes | None = None,
    headers: dict[str, str] | None = None,
    timeout: float = 5.0,
) -> tuple[int, str]:
    """One HTTP request: ``(status, body)``; connection errors give status 0."""
    request = urllib.request.Request(url, data=body, headers=headers or {}, method=method)
    try:
        with _OPENER.open(request, timeout=timeout) as response:
            return response.status, response.read().decode("utf-8", "replace")
    except urllib.error.HTTPError as err:
        return err.code, err.read().decode("utf-8", "replace")
    except (OSError, urllib.error.URLError):
        return 0, ""


def http_get(url: str, accept: str = "application/json", timeout: float = 2.0) -> tuple[int, str]:
    """GET ``url``: ``(status, body)``; connection errors give status 0."""
    return http_request("GET", url, headers={"Accept": accept}, timeout=timeout)


def eureka_instances(eureka_url: str, app: str) -> list[dict[str, Any]]:
    """The instances ``GET {eureka_url}apps/{app}`` lists (empty when the app is unknown)."""
    status, body = http_get(f"{eureka_url}apps/{app.upper()}")
    if status == 404:
        return []
    if status != 200:
        raise RuntimeError(f"GET {eureka_url}apps/{app} answered {status}: {body[:300]}")
    instances = json.loads(body)["application"]["instance"]
    return instances if isinstance(instances, list) else [instances]


def eureka_status(eureka_url: str, app: str, instance_id: str) -> str | None:
    """The status a Eureka server reports for one instance, or None when it does not list it."""
    for instance in eureka_instances(eureka_url, app):
        if instance.get("instanceId") == instance_id:
            return str(instance.get("status"))
    return None


def eureka_set_status(eureka_url: str, app: str, instance_id: str, value: str) -> int:
    """``PUT {eureka_url}apps/{APP}/{id}/status?value=...`` (a status override): HTTP status."""
    url = f"{eureka_url}apps/{app.upper()}/{instance_id}/status?value={value}"
    return http_request("PUT", url, body=b"")[0]


# ------------------------------------------------------------------------------------- JavaApp


class JavaApp:
    """One JVM running an executable jar, its output in ``log_path``."""

    def __init__(
        self,
        jar: Path,
        args: Sequence[str],
        log_dir: Path,
        name: str,
        java_opts: Sequence[str] = JAVA_OPTS,
    ) -> None:
        self.jar = Path(jar)
        self.args = list(args)
        self.name = name
        self.java_opts = list(java_opts)
        self.log_path = Path(log_dir) / f"{name}.log"
        self.proc: subprocess.Popen[bytes] | None = None
        self.started_at = 0.0

    @property
    def command(self) -> list[str]:
        archive = self.jar.with_suffix(".jsa")  # made by build(); ignored by the JVM if stale
        cds = [f"-XX:SharedArchiveFile={archive}"] if archive.is_file() else []
        return ["java", *self.java_opts, *cds, "-jar", str(self.jar), *self.args]

    @property
    def pid(self) -> int | None:
        return self.proc.pid if self.proc else None

    def alive(self) -> bool:
        return self.proc is not None and self.proc.poll() is None

    def start(self) -> JavaApp:
        if self.alive():
            raise RuntimeError(f"{self.name} is already running")
        _live[:] = [app for app in _live if app.alive()]
        limit = int(os.environ.get("PRESTOP_MAX_JVMS", MAX_JVMS))
        if len(_live) >= limit:
            names = ", ".join(app.name for app in _live)
            raise RuntimeError(f"{limit} JVMs already running ({names}); stop one first")
        self.log_path.parent.mkdir(parents=True, exist_ok=True)
        with open(self.log_path, "ab") as log:  # a restart appends to the same log
            log.write(f"\n==== {' '.join(self.command)}\n".encode())
            log.flush()
            self.proc = subprocess.Popen(
                self.command,
                stdin=subprocess.DEVNULL,
                stdout=log,
                stderr=subprocess.STDOUT,
                start_new_session=True,  # a Ctrl-C in the terminal does not reach the JVM
            )
        self.started_at = time.monotonic()
        _live.append(self)
        _history.append(self)
        return self

    def wait_ready(
        self, url: str, timeout: float = START_TIMEOUT, accept: str = "application/json"
    ) -> float:
        """Poll ``url`` until it answers 200; returns seconds since ``start()``."""
        deadline = time.monotonic() + timeout
        while True:
            if not self.alive():
                raise RuntimeError(
                    f"{self.name} exited ({self.proc and self.proc.returncode}) before {url} "
                    f"answered; log {self.log_path}:\n{self.log_tail()}"
                )
            if http_get(url, accept=accept, timeout=1.0)[0] == 200:
                return time.monotonic() - self.started_at
            if time.monotonic() > deadline:
                raise TimeoutError(
                    f"{url} not ready within {timeout} s; log {self.log_path}:\n{self.log_tail()}"
                )
            time.sleep(0.1)

    def stop(self, timeout: float = 20.0) -> int | None:
        """SIGTERM, wait up to ``timeout`` s, then SIGKILL. Returns the exit code."""
        proc = self.proc
        if proc is None:
            return None
        if proc.poll() is None:
            with contextlib.suppress(ProcessLookupError):
                proc.send_signal(signal.SIGTERM)
            try:
                proc.wait(timeout)
            except subprocess.TimeoutExpired:
                with contextlib.suppress(ProcessLookupError):
                    proc.kill()
                proc.wait(10)
        if self in _live:
            _live.remove(self)
        return proc.returncode

    def rss_kib(self) -> int | None:
        """Resident memory of the JVM in KiB (None when it is not running)."""
        if not self.alive():
            return None
        try:
            status = Path(f"/proc/{self.pid}/status").read_text()
        except OSError:
            return None
        for line in status.splitlines():
            if line.startswith("VmRSS:"):
                return int(line.split()[1])
        return None

    def log_tail(self, lines: int = 80) -> str:
        try:
            text = self.log_path.read_text(errors="replace")
        except OSError:
            return "(no log)"
        return "\n".join(text.splitlines()[-lines:])


def live_jvms() -> list[JavaApp]:
    return [app for app in _live if app.alive()]


def print_jvm_logs(apps: Iterable[JavaApp] | None = None, lines: int = 80) -> None:
    """Print the tail of each JVM's log (all live ones by default)."""
    for app in live_jvms() if apps is None else apps:
        print(f"\n----- {app.name}: last {lines} lines of {app.log_path} -----")
        print(app.log_tail(lines))


# --------------------------------------------------------------------------------- the servers


class EurekaServer:
    """A Eureka server on ``host:port``; ``peers`` are the other servers' URLs."""

    def __init__(
        self, jar: Path, log_dir: Path, name: str, host: str, port: int, peers: Sequence[str] = ()
    ) -> None:
        self.host = host
        self.port = port
        self.url = f"http://{host}:{port}/eureka/"
        args = [
            f"--server.address={host}",
            f"--server.port={port}",
            f"--eureka.instance.hostname={host}",
        ]
        if peers:
            args += [
                f"--eureka.client.service-url.defaultZone={','.join(peers)}",
                # A (re)started peer copies the registry from the other one before serving.
                "--eureka.client.fetch-registry=true",
                "--eureka.server.registry-sync-retries=1",
            ]
        self.app = JavaApp(jar, args, log_dir, name)
        self.startup_seconds = 0.0

    def start(self, timeout: float = START_TIMEOUT) -> EurekaServer:
        self.app.start()
        self.startup_seconds = self.app.wait_ready(f"{self.url}apps", timeout)
        return self

    def stop(self) -> None:
        self.app.stop()

    def running(self) -> bool:
        return self.app.alive()

    def log_tail(self, lines: int = 80) -> str:
        return self.app.log_tail(lines)

    def __repr__(self) -> str:
        return f"EurekaServer({self.url}, running={self.running()})"


class DemoApp:
    """The demo Spring Boot app, registered with ``eureka_urls``."""

    def __init__(
        self,
        jar: Path,
        log_dir: Path,
        eureka_urls: Sequence[str],
        app_name: str,
        ip: str,
        port: int,
        instance_id: str,
        bind: str | None,
        extra_args: Sequence[str],
    ) -> None:
        self.eureka_urls = list(eureka_urls)
        self.app_name = app_name.upper()
        self.ip = ip
        self.port = port
        self.instance_id = instance_id
        self.url = f"http://{bind if bind and bind != '0.0.0.0' else ip}:{port}/"
        args = [
            f"--server.port={port}",
            f"--spring.application.name={app_name.lower()}",
            f"--demo.ip={ip}",
            f"--demo.instance-id={instance_id}",
            f"--eureka.client.service-url.defaultZone={','.join(self.eureka_urls)}",
        ]
        if bind:
            args.append(f"--server.address={bind}")
        safe_id = instance_id.replace(":", "_").replace("/", "_")
        self.app = JavaApp(jar, [*args, *extra_args], log_dir, f"demo-{safe_id}")
        self.startup_seconds = 0.0

    def start(self, timeout: float = START_TIMEOUT, wait_registered: bool = True) -> DemoApp:
        self.app.start()
        self.app.wait_ready(f"{self.url}actuator/health", timeout)
        if wait_registered:
            self.wait_status("UP", timeout=timeout)
        self.startup_seconds = time.monotonic() - self.app.started_at
        return self

    def wait_status(self, status: str | None, timeout: float = 30.0) -> None:
        """Wait until every server of this app reports ``status`` for it (None: not listed)."""
        deadline = time.monotonic() + timeout
        while True:
            seen = {
                url: eureka_status(url, self.app_name, self.instance_id) for url in self.eureka_urls
            }
            if all(value == status for value in seen.values()):
                return
            if not self.app.alive():
                raise RuntimeError(f"{self.app.name} exited; log:\n{self.app.log_tail()}")
            if time.monotonic() > deadline:
                raise TimeoutError(
                    f"{self.app_name}/{self.instance_id} not {status} within {timeout} s: {seen}"
                )
            time.sleep(0.1)

    def discovery(self, app: str | None = None) -> list[dict[str, Any]]:
        """What the app's own DiscoveryClient lists for ``app`` (default: itself)."""
        status, body = http_get(f"{self.url}discovery/{app or self.app_name}")
        if status != 200:
            raise RuntimeError(f"/discovery answered {status}: {body[:300]}")
        return json.loads(body)

    def stop(self, timeout: float = 20.0) -> int | None:
        return self.app.stop(timeout)

    def log_tail(self, lines: int = 80) -> str:
        return self.app.log_tail(lines)

    def __repr__(self) -> str:
        return f"DemoApp({self.app_name}/{self.instance_id} at {self.url})"


# ------------------------------------------------------------------------------------ fixtures


@pytest.fixture(scope="session")
def need_java() -> None:
    """Skip (under CI=true: fail) when java or mvn is missing."""
    missing = [tool for tool in ("java", "mvn") if shutil.which(tool) is None]
    if missing:
        skip_or_fail(f"{' and '.join(missing)} not installed")


@pytest.fixture(scope="session")
def java_log_dir(tmp_path_factory: pytest.TempPathFactory) -> Path:
    return tmp_path_factory.mktemp("jvm-logs")


@pytest.fixture(scope="session")
def eureka_jar(need_java: None) -> Path:
    return build("eureka-server")


@pytest.fixture(scope="session")
def demo_app_jar(need_java: None) -> Path:
    return build("demo-app")


@pytest.fixture
def jvm_logs_on_failure(request: pytest.FixtureRequest) -> Iterator[None]:
    """After a failed test, print the tail of every live JVM's log (shown with the failure)."""
    failed_before = request.session.testsfailed
    started_before = len(_history)
    running = live_jvms()
    yield
    if request.session.testsfailed > failed_before:
        # The JVMs that ran during the test, including those its fixtures have stopped already.
        apps = dict.fromkeys([*running, *_history[started_before:], *live_jvms()])
        print_jvm_logs(apps)


@pytest.fixture(scope="session")
def eureka_server(eureka_jar: Path, java_log_dir: Path) -> Iterator[EurekaServer]:
    """One standalone Eureka server for the whole session (``.url`` ends in ``/eureka/``)."""
    server = EurekaServer(eureka_jar, java_log_dir, "eureka", "127.0.0.1", free_port())
    try:
        server.start()
        yield server
    finally:
        server.stop()


# The read-only response cache's refresh interval of ``cached_eureka_server``: Eureka's 30 s
# default scaled 10x down, as the propagation tests use it.
CACHED_EUREKA_UPDATE_SECONDS = 3.0


@pytest.fixture(scope="module")
def cached_eureka_server(eureka_jar: Path, java_log_dir: Path) -> Iterator[EurekaServer]:
    """A standalone server with the read-only response cache on, refreshed every 3 s (per
    module): what clients fetch lags the registry by up to that, as in production."""
    server = EurekaServer(eureka_jar, java_log_dir, "eureka-cached", "127.0.0.1", free_port())
    server.app.args += [
        "--eureka.server.use-read-only-response-cache=true",
        "--eureka.server.response-cache-update-interval-ms="
        f"{int(CACHED_EUREKA_UPDATE_SECONDS * 1000)}",
    ]
    try:
        server.start()
        yield server
    finally:
        server.stop()


def replicating_pair(
    eureka_jar: Path, java_log_dir: Path, name: str
) -> tuple[EurekaServer, EurekaServer]:
    """Two Eureka servers (not started) that name each other as peers, ``{name}-a`` on
    127.0.0.1 and ``{name}-b`` on 127.0.0.2: distinct loopback addresses, since Eureka drops a
    peer URL whose host is its own hostname."""
    hosts = ("127.0.0.1", "127.0.0.2")
    ports = [free_port(host) for host in hosts]
    urls = [f"http://{host}:{port}/eureka/" for host, port in zip(hosts, ports, strict=True)]
    first, second = (
        EurekaServer(
            eureka_jar, java_log_dir, f"{name}-{'ab'[i]}", hosts[i], ports[i], peers=[urls[1 - i]]
        )
        for i in range(2)
    )
    return first, second


@pytest.fixture(scope="module")
def _eureka_peer_pair(eureka_jar: Path, java_log_dir: Path) -> Iterator[tuple[EurekaServer, ...]]:
    with running(replicating_pair(eureka_jar, java_log_dir, "eureka-peer")) as servers:
        yield servers


@contextlib.contextmanager
def running(servers: tuple[EurekaServer, ...]) -> Iterator[tuple[EurekaServer, ...]]:
    """Start the servers' JVMs together, wait until each answers, stop them all at the end."""
    try:
        for server in servers:
            server.app.start()  # the JVMs boot at once
        for server in servers:
            server.startup_seconds = server.app.wait_ready(f"{server.url}apps")
        yield servers
    finally:
        for server in servers:
            server.stop()


@pytest.fixture
def eureka_peers(
    _eureka_peer_pair: tuple[EurekaServer, EurekaServer], jvm_logs_on_failure: None
) -> tuple[EurekaServer, EurekaServer]:
    """Two Eureka servers replicating to each other (127.0.0.1 and 127.0.0.2).

    A test may ``stop()`` and ``start()`` either one; each test starts with both running.
    """
    for server in _eureka_peer_pair:
        if not server.running():
            server.start()
    return _eureka_peer_pair


def _urls(eureka_urls: str | EurekaServer | Sequence[str | EurekaServer]) -> list[str]:
    items = [eureka_urls] if isinstance(eureka_urls, str | EurekaServer) else list(eureka_urls)
    urls = [item.url if isinstance(item, EurekaServer) else item for item in items]
    return [url if url.endswith("/") else url + "/" for url in urls]


class StartDemoApp:
    """Starts demo apps (``start_demo_app``'s factory): ``starter(eureka_urls, app_name=...,
    instance_id=None, port=None)``.

    ``eureka_urls``: a URL, an ``EurekaServer`` or a list of them. The app listens on
    ``bind`` (default: ``ip``, 127.0.0.1) at ``port`` (default: a free one) and registers as
    ``ip:app-name:port`` unless ``instance_id`` is given. Returns once every server lists it UP
    (``wait_registered=False``: once it answers). ``stop_all()`` stops every app it started.
    """

    def __init__(self, jar: Path, log_dir: Path) -> None:
        self._jar = jar
        self._log_dir = log_dir
        self._started: list[DemoApp] = []

    def __call__(
        self,
        eureka_urls: str | EurekaServer | Sequence[str | EurekaServer],
        app_name: str = "DEMO-APP",
        instance_id: str | None = None,
        port: int | None = None,
        *,
        ip: str = "127.0.0.1",
        bind: str | None = None,
        extra_args: Sequence[str] = (),
        wait_registered: bool = True,
        timeout: float = START_TIMEOUT,
    ) -> DemoApp:
        bind = bind or ip
        port = port or free_port(bind if bind != "0.0.0.0" else "127.0.0.1")
        instance_id = instance_id or f"{ip}:{app_name.lower()}:{port}"
        app = DemoApp(
            self._jar,
            self._log_dir,
            _urls(eureka_urls),
            app_name,
            ip,
            port,
            instance_id,
            bind,
            extra_args,
        )
        self._started.append(app)
        return app.start(timeout=timeout, wait_registered=wait_registered)

    def stop_all(self) -> None:
        for app in self._started:
            app.stop()


@pytest.fixture
def start_demo_app(
    demo_app_jar: Path, java_log_dir: Path, jvm_logs_on_failure: None
) -> Iterator[StartDemoApp]:
    """Factory of demo apps (``StartDemoApp``); every app started is stopped after the test."""
    starter = StartDemoApp(demo_app_jar, java_log_dir)
    try:
        yield starter
    finally:
        starter.stop_all()
