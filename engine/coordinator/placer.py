"""The coordinator's placement state: which model each node serves, what it measured, the plan.

No I/O: the coordinator feeds it events (join, measurement, drain, leave) and sends the
assignments ``replan`` returns. The decisions themselves are the pure functions of
``engine.scheduler.placement`` (and through it ``spans.plan_spans`` / ``spans.rebalance``).
"""

from __future__ import annotations

import logging
from dataclasses import dataclass, field
from typing import Any

from engine.errors import ConfigError, NoRouteError
from engine.scheduler.capacity import NodeCapacity
from engine.scheduler.placement import PackLayout, Span, changed_spans, node_capacity, place

log = logging.getLogger(__name__)


@dataclass(frozen=True)
class Measurement:
    """What a node measured about itself: decode speed on the model's layers, and memory offered."""

    layers_per_s: float
    offered_bytes: int


@dataclass
class _Node:
    model_id: str
    claimed_layers_per_s: float | None = None
    measurement: Measurement | None = None
    #: monotonic time the coordinator asked for a measurement still outstanding, else None
    measuring_since: float | None = None
    #: draining or failed to load: no longer planned
    retired: bool = False


@dataclass
class Placer:
    """Per served model, the plan (fragment spans per node) over live, measured, usable nodes."""

    layouts: dict[str, PackLayout]
    min_replicas: int = 2
    min_gain: float = 0.15
    _nodes: dict[str, _Node] = field(default_factory=dict)
    _plans: dict[str, dict[str, Span]] = field(default_factory=dict)

    def choose_model(self) -> str | None:
        """The model a new node should serve: the one with the fewest nodes (ties: the first by id)."""
        if not self.layouts:
            return None
        if len(self.layouts) == 1:  # the usual grid: no need to count every node at every join
            return next(iter(self.layouts))
        count = dict.fromkeys(self.layouts, 0)
        for n in self._nodes.values():
            if n.model_id in count and not n.retired:
                count[n.model_id] += 1
        return min(sorted(count), key=lambda m: count[m])

    def model_of(self, peer: str) -> str | None:
        node = self._nodes.get(peer)
        return None if node is None else node.model_id

    def joined(self, peer: str, model_id: str, claimed_layers_per_s: float | None = None) -> None:
        """A node connected and will serve ``model_id`` (a claimed speed is kept for display only)."""
        old = self._nodes.get(peer)
        node = _Node(model_id, claimed_layers_per_s)
        if old is not None and old.model_id == model_id:
            node.measurement = old.measurement
        self._nodes[peer] = node

    def hosting(self, peer: str, model_id: str, span: Span) -> None:
        """A reconnecting node already holds ``span``: that is its place in the plan (nothing to reload)."""
        self._plans.setdefault(model_id, {})[peer] = span

    def measuring(self, peer: str, now: float) -> None:
        node = self._nodes.get(peer)
        if node is not None:
            node.measuring_since = now

    def measured(self, peer: str, measurement: Measurement) -> None:
        node = self._nodes.get(peer)
        if node is not None:
            node.measurement = measurement
            node.measuring_since = None

    def retire(self, peer: str) -> None:
        """Draining, or unable to load what it was given: plan without it (it keeps serving what it has)."""
        node = self._nodes.get(peer)
        if node is not None:
            node.retired = True
            node.measuring_since = None
        for plan in self._plans.values():
            plan.pop(peer, None)

    def left(self, peer: str) -> None:
        self._nodes.pop(peer, None)
        for plan in self._plans.values():
            plan.pop(peer, None)

    def measuring_count(self, now: float, limit_s: float) -> int:
        """Measurements asked for within the last ``limit_s`` and not yet answered (placement waits
        for them, so nodes starting together are planned together rather than one by one)."""
        return sum(
            1 for n in self._nodes.values() if n.measuring_since is not None and now - n.measuring_since < limit_s
        )

    def measurement(self, peer: str) -> Measurement | None:
        node = self._nodes.get(peer)
        return None if node is None else node.measurement

    def assigned(self, peer: str) -> tuple[str, Span] | None:
        for model_id, plan in self._plans.items():
            if peer in plan:
                return model_id, plan[peer]
        return None

    def capacities(self, model_id: str) -> list[NodeCapacity]:
        """The usable measured nodes of ``model_id`` in the planner's units."""
        layout = self.layouts[model_id]
        out = []
        for peer, n in sorted(self._nodes.items()):
            if n.model_id != model_id or n.retired or n.measurement is None:
                continue
            out.append(
                node_capacity(
                    peer,
                    layout,
                    layers_per_s=n.measurement.layers_per_s,
                    offered_bytes=n.measurement.offered_bytes,
                    claimed_layers_per_s=n.claimed_layers_per_s,
                )
            )
        return out

    def replan(self) -> list[tuple[str, str, Span]]:
        """Update every model's plan; returns the (peer, model_id, span) assignments that changed."""
        changes: list[tuple[str, str, Span]] = []
        for model_id, layout in sorted(self.layouts.items()):
            nodes = self.capacities(model_id)
            old = self._plans.get(model_id, {})
            try:
                new = place(layout, nodes, old, min_replicas=self.min_replicas, min_gain=self.min_gain)
            except (NoRouteError, ConfigError) as exc:
                log.warning("cannot place %s yet: %s", model_id, exc)
                continue
            self._plans[model_id] = dict(new)
            moved = changed_spans(old, new)
            if moved:
                log.info(
                    "placement of %s over %d nodes: %s",
                    model_id,
                    len(nodes),
                    ", ".join(f"{p} {a}-{b - 1}{'*' if p in moved else ''}" for p, (a, b) in sorted(new.items())),
                )
            changes += [(peer, model_id, span) for peer, span in moved.items()]
        return changes

    def describe(self, peer: str) -> dict[str, Any]:
        """What ``/v1/nodes`` shows about a node's placement inputs and outcome."""
        node = self._nodes.get(peer)
        got = self.assigned(peer)
        return {
            "measured_layers_per_s": None
            if node is None or node.measurement is None
            else node.measurement.layers_per_s,
            "memory_offered_bytes": None
            if node is None or node.measurement is None
            else node.measurement.offered_bytes,
            "claimed_layers_per_s": None if node is None else node.claimed_layers_per_s,
            "assigned_fragments": None if got is None else list(got[1]),
        }
