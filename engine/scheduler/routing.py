"""Which hosts one token's ring takes: client -> h1 -> ... -> hk -> client, fastest first.

A hop onto host h at layer s runs h's whole remaining span [s, h.end) (a route never stops a host
part-way: splitting would add a hop for no compute saved) and costs half the round trip from the
previous hop, rtt_ms(prev, h) / 2, plus (h.end - s) / h.layers_per_s seconds of compute scaled by
(1 + load + queue) for the sessions it already serves and the requests waiting for it. The last hop
adds rtt_ms(last, client) / 2 for the way back. Replicas may be mixed freely.

Every hop strictly advances the layer position, so the hop graph is acyclic in layer order; the
shortest path is found by relaxing positions 0..num_layers in increasing order, which is what
Dijkstra over layer positions reduces to on such a graph (no priority queue needed). The state is
(position, last host), because the next hop's network cost depends on where the token is.

A grid of 10,000 hosts would mean millions of candidate hops, so each position keeps every host
covering it when there are few (then the answer is exact), otherwise the best few by cheap
rankings: round trip to the client (a ring that stays near the client is short), estimated cost
per layer, reach (fewest hops) and, for the best arrivals, a triangle-inequality lower bound on
the hop from where the token is; and each position expands only the few best arrivals. The answer
is then a very good route rather than a proven optimum (within 0.3% on average and 3% at worst
of the exhaustive search on region-matrix grids of 400-3,000 hosts); ``exhaustive=True`` lifts
both limits.
"""

from __future__ import annotations

import itertools
import logging
import math
from collections.abc import Callable, Sequence
from dataclasses import dataclass

import numpy as np

from engine.errors import ConfigError, NoRouteError

log = logging.getLogger(__name__)

#: A position keeps all of its covering hosts as next-hop candidates up to this many ...
ALL_CANDIDATES = 24
#: ... else this many from each of the three rankings (client round trip, cost per layer, reach).
PER_RANKING = 6
#: Arrivals (distinct last hosts) expanded per layer position ...
ARRIVALS_PER_POSITION = 6
#: ... of which the best few also get candidates ranked by a lower bound on the hop from them.
LOCAL_LABELS = 2


@dataclass(frozen=True)
class HostView:
    """A live host of the model as routing sees it: its span, measured speed, and how busy it is."""

    node_id: str
    start: int
    end: int
    layers_per_s: float
    load: int = 0
    queue: int = 0

    def __post_init__(self) -> None:
        if not isinstance(self.node_id, str) or not self.node_id:
            raise ConfigError(f"host node_id must be a non-empty string, got {self.node_id!r}")
        ints = (self.start, self.end, self.load, self.queue)
        if not all(isinstance(v, int) and not isinstance(v, bool) for v in ints):
            raise ConfigError(f"host '{self.node_id}': start, end, load and queue must be integers")
        if not 0 <= self.start < self.end:
            raise ConfigError(f"host '{self.node_id}': span [{self.start}, {self.end}) is empty or negative")
        if self.load < 0 or self.queue < 0:
            raise ConfigError(f"host '{self.node_id}': load and queue must be >= 0")
        lps = self.layers_per_s
        if not isinstance(lps, int | float) or isinstance(lps, bool) or not math.isfinite(lps) or lps <= 0:
            raise ConfigError(f"host '{self.node_id}': layers_per_s must be a finite number > 0, got {lps!r}")


def _one_way(rtt_ms: Callable[[str, str], float], a: str, b: str) -> float:
    r = rtt_ms(a, b)
    if not r >= 0:  # also catches NaN
        raise ConfigError(f"rtt_ms({a!r}, {b!r}) returned {r!r}; round trips must be >= 0 (inf: unreachable)")
    return 0.5 * float(r)


def _candidates(
    p: int, idx: np.ndarray, to_client: np.ndarray, end: np.ndarray, per_layer: np.ndarray, local: list[int]
) -> tuple[list[int], dict[int, list[int]]]:
    """Next-hop candidates at layer ``p`` out of the covering hosts ``idx``: (for every arrival,
    extra ones for the arrivals at the hosts in ``local``).

    Every arrival gets the hosts that rank best on being near the client, cheap per layer (round
    trip from the client plus compute, over the layers covered) and far-reaching (fewest hops).
    The arrivals at hosts in ``local`` (the best few; -1 is the client, which needs nothing more)
    also get the hosts that may be near them: by the triangle inequality the one-way time from g
    to h is at least |near(g) - near(h)|, so hosts the client sees at a similar distance rank first.
    """
    reach = end[idx] - p
    near = to_client[idx]
    compute = reach * per_layer[idx]
    rows = [near + compute * 1e-9, (near + compute) / reach, -reach + per_layer[idx] / (per_layer[idx].max() + 1.0)]
    for g in local:
        if g >= 0:
            bound = np.abs(near - to_client[g])
            rows += [bound + compute * 1e-9, (bound + compute) / reach]
    k = min(PER_RANKING, idx.size)
    top = idx[np.argpartition(np.stack(rows), k - 1, axis=1)[:, :k]].tolist()
    common = set(top[0] + top[1] + top[2])
    extra: dict[int, list[int]] = {}
    row = 3
    for g in local:
        if g >= 0:
            extra[g] = sorted(common.union(top[row], top[row + 1]))
            row += 2
    return sorted(common), extra


def plan_route(
    num_layers: int,
    hosts: Sequence[HostView],
    rtt_ms: Callable[[str, str], float],
    *,
    client: str,
    exclude: frozenset[str] = frozenset(),
    exhaustive: bool = False,
    ends_on: frozenset[str] | None = None,
) -> list[tuple[str, int, int]]:
    """The fastest ring for one token: [(node_id, first_layer, end_layer), ...] covering 0..L-1.

    ``exclude`` drops failed nodes (failover asks again without them). ``ends_on`` (a private job)
    names the only hosts that may run the first hop (it holds the embeddings, so it sees the
    prompt's tokens) and the last hop (the head: it sees every generated token); middle hops see
    only hidden states and may be any host. Raises ``NoRouteError``
    naming the first layer no remaining host serves, ``ConfigError`` for a host outside the model,
    a duplicate host or a negative/NaN round trip. Deterministic: ties go to the lower node_id.
    """
    if not isinstance(num_layers, int) or isinstance(num_layers, bool) or num_layers < 1:
        raise ConfigError(f"num_layers must be an integer >= 1, got {num_layers!r}")
    L = num_layers
    active = sorted((h for h in hosts if h.node_id not in exclude), key=lambda h: h.node_id)
    for prev, h in itertools.pairwise(active):
        if prev.node_id == h.node_id:
            raise ConfigError(f"host '{h.node_id}' is listed twice")
    n = len(active)
    ids = [h.node_id for h in active]
    start_l = [h.start for h in active]
    end_l = [h.end for h in active]
    # Compute cost per layer in ms, scaled for the sessions and requests already on the host.
    per_layer_l = [1000.0 * (1 + h.load + h.queue) / h.layers_per_s for h in active]
    start = np.array(start_l, dtype=np.int64)
    end = np.array(end_l, dtype=np.int64)
    per_layer = np.array(per_layer_l, dtype=np.float64)
    if n and int(end.max()) > L:
        bad = active[int(np.argmax(end))]
        raise ConfigError(f"host '{bad.node_id}' serves layers up to {bad.end - 1}; the model has {L}")
    covered = np.cumsum(np.bincount(start, minlength=L + 1) - np.bincount(end, minlength=L + 1))[:L]
    if n == 0 or int(covered.min()) == 0:
        missing = 0 if n == 0 else int(np.argmin(covered > 0))
        gone = f" ({len(exclude)} excluded)" if exclude else ""
        raise NoRouteError(f"no live host serves layer {missing} of {L}{gone}")
    limit_all = n if exhaustive else ALL_CANDIDATES
    arrivals_kept = n + 1 if exhaustive else ARRIVALS_PER_POSITION
    to_client: np.ndarray | None = None  # one-way ms client -> host, computed only if ranking needs it
    inf = math.inf
    best = [inf] * n  # best arrival time (ms) at end[h] with h as the last host
    pred: list[tuple[int, int]] = [(-1, -1)] * n  # (previous host or -1 for the client, entry layer)
    arriving: dict[int, list[int]] = {}  # position -> hosts whose span ends there and were reached
    labels: list[tuple[float, int]] = [(0.0, -1)]  # at position 0: the client
    for p in range(L):
        if p:
            reached = arriving.get(p)
            if not reached:
                continue
            labels = sorted((best[h], h) for h in reached)[:arrivals_kept]
        idx = np.flatnonzero((start <= p) & (end > p))
        if p == 0 and ends_on is not None:  # a private job's first hop (before pruning, so none is lost)
            idx = np.array([h for h in idx.tolist() if ids[h] in ends_on], dtype=np.int64)
        if idx.size > limit_all:
            if to_client is None:
                to_client = np.array([_one_way(rtt_ms, client, i) for i in ids], dtype=np.float64)
            common, extra = _candidates(p, idx, to_client, end, per_layer, [g for _, g in labels[:LOCAL_LABELS]])
        else:
            common, extra = idx.tolist(), {}
        for dist, g in labels:
            src = client if g < 0 else ids[g]
            cand = extra.get(g, common)
            for h in cand:
                r = rtt_ms(src, ids[h])
                if not r >= 0:  # also catches NaN
                    _one_way(rtt_ms, src, ids[h])  # raises the explanatory ConfigError
                d = dist + 0.5 * r + (end_l[h] - p) * per_layer_l[h]
                if d < best[h]:
                    if best[h] == inf:
                        arriving.setdefault(end_l[h], []).append(h)
                    best[h] = d
                    pred[h] = (g, p)
    finals = [
        (best[h] + _one_way(rtt_ms, ids[h], client), h)
        for h in arriving.get(L, [])
        if ends_on is None or ids[h] in ends_on
    ]
    if not finals and ends_on is not None:
        raise NoRouteError(
            "no route keeps the embeddings and the head on the allowed nodes: none of them serves "
            f"layer 0 or layer {L - 1} (or no route joins them)"
        )
    if not finals or min(finals)[0] == inf:
        raise NoRouteError(f"no route reaches every layer of {L}: round trips to the remaining hosts are infinite")
    total, last = min(finals)
    route: list[tuple[str, int, int]] = []
    h = last
    while h >= 0:
        g, p = pred[h]
        route.append((ids[h], p, end_l[h]))
        h = g
    route.reverse()
    log.debug("plan_route: %d hops, %.1f ms estimated, %d hosts", len(route), total, n)
    return route
