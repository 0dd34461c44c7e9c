"""A small, bounded Kubernetes API client over aiohttp, for the few calls the agent makes from
inside its pod: get its own pod, list and watch the EndpointSlices of its namespace.

Why not kubernetes_asyncio, kr8s or lightkube: measured on this project's machine, they add
+38 MiB / ~340 ms, +20 MiB / ~260 ms and +7 MiB / ~80 ms (RSS / import) to an agent whose targets
are 45 MB idle and 0.5 s to Ready; aiohttp is already loaded and adds nothing.

In-cluster configuration as every client library does it: the API server at
``KUBERNETES_SERVICE_HOST``:``KUBERNETES_SERVICE_PORT`` (given by the caller, from the Config),
the ServiceAccount's token and CA under ``/var/run/secrets/kubernetes.io/serviceaccount``. The
token is a projected, rotating one (about hourly; the kubelet rewrites the file), so it is read
again for every request. Every call is bounded: a deadline on the whole call (a watch: the
server's ``timeoutSeconds`` plus a little), a cap on what an answer may hold, and every failure
is a :class:`KubeError` whose message says what went wrong and what to check.
"""

from __future__ import annotations

import asyncio
import json
import ssl
from collections.abc import AsyncIterator, Mapping
from dataclasses import dataclass
from pathlib import Path
from typing import Any
from urllib.parse import quote, urlencode

import aiohttp

SERVICE_ACCOUNT = Path("/var/run/secrets/kubernetes.io/serviceaccount")
MAX_ANSWER_BYTES = 8 * 1024 * 1024
"""An answer larger than this is refused (a namespace's slices are kilobytes each)."""
MAX_EVENT_BYTES = 1024 * 1024
"""One watch event (one object) larger than this is refused."""
WATCH_SLACK_SECONDS = 5.0
"""How long past the server's ``timeoutSeconds`` a watch may last before it is cut."""


class KubeError(Exception):
    """A Kubernetes API call failed; the message names the call, the cause and the remedy."""


class Gone(KubeError):
    """A watch's resourceVersion is too old (HTTP 410): list again, then watch from there."""


@dataclass(frozen=True, slots=True)
class InCluster:
    """Where the API server is and how to authenticate to it, from inside a pod."""

    host: str
    port: int
    folder: Path = SERVICE_ACCOUNT

    @property
    def base_url(self) -> str:
        host = f"[{self.host}]" if ":" in self.host else self.host
        return f"https://{host}:{self.port}"

    def token(self) -> str:
        """The ServiceAccount token as it is now (it rotates: read for every request)."""
        path = self.folder / "token"
        try:
            token = path.read_text(encoding="ascii").strip()
        except FileNotFoundError:
            raise KubeError(
                f"no ServiceAccount token at {path}: mount one into the agent's container"
                " (automountServiceAccountToken, or a projected volume)"
            ) from None
        except (OSError, UnicodeDecodeError) as error:
            raise KubeError(f"cannot read the ServiceAccount token at {path}: {error}") from None
        if not token:
            raise KubeError(f"the ServiceAccount token at {path} is empty")
        return token

    def namespace(self) -> str | None:
        """The pod's namespace as the ServiceAccount's mount gives it (None: no such file)."""
        try:
            return (self.folder / "namespace").read_text(encoding="utf-8").strip() or None
        except (OSError, UnicodeDecodeError):
            return None

    def ssl_context(self) -> ssl.SSLContext:
        path = self.folder / "ca.crt"
        try:
            return ssl.create_default_context(cafile=str(path))
        except (OSError, ssl.SSLError) as error:
            raise KubeError(f"cannot load the cluster's CA from {path}: {error}") from None


def resource_path(group_version: str, namespace: str, resource: str, name: str = "") -> str:
    """``/api/v1/...`` for the core group, ``/apis/{group}/{version}/...`` otherwise."""
    root = "/api" if "/" not in group_version else "/apis"
    path = f"{root}/{group_version}/namespaces/{quote(namespace, safe='')}/{resource}"
    return f"{path}/{quote(name, safe='')}" if name else path


class KubeClient:
    """The agent's calls to the API server. The session is the caller's (opened and closed with
    the agent's other resources); every call is bounded by ``timeout`` seconds."""

    def __init__(
        self, cluster: InCluster, session: aiohttp.ClientSession, *, timeout: float = 5.0
    ) -> None:
        self.cluster = cluster
        self.session = session
        self.timeout = timeout
        self._ssl: ssl.SSLContext | None = None

    async def get_pod(self, namespace: str, name: str) -> dict[str, Any]:
        """The pod as the API server has it now (its ``deletionGracePeriodSeconds``, ...)."""
        return await self._get(resource_path("v1", namespace, "pods", name), f"get pod {name}")

    async def list_endpointslices(
        self, namespace: str, *, label_selector: str = ""
    ) -> tuple[list[dict[str, Any]], str]:
        """Every EndpointSlice of the namespace (matching ``label_selector``) and the list's
        resourceVersion, from which a watch continues."""
        query = {"labelSelector": label_selector} if label_selector else {}
        path = resource_path("discovery.k8s.io/v1", namespace, "endpointslices")
        answer = await self._get(path, "list endpointslices", query)
        items = answer.get("items")
        version = (answer.get("metadata") or {}).get("resourceVersion")
        if not isinstance(items, list) or not isinstance(version, str):
            raise KubeError("list endpointslices: the answer is not a list of EndpointSlices")
        return [item for item in items if isinstance(item, dict)], version

    async def watch_endpointslices(
        self,
        namespace: str,
        resource_version: str,
        *,
        label_selector: str = "",
        timeout_seconds: int = 60,
    ) -> AsyncIterator[tuple[str, dict[str, Any]]]:
        """``(type, object)`` for every change after ``resource_version`` until the server ends
        the watch (after ``timeout_seconds``); :class:`Gone` when that version is too old."""
        query = {
            "watch": "1",
            "resourceVersion": resource_version,
            "allowWatchBookmarks": "true",
            "timeoutSeconds": str(timeout_seconds),
        }
        if label_selector:
            query["labelSelector"] = label_selector
        path = resource_path("discovery.k8s.io/v1", namespace, "endpointslices")
        what = "watch endpointslices"
        try:
            async with asyncio.timeout(timeout_seconds + WATCH_SLACK_SECONDS):
                async with self._request(path, query) as response:
                    await self._check(response, what)
                    pending = b""
                    async for chunk in response.content.iter_any():
                        *lines, pending = (pending + chunk).split(b"\n")
                        if len(pending) > MAX_EVENT_BYTES:
                            raise KubeError(f"{what}: an event larger than {MAX_EVENT_BYTES} bytes")
                        for line in lines:
                            event = _event(line, what)
                            if event is not None:
                                yield event
        except TimeoutError:
            limit = timeout_seconds + WATCH_SLACK_SECONDS
            raise KubeError(f"{what}: the server did not end it within {limit:g}s") from None
        except aiohttp.ClientError as error:
            raise KubeError(f"{what}: {_described(error)}") from None

    async def create_event(self, namespace: str, body: Mapping[str, Any]) -> dict[str, Any]:
        """Create an events.k8s.io/v1 Event in ``namespace`` (POST); the created Event. Bounded
        like every call; a 403 names the Role rule that is missing."""
        path = resource_path("events.k8s.io/v1", namespace, "events")
        needs = "apiGroups [events.k8s.io], resources [events], verbs [create]"
        answer = await self._call(path, "create event", body=body, needs=needs)
        try:
            created = json.loads(answer)
        except ValueError:
            created = None
        return created if isinstance(created, dict) else {}

    # --- one request ----------------------------------------------------------------------------

    def _request(
        self,
        path: str,
        query: Mapping[str, str] | None = None,
        body: Mapping[str, Any] | None = None,
    ) -> Any:
        """A GET, or a POST of ``body`` as JSON."""
        url = self.cluster.base_url + path + (f"?{urlencode(query)}" if query else "")
        headers = {
            "Authorization": f"Bearer {self.cluster.token()}",  # first: no token says most
            "Accept": "application/json",
            "User-Agent": "prestop-agent",
        }
        if body is not None:
            headers["Content-Type"] = "application/json"
        if self._ssl is None:
            self._ssl = self.cluster.ssl_context()
        return self.session.request(
            "GET" if body is None else "POST",
            url,
            data=None if body is None else json.dumps(body).encode(),
            headers=headers,
            ssl=self._ssl,
            allow_redirects=False,
        )

    async def _call(
        self,
        path: str,
        what: str,
        query: Mapping[str, str] | None = None,
        body: Mapping[str, Any] | None = None,
        needs: str = "that verb on that resource",
    ) -> bytes:
        """One bounded request: its answer's body (up to one byte past the cap), or a KubeError;
        ``needs``: the Role rule a 403 names."""
        try:
            async with asyncio.timeout(self.timeout):
                async with self._request(path, query, body) as response:
                    await self._check(response, what, needs)
                    return await _read_at_most(response, MAX_ANSWER_BYTES + 1)
        except TimeoutError:
            raise KubeError(f"{what}: no answer within {self.timeout:g}s") from None
        except aiohttp.ClientError as error:
            raise KubeError(f"{what}: {_described(error)}") from None

    async def _get(
        self, path: str, what: str, query: Mapping[str, str] | None = None
    ) -> dict[str, Any]:
        body = await self._call(path, what, query)
        if len(body) > MAX_ANSWER_BYTES:
            raise KubeError(f"{what}: answer larger than {MAX_ANSWER_BYTES} bytes")
        try:
            answer = json.loads(body)
        except ValueError as error:
            raise KubeError(f"{what}: the answer is not JSON: {error}") from None
        if not isinstance(answer, dict):
            raise KubeError(f"{what}: the answer is not a JSON object")
        return answer

    @staticmethod
    async def _check(
        response: aiohttp.ClientResponse, what: str, needs: str = "that verb on that resource"
    ) -> None:
        if 200 <= response.status < 300:
            return
        message = await _status_message(response)
        if response.status == 401:
            raise KubeError(f"{what}: HTTP 401, the API server refused the token ({message})")
        if response.status == 403:
            raise KubeError(
                f"{what}: HTTP 403, the ServiceAccount may not do this: its Role needs"
                f" {needs} ({message})"
            )
        if response.status == 410:
            raise Gone(f"{what}: HTTP 410, the resourceVersion is too old ({message})")
        raise KubeError(f"{what}: HTTP {response.status} ({message})")


async def _read_at_most(response: aiohttp.ClientResponse, limit: int) -> bytes:
    """The answer's body up to ``limit`` bytes (a read returns what has arrived, not all)."""
    body = bytearray()
    while len(body) < limit:
        chunk = await response.content.read(limit - len(body))
        if not chunk:
            break
        body += chunk
    return bytes(body)


def _event(line: bytes, what: str) -> tuple[str, dict[str, Any]] | None:
    """One watch line as ``(type, object)``; None for a bookmark or a blank line."""
    if not line.strip():
        return None
    try:
        event = json.loads(line)
    except ValueError as error:
        raise KubeError(f"{what}: an event is not JSON: {error}") from None
    kind = event.get("type") if isinstance(event, dict) else None
    item = event.get("object") if isinstance(event, dict) else None
    if not isinstance(kind, str) or not isinstance(item, dict):
        raise KubeError(f"{what}: an event without a type and an object")
    if kind == "BOOKMARK":
        return None
    if kind == "ERROR":
        status = item.get("code")
        text = f"{what}: the server ended the watch: {item.get('message', 'no message')}"
        raise Gone(text) if status == 410 else KubeError(text)
    return kind, item


async def _status_message(response: aiohttp.ClientResponse) -> str:
    """The API server's Status message, or the start of whatever it answered."""
    try:
        body = await _read_at_most(response, 4096)
        status = json.loads(body)
        if isinstance(status, dict) and isinstance(status.get("message"), str):
            return status["message"][:300]
        return body[:300].decode("utf-8", "replace")
    except (ValueError, aiohttp.ClientError):
        return "no readable answer"


def _described(error: aiohttp.ClientError) -> str:
    if isinstance(error, aiohttp.ClientConnectorCertificateError):
        return f"TLS: the API server's certificate is not signed by the cluster's CA ({error})"
    return f"{type(error).__name__}: {error}"
