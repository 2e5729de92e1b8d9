"""Pure glue between a served pack and the span planner and router (no I/O, unit-tested).

The placement unit is a pack fragment: the planner (``spans``) sees a model of ``units`` "layers",
one per fragment, so a pack of 30 one-layer fragments gives layer-level placement and the demo's
3-fragment pack coarse placement. A node's span [a, b) is fragments a..b-1, which it loads as one
model. Routing (``routing``) works in real decoder layers, so a route may enter a span part-way.

Memory: every unit is priced like the largest fragment without its embeddings or LM head (so no
node is ever given more than it can hold), plus the KV cache of ``kv_tokens`` tokens for its
layers; the embeddings and head are one large matrix each that only the first and last units
carry, so each node keeps one such matrix free instead of every unit paying for one (which would
overprice a 30-fragment pack of a small model several times over).

Speed: the planner trusts only the MEASURED layers/s (converted to units/s); what a node claims is
carried in ``NodeCapacity.claimed_layers_per_s`` for display and never used.
"""

from __future__ import annotations

import bisect
import math
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass
from typing import Any

from engine.errors import ConfigError, NoRouteError
from engine.fragments.manifest import Manifest
from engine.models.config import ModelConfig
from engine.scheduler.capacity import ModelShape, NodeCapacity
from engine.scheduler.routing import HostView, plan_route
from engine.scheduler.spans import plan_spans, rebalance

Span = tuple[int, int]

#: Tokens of KV cache every hosted unit reserves memory for (the planner's KV budget).
KV_TOKENS = 2048
#: Round trip assumed between two peers whose link nobody has measured yet, and to the client
#: (whose position is unknown, so the same for every node).
DEFAULT_RTT_MS = 20.0
#: The name routing uses for the client end of the ring.
CLIENT = "@client"

_ITEMSIZE = {"float32": 4, "float16": 2, "bfloat16": 2}


@dataclass(frozen=True)
class PackLayout:
    """A served pack as the scheduler sees it: its units (fragments) and what one costs."""

    model_id: str
    #: layer bounds: unit i is layers bounds[i]..bounds[i+1]-1
    bounds: tuple[int, ...]
    shape: ModelShape
    #: the larger of the embeddings and the LM head: every node keeps this much free
    reserve_bytes: int
    #: every fragment's weights plus the KV of every unit: what a node hosting the whole model needs
    whole_bytes: int

    @property
    def units(self) -> int:
        return len(self.bounds) - 1

    @property
    def num_layers(self) -> int:
        return self.bounds[-1]

    @property
    def layers_per_unit(self) -> int:
        return max(b - a for a, b in zip(self.bounds, self.bounds[1:], strict=False))

    def layers(self, span: Span) -> Span:
        """The decoder layers [start, end) of the units [a, b)."""
        return self.bounds[span[0]], self.bounds[span[1]]

    def unit_of(self, layer: int) -> int:
        """The unit holding decoder layer ``layer``."""
        return bisect.bisect_right(self.bounds, layer) - 1


def pack_layout(
    model_id: str, manifests: Sequence[Manifest], cfg: ModelConfig, *, kv_tokens: int = KV_TOKENS
) -> PackLayout:
    """The layout of a pack from its manifests (in order) and the model's config."""
    if not manifests:
        raise ConfigError(f"pack of '{model_id}' has no fragments")
    itemsize = _ITEMSIZE.get(manifests[0].dtype, 4)
    embed_bytes = cfg.vocab_size * cfg.hidden_size * itemsize
    head_bytes = embed_bytes + cfg.hidden_size * itemsize  # LM head and final norm
    core = [max(1, m.bytes - embed_bytes * m.embed - head_bytes * m.head) for m in manifests]
    bounds = (manifests[0].start, *(m.end for m in manifests))
    per_layer_kv = 2 * cfg.num_key_value_heads * cfg.head_dim * itemsize
    layers_per_unit = max(m.end - m.start for m in manifests)
    shape = ModelShape(
        num_layers=len(manifests),
        layer_bytes=max(core),
        kv_bytes_per_token_layer=per_layer_kv * max(1, layers_per_unit),
        kv_tokens=kv_tokens,
    )
    whole = sum(m.bytes for m in manifests) + len(manifests) * shape.kv_bytes_per_token_layer * kv_tokens
    return PackLayout(model_id, bounds, shape, max(embed_bytes, head_bytes), whole)


def planning_memory(layout: PackLayout, offered_bytes: int) -> int:
    """The memory the planner may count on from a node offering ``offered_bytes``.

    The end reserve is kept free; a node that would hold every unit must hold both ends, so it is
    counted able to do so only when it offers the whole model.
    """
    usable = max(0, offered_bytes - layout.reserve_bytes)
    per_unit = layout.shape.bytes_per_layer
    if usable // per_unit >= layout.units and offered_bytes < layout.whole_bytes:
        usable = (layout.units - 1) * per_unit
    return usable


def memory_for_units(layout: PackLayout, units: int) -> int:
    """The memory a node must offer to be able to hold ``units`` units (the inverse of ``planning_memory``)."""
    need = units * layout.shape.bytes_per_layer + layout.reserve_bytes
    return max(need, layout.whole_bytes) if units >= layout.units else need


def measured_layers_per_s(capability: Any) -> float:
    """The measured decode rate in a node's capability report (layers/s), 0.0 when absent or invalid."""
    if not isinstance(capability, Mapping):
        return 0.0
    throughput = capability.get("throughput")
    value = throughput.get("layers_per_s") if isinstance(throughput, Mapping) else None
    if isinstance(value, int | float) and not isinstance(value, bool) and math.isfinite(value) and value > 0:
        return float(value)
    return 0.0


def node_capacity(
    node_id: str,
    layout: PackLayout,
    *,
    layers_per_s: float,
    offered_bytes: int,
    claimed_layers_per_s: float | None = None,
) -> NodeCapacity:
    """A node in the planner's units: measured layers/s become units/s (a unit of k layers takes k times as long)."""
    per_unit = layout.layers_per_unit
    claimed = None if claimed_layers_per_s is None else claimed_layers_per_s / per_unit
    return NodeCapacity(
        node_id,
        memory_bytes=planning_memory(layout, max(0, int(offered_bytes))),
        layers_per_s=max(0.0, layers_per_s) / per_unit,
        claimed_layers_per_s=claimed,
    )


def _partial(layout: PackLayout, nodes: Sequence[NodeCapacity], current: Mapping[str, Span]) -> dict[str, Span]:
    """While the nodes' memory cannot hold the model once: keep every span, and give each unplaced
    node the window of its size covering the most units nobody holds yet (so they fetch early and
    the model is served as soon as enough memory has joined)."""
    L = layout.units
    plan = dict(current)
    count = [0] * L
    for a, b in plan.values():
        for u in range(a, b):
            count[u] += 1
    for node in sorted(nodes, key=lambda n: (-n.layers_per_s, n.node_id)):
        cap = layout.shape.max_layers(node)
        if node.node_id in plan or cap < 1 or node.layers_per_s <= 0:
            continue
        best = min(
            range(L - cap + 1),
            key=lambda a: (-sum(1 for u in range(a, a + cap) if count[u] == 0), sum(count[a : a + cap]), a),
        )
        plan[node.node_id] = (best, best + cap)
        for u in range(best, best + cap):
            count[u] += 1
    return plan


def place(
    layout: PackLayout,
    nodes: Sequence[NodeCapacity],
    current: Mapping[str, Span],
    *,
    min_replicas: int = 2,
    min_gain: float = 0.15,
) -> dict[str, Span]:
    """The spans (in units) the live measured ``nodes`` should hold, given the ``current`` plan.

    The first placement is a fresh ``plan_spans``; later ones go through ``rebalance``, which
    keeps the current spans unless a change gains more than ``min_gain`` (no thrashing). While the
    memory of all nodes cannot hold the model, spans are kept and newcomers fill the gaps.
    Spans of nodes not in ``nodes`` are dropped.
    """
    ids = {n.node_id for n in nodes}
    live = {n: s for n, s in current.items() if n in ids}
    if sum(layout.shape.max_layers(n) for n in nodes if n.layers_per_s > 0) < layout.units:
        return _partial(layout, nodes, live)
    if not live:
        return plan_spans(layout.shape, nodes, min_replicas=min_replicas)
    return rebalance(layout.shape, nodes, live, min_gain=min_gain, min_replicas=min_replicas)


def changed_spans(old: Mapping[str, Span], new: Mapping[str, Span]) -> dict[str, Span]:
    """The nodes that must (re)load: a span in ``new`` that differs from ``old``."""
    return {n: s for n, s in sorted(new.items()) if old.get(n) != s}


def rtt_lookup(
    rtts: Mapping[str, Mapping[str, float]], default_ms: float = DEFAULT_RTT_MS
) -> Callable[[str, str], float]:
    """A round-trip function for routing: measured either way round, else ``default_ms``; 0 to oneself."""

    def rtt(a: str, b: str) -> float:
        if a == b:
            return 0.0
        known = rtts.get(a, {}).get(b)
        if known is None:
            known = rtts.get(b, {}).get(a)
        return default_ms if known is None else float(known)

    return rtt


def route_layers(
    layout: PackLayout,
    hosts: Sequence[HostView],
    rtts: Mapping[str, Mapping[str, float]],
    *,
    exclude: frozenset[str] = frozenset(),
    default_rtt_ms: float = DEFAULT_RTT_MS,
    ends_on: frozenset[str] | None = None,
) -> list[tuple[str, int, int]]:
    """The fastest route [(node_id, first_layer, end_layer), ...] over hosts given in decoder layers.

    A ``NoRouteError`` names the decoder layers and fragment no remaining host serves. ``ends_on``:
    the hosts a private job allows to hold its embeddings and head (``plan_route``).
    """
    active = [h for h in hosts if h.node_id not in exclude]
    covered = [False] * layout.num_layers
    for h in active:
        for layer in range(h.start, h.end):
            covered[layer] = True
    if not all(covered):
        unit = layout.unit_of(covered.index(False))
        a, b = layout.layers((unit, unit + 1))
        raise NoRouteError(
            f"no live node serves layers {a}-{b - 1} of '{layout.model_id}' (fragment {unit})"
            + (f" ({len(exclude)} excluded)" if exclude else "")
        )
    return plan_route(layout.num_layers, active, rtt_lookup(rtts, default_rtt_ms), client=CLIENT, ends_on=ends_on)


__all__ = [
    "CLIENT",
    "DEFAULT_RTT_MS",
    "KV_TOKENS",
    "HostView",
    "PackLayout",
    "Span",
    "changed_spans",
    "measured_layers_per_s",
    "memory_for_units",
    "node_capacity",
    "pack_layout",
    "place",
    "planning_memory",
    "route_layers",
    "rtt_lookup",
]
