"""Which contiguous layer span [start, end) each node serves: throughput-aware, replicated, stable.

The quantity optimised is the grid's *bottleneck throughput*. A node serving k layers at a measured
``layers_per_s`` of s spends its compute across its span, so it adds s/k token-passes per second to
each of those layers; a layer's throughput is the sum over its hosts, and the grid sustains the
minimum over layers. Summed over layers every node contributes exactly s whatever its span, so
S/L (total measured speed over layer count) is an upper bound, reached when every layer receives
the same total.

``plan_spans`` aims at that bound with *lanes*: disjoint groups of nodes, each covering all L
layers once as a chain. Inside a lane span lengths are proportional to speed (k_i = L*s_i/S_lane),
so every hop of the chain is equally fast and the lane adds S_lane/L to every layer; summing lanes
gives S/L whatever the grouping. Lanes make coverage and replication structural (R lanes = R full
copies) and, with lanes of equal total speed, make span length proportional to speed across the
whole grid. Only memory caps and integer rounding make a lane uneven. Against that: several lane
counts are tried (more lanes = longer spans = fewer hops and smaller rounding error, until memory
caps bind) and several groupings on small grids, uneven lanes are staggered so their weak parts
fall on different layers, the throughput-blind even split competes too (so the result is never
worse than it), and on small grids a local search then moves single spans while that raises the
bottleneck (or, at equal bottleneck, evens out the weak layers), including sideways moves that
tight-memory grids need.

``rebalance`` keeps an existing plan unless another is clearly (``min_gain``) better, and then
prefers the plan that moves the fewest nodes: joiners take the weakest windows, Petals-style, a
hole left by a departed node is filled by moving spare nodes, and a few single-node moves are
tried before falling back to the fresh plan.

Everything here is pure and deterministic (ties are broken by node_id; input order is irrelevant).
"""

from __future__ import annotations

import functools
import heapq
import logging
import math
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass

import numpy as np

from engine.errors import ConfigError, NoRouteError
from engine.scheduler.capacity import ModelShape, NodeCapacity

log = logging.getLogger(__name__)

Span = tuple[int, int]

#: Speed-weighted share of the throughput allowed to have its proportional span cut short by memory
#: when choosing the preferred lane count (the starting point of the lane-count search).
CAPPED_SHARE = 0.1
#: Up to this many joiners are placed one by one in the weakest windows; a larger batch that can
#: cover the model by itself gets lanes of its own (about as good on a large batch, far cheaper).
GREEDY_JOIN_LIMIT = 32
#: Local search runs on grids up to this many nodes, for at most this many node evaluations each
#: pass; the plateau walk (sideways moves) on grids up to WALK_MAX_NODES, for WALK_STEPS moves.
POLISH_MAX_NODES = 128
POLISH_MAX_EVALS = 600
_POLISH_ROUNDS = 8
WALK_MAX_NODES = 32
WALK_STEPS = 300
_WALK_PATIENCE = 3
#: Spans proportional to speed (the preferred lane count, lanes of even speed) are kept unless
#: another plan's bottleneck is better by more than this share: in exact arithmetic they tie, and
#: proportional spans are what operators can reason about.
PROPORTIONAL_SLACK = 0.005
#: Lane counts tried exhaustively when the feasible range is this small, else by geometric steps.
_EXHAUSTIVE_LANE_COUNTS = 8
_NO_LANES = -1
#: Up to this many uneven lanes are laid out one by one against the running per-layer total.
_SCORED_LANES = 256
#: rebalance moves at most this many placed nodes (and at most half of the grid) in one call, and
#: takes a fresh plan only if it moves no more than this many; each move is chosen among this
#: many donor candidates.
MAX_REBALANCE_MOVES = 16
_DONORS_PER_MOVE = 8


@dataclass(frozen=True)
class _Grid:
    """The useful nodes (can hold a layer, measured speed > 0), fastest first, ties by node_id.

    Only the measured ``layers_per_s`` is read, never ``claimed_layers_per_s``.
    """

    ids: list[str]
    speed: np.ndarray  # float64, > 0
    cap: np.ndarray  # int64, 1..L: how many layers fit in the node's memory

    @property
    def n(self) -> int:
        return len(self.ids)

    def subset(self, mask: np.ndarray) -> _Grid:
        idx = np.flatnonzero(mask)
        return _Grid([self.ids[i] for i in idx], self.speed[idx], self.cap[idx])


def _grid(model: ModelShape, nodes: Sequence[NodeCapacity]) -> _Grid:
    seen: set[str] = set()
    rows: list[tuple[float, str, int]] = []
    for n in nodes:
        if n.node_id in seen:
            raise ConfigError(f"node '{n.node_id}' is listed twice")
        seen.add(n.node_id)
        cap = model.max_layers(n)
        if cap >= 1 and n.layers_per_s > 0:
            rows.append((-float(n.layers_per_s), n.node_id, cap))
    rows.sort()
    return _Grid(
        [r[1] for r in rows],
        np.array([-r[0] for r in rows], dtype=np.float64),
        np.array([r[2] for r in rows], dtype=np.int64),
    )


def _check_min_replicas(min_replicas: int) -> None:
    if not isinstance(min_replicas, int) or isinstance(min_replicas, bool) or min_replicas < 1:
        raise ConfigError(f"min_replicas must be an integer >= 1, got {min_replicas!r}")


# ------------------------------------------------------------------------------- profile helpers


def _profile(
    num_layers: int, speed: np.ndarray, start: np.ndarray, length: np.ndarray
) -> tuple[np.ndarray, np.ndarray]:
    """Per-layer throughput and host count; entries with length 0 are unplaced."""
    on = length > 0
    a, k, s = start[on], length[on], speed[on]
    r = s / k
    size = num_layers + 1
    rate = np.bincount(a, weights=r, minlength=size) - np.bincount(a + k, weights=r, minlength=size)
    count = np.bincount(a, minlength=size) - np.bincount(a + k, minlength=size)
    return np.cumsum(rate, dtype=np.float64)[:num_layers], np.cumsum(count)[:num_layers]


def _bottleneck_of(rate: np.ndarray, count: np.ndarray) -> float:
    if count.size == 0 or int(count.min()) <= 0:
        return 0.0
    return max(0.0, float(rate.min()))


def _quantize(values: np.ndarray, scale: float) -> np.ndarray:
    """Round away float noise so equal-in-principle scores tie and the deterministic tie-break decides."""
    return np.round(values / (scale if scale > 0 else 1.0), 9)


# ---------------------------------------------------------------------------------------- lanes


def _water_level(speed: np.ndarray, cap: np.ndarray, target: float) -> float:
    """The scale c with sum(clip(c * speed, 1, cap)) == target: spans proportional to speed,
    capped by memory, at least one layer, using ``target`` layer slots in all (clipped to range).
    """
    lo, hi = 1.0 / float(speed.max()), float((cap / speed).max())
    if target <= speed.size:
        return lo
    if target >= float(cap.sum()):
        return hi
    capf = cap.astype(np.float64)
    for _ in range(64):
        mid = 0.5 * (lo + hi)
        if float(np.clip(mid * speed, 1.0, capf).sum()) >= target:
            hi = mid
        else:
            lo = mid
    return hi


def _lane_counts(grid: _Grid, num_layers: int, min_replicas: int) -> tuple[int, int, int]:
    """Lane (full copy) counts: (fewest, preferred, most).

    Fewest: ``min_replicas`` and enough lanes for every node (a lane holds at most L nodes). Most:
    what the total memory allows. Preferred: the most lanes the memory of the nodes holding all but
    ``CAPPED_SHARE`` of the throughput allows at proportional lengths. All within [1, most].
    """
    L = num_layers
    r_hi = max(1, int(grid.cap.sum()) // L)
    ratio = grid.cap / grid.speed
    order = np.argsort(ratio, kind="stable")
    acc = np.cumsum(grid.speed[order])
    at = int(np.searchsorted(acc, CAPPED_SHARE * acc[-1]))
    c_mem = float(ratio[order[min(at, order.size - 1)]])
    pref = float(np.clip(c_mem * grid.speed, 1.0, grid.cap.astype(np.float64)).sum())
    r_lo = min(r_hi, max(min_replicas, -(-grid.n // L), 1))
    r_pref = min(r_hi, max(r_lo, int(pref // L)))
    return r_lo, r_pref, r_hi


def _lpt(weights: np.ndarray, lanes: int, num_layers: int) -> np.ndarray:
    """Longest-processing-time partition: the lane of each node, or _NO_LANES for leftovers.

    Heaviest first into the lightest lane gives lanes of near-equal weight. With proportional
    weights that means near-equal lane speed, so one scale fits every lane and span length stays
    proportional to speed across lanes, not only within one. A lane takes at most L nodes.
    """
    lane = np.full(weights.size, _NO_LANES, dtype=np.int64)
    order = np.argsort(-weights, kind="stable")  # grid order (speed, id) breaks weight ties
    heap = [(0.0, j) for j in range(lanes)]
    sizes = [0] * lanes
    for i in order.tolist():
        if not heap:
            break
        total, j = heapq.heappop(heap)
        lane[i] = j
        sizes[j] += 1
        if sizes[j] < num_layers:
            heapq.heappush(heap, (total + float(weights[i]), j))
    return lane


def _next_fit_by_cap(grid: _Grid, num_layers: int) -> np.ndarray:
    """Memory-only packing, the fallback: largest nodes first, a new lane once one covers the model.

    Always yields at least one lane when the total memory covers the model once.
    """
    lane = np.full(grid.n, _NO_LANES, dtype=np.int64)
    order = np.argsort(-grid.cap, kind="stable")
    j, room, members = 0, 0, []
    for i in order.tolist():
        members.append(i)
        room += int(grid.cap[i])
        if room >= num_layers:
            lane[members] = j
            j, room, members = j + 1, 0, []
    return lane


def _lane_lengths(grid: _Grid, lane: np.ndarray, lanes: int, num_layers: int) -> np.ndarray | None:
    """Integer span lengths: per lane proportional to speed, capped by memory, summing to exactly L.

    A per-lane scale is found by bisection (all lanes at once), then largest-remainder rounding
    keeps every length within one layer of its exact proportional value. None if a lane's memory
    cannot cover the model (or a lane is empty).
    """
    L = num_layers
    idx = np.flatnonzero(lane >= 0)
    ln, s = lane[idx], grid.speed[idx]
    cp = grid.cap[idx].astype(np.float64)
    cnt = np.bincount(ln, minlength=lanes)
    if (cnt == 0).any() or (cnt > L).any() or (np.bincount(ln, weights=cp, minlength=lanes) < L).any():
        return None
    lo = np.zeros(lanes)
    hi = np.zeros(lanes)
    np.maximum.at(hi, ln, cp / s)
    for _ in range(48):
        mid = 0.5 * (lo + hi)
        enough = np.bincount(ln, weights=np.clip(mid[ln] * s, 1.0, cp), minlength=lanes) >= L
        hi = np.where(enough, mid, hi)
        lo = np.where(enough, lo, mid)
    exact = np.clip(hi[ln] * s, 1.0, cp)
    k = np.clip(np.floor(exact + 1e-9), 1, cp).astype(np.int64)
    short = L - np.bincount(ln, weights=k, minlength=lanes).astype(np.int64)
    eligible = k < cp
    frac = exact - k
    order = np.lexsort((np.arange(idx.size), -s, -frac, ~eligible, ln))
    first = np.concatenate(([0], np.cumsum(cnt)[:-1]))
    rank = np.empty(idx.size, dtype=np.int64)
    rank[order] = np.arange(idx.size) - first[ln[order]]
    k += (eligible & (rank < short[ln])).astype(np.int64)
    short = L - np.bincount(ln, weights=k, minlength=lanes).astype(np.int64)
    for j in np.flatnonzero(short).tolist():  # float edge cases only: settle one layer at a time
        members = [int(i) for i in order if ln[i] == j]
        need = int(short[j])
        step = 1 if need > 0 else -1
        while need != 0:
            moved = False
            for i in members if step > 0 else members[::-1]:
                if need == 0:
                    break
                if (step > 0 and k[i] < cp[i]) or (step < 0 and k[i] > 1):
                    k[i] += step
                    need -= step
                    moved = True
            if not moved:
                return None
    out = np.zeros(grid.n, dtype=np.int64)
    out[idx] = k
    return out


def _arrange(grid: _Grid, lane: np.ndarray, length: np.ndarray, lanes: int, num_layers: int) -> np.ndarray:
    """Start of every laned node: each lane a chain, uneven lanes staggered against each other.

    A lane whose hops all have the same rate adds a constant to every layer, so its order does not
    matter. In an uneven lane (memory caps, rounding) the fast-per-layer hops go at the start or at
    the end of the chain, whichever leaves the running per-layer total higher at its minimum, then
    flatter, so the uneven parts of different lanes do not pile onto the same layers.
    """
    start = np.full(grid.n, -1, dtype=np.int64)
    idx = np.flatnonzero(lane >= 0)
    if idx.size == 0:
        return start
    rate = grid.speed[idx] / length[idx]
    order = idx[np.lexsort((idx, rate, lane[idx]))]  # by lane, then rate ascending, then grid order
    ln = lane[order]
    k = length[order]
    r = grid.speed[order] / k
    bounds = np.flatnonzero(np.diff(ln)) + 1
    first = np.concatenate(([0], bounds))
    last = np.concatenate((bounds, [order.size]))
    rmax = np.maximum.reduceat(r, first)
    rmin = np.minimum.reduceat(r, first)
    uneven = (rmax - rmin) > 1e-12 * rmax
    # Ascending order for every lane first (final for even lanes): exclusive prefix sums of lengths.
    excl = np.cumsum(k) - k
    start[order] = excl - excl[first][np.repeat(np.arange(first.size), last - first)]
    if int(uneven.sum()) > _SCORED_LANES:
        # Many lanes: scoring each against the running total costs more than it gains; mirroring
        # every other uneven lane end-for-end staggers them well enough.
        flip = np.zeros(first.size, dtype=bool)
        flip[np.flatnonzero(uneven)[1::2]] = True
        mirror = np.repeat(flip, last - first)
        start[order[mirror]] = num_layers - start[order[mirror]] - k[mirror]
        return start
    total = np.zeros(num_layers) + float(rmax[~uneven].sum())
    for f, e in zip(first[uneven].tolist(), last[uneven].tolist(), strict=True):
        scored = []
        for members in (order[f:e], order[f:e][::-1]):
            prof = total + np.repeat(grid.speed[members] / length[members], length[members])
            scored.append(((float(prof.min()), -float(np.dot(prof, prof))), members, prof))
        _, members, total = scored[1] if scored[1][0] > scored[0][0] else scored[0]
        start[members] = np.cumsum(length[members]) - length[members]
    return start


def _best_window(
    rate: np.ndarray, count: np.ndarray, speed: float, lengths: Sequence[int], target: int
) -> tuple[int, int]:
    """The (start, length) a node of ``speed`` should take on top of the current per-layer profile.

    Ranked by: the plan's new bottleneck (highest), then uncovered layers it covers (most), then
    closeness of its length to its proportional ``target`` length, then the weakest window
    (lowest current throughput, as Petals does), then the lowest start.
    """
    L = rate.shape[0]
    pre = np.concatenate(([np.inf], np.minimum.accumulate(rate)))  # pre[i] = min(rate[:i])
    suf = np.concatenate((np.minimum.accumulate(rate[::-1])[::-1], [np.inf]))  # suf[i] = min(rate[i:])
    zeros = np.concatenate(([0], np.cumsum(count == 0)))
    sums = np.concatenate(([0.0], np.cumsum(rate)))
    scale = float(max(rate.max(initial=0.0), speed))
    keys: list[np.ndarray] = []
    starts_all: list[np.ndarray] = []
    lens_all: list[np.ndarray] = []
    for k in sorted(set(lengths)):
        starts = np.arange(L - k + 1)
        inside = np.lib.stride_tricks.sliding_window_view(rate, k).min(axis=1) + speed / k
        new_min = np.minimum(inside, np.minimum(pre[starts], suf[starts + k]))
        keys.append(
            np.stack(
                [
                    -starts.astype(np.float64),
                    -_quantize(sums[starts + k] - sums[starts], scale * k),
                    -np.full(starts.shape, abs(k - target), dtype=np.float64),
                    (zeros[starts + k] - zeros[starts]).astype(np.float64),
                    _quantize(new_min, scale),
                ]
            )
        )
        starts_all.append(starts)
        lens_all.append(np.full(starts.shape, k))
    best = int(np.lexsort(np.concatenate(keys, axis=1))[-1])  # last row is the primary key
    return int(np.concatenate(starts_all)[best]), int(np.concatenate(lens_all)[best])


def _place_greedily(
    grid: _Grid, num_layers: int, start: np.ndarray, length: np.ndarray, which: Sequence[int], c: float
) -> None:
    """Give each node in ``which``, in order, its best window on top of the plan (arrays mutated)."""
    rate, count = _profile(num_layers, grid.speed, start, length)
    for i in which:
        s, cap = float(grid.speed[i]), int(grid.cap[i])
        target = max(1, min(cap, round(c * s)))
        a, k = _best_window(rate, count, s, (target, cap), target)
        start[i], length[i] = a, k
        rate[a : a + k] += s / k
        count[a : a + k] += 1


# --------------------------------------------------------------------------------- local search


@functools.lru_cache(maxsize=32)
def _windows(num_layers: int, cap: int) -> tuple[np.ndarray, np.ndarray, np.ndarray, np.ndarray]:
    """Every window (start, length <= cap) of an L-layer model, with sparse-table lookup helpers:
    (starts, lengths, level = floor(log2 length), offset of length k's first window)."""
    starts = np.concatenate([np.arange(num_layers - k + 1) for k in range(1, cap + 1)])
    lengths = np.concatenate([np.full(num_layers - k + 1, k) for k in range(1, cap + 1)])
    level = np.floor(np.log2(lengths)).astype(np.int64)
    offset = np.concatenate(([0], np.cumsum([num_layers - k + 1 for k in range(1, cap + 1)])))
    for arr in (starts, lengths, level, offset):
        arr.flags.writeable = False
    return starts, lengths, level, offset


def _sparse_table(values: np.ndarray, fill: float) -> np.ndarray:
    """table[j, i] = min(values[i : i + 2**j]) (``fill`` past the end), for O(1) range minima."""
    L = values.shape[0]
    levels = max(1, L.bit_length())
    table = np.full((levels, L), fill, dtype=np.float64)
    table[0] = values
    for j in range(1, levels):
        half, width = 1 << (j - 1), L - (1 << j) + 1
        if width <= 0:
            break
        table[j, :width] = np.minimum(table[j - 1, :width], table[j - 1, half : half + width])
    return table


class _Moves:
    """Every re-placement of one node on top of the rest of a plan, scored at once (vectorised).

    A plan is scored by (bottleneck, then the sum over layers of (mean/throughput)^4, smaller is
    better): the second term rewards lifting weak layers that are not yet the bottleneck, which is
    what lets a search cross plateaus of equal bottleneck. Windows that would leave a layer with
    fewer than ``floor`` hosts are ruled out.
    """

    def __init__(self, grid: _Grid, num_layers: int, start: np.ndarray, length: np.ndarray, floor: int) -> None:
        self.grid, self.L, self.start, self.length, self.floor = grid, num_layers, start, length, floor
        self.ref = float(grid.speed.sum()) / num_layers
        self.rate, count = _profile(num_layers, grid.speed, start, length)
        self.count = count.astype(np.float64)

    def score(self) -> tuple[float, float]:
        soft = float(((self.ref / np.maximum(self.rate, 0.01 * self.ref)) ** 4).sum())
        return float(_quantize(np.array([self.rate.min()]), self.ref)[0]), soft

    def options(self, i: int) -> tuple[np.ndarray, np.ndarray, np.ndarray, np.ndarray, int]:
        """(quantised new bottleneck or -inf if ruled out, soft score, starts, lengths, index of the
        node's current window) over every window node ``i``'s memory allows."""
        s, cap, a0, k0 = float(self.grid.speed[i]), int(self.grid.cap[i]), int(self.start[i]), int(self.length[i])
        ref = self.ref
        base = self.rate.copy()
        base[a0 : a0 + k0] -= s / k0
        cbase = self.count.copy()
        cbase[a0 : a0 + k0] -= 1
        starts, ks, lv, offset = _windows(self.L, cap)
        ends = starts + ks
        tail = ends - (1 << lv)
        tab = _sparse_table(base, np.inf)
        inside = np.minimum(tab[lv, starts], tab[lv, tail]) + s / ks
        pre = np.concatenate(([np.inf], np.minimum.accumulate(base)))
        suf = np.concatenate((np.minimum.accumulate(base[::-1])[::-1], [np.inf]))
        new_min = np.minimum(inside, np.minimum(pre[starts], suf[ends]))
        ctab = _sparse_table(cbase, np.inf)
        cpre = np.concatenate(([np.inf], np.minimum.accumulate(cbase)))
        csuf = np.concatenate((np.minimum.accumulate(cbase[::-1])[::-1], [np.inf]))
        ok = (np.minimum(ctab[lv, starts], ctab[lv, tail]) + 1 >= self.floor) & (
            np.minimum(cpre[starts], csuf[ends]) >= self.floor
        )
        soft_base = (ref / np.maximum(base, 0.01 * ref)) ** 4
        prefix = np.concatenate(([0.0], np.cumsum(soft_base)))
        suffix = np.concatenate((np.cumsum(soft_base[::-1])[::-1], [0.0]))
        lifted = (ref / np.maximum(base[None, :] + s / np.arange(1, cap + 1)[:, None], 0.01 * ref)) ** 4
        lifted_cum = np.concatenate((np.zeros((cap, 1)), np.cumsum(lifted, axis=1)), axis=1)
        soft = prefix[starts] + suffix[ends] + lifted_cum[ks - 1, ends] - lifted_cum[ks - 1, starts]
        key_min = np.where(ok, _quantize(new_min, ref), -np.inf)
        return key_min, soft, starts, ks, int(offset[k0 - 1]) + a0

    def move(self, i: int, a1: int, k1: int) -> None:
        s, a0, k0 = float(self.grid.speed[i]), int(self.start[i]), int(self.length[i])
        self.rate[a0 : a0 + k0] -= s / k0
        self.count[a0 : a0 + k0] -= 1
        self.rate[a1 : a1 + k1] += s / k1
        self.count[a1 : a1 + k1] += 1
        self.start[i], self.length[i] = a1, k1


def _polish(grid: _Grid, num_layers: int, start: np.ndarray, length: np.ndarray, floor: int, budget: int) -> int:
    """Local search: re-place one node at a time (best response) while that strictly improves the
    plan's score (see ``_Moves``). Strict improvement of a global score rules out cycles; ``budget``
    bounds the node evaluations. Returns the number of moves made (arrays mutated)."""
    moves = _Moves(grid, num_layers, start, length, floor)
    made = evals = 0
    for _ in range(_POLISH_ROUNDS):
        moved = False
        for i in range(grid.n):
            if evals >= budget:
                return made
            evals += 1
            key_min, soft, starts, ks, here = moves.options(i)
            best = int(np.lexsort((soft, -key_min))[0])
            if key_min[best] > key_min[here] or (
                key_min[best] == key_min[here] and soft[best] < soft[here] * (1.0 - 1e-6)
            ):
                moves.move(i, int(starts[best]), int(ks[best]))
                made += 1
                moved = True
        if not moved:
            break
    return made


def _walk(grid: _Grid, num_layers: int, start: np.ndarray, length: np.ndarray, floor: int, steps: int) -> None:
    """Plateau walk for small grids, after ``_polish``: keep re-placing nodes in turn, accepting
    any move that does not lower the bottleneck (the best soft score among them, even if worse
    than now), never returning a node to a window it held in its last few moves; keep the best
    plan seen. Tight-memory grids need such chains of sideways moves (a slow node can only join
    another on the weakest layer once a third node has shifted to cover what it leaves)."""
    moves = _Moves(grid, num_layers, start, length, floor)
    best_score = moves.score()
    best_plan = (start.copy(), length.copy())
    recent: dict[int, list[tuple[int, int]]] = {}
    last_gain = 0
    for step in range(steps):
        if step - last_gain > _WALK_PATIENCE * grid.n:
            break  # several sweeps over every node without a new best: stuck
        i = step % grid.n
        key_min, soft, starts, ks, here = moves.options(i)
        allowed = key_min >= moves.score()[0]
        allowed[here] = False
        offset = _windows(num_layers, int(grid.cap[i]))[3]
        for a, k in recent.get(i, []):
            allowed[int(offset[k - 1]) + a] = False
        if not allowed.any():
            continue
        pick = int(np.flatnonzero(allowed)[np.argmin(soft[allowed])])
        recent.setdefault(i, []).append((int(start[i]), int(length[i])))
        del recent[i][:-3]
        moves.move(i, int(starts[pick]), int(ks[pick]))
        score = moves.score()
        if score[0] > best_score[0] or (score[0] == best_score[0] and score[1] < best_score[1] * (1.0 - 1e-6)):
            best_score, best_plan, last_gain = score, (start.copy(), length.copy()), step
    start[:], length[:] = best_plan


# ------------------------------------------------------------------------------------- planning


def _contiguous(weights: np.ndarray, lanes: int) -> np.ndarray:
    """Cut the nodes, fastest first, into ``lanes`` runs of near-equal weight: fast nodes share lanes.

    Where memory caps bind, a capped fast node leaves the rest of its lane to its lane-mates; fast
    lane-mates cover that at a high rate, while a slow one would become the lane's weak spot.
    """
    total = float(weights.sum())
    mid = np.cumsum(weights) - 0.5 * weights
    return np.minimum((mid / (total / lanes)).astype(np.int64), lanes - 1)


def _snake(n: int, lanes: int) -> np.ndarray:
    """Deal the nodes, fastest first, to lanes 0..R-1, R-1..0, ...: every lane gets a mix of speeds."""
    j = np.arange(n) % (2 * lanes)
    return np.where(j < lanes, j, 2 * lanes - 1 - j)


def _plan_lanes(
    grid: _Grid, num_layers: int, lanes: int, lane: np.ndarray | None = None, thorough: bool = False
) -> tuple[np.ndarray, np.ndarray, float] | None:
    """A plan with ``lanes`` lanes (start, length, span scale c), or None if they cannot be packed.

    Lanes are packed by proportional length (even lane speeds: proportional spans grid-wide), else
    by memory. ``thorough`` (small grids) also tries speed-sorted runs (by proportional length, by
    speed, by count) and a snake deal, and keeps the packing with the best bottleneck. A node left
    over (a lane holds at most L nodes) is placed greedily on top.
    """
    L = num_layers
    c = _water_level(grid.speed, grid.cap, float(lanes * L))
    proportional = np.clip(c * grid.speed, 1.0, grid.cap.astype(np.float64))
    if lane is not None:
        packings: list[Callable[[], np.ndarray]] = [lambda: lane]
    else:
        packings = [lambda: _lpt(proportional, lanes, L), lambda: _lpt(grid.cap.astype(np.float64), lanes, L)]
        if thorough:
            packings += [
                lambda: _contiguous(proportional, lanes),
                lambda: _contiguous(grid.speed, lanes),
                lambda: _contiguous(np.ones(grid.n), lanes),
                lambda: _snake(grid.n, lanes),
            ]
    best: tuple[float, np.ndarray, np.ndarray] | None = None
    for packing in packings:
        assignment = packing()
        length = _lane_lengths(grid, assignment, lanes, L)
        if length is None:
            continue
        start = _arrange(grid, assignment, length, lanes, L)
        extras = np.flatnonzero(assignment < 0).tolist()
        if extras:
            _place_greedily(grid, L, start, length, extras, c)
        if not thorough:
            return start, length, c
        value = _bottleneck_of(*_profile(L, grid.speed, start, length))
        # The first feasible packing keeps spans proportional grid-wide; another one must be
        # clearly better to replace it (equal in exact arithmetic, they differ by rounding luck).
        if best is None or value > best[0] * (1.0 + PROPORTIONAL_SLACK):
            best = (value, start, length)
    return None if best is None else (best[1], best[2], c)


def _even(grid: _Grid, num_layers: int, lanes: int) -> tuple[np.ndarray, np.ndarray] | None:
    """The throughput-blind baseline: nodes in node_id order dealt round-robin to ``lanes`` lanes,
    each lane cut into equal spans (the first L % n one layer longer). None if a span does not fit
    its node's memory or a lane is empty; nodes beyond the L-th of a lane get no span."""
    order = sorted(range(grid.n), key=lambda i: grid.ids[i])
    start = np.zeros(grid.n, dtype=np.int64)
    length = np.zeros(grid.n, dtype=np.int64)
    for j in range(lanes):
        members = order[j::lanes][:num_layers]
        if not members:
            return None
        base, extra = divmod(num_layers, len(members))
        pos = 0
        for t, i in enumerate(members):
            k = base + (1 if t < extra else 0)
            if k > grid.cap[i]:
                return None
            start[i], length[i] = pos, k
            pos += k
    return start, length


def _plan(grid: _Grid, num_layers: int, min_replicas: int) -> tuple[np.ndarray, np.ndarray, float]:
    """plan_spans on a grid: (start, length, span scale c) per grid node.

    Lane counts are searched around the preferred one (all of them on small grids, geometric
    steps on large ones); the preferred count (spans proportional to speed) is kept unless another
    is better by more than ``PROPORTIONAL_SLACK``, then the highest bottleneck wins, ties going to
    more lanes (longer spans). Small grids are then polished.
    """
    L = num_layers
    total_cap = int(grid.cap.sum())
    if total_cap < L:
        raise NoRouteError(f"the grid's memory holds {total_cap} layer slots; the model needs {L}")
    r_lo, r_pref, r_hi = _lane_counts(grid, L, min_replicas)
    results: dict[int, tuple[np.ndarray, np.ndarray, float, float] | None] = {}

    def attempt(r: int) -> float:
        if r not in results:
            got = _plan_lanes(grid, L, r, thorough=grid.n <= POLISH_MAX_NODES)
            results[r] = None if got is None else (*got, _bottleneck_of(*_profile(L, grid.speed, got[0], got[1])))
        got = results[r]
        return -1.0 if got is None else got[3]

    if r_hi - r_lo + 1 <= _EXHAUSTIVE_LANE_COUNTS:
        for r in range(r_lo, r_hi + 1):
            attempt(r)
    else:
        attempt(r_pref)
        for direction in (1, -1):  # walk away from the preferred count while it keeps improving
            r, best_here = r_pref, attempt(r_pref)
            while True:
                nxt = max(r + 1, math.ceil(r * 1.5)) if direction > 0 else min(r - 1, math.floor(r / 1.5))
                nxt = min(max(nxt, r_lo), r_hi)
                if nxt == r:
                    break
                value = attempt(nxt)
                if value < best_here:
                    break
                r, best_here = nxt, value
        attempt(r_lo)
        attempt(r_hi)
    # The preferred count (proportional spans) unless another is clearly better; then the best,
    # ties to more lanes. The even split competes last and wins only if strictly better.
    feasible = {r: v for r, v in results.items() if v is not None}
    chosen: tuple[np.ndarray, np.ndarray, float, float] | None = None
    if feasible:
        top = max(feasible, key=lambda r: (round(feasible[r][3], 9), r))
        keep_pref = r_pref in feasible and feasible[top][3] <= feasible[r_pref][3] * (1.0 + PROPORTIONAL_SLACK)
        chosen = feasible[r_pref] if keep_pref else feasible[top]
    even = _even(grid, L, min(min_replicas, grid.n)) if grid.n <= min_replicas * L else None
    if even is not None:
        value = _bottleneck_of(*_profile(L, grid.speed, even[0], even[1]))
        if chosen is None or value > chosen[3]:
            chosen = (even[0], even[1], _water_level(grid.speed, grid.cap, float(L)), value)
    if chosen is not None:
        start, length, c = chosen[0].copy(), chosen[1].copy(), chosen[2]
    else:
        fallback = None
        for r in range(min(r_lo, r_hi) - 1, 0, -1):  # fewer copies than asked, but proportional lanes
            fallback = _plan_lanes(grid, L, r)
            if fallback is not None:
                break
        if fallback is None:
            lane = _next_fit_by_cap(grid, L)
            fallback = _plan_lanes(grid, L, int(lane.max()) + 1, lane)
            log.debug("plan_spans: lane packing fell back to memory-first packing")
        if fallback is None:  # unreachable: next-fit lanes each hold >= L layers
            raise NoRouteError(f"could not pack the model's {L} layers into the grid's memory")
        start, length, c = fallback
    rate, count = _profile(L, grid.speed, start, length)
    at_bound = float(rate.min()) >= float(grid.speed.sum()) / L * (1.0 - 1e-9)  # nothing to gain
    if grid.n <= POLISH_MAX_NODES and not at_bound:
        floor = min(min_replicas, int(count.min()))
        _polish(grid, L, start, length, floor, POLISH_MAX_EVALS)
        if grid.n <= WALK_MAX_NODES:
            _walk(grid, L, start, length, floor, WALK_STEPS)
            _polish(grid, L, start, length, floor, POLISH_MAX_EVALS)
    return start, length, c


def _to_dict(grid: _Grid, start: np.ndarray, length: np.ndarray) -> dict[str, Span]:
    pairs = [
        (grid.ids[i], (int(a), int(a) + int(k)))
        for i, (a, k) in enumerate(zip(start.tolist(), length.tolist(), strict=True))
        if k > 0
    ]
    return dict(sorted(pairs))


def _validate_spans(model: ModelShape, spans: Mapping[str, Span]) -> None:
    for nid, span in spans.items():
        if (
            not isinstance(span, tuple)
            or len(span) != 2
            or not all(isinstance(v, int) and not isinstance(v, bool) for v in span)
            or not 0 <= span[0] < span[1] <= model.num_layers
        ):
            raise ConfigError(
                f"span {span!r} of node '{nid}' is not a non-empty [start, end) within 0..{model.num_layers}"
            )


# ------------------------------------------------------------------------------------------- public


def plan_spans(
    model: ModelShape, nodes: Sequence[NodeCapacity], *, min_replicas: int = 2
) -> dict[str, tuple[int, int]]:
    """One contiguous span [start, end) per useful node: every layer covered, replicated, fast.

    Every node that can hold a layer and measured a non-zero speed gets a span (another host
    never lowers the bottleneck). Coverage and ``min_replicas`` copies come from the lanes (see
    the module docstring) whenever memory lets them be packed, else as many copies as it does;
    span lengths follow *measured* speed, capped by memory. Raises ``NoRouteError`` when the
    nodes' memory cannot hold the model even once.
    """
    _check_min_replicas(min_replicas)
    grid = _grid(model, nodes)
    if grid.n == 0:
        raise NoRouteError(f"no node can hold a layer of the model ({model.bytes_per_layer} bytes each)")
    start, length, _ = _plan(grid, model.num_layers, min_replicas)
    return _to_dict(grid, start, length)


def even_spans(model: ModelShape, nodes: Sequence[NodeCapacity], *, replicas: int = 2) -> dict[str, tuple[int, int]]:
    """The naive baseline planners are measured against: equal spans, blind to speed.

    Useful nodes in node_id order are dealt round-robin to ``replicas`` lanes and each lane cuts the
    model into equal consecutive spans. Raises ``NoRouteError`` when a span does not fit its node's
    memory (the even split needs more memory than the grid has where it matters).
    """
    _check_min_replicas(replicas)
    grid = _grid(model, nodes)
    got = _even(grid, model.num_layers, replicas) if grid.n >= replicas else None
    if got is None:
        raise NoRouteError(f"an even split into {replicas} copies does not fit these nodes' memory")
    return _to_dict(grid, *got)


def bottleneck_throughput(
    model: ModelShape, nodes: Sequence[NodeCapacity], spans: Mapping[str, tuple[int, int]]
) -> float:
    """Tokens per second the grid sustains: min over layers of sum(layers_per_s / span length).

    Spans of nodes not in ``nodes`` are ignored (those nodes are gone); a layer nobody serves
    makes the answer 0.0. Raises ``ConfigError`` for a span outside the model.
    """
    _validate_spans(model, spans)
    speed = {n.node_id: float(n.layers_per_s) for n in nodes}
    live = sorted(nid for nid in spans if nid in speed)
    return _bottleneck_of(
        *_profile(
            model.num_layers,
            np.array([speed[n] for n in live], dtype=np.float64),
            np.array([spans[n][0] for n in live], dtype=np.int64),
            np.array([spans[n][1] - spans[n][0] for n in live], dtype=np.int64),
        )
    )


def _fill_holes(grid: _Grid, num_layers: int, start: np.ndarray, length: np.ndarray, c: float, budget: int) -> int:
    """Move as few nodes as possible onto layers nobody serves (arrays mutated); returns moves.

    Each move takes the node whose departure hurts least: every layer it serves keeps another
    host, and the weakest of those layers stays as strong as possible without it. Each move covers
    at least one empty layer, so this ends; it stops early when no node can be spared.
    """
    L = num_layers
    moves = 0
    while moves < budget:
        rate, count = _profile(L, grid.speed, start, length)
        if int(count.min()) > 0:
            break
        on = np.flatnonzero(length > 0)
        if on.size == 0:
            break
        a, k = start[on], length[on]
        lv = np.floor(np.log2(k)).astype(np.int64)
        ctab = _sparse_table(count.astype(np.float64), np.inf)
        spare = np.minimum(ctab[lv, a], ctab[lv, a + k - (1 << lv)]) >= 2
        if not spare.any():
            break
        rtab = _sparse_table(rate, np.inf)
        left = np.minimum(rtab[lv, a], rtab[lv, a + k - (1 << lv)]) - grid.speed[on] / k
        cand = np.flatnonzero(spare)
        pick = cand[np.lexsort((cand, -grid.cap[on][cand], -left[cand]))[0]]
        donor = int(on[pick])
        length[donor] = 0
        _place_greedily(grid, L, start, length, [donor], c)
        moves += 1
        log.debug("rebalance: moved node '%s' to cover an empty layer", grid.ids[donor])
    return moves


def _few_moves(
    grid: _Grid,
    num_layers: int,
    start: np.ndarray,
    length: np.ndarray,
    free: np.ndarray,
    floor: int,
    goal: float,
    max_moves: int,
) -> int:
    """Raise the bottleneck towards ``goal`` moving as few placed nodes as possible (arrays mutated).

    Joiners (``free``) hold no weights yet, so they are re-placed first at no cost. Then, one move at
    a time, the few nodes whose surroundings stay strongest without them (the same ranking as
    ``_fill_holes``) are each offered their best window and the single most improving move is
    made, until the goal is met, nothing improves, or ``max_moves`` distinct nodes have moved.
    Returns the number of distinct placed nodes moved.
    """
    L = num_layers
    moves = _Moves(grid, L, start, length, floor)

    def bottleneck() -> float:
        return float(moves.rate.min()) if float(moves.count.min()) > 0 else 0.0

    for i in np.flatnonzero(free).tolist():
        if bottleneck() >= goal:
            break
        key_min, soft, starts, ks, here = moves.options(i)
        j = int(np.lexsort((soft, -key_min))[0])
        if key_min[j] > key_min[here] or (key_min[j] == key_min[here] and soft[j] < soft[here] * (1.0 - 1e-6)):
            moves.move(i, int(starts[j]), int(ks[j]))
    moved: set[int] = set()
    while bottleneck() < goal and len(moved) < max_moves:
        on = np.flatnonzero((length > 0) & ~free)
        if on.size == 0:
            break
        a, k = start[on], length[on]
        lv = np.floor(np.log2(k)).astype(np.int64)
        rtab = _sparse_table(moves.rate, np.inf)
        left = np.minimum(rtab[lv, a], rtab[lv, a + k - (1 << lv)]) - grid.speed[on] / k
        donors = on[np.lexsort((on, -left))[:_DONORS_PER_MOVE]]
        best: tuple[float, float, int, int, int] | None = None
        for i in donors.tolist():
            key_min, soft, starts, ks, here = moves.options(i)
            j = int(np.lexsort((soft, -key_min))[0])
            improves = key_min[j] > key_min[here] or (
                key_min[j] == key_min[here] and soft[j] < soft[here] * (1.0 - 1e-6)
            )
            if improves and (best is None or (key_min[j], -soft[j]) > (best[0], best[1])):
                best = (float(key_min[j]), float(-soft[j]), i, int(starts[j]), int(ks[j]))
        if best is None:
            break
        _, _, i, a1, k1 = best
        moves.move(i, a1, k1)
        moved.add(i)
    return len(moved)


def rebalance(
    model: ModelShape,
    nodes: Sequence[NodeCapacity],
    current: Mapping[str, tuple[int, int]],
    *,
    min_gain: float = 0.15,
    min_replicas: int = 2,
) -> dict[str, tuple[int, int]]:
    """The plan to use after nodes joined or left: ``current`` unless a change clearly pays.

    Moving a node costs a weight download and breaks its sessions, so the current plan (restricted
    to live nodes whose span still fits their memory; a plan with an empty layer counts as 0) is
    kept unless a candidate's bottleneck beats it by more than ``min_gain`` (relative). Candidates,
    cheapest first: (1) keep every span, place joiners in the weakest windows and, if a layer is
    still empty, move the fewest spare nodes onto it; (2) the fresh ``plan_spans`` plan. (1) is
    taken when it passes the threshold (restoring coverage always does) unless (2) beats (1) by
    the threshold again. That last condition makes every result a fixed point: ``rebalance`` of its
    own output returns it unchanged, so plans never thrash. When memory cannot hold the model at
    all, the live plan is returned (routing reports the missing layer).

    A joiner that alone improves the bottleneck by less than ``min_gain`` stays unplaced until
    enough joiners accumulate (a 1-in-1000 node never passes 15% by itself); pass a smaller
    ``min_gain`` where idle joiners matter more than stability.
    """
    _check_min_replicas(min_replicas)
    if (
        not isinstance(min_gain, int | float)
        or isinstance(min_gain, bool)
        or not math.isfinite(min_gain)
        or min_gain < 0
    ):
        raise ConfigError(f"min_gain must be a finite number >= 0, got {min_gain!r}")
    _validate_spans(model, current)
    L = model.num_layers
    grid = _grid(model, nodes)
    start = np.zeros(grid.n, dtype=np.int64)
    length = np.zeros(grid.n, dtype=np.int64)
    for i, nid in enumerate(grid.ids):
        span = current.get(nid)
        if span is not None and span[1] - span[0] <= grid.cap[i]:  # still fits the node's memory
            start[i], length[i] = span[0], span[1] - span[0]
    live = _to_dict(grid, start, length)
    base = _bottleneck_of(*_profile(L, grid.speed, start, length))
    if int(grid.cap.sum()) < L:
        return live
    f_start, f_length, c = _plan(grid, L, min_replicas)
    full = _to_dict(grid, f_start, f_length)
    b_full = _bottleneck_of(*_profile(L, grid.speed, f_start, f_length))

    joiners = length == 0
    if int(joiners.sum()) > GREEDY_JOIN_LIMIT and int(grid.cap[joiners].sum()) >= L:
        sub = grid.subset(joiners)
        j_start, j_length, _ = _plan(sub, L, 1)
        start[joiners], length[joiners] = j_start, j_length
    elif joiners.any():
        _place_greedily(grid, L, start, length, np.flatnonzero(joiners).tolist(), c)
    _fill_holes(grid, L, start, length, c, L)
    rate, count = _profile(L, grid.speed, start, length)
    b_inc = _bottleneck_of(rate, count)
    if b_full > b_inc * (1.0 + min_gain) and int(count.min()) > 0:
        goal = b_full / (1.0 + min_gain) * (1.0 + 1e-9)
        floor = min(min_replicas, int(count.min()))
        _few_moves(grid, L, start, length, joiners, floor, goal, max(2, min(MAX_REBALANCE_MOVES, grid.n // 2)))
        b_inc = _bottleneck_of(*_profile(L, grid.speed, start, length))
    incremental = _to_dict(grid, start, length)

    threshold = base * (1.0 + min_gain)
    # The fresh plan is a reshuffle: only worth it when it moves few nodes, or when the kept spans
    # cannot even serve every layer. Otherwise a big grid under churn would move thousands of
    # nodes (each re-downloading weights and dropping its sessions) on one departure.
    full_ok = len(_moved(live, full)) <= MAX_REBALANCE_MOVES or int(count.min()) == 0
    if incremental != live and b_inc > threshold and (b_full <= b_inc * (1.0 + min_gain) or not full_ok):
        return incremental
    if b_full > threshold and full_ok:
        return full
    return live


def _moved(before: Mapping[str, Span], after: Mapping[str, Span]) -> list[str]:
    """Nodes that had a span in ``before`` and hold a different one (or none) in ``after``."""
    return [nid for nid, span in before.items() if after.get(nid) != span]
