"""What one run measures, collected as it goes (fixed memory: histograms, not samples)."""

from __future__ import annotations

from dataclasses import dataclass, field

import numpy as np

#: token latencies are binned on a log scale from 1 ms to 10,000 s
_EDGES = np.logspace(-3, 4, 701)


def weighted_percentile(edges: np.ndarray, weights: np.ndarray, q: float) -> float:
    """The q-th percentile (0..100) of a histogram, at the upper edge of the bin that reaches it."""
    total = float(weights.sum())
    if total <= 0:
        return float("nan")
    at = int(np.searchsorted(np.cumsum(weights), total * q / 100.0))
    return float(edges[min(at + 1, edges.size - 1)])


def percentile(values: list[float], q: float) -> float:
    return float(np.percentile(values, q)) if values else float("nan")


@dataclass
class Metrics:
    """Counters of one policy's run over the window [``warmup_s``, ``end_s``).

    Tokens, routes and latencies count when they happen inside the window; requests (completed,
    failed, failovers) count when they were sent inside it, whenever they end.
    """

    warmup_s: float
    end_s: float
    tokens: float = 0.0
    #: tokens generated again after a retry from scratch (not in ``tokens``: the client had them)
    regenerated: float = 0.0
    sent: int = 0
    #: simulated seconds after ``end_s`` until the last request in flight ended
    drain_s: float = 0.0
    completed: int = 0
    failed: int = 0
    failed_reasons: dict[str, int] = field(default_factory=dict)
    failovers: int = 0
    hops: int = 0
    routes: int = 0
    nodes_moved: int = 0
    max_moved_at_once: int = 0
    latency: np.ndarray = field(default_factory=lambda: np.zeros(_EDGES.size - 1))
    route_ms: list[float] = field(default_factory=list)
    route_cpu_ms: list[float] = field(default_factory=list)
    tokens_per_step: list[float] = field(default_factory=list)
    busy_share: list[float] = field(default_factory=list)

    def counts(self, t: float) -> bool:
        """Whether something happening at t is measured."""
        return self.warmup_s <= t < self.end_s

    def measured(self, sent_s: float) -> bool:
        """Whether a request sent at ``sent_s`` is measured (``counts`` of its send time)."""
        return self.counts(sent_s)

    def add_latency(self, seconds: np.ndarray, weights: np.ndarray) -> None:
        """Token latencies (one per token, or one per session with its token count as weight)."""
        idx = np.clip(np.searchsorted(_EDGES, seconds) - 1, 0, self.latency.size - 1)
        self.latency += np.bincount(idx, weights=weights, minlength=self.latency.size)

    def fail(self, sent_s: float, reason: str) -> None:
        if self.measured(sent_s):
            self.failed += 1
            self.failed_reasons[reason] = self.failed_reasons.get(reason, 0) + 1

    def latency_ms(self, q: float) -> float:
        return 1000.0 * weighted_percentile(_EDGES, self.latency, q)
