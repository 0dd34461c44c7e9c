"""The propagation floor stage by stage, and Eureka/Spring Cloud settings that bring it under a
target, with what they cost the Eureka servers. Pure arithmetic: ``prestop-agent check`` prints
it, tests hold it against a real Eureka server and Spring Cloud client.

A caller stops routing to a pod whose instance was marked DOWN once three caches have turned over
(docs/operations.md, "How long callers keep coming"): the server's read-only response cache
(``eureka.server.response-cache-update-interval-ms``, none with
``use-read-only-response-cache=false``), the client's registry fetch
(``eureka.client.registry-fetch-interval-seconds``) and Spring Cloud LoadBalancer's instance cache
(``spring.cloud.loadbalancer.cache.ttl``). The agent knows the first as
``PRESTOP_EUREKA_SERVER_CACHE_SECONDS`` and the other two together as
``PRESTOP_EUREKA_CLIENT_REFRESH_SECONDS``; whatever that variable holds beyond fetch + TTL is a
margin and is kept as it is.
"""

from __future__ import annotations

import math
from dataclasses import dataclass

# Spring Cloud Netflix / Spring Cloud Commons defaults.
DEFAULT_CLIENT_FETCH_SECONDS = 30.0
DEFAULT_LOADBALANCER_TTL_SECONDS = 35.0


@dataclass(frozen=True, slots=True)
class Stages:
    """How long each stage may keep a caller routing to the pod, seconds."""

    server_cache: float
    client_fetch: float
    loadbalancer_ttl: float
    margin: float = 0.0
    """What PRESTOP_EUREKA_CLIENT_REFRESH_SECONDS holds beyond fetch + TTL."""

    @property
    def floor(self) -> float:
        return self.server_cache + self.client_fetch + self.loadbalancer_ttl + self.margin

    @property
    def client_refresh(self) -> float:
        """The agent's PRESTOP_EUREKA_CLIENT_REFRESH_SECONDS for these stages."""
        return self.client_fetch + self.loadbalancer_ttl + self.margin

    @property
    def fetches_per_second(self) -> float:
        """What each client's registry fetch (``GET apps/delta``) costs every Eureka server it
        asks, in requests per second (heartbeats are a separate, unchanged cost)."""
        return 1.0 / self.client_fetch if self.client_fetch > 0 else math.inf


def stages_of(
    server_cache_seconds: float,
    client_refresh_seconds: float,
    client_fetch_seconds: float = DEFAULT_CLIENT_FETCH_SECONDS,
    loadbalancer_ttl_seconds: float = DEFAULT_LOADBALANCER_TTL_SECONDS,
) -> Stages:
    """The stages behind the agent's two settings, given the clients' fetch interval and TTL.
    A client refresh shorter than fetch + TTL leaves a negative margin: the agent then assumes
    clients refresh faster than they are configured to (:func:`underestimate` says so)."""
    return Stages(
        server_cache=server_cache_seconds,
        client_fetch=client_fetch_seconds,
        loadbalancer_ttl=loadbalancer_ttl_seconds,
        margin=client_refresh_seconds - client_fetch_seconds - loadbalancer_ttl_seconds,
    )


def underestimate(stages: Stages) -> float:
    """Seconds by which the agent's client refresh is shorter than the clients' fetch + TTL."""
    return max(0.0, -stages.margin)


@dataclass(frozen=True, slots=True)
class Proposal:
    """One way to bring the floor under a target."""

    name: str
    stages: Stages
    read_only_cache: bool

    def server_properties(self) -> list[str]:
        if not self.read_only_cache:
            return ["eureka.server.use-read-only-response-cache=false"]
        interval_ms = round(self.stages.server_cache * 1000)
        return [f"eureka.server.response-cache-update-interval-ms={interval_ms}"]

    def client_properties(self) -> list[str]:
        return [
            f"eureka.client.registry-fetch-interval-seconds={self.stages.client_fetch:g}",
            f"spring.cloud.loadbalancer.cache.ttl={self.stages.loadbalancer_ttl:g}s",
        ]

    def agent_variables(self) -> list[str]:
        return [
            f"PRESTOP_EUREKA_SERVER_CACHE_SECONDS={self.stages.server_cache:g}",
            f"PRESTOP_EUREKA_CLIENT_REFRESH_SECONDS={self.stages.client_refresh:g}",
        ]


def proposals(current: Stages, target: float) -> list[Proposal]:
    """Whole-second settings whose floor is at most ``target`` (the margin kept): the three
    stages shortened alike, or the server's read-only cache turned off and the two client
    stages shortened alike. Empty when the floor is under the target already, or when even one
    second per stage does not fit (then only a longer grace period helps)."""
    if current.floor <= target + 1e-9:
        return []
    budget = target - max(current.margin, 0.0)
    found: list[Proposal] = []
    each = math.floor(budget / 3 + 1e-9)
    if each >= 1:
        found.append(
            Proposal(
                "keep the server's read-only response cache, shorten all three stages",
                Stages(each, each, each, max(current.margin, 0.0)),
                read_only_cache=True,
            )
        )
    each = math.floor(budget / 2 + 1e-9)
    if each >= 1:
        found.append(
            Proposal(
                "turn the server's read-only response cache off, shorten the client stages",
                Stages(0.0, each, each, max(current.margin, 0.0)),
                read_only_cache=False,
            )
        )
    return found


def describe(current: Stages, target: float) -> list[str]:
    """The lines ``prestop-agent check`` prints: each stage, then the proposals and their cost."""
    lines = [
        f"Propagation floor, by stage (worst case {current.floor:g}s; target {target:g}s):",
        f"  Eureka server read-only response cache  {current.server_cache:>5g}s"
        "  eureka.server.response-cache-update-interval-ms (PRESTOP_EUREKA_SERVER_CACHE_SECONDS)",
        f"  client registry fetch                   {current.client_fetch:>5g}s"
        "  eureka.client.registry-fetch-interval-seconds (check --client-fetch-seconds)",
        f"  LoadBalancer instance cache             {current.loadbalancer_ttl:>5g}s"
        "  spring.cloud.loadbalancer.cache.ttl (check --loadbalancer-ttl-seconds)",
    ]
    if current.margin > 0:
        lines.append(
            f"  margin                                  {current.margin:>5g}s"
            "  the rest of PRESTOP_EUREKA_CLIENT_REFRESH_SECONDS"
        )
    short = underestimate(current)
    if short > 0:
        lines.append(
            f"  WARNING: PRESTOP_EUREKA_CLIENT_REFRESH_SECONDS {current.client_refresh:g}s is"
            f" {short:g}s shorter than the clients' fetch + TTL"
            f" ({current.client_fetch + current.loadbalancer_ttl:g}s): set it to at least that"
        )
    now = current.fetches_per_second
    if current.floor <= target + 1e-9:
        lines.append(f"  under the target; registry fetches cost {now:.3g} requests/s per client")
        return lines
    found = proposals(current, target)
    if not found:
        lines.append(
            f"  a floor of {target:g}s cannot be reached by shorter caches (a second per stage"
            " at least, plus the margin): raise the grace period instead"
        )
        return lines
    for number, proposal in enumerate(found, start=1):
        stages = proposal.stages
        cost = stages.fetches_per_second
        lines += [
            f"  option {number}: {proposal.name}: floor {stages.floor:g}s",
            f"    Eureka servers:   {', '.join(proposal.server_properties())}",
            f"    every client:     {', '.join(proposal.client_properties())}",
            f"    this agent:       {', '.join(proposal.agent_variables())}",
            f"    cost per client:  {cost:.3g} registry fetches/s to each Eureka server"
            f" ({cost / now:.3g}x today's {now:.3g}/s)"
            + (
                "; every fetch is answered from the read-write cache"
                if not proposal.read_only_cache
                else ""
            ),
        ]
    return lines
