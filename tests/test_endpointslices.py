"""The EndpointSlice propagation source on slices recorded from a real API server (v1.34.2, the
kube suite's cluster): tests/fixtures/endpointslices/list.json is a list of every slice (a
Service with three pods, two Eureka peers each behind two Services), rollout-watch.jsonl the
watch events of the demo-app Service's slice during a ``kubectl rollout restart``."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import pytest

from agent.endpointslices import (
    KUBE_PROXY_SYNC_SECONDS,
    EndpointSliceSource,
    endpoint_ready,
)
from agent.lifecycle import Propagation
from agent.propagation import Floor, PropagationSource

FIXTURES = Path(__file__).parent / "fixtures" / "endpointslices"
LISTED = json.loads((FIXTURES / "list.json").read_text())["items"]
WATCH = [json.loads(line) for line in (FIXTURES / "rollout-watch.jsonl").read_text().splitlines()]
FIRST_OLD_POD = "10.207.88.6"  # the rollout's first replaced pod
EUREKA_PEER = "10.207.88.2"  # listed by the eureka-a and the eureka Services' slices


def replay(source: EndpointSliceSource, events: list[dict[str, Any]], trigger: int) -> None:
    """Event i arrives i - trigger seconds after the trigger; the first (the watch's ADDED
    for the existing slice) stands for the list the reader starts with."""
    source.replace([events[0]["object"]], float(-trigger))
    for index, event in enumerate(events[1:], start=1):
        source.update(event["type"], event["object"], float(index - trigger))


def first_not_ready(pod_ip: str) -> int:
    return next(
        index
        for index, event in enumerate(WATCH)
        if endpoint_ready(event["object"], pod_ip) is False
    )


def test_a_pod_no_service_selects_is_inactive() -> None:
    source = EndpointSliceSource(pod_ip="10.207.88.250")
    source.replace(LISTED, -5.0)
    assert isinstance(source, PropagationSource)
    assert not source.active
    assert source.floor(3.0) == 0.0
    assert Floor((source,)).latest(3.0) is None


def test_a_ready_endpoint_holds_the_floor_open() -> None:
    source = EndpointSliceSource(pod_ip=EUREKA_PEER, bound_seconds=5.0)
    source.replace(LISTED, 0.0)
    assert source.active
    assert source.slices == {"default/eureka-a-xp55d": True, "default/eureka-bpr48": True}
    assert source.visible_at is None
    assert source.floor(7.0) == pytest.approx(12.0)


def test_the_rollout_the_floor_follows_the_slice_update() -> None:
    changed = first_not_ready(FIRST_OLD_POD)
    assert WATCH[changed]["object"]["endpoints"][0]["conditions"] == {
        "ready": False,
        "serving": True,  # KEP-1672: still serving, terminating; kube-proxy stops new traffic
        "terminating": True,
    }
    source = EndpointSliceSource(pod_ip=FIRST_OLD_POD, bound_seconds=5.0)
    trigger = changed - 1
    replay(source, WATCH[:changed], trigger)
    assert source.visible_at is None
    assert source.floor(0.5) == pytest.approx(5.5)  # still ready: now + the bound
    replay(source, WATCH, trigger)
    # Later events (other pods, this one dropped) never move the moment it became not ready.
    assert source.visible_at == pytest.approx(1.0)
    assert source.floor(60.0) == pytest.approx(6.0)
    assert source.slices == {}  # the last events no longer list it
    assert source.active  # it was listed: the Service's routers had it


def test_every_listing_slice_must_show_it_not_ready() -> None:
    source = EndpointSliceSource(pod_ip=EUREKA_PEER, bound_seconds=1.0)
    source.replace(LISTED, 0.0)
    for at, name in ((2.0, "eureka-a-xp55d"), (4.0, "eureka-bpr48")):
        item = next(i for i in LISTED if i["metadata"]["name"] == name)
        unready = json.loads(json.dumps(item))
        for endpoint in unready["endpoints"]:
            if EUREKA_PEER in endpoint["addresses"]:
                endpoint["conditions"]["ready"] = False
        source.update("MODIFIED", unready, at)
        if name == "eureka-a-xp55d":
            assert source.visible_at is None  # the eureka Service's slice still shows it ready
    assert source.visible_at == pytest.approx(4.0)
    assert source.floor(9.0) == pytest.approx(5.0)


def test_a_slice_deleted_counts_as_not_listing_it() -> None:
    source = EndpointSliceSource(pod_ip=FIRST_OLD_POD, bound_seconds=2.0)
    source.replace([WATCH[0]["object"]], -1.0)
    source.update("DELETED", WATCH[0]["object"], 3.0)
    assert source.visible_at == pytest.approx(3.0)
    assert source.floor(10.0) == pytest.approx(5.0)


def test_no_api_access_assumes_the_bound_from_the_trigger() -> None:
    source = EndpointSliceSource(pod_ip=FIRST_OLD_POD, bound_seconds=5.0, assumed_update_seconds=10)
    source.lost("the API server refused the ServiceAccount (HTTP 403)", 0.0)
    assert source.active  # a Service is assumed: the pod may be behind one
    assert source.visible_at is None
    assert source.floor(0.0) == pytest.approx(15.0)
    assert source.floor(300.0) == pytest.approx(15.0)  # never delayed past the assumed bound
    assert "HTTP 403" in (source.assumption or "")
    # Not read yet counts the same: the source never waits for the API.
    assert EndpointSliceSource(pod_ip=FIRST_OLD_POD).floor(0.0) == pytest.approx(
        10.0 + KUBE_PROXY_SYNC_SECONDS
    )


def test_losing_the_watch_keeps_what_it_saw() -> None:
    source = EndpointSliceSource(pod_ip=FIRST_OLD_POD, bound_seconds=5.0, assumed_update_seconds=2)
    source.replace([WATCH[0]["object"]], 0.0)
    source.update("MODIFIED", WATCH[1]["object"], 12.0)  # still ready 12 s in
    source.lost("watch: connection reset", 13.0)
    # Last known ready when the watch broke at 13 s: held until then + the bound, not 2 + 5.
    assert source.floor(13.0) == pytest.approx(18.0)
    assert source.floor(60.0) == pytest.approx(18.0)


def test_beside_eureka_the_later_floor_wins() -> None:
    eureka = Propagation(registry=True, client_refresh=65.0, server_cache=30.0)
    eureka.watch("a")
    eureka.seen("a", 1.0)
    slices = EndpointSliceSource(pod_ip=FIRST_OLD_POD, bound_seconds=5.0)
    replay(slices, WATCH, first_not_ready(FIRST_OLD_POD) - 1)
    floor = Floor((eureka, slices))
    assert floor.at(10.0) == pytest.approx(66.0)
    shown = floor.as_dict(10.0)
    assert shown["latest"] == "eureka"
    assert shown["sources"]["endpointslices"]["floor_seconds"] == pytest.approx(6.0)
    assert shown["sources"]["endpointslices"]["visible_at_seconds"] == pytest.approx(1.0)


@pytest.mark.parametrize(
    ("endpoint", "expected"),
    [
        ({"addresses": ["10.0.0.1"]}, True),  # no conditions: ready (the API's nil rule)
        ({"addresses": ["10.0.0.1"], "conditions": {}}, True),
        ({"addresses": ["10.0.0.1"], "conditions": {"ready": False}}, False),
        ({"addresses": ["10.0.0.2"], "conditions": {"ready": True}}, None),
        ({"addresses": None, "conditions": None}, None),
        ("not an endpoint", None),
    ],
)
def test_endpoint_ready_reads_odd_slices(endpoint: Any, expected: bool | None) -> None:
    assert endpoint_ready({"endpoints": [endpoint]}, "10.0.0.1") is expected
    assert endpoint_ready({"endpoints": None}, "10.0.0.1") is None
