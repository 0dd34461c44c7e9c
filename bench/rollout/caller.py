"""The non-pooled caller of the rolling-replacement benchmark: a new TCP connection per request.

A Eureka client of its own, standard library only (it runs in a pod with a bare python3): every
``--fetch`` seconds it reads ``GET {eureka}apps/{APP}`` (the server's client-facing view, as a
Spring client's registry fetch does) into its local registry; every ``--cache`` seconds its load
balancer copies the UP instances from that registry (as Spring Cloud LoadBalancer's cache does).
It sends ``GET path`` round-robin over that list at ``--rate`` requests per second, each on a
fresh connection closed after the answer, no retries, and writes one JSON line per request to
``--record``: ``{"t": epoch seconds at send, "ms": duration, "target": "ip:port",
"outcome": "200" or the exception class}``.

With ``--service URL`` instead of ``--eureka`` it is a caller through a Kubernetes Service, as a
gateway or another team's service is: every request goes to the Service's ClusterIP (kube-proxy
picks the pod), ``target`` is the Service's address. ``--keep-alive`` makes it a pooled client:
each sender thread keeps its HTTP/1.1 connection open across requests and opens a new one only
after the old one failed or was closed (no retries), as a pooled HTTP client does. Its records
also say which connection carried the request (``conn``: the caller's local port) and whether the
answer closed it (``close``: the server answered ``Connection: close``, e.g. Tomcat's
``maxKeepAliveRequests`` rotation), so that the benchmark can tell pinned connections apart.
"""

from __future__ import annotations

import argparse
import contextlib
import http.client
import json
import sys
import threading
import time
import urllib.parse
import urllib.request
from concurrent.futures import ThreadPoolExecutor
from typing import Any, TextIO

# urllib without proxies from the environment: Eureka is on the pod network.
_OPENER = urllib.request.build_opener(urllib.request.ProxyHandler({}))


def fetch_up(eureka: str, app: str) -> list[str]:
    """The UP instances of ``app`` in the server's client-facing view, as ``ip:port``."""
    request = urllib.request.Request(f"{eureka}apps/{app}", headers={"Accept": "application/json"})
    with _OPENER.open(request, timeout=2) as response:
        instances: Any = json.load(response)["application"]["instance"]
    if isinstance(instances, dict):
        instances = [instances]
    return [
        f"{i['ipAddr']}:{i['port']['$']}"
        for i in instances
        if i.get("status") == "UP" and i["port"].get("@enabled") in ("true", True)
    ]


class Caller:
    """Registry fetch, load-balancer cache and the request loop; see the module docstring."""

    def __init__(self, args: argparse.Namespace, record: TextIO) -> None:
        self.args = args
        self.record = record
        self.registry: list[str] = []
        self.balanced: list[str] = []
        self.turn = 0
        self.lock = threading.Lock()
        self.pooled = threading.local()
        if args.service:
            url = urllib.parse.urlsplit(args.service)
            self.registry = self.balanced = [f"{url.hostname}:{url.port or 80}"]

    def refresh_forever(self) -> None:
        next_fetch = next_cache = time.monotonic()
        while True:
            now = time.monotonic()
            if now >= next_fetch:
                # On an error the last list stays, as a Eureka client's does.
                with contextlib.suppress(OSError, ValueError, KeyError, TypeError):
                    self.registry = fetch_up(self.args.eureka, self.args.app)
                next_fetch += self.args.fetch
            if now >= next_cache:
                self.balanced = list(self.registry)
                next_cache += self.args.cache
            time.sleep(max(0.0, min(next_fetch, next_cache) - time.monotonic()))

    def call_once(self) -> None:
        sent = time.time()
        started = time.monotonic()
        extra: dict[str, Any] = {}
        with self.lock:
            targets = self.balanced
            target = targets[self.turn % len(targets)] if targets else ""
            self.turn += 1
        if not target:
            outcome = "NoInstance"
        elif self.args.keep_alive:
            outcome, extra = self.call_pooled(target)
        else:
            host, port = target.rsplit(":", 1)
            connection = http.client.HTTPConnection(
                host, int(port), timeout=self.args.connect_timeout
            )
            try:
                connection.connect()
                assert connection.sock is not None
                connection.sock.settimeout(self.args.read_timeout)
                connection.request("GET", self.args.path, headers={"Connection": "close"})
                response = connection.getresponse()
                response.read()
                outcome = str(response.status)
            except (OSError, http.client.HTTPException) as err:
                outcome = type(err).__name__
            finally:
                connection.close()
        line = {
            "t": round(sent, 3),
            "ms": round((time.monotonic() - started) * 1000),
            "target": target,
            "outcome": outcome,
            **extra,
        }
        with self.lock:
            self.record.write(json.dumps(line) + "\n")
            self.record.flush()

    def call_pooled(self, target: str) -> tuple[str, dict[str, Any]]:
        """One request on this thread's kept-alive connection (opened when it has none): the
        outcome, and which connection carried it and whether the answer closed it."""
        connection: http.client.HTTPConnection | None = getattr(self.pooled, "connection", None)
        extra: dict[str, Any] = {}
        try:
            if connection is None:
                host, port = target.rsplit(":", 1)
                connection = http.client.HTTPConnection(
                    host, int(port), timeout=self.args.connect_timeout
                )
                connection.connect()
                assert connection.sock is not None
                connection.sock.settimeout(self.args.read_timeout)
                self.pooled.connection = connection
            if connection.sock is not None:
                extra["conn"] = connection.sock.getsockname()[1]
            connection.request("GET", self.args.path)
            response = connection.getresponse()
            response.read()
            if response.will_close:
                extra["close"] = True
                connection.close()
                self.pooled.connection = None
            return str(response.status), extra
        except (OSError, http.client.HTTPException) as err:
            if connection is not None:
                connection.close()
            self.pooled.connection = None
            return type(err).__name__, extra

    def run(self) -> None:
        if not self.args.service:
            threading.Thread(target=self.refresh_forever, daemon=True).start()
        period = 1.0 / self.args.rate
        tick = time.monotonic()
        with ThreadPoolExecutor(max_workers=16) as senders:
            while True:
                senders.submit(self.call_once)
                tick += period
                time.sleep(max(0.0, tick - time.monotonic()))


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    source = parser.add_mutually_exclusive_group(required=True)
    source.add_argument("--eureka", help="Eureka base URL, ending in /eureka/")
    source.add_argument("--service", help="a Service's URL (http://CLUSTER-IP:PORT): no Eureka")
    parser.add_argument("--keep-alive", action="store_true", help="pooled kept-alive connections")
    parser.add_argument("--app", default="DEMO-APP")
    parser.add_argument("--path", default="/hello")
    parser.add_argument("--rate", type=float, default=25.0, help="requests per second")
    parser.add_argument("--fetch", type=float, default=3.0, help="registry fetch interval, s")
    parser.add_argument("--cache", type=float, default=3.5, help="load-balancer cache TTL, s")
    parser.add_argument("--connect-timeout", type=float, default=1.0, help="seconds")
    parser.add_argument("--read-timeout", type=float, default=5.0, help="seconds")
    parser.add_argument("--record", default="-", help="file to append records to")
    args = parser.parse_args(argv)
    with open(args.record, "a") if args.record != "-" else sys.stdout as record:
        Caller(args, record).run()


if __name__ == "__main__":
    main()
