"""Who hosts which layers, under each policy: ours calls the real span planner, the baseline is Petals'.

Ours: ``plan_spans`` for the grid present at the start, then ``rebalance`` every
``rebalance_s`` on the live nodes (joiners wait unplaced until a rebalance places them, exactly
as the coordinator would run it). Baseline: every server picks its own window on joining and
re-checks the swarm balance now and then (``engine.sim.petals``).
"""

from __future__ import annotations

import time
from collections.abc import Mapping, Sequence
from typing import Protocol

import numpy as np

from engine.scheduler.capacity import ModelShape, NodeCapacity
from engine.scheduler.spans import plan_spans, rebalance
from engine.sim import petals
from engine.sim.gpus import SimModel
from engine.sim.workload import NodeSpec

Span = tuple[int, int]


class Placement(Protocol):
    #: wall-clock ms of each placement decision made by the real code (empty for the baseline)
    timings_ms: list[float]

    def initial(self, nodes: Sequence[NodeSpec]) -> dict[str, Span]: ...

    def joined(self, node: NodeSpec) -> Span | None: ...

    def left(self, node: NodeSpec) -> None: ...

    def step(
        self, t: float, dt: float, alive: Sequence[NodeSpec], spans: Mapping[str, Span], rng: np.random.Generator
    ) -> dict[str, Span]:
        """Span changes to apply now (node_id -> new span)."""
        ...


def capacity(node: NodeSpec) -> NodeCapacity:
    return NodeCapacity(node.node_id, node.memory_bytes, node.layers_per_s, region=str(node.region))


class OursPlacement:
    """plan_spans once, then rebalance(min_gain) every ``period_s`` simulated seconds."""

    def __init__(self, model: SimModel, period_s: float, min_gain: float) -> None:
        self.shape: ModelShape = model.shape()
        self.period_s = period_s
        self.min_gain = min_gain
        self.timings_ms: list[float] = []
        self.initial_ms = 0.0
        self._caps: dict[str, NodeCapacity] = {}
        self._due = period_s

    def _cap(self, node: NodeSpec) -> NodeCapacity:
        cap = self._caps.get(node.node_id)
        if cap is None:
            cap = self._caps[node.node_id] = capacity(node)
        return cap

    def initial(self, nodes: Sequence[NodeSpec]) -> dict[str, Span]:
        caps = [self._cap(n) for n in nodes]
        t0 = time.perf_counter()
        spans = plan_spans(self.shape, caps)
        self.initial_ms = (time.perf_counter() - t0) * 1000
        return spans

    def joined(self, node: NodeSpec) -> Span | None:
        return None  # placed by the next rebalance

    def left(self, node: NodeSpec) -> None:
        self._caps.pop(node.node_id, None)

    def step(
        self, t: float, dt: float, alive: Sequence[NodeSpec], spans: Mapping[str, Span], rng: np.random.Generator
    ) -> dict[str, Span]:
        if t < self._due:
            return {}
        self._due = t + self.period_s
        caps = [self._cap(n) for n in alive]
        current = {n.node_id: spans[n.node_id] for n in alive if n.node_id in spans}
        t0 = time.perf_counter()
        new = rebalance(self.shape, caps, current, min_gain=self.min_gain)
        self.timings_ms.append((time.perf_counter() - t0) * 1000)
        return {nid: span for nid, span in new.items() if current.get(nid) != span}


class PetalsPlacement:
    """Each server takes the weakest window that its memory allows; servers re-check balance now and then."""

    def __init__(self, model: SimModel) -> None:
        self.model = model
        self.shape = model.shape()
        self.timings_ms: list[float] = []
        self.throughputs = np.zeros(model.num_layers)
        self._own: dict[str, tuple[int, int, float]] = {}  # node -> (start, blocks, throughput)

    def initial(self, nodes: Sequence[NodeSpec]) -> dict[str, Span]:
        spans = {}
        for n in nodes:  # the swarm formed by servers joining one by one
            span = self.joined(n)
            if span is not None:
                spans[n.node_id] = span
        return spans

    def joined(self, node: NodeSpec) -> Span | None:
        blocks = self.shape.max_layers(capacity(node))
        if blocks < 1:
            return None
        value = petals.server_throughput(self.model, blocks, node.tflops, node.uplink_bps)
        start = petals.choose_best_start(self.throughputs, blocks)
        self.throughputs[start : start + blocks] += value
        self._own[node.node_id] = (start, blocks, value)
        return start, start + blocks

    def left(self, node: NodeSpec) -> None:
        own = self._own.pop(node.node_id, None)
        if own is not None:
            start, blocks, value = own
            self.throughputs[start : start + blocks] -= value

    def step(
        self, t: float, dt: float, alive: Sequence[NodeSpec], spans: Mapping[str, Span], rng: np.random.Generator
    ) -> dict[str, Span]:
        checks = int(rng.poisson(len(self._own) * dt / petals.BALANCE_CHECK_S))
        if not checks or petals.swarm_quality(self.throughputs) >= petals.BALANCE_QUALITY:
            return {}
        ids = sorted(self._own)
        changes = {}
        for i in rng.choice(len(ids), size=min(checks, len(ids)), replace=False).tolist():
            nid = ids[i]
            start, blocks, value = self._own[nid]
            new = petals.rebalanced_start(self.throughputs, start, blocks, value)
            if new is not None:
                self.throughputs[start : start + blocks] -= value
                self.throughputs[new : new + blocks] += value
                self._own[nid] = (new, blocks, value)
                changes[nid] = (new, new + blocks)
        return changes
