"""The shutdown plan as data: what the agent does from the trigger on, and by when.

Built once from the :class:`agent.config.Config` (:meth:`ShutdownPlan.of`), it owns the time
budget, every deadline counted from the trigger, the propagation floor's sources, the drain's end
rule and the linger after the drain. ``main`` executes it, ``prestop-agent check`` prints
:meth:`ShutdownPlan.describe`, ``/status`` shows :meth:`ShutdownPlan.as_dict`, and the sequence
in docs/design.md is tested against :meth:`ShutdownPlan.steps`. Pure: no I/O, no clock.
"""

from __future__ import annotations

import dataclasses
from dataclasses import dataclass
from enum import StrEnum
from typing import Any

from agent import endpointslices
from agent.config import Budget, Config
from agent.drain import STRATEGIES, DrainStrategy, Shortfall
from agent.lifecycle import FloorSource, GracePeriod, Propagation
from agent.registry import view

CONFIGURED_GRACE = "PRESTOP_GRACE_PERIOD_SECONDS"
"""Where the grace period comes from unless the pod's deletion gave less."""

TRIGGERS = "/prestop, SIGTERM or SIGINT"
LINGER_STEP = "final_scrape"
"""The linger's name in the timeline (dashboards and docs read it): after the drain of a classic
sidecar, the agent stays up until the first of its three outcomes (:class:`LingerOutcome`)."""


class LingerOutcome(StrEnum):
    """How the linger after the drain ended."""

    SCRAPED = "scraped"
    """A /metrics page generated after the drain was written to a scraper: the figures left."""
    APP_EXITED = "app_exited"
    """Nothing listens on or holds a connection on the app's ports: the pod is going."""
    GRACE = "grace"
    """The grace period less the margin has passed: the kubelet's SIGKILL comes next."""


@dataclass(frozen=True, slots=True)
class PlanStep:
    """One step of the shutdown, as ``check`` prints it and the design doc lists it."""

    name: str
    what: str


@dataclass(frozen=True, slots=True)
class ShutdownPlan:
    """The termination this configuration plans; times are seconds after the first trigger.
    Its deadlines are the budget's (``budget.answer_by``, ``budget.drain``,
    ``budget.linger_until``, ``budget.registry_deadline``), cut by :meth:`drain_limit`."""

    config: Config
    budget: Budget
    sources: tuple[FloorSource, ...]
    """Every way callers find the pod that the floor waits for, one per source module: the
    registry's view (none without a registry), the EndpointSlices (in a cluster)."""
    grace_from: str = CONFIGURED_GRACE
    """Where ``budget.grace_period`` comes from (:meth:`with_grace`)."""

    @classmethod
    def of(cls, config: Config) -> ShutdownPlan:
        found = (view.floor_source(config), endpointslices.floor_source(config))
        sources = tuple(source for source in found if source is not None)
        return cls(config=config, budget=config.budget(), sources=sources)

    def with_grace(self, grace: GracePeriod) -> ShutdownPlan:
        """The plan for a termination that has ``grace.seconds`` rather than the configured
        grace period (only ever less: a longer one is not the agent's to use, its manifests
        were sized for the configured one). The budget is recomputed from it: the answers are
        due earlier, the drain's maximum is cut to what is left (never below 0), the linger
        ends earlier."""
        if not grace.shortened:
            return self
        config = dataclasses.replace(self.config, grace_period_seconds=grace.seconds)
        budget = config.budget()
        drain = max(0.0, min(budget.drain, budget.available_for_drain))
        budget = dataclasses.replace(budget, drain=drain)
        return dataclasses.replace(self, config=config, budget=budget, grace_from=grace.source)

    # --- deadlines ------------------------------------------------------------------------------

    @property
    def strategy(self) -> DrainStrategy:
        return STRATEGIES[self.config.drain_mode]

    def drain_limit(self, elapsed: float) -> float:
        """How long a drain that begins ``elapsed`` seconds after the trigger may last: its
        maximum, cut to what is left before the answers are due (a slow mark-down ate into
        it), never below 0 (a grace period shorter than everything else's share)."""
        return max(0.0, min(self.budget.drain, self.budget.answer_by - elapsed))

    def lingers(self, exit_requested: bool) -> bool:
        """The linger rule: after the drain, a classic sidecar (its SIGTERM came with the
        trigger) stays until its figures have been scraped (:data:`LINGER_STEP`); a native one
        goes when the kubelet signals it, after the app has exited."""
        return exit_requested

    # --- the floor ------------------------------------------------------------------------------

    def propagation(self) -> Propagation:
        """The record the drain fills in as the registry's view is observed (a record that
        counts for nothing without a registry). The other sources keep their own."""
        for source in self.sources:
            if source.registry:
                return source.propagation()
        return Propagation(registry=False, client_refresh=0.0, server_cache=0.0)

    def worst_case_floor(self) -> float:
        """Seconds after the trigger before which the drain may not end, at worst: until every
        source's routers can have dropped the pod. Without a source, the drain's minimum."""
        if not self.sources:
            return self.config.drain_min_seconds
        return max(source.worst_case for source in self.sources)

    def floor_warning(self) -> str | None:
        """The arithmetic and the remedy when the propagation floor can outlast the drain's
        maximum (the drain then ends at its maximum while callers may still send); else None."""
        if not self.sources:
            return None
        source = max(self.sources, key=lambda source: source.worst_case)
        floor, limit = source.worst_case, self.budget.drain
        if floor <= limit + 1e-9:
            return None
        short = Shortfall(
            floor=floor,
            limit=limit,
            grace_needed=self.budget.grace_for(floor),
            budget=self.budget.arithmetic(),
            remedy=source.remedy,
        )
        figures = f"propagation floor: {source.figures} = {floor:g}s >"
        return f"{figures} {self.strategy.shortfall(self.config, short)}"

    # --- in words -------------------------------------------------------------------------------

    def steps(self) -> tuple[PlanStep, ...]:
        config = self.config
        if config.registry == "none":
            mark_down = "registry: none, nothing to mark down"
            finalize = "registry: none, nothing to finalize"
        else:
            mark_down = (
                f"registry {config.registry}: mark the instance {config.eureka_status} within"
                f" {config.registry_timeout_seconds:g}s (retries included), then read it back"
            )
            finalize = (
                f"registry {config.registry}: cancel the registration made for the app"
                if config.registry == "register"
                else f"registry {config.registry}: nothing to undo (the app's own client renews)"
            )
        drain = self.strategy.describe(config, self.budget.drain)
        if self.strategy.waits_for_floor:
            for source in self.sources:
                drain += (
                    f"\nand never before {source.name} callers can have dropped the instance:"
                    f" {source.watching}; at worst {source.worst_case:g}s after the trigger"
                )
        # Both modes: a fixed drain shorter than the floor leaves callers as stale as a cut one.
        warning = self.floor_warning()
        if warning is not None:
            drain += f"\nWARNING: {warning}"
        return (
            PlanStep("not_ready", "/ready answers 503 at once"),
            PlanStep("mark_down", mark_down),
            PlanStep("drain", drain),
            PlanStep(
                "answer",
                "answer every /prestop caller: the kubelet then sends the app SIGTERM"
                f"\nand the app has {config.app_shutdown_seconds:g}s to stop",
            ),
            PlanStep("finalize", finalize),
            PlanStep(
                "exit",
                "exit once a SIGTERM has arrived; if it came before the end of the drain (classic"
                "\nsidecar), first wait for one /metrics scrape, the app's exit or the grace"
                f" period ({self.budget.linger_until:g}s after the trigger)",
            ),
        )

    def describe(self) -> list[str]:
        """The plan as ``prestop-agent check`` prints it."""
        lines = [f"Shutdown plan, from the first trigger ({TRIGGERS}):"]
        for number, step in enumerate(self.steps(), start=1):
            first, *rest = step.what.split("\n")
            lines.append(f"  {number}. {first}")
            lines.extend(f"     {line}" for line in rest)
        lines += ["", f"Time budget: {self.budget.arithmetic()}"]
        if self.grace_from != CONFIGURED_GRACE:
            lines.append(f"  (grace period from the pod's {self.grace_from})")
        return lines

    def as_dict(self) -> dict[str, Any]:
        """For /status."""
        return {
            "steps": [step.name for step in self.steps()],
            "grace_period_seconds": self.budget.grace_period,
            "grace_period_from": self.grace_from,
            "registry_deadline_seconds": self.budget.registry_deadline,
            "drain_max_seconds": self.budget.drain,
            "answer_by_seconds": self.budget.answer_by,
            "linger_until_seconds": self.budget.linger_until,
            "floor_seconds": self.worst_case_floor(),
            "sources": [
                {
                    "name": source.name,
                    "watched": source.watched,
                    "blind_seconds": source.blind_seconds,
                    "refresh_seconds": source.refresh_seconds,
                    "worst_case_seconds": source.worst_case,
                    "figures": source.figures,
                }
                for source in self.sources
            ],
            "budget": self.budget.arithmetic(),
        }
