"""The live grid during one run: who is online, what each node hosts and how busy it is.

Nodes are indexed by their position in the trace. A node given a (new) span downloads the layers
it does not already hold at its own bandwidth and serves only once they are loaded. A serving
node's KV budget is ``kv_tokens`` tokens per hosted layer; a session reserves its whole length
(prompt + generation) on every node of its route, as both systems do.

Routing sees ``HostView``s: the span and measured speed of every serving node and, for the
load-aware policy, its load (sessions routed through it) and queue (sessions waiting for it).
"""

from __future__ import annotations

import numpy as np

from engine.scheduler.routing import HostView
from engine.sim.gpus import SimModel
from engine.sim.workload import NodeSpec

Span = tuple[int, int]


class Grid:
    def __init__(self, nodes: tuple[NodeSpec, ...], model: SimModel, *, load_aware: bool) -> None:
        n = len(nodes)
        self.nodes = nodes
        self.model = model
        self.load_aware = load_aware
        self.ids = [s.node_id for s in nodes]
        self.index = {nid: i for i, nid in enumerate(self.ids)}
        self.speed = np.array([s.layers_per_s for s in nodes])
        self.alive = np.zeros(n, dtype=bool)
        self.serving = np.zeros(n, dtype=bool)
        self.spans: dict[str, Span] = {}
        self.free_kv = np.zeros(n, dtype=np.int64)
        self.load = np.zeros(n, dtype=np.int64)
        self.queue = np.zeros(n, dtype=np.int64)
        self.present = np.zeros(n)
        self.users: list[set[int]] = [set() for _ in range(n)]
        self.views: dict[str, HostView] = {}
        self._generation = np.zeros(n, dtype=np.int64)

    def _refresh(self, i: int) -> None:
        nid = self.ids[i]
        span = self.spans.get(nid)
        if not self.serving[i] or span is None:
            self.views.pop(nid, None)
            return
        load, queue = (int(self.load[i]), int(self.queue[i])) if self.load_aware else (0, 0)
        self.views[nid] = HostView(nid, span[0], span[1], float(self.speed[i]), load, queue)

    def start(self, i: int, span: Span | None) -> None:
        """A node of the initial grid: online, and serving ``span`` already (if any)."""
        self.alive[i] = True
        if span is not None:
            self.spans[self.ids[i]] = span
            self.serving[i] = True
            self.free_kv[i] = self.model.kv_tokens
            self._refresh(i)

    def assign(self, i: int, span: Span, t: float) -> tuple[float, int]:
        """Give node i ``span``: (time its layers are loaded, load generation for ``loaded``).

        The caller has already failed over the sessions it served.
        """
        nid = self.ids[i]
        old = self.spans.get(nid)
        kept = max(0, min(old[1], span[1]) - max(old[0], span[0])) if old is not None and self.serving[i] else 0
        new_bytes = (span[1] - span[0] - kept) * self.model.layer_bytes
        self.spans[nid] = span
        self.serving[i] = False
        self._generation[i] += 1
        self._refresh(i)
        return t + new_bytes * 8.0 / self.nodes[i].download_bps, int(self._generation[i])

    def loaded(self, i: int, generation: int) -> None:
        if self.alive[i] and generation == self._generation[i]:
            self.serving[i] = True
            self.free_kv[i] = self.model.kv_tokens
            self._refresh(i)

    def leave(self, i: int) -> None:
        self.alive[i] = False
        self.serving[i] = False
        self.spans.pop(self.ids[i], None)
        self._generation[i] += 1
        self._refresh(i)

    def attach(self, i: int, sid: int, need: int) -> None:
        self.users[i].add(sid)
        self.load[i] += 1
        self.free_kv[i] -= need
        if self.load_aware:
            self._refresh(i)

    def detach(self, i: int, sid: int, need: int) -> None:
        if sid in self.users[i]:
            self.users[i].discard(sid)
            self.load[i] -= 1
            self.free_kv[i] += need
            if self.load_aware:
                self._refresh(i)

    def full(self, need: int) -> frozenset[str]:
        """Serving nodes without ``need`` tokens of KV budget left: a route must avoid them."""
        return frozenset(self.ids[j] for j in np.flatnonzero(self.serving & (self.free_kv < need)).tolist())

    def set_present(self, present: np.ndarray, utilisation: np.ndarray) -> None:
        """Queue lengths from the last token-rate solution; refresh the views whose queue changed."""
        self.present = present
        queue = np.floor(np.maximum(present - utilisation, 0.0) + 0.5).astype(np.int64)
        changed = np.flatnonzero(queue != self.queue)
        self.queue = queue
        if self.load_aware:
            for j in changed.tolist():
                self._refresh(j)
