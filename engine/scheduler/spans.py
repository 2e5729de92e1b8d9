"""Which contiguous layer span [start, end) each node serves: throughput-aware, replicated, stable.

The quantity optimised is the grid's *bottleneck throughput*: a node serving k layers at a measured
``layers_per_s`` of s spends its compute across its span, so it adds s/k token-passes per second to
each of those layers; a layer's throughput is the sum over its hosts, and the grid sustains the
minimum over layers. Summed over layers, every node contributes exactly s whatever its span, so
S/L (total measured speed over layer count) is an upper bound, reached exactly when every layer
receives the same total.

``plan_spans`` reaches that bound by building *lanes*: disjoint groups of nodes, each of which
covers all L layers once as a chain. Inside a lane a node's span length is proportional to its
speed (k_i = L * s_i / S_lane), so every hop of the chain is equally fast and the lane adds the
same S_lane / L to every layer; summing lanes gives S / L whatever the grouping. The number of
lanes is the number of full copies of the model, so it is at least ``min_replicas`` when memory
allows; beyond that it is chosen so that spans are as long as memory lets most of the throughput
have (long spans mean fewer network hops per token). Memory caps and integer rounding are the only
sources of unevenness; lanes are laid out so their uneven parts fall on different layers.

``rebalance`` keeps an existing plan unless a new one is clearly (``min_gain``) better, and when
it changes prefers the plan that moves nobody: joiners take the weakest windows, Petals-style, and
a hole left by a departed node is filled by moving as few well-replicated nodes as possible.

All functions are pure and deterministic (ties are broken by node_id); callers may pass nodes in
any order.
"""

from __future__ import annotations

import heapq
import logging
import math
from collections.abc import Mapping, Sequence
from dataclasses import dataclass

import numpy as np

from engine.errors import ConfigError, NoRouteError
from engine.scheduler.capacity import ModelShape, NodeCapacity

log = logging.getLogger(__name__)

Span = tuple[int, int]

#: Speed-weighted share of the grid's throughput allowed to have its proportional span cut short by
#: memory when choosing the span scale. Higher means longer spans (fewer hops) but more unevenness.
CAPPED_SHARE = 0.1
#: Up to this many joiners are placed one by one in the weakest windows; a larger batch that can
#: cover the model by itself is given lanes of its own (same result on a large batch, far cheaper).
GREEDY_JOIN_LIMIT = 32
#: How many lane counts below the preferred one are tried before the plain memory-packing fallback.
_LANE_RETRIES = 4
import os
_DEBUG = bool(os.environ.get('SPANS_DEBUG'))


@dataclass(frozen=True, slots=True)
class _Node:
    """A useful node reduced to what planning needs: id, measured speed, layer capacity."""

    node_id: str
    speed: float
    cap: int


# ------------------------------------------------------------------------------------------ helpers


def _useful_nodes(model: ModelShape, nodes: Sequence[NodeCapacity]) -> list[_Node]:
    """Nodes that can hold at least one layer and computed a non-zero speed, fastest first.

    Only the measured ``layers_per_s`` is read here, never ``claimed_layers_per_s``.
    """
    seen: set[str] = set()
    out: list[_Node] = []
    for n in nodes:
        if n.node_id in seen:
            raise ConfigError(f"node '{n.node_id}' is listed twice")
        seen.add(n.node_id)
        cap = model.max_layers(n)
        if cap >= 1 and n.layers_per_s > 0:
            out.append(_Node(n.node_id, float(n.layers_per_s), cap))
    out.sort(key=lambda n: (-n.speed, n.node_id))
    return out


def _check_min_replicas(min_replicas: int) -> None:
    if not isinstance(min_replicas, int) or isinstance(min_replicas, bool) or min_replicas < 1:
        raise ConfigError(f"min_replicas must be an integer >= 1, got {min_replicas!r}")


def _water_level(speeds: Sequence[float], lo: Sequence[float], hi: Sequence[float], target: float) -> float:
    """The scale c with sum(clamp(c * s_i, lo_i, hi_i)) == target (target clipped to the feasible range).

    The sum is piecewise linear and non-decreasing in c, so a sweep over the breakpoints
    (c = lo_i / s_i where node i starts growing, c = hi_i / s_i where it stops) solves it exactly
    in O(n log n): the span lengths proportional to speed, capped by memory, that use exactly
    ``target`` layer slots.
    """
    total_lo = math.fsum(lo)
    total_hi = math.fsum(hi)
    if target <= total_lo:
        return min(lv / s for lv, s in zip(lo, speeds, strict=True))
    if target >= total_hi:
        return max(hv / s for hv, s in zip(hi, speeds, strict=True))
    events: list[tuple[float, int, float]] = []
    for s, lv, hv in zip(speeds, lo, hi, strict=True):
        events.append((lv / s, 0, s))  # node starts growing past its lower bound
        events.append((hv / s, 1, s))  # node reaches its upper bound
    events.sort()
    value = total_lo
    slope = 0.0
    c_prev = events[0][0]
    for c, kind, s in events:
        nxt = value + slope * (c - c_prev)
        if nxt >= target and slope > 0:
            return c_prev + (target - value) / slope
        value, c_prev = nxt, c
        slope += s if kind == 0 else -s  # the sum is continuous: only its slope changes here
    return c_prev


def _clamp(x: float, lo: float, hi: float) -> float:
    return lo if x < lo else hi if x > hi else x


def _lane_counts(useful: Sequence[_Node], num_layers: int, min_replicas: int) -> tuple[int, int, int]:
    """Candidate numbers of lanes (full copies): (fewest, preferred, most).

    Fewest: ``min_replicas`` and enough lanes for every node to fit in one (a lane holds at most L
    nodes). Most: what the total memory allows. Preferred: as many lanes as the memory of the nodes
    holding all but ``CAPPED_SHARE`` of the throughput allows at proportional lengths, since longer
    spans mean fewer hops per token and less rounding, at no cost in bottleneck throughput until
    memory caps start to bind. All three are clipped to [1, most].
    """
    L = num_layers
    r_hi = max(1, sum(n.cap for n in useful) // L)
    total_speed = math.fsum(n.speed for n in useful)
    # Speed-weighted quantile of cap/speed: at a scale c below it, nodes holding at least
    # (1 - CAPPED_SHARE) of the throughput get their full proportional span c * speed.
    ratios = sorted((n.cap / n.speed, n.speed) for n in useful)
    acc = 0.0
    c_mem = ratios[-1][0]
    for ratio, s in ratios:
        acc += s
        if acc >= CAPPED_SHARE * total_speed:
            c_mem = ratio
            break
    pref = math.fsum(_clamp(c_mem * n.speed, 1.0, float(n.cap)) for n in useful)
    r_lo = min(r_hi, max(min_replicas, -(-len(useful) // L), 1))
    r_pref = min(r_hi, max(r_lo, int(pref // L)))
    return r_lo, r_pref, r_hi


def _lpt(
    useful: Sequence[_Node], weights: Sequence[float], lanes: int, num_layers: int
) -> tuple[list[list[int]], list[int]]:
    """Longest-processing-time partition of node indices into ``lanes`` groups with even weight sums.

    Even sums mean every lane's proportional spans need the same scale, so span length stays
    proportional to speed across lanes, not only within one. A lane takes at most L nodes (each
    needs a layer); nodes that find no room are returned as extras.
    """
    order = sorted(range(len(useful)), key=lambda i: (-weights[i], -useful[i].speed, useful[i].node_id))
    heap = [(0.0, j) for j in range(lanes)]
    groups: list[list[int]] = [[] for _ in range(lanes)]
    extras: list[int] = []
    for i in order:
        if not heap:
            extras.append(i)
            continue
        total, j = heapq.heappop(heap)
        groups[j].append(i)
        if len(groups[j]) < num_layers:
            heapq.heappush(heap, (total + weights[i], j))
    return groups, extras


def _next_fit_by_cap(useful: Sequence[_Node], num_layers: int) -> tuple[list[list[int]], list[int]]:
    """Fallback packing that only cares about memory: fill lanes with the largest nodes first.

    Always yields at least one lane when the total capacity covers the model once.
    """
    order = sorted(range(len(useful)), key=lambda i: (-useful[i].cap, -useful[i].speed, useful[i].node_id))
    groups: list[list[int]] = []
    current: list[int] = []
    room = 0
    for i in order:
        current.append(i)
        room += useful[i].cap
        if room >= num_layers:
            groups.append(current)
            current, room = [], 0
    return groups, current


def _lane_lengths(members: Sequence[_Node], num_layers: int) -> list[int] | None:
    """Integer span lengths for one lane: proportional to speed, capped by memory, summing to L.

    Largest-remainder rounding keeps every length within one layer of its exact proportional
    value. None when the lane's memory cannot cover the model.
    """
    if sum(m.cap for m in members) < num_layers or len(members) > num_layers:
        return None
    speeds = [m.speed for m in members]
    lo = [1.0] * len(members)
    hi = [float(m.cap) for m in members]
    c = _water_level(speeds, lo, hi, float(num_layers))
    exact = [_clamp(c * m.speed, 1.0, float(m.cap)) for m in members]
    lengths = [min(m.cap, max(1, math.floor(x))) for m, x in zip(members, exact, strict=True)]
    short = num_layers - sum(lengths)
    if short < 0:  # float noise pushed a floor up; take back from the largest remainders' opposite
        order = sorted(range(len(members)), key=lambda i: (exact[i] - lengths[i], members[i].node_id))
        for i in order:
            if short == 0:
                break
            if lengths[i] > 1:
                lengths[i] -= 1
                short += 1
    order = sorted(range(len(members)), key=lambda i: (-(exact[i] - lengths[i]), -members[i].speed, members[i].node_id))
    while short > 0:
        progressed = False
        for i in order:
            if short == 0:
                break
            if lengths[i] < members[i].cap:
                lengths[i] += 1
                short -= 1
                progressed = True
        if not progressed:
            return None
    return lengths


def _build_lanes(
    useful: Sequence[_Node], num_layers: int, lanes: int, c: float
) -> tuple[list[tuple[list[int], list[int]]], list[int]] | None:
    """Partition into ``lanes`` feasible lanes (members, lengths), or None if this lane count fails."""
    proportional = [_clamp(c * n.speed, 1.0, float(n.cap)) for n in useful]
    for weights in (proportional, [float(n.cap) for n in useful]):
        groups, extras = _lpt(useful, weights, lanes, num_layers)
        built: list[tuple[list[int], list[int]]] = []
        for g in groups:
            lengths = _lane_lengths([useful[i] for i in g], num_layers)
            if lengths is None:
                break
            built.append((g, lengths))
        else:
            return built, extras
    return None


def _profile(num_layers: int, placed: Mapping[str, Span], speed: Mapping[str, float]) -> tuple[np.ndarray, np.ndarray]:
    """Per-layer throughput and host count of a plan (plan entries in node_id order: deterministic)."""
    rate = np.zeros(num_layers + 1)
    count = np.zeros(num_layers + 1, dtype=np.int64)
    for nid in sorted(placed):
        a, b = placed[nid]
        r = speed[nid] / (b - a)
        rate[a] += r
        rate[b] -= r
        count[a] += 1
        count[b] -= 1
    return np.cumsum(rate)[:num_layers], np.cumsum(count)[:num_layers]


def _arrange(
    useful: Sequence[_Node], built: Sequence[tuple[list[int], list[int]]], num_layers: int
) -> tuple[dict[str, Span], np.ndarray]:
    """Lay each lane out as a chain, ordering its nodes so uneven parts land on weak layers.

    A lane whose hops all have the same rate is uniform in any order. Otherwise (memory caps,
    rounding) its fast-per-layer hops are put at the end or the start of the chain, whichever
    leaves the running per-layer total higher at its minimum and flatter, so the uneven parts of
    different lanes do not pile onto the same layers.
    """
    total = np.zeros(num_layers)
    out: dict[str, Span] = {}
    for members, lengths in built:
        rates = [useful[i].speed / k for i, k in zip(members, lengths, strict=True)]
        asc = sorted(range(len(members)), key=lambda j: (rates[j], useful[members[j]].node_id))
        candidates = [asc]
        if len(members) > 1 and max(rates) - min(rates) > 1e-12 * max(rates):
            candidates.append(asc[::-1])
        best: tuple[float, float] | None = None
        chosen = asc
        chosen_profile = None
        for order in candidates:
            prof = total + np.repeat([rates[j] for j in order], [lengths[j] for j in order])
            score = (float(prof.min()), -float(np.dot(prof, prof)))
            if best is None or score > best:
                best, chosen, chosen_profile = score, order, prof
        pos = 0
        for j in chosen:
            out[useful[members[j]].node_id] = (pos, pos + lengths[j])
            pos += lengths[j]
        total = chosen_profile if chosen_profile is not None else total
    return out, total


def _quantize(values: np.ndarray, scale: float) -> np.ndarray:
    """Round away float noise so that equal-in-principle scores tie and the id tie-break decides."""
    return np.round(values / (scale if scale > 0 else 1.0), 9)


def _best_window(
    rate: np.ndarray, count: np.ndarray, speed: float, lengths: Sequence[int], target: int
) -> tuple[int, int]:
    """The (start, length) a node of ``speed`` should take given the current per-layer profile.

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
                    _quantize(new_min, scale),
                    (zeros[starts + k] - zeros[starts]).astype(float),
                    -np.full(starts.shape, abs(k - target), dtype=float),
                    -_quantize(sums[starts + k] - sums[starts], scale * k),
                    -starts.astype(float),
                ]
            )
        )
        starts_all.append(starts)
        lens_all.append(np.full(starts.shape, k))
    key = np.concatenate(keys, axis=1)
    best = int(np.lexsort(key[::-1])[-1])  # lexsort sorts by the last key first
    return int(np.concatenate(starts_all)[best]), int(np.concatenate(lens_all)[best])


def _place_greedily(
    num_layers: int,
    placed: dict[str, Span],
    speed: Mapping[str, float],
    joiners: Sequence[_Node],
    c: float,
) -> None:
    """Give each joiner, in order, its best window on top of ``placed`` (mutated)."""
    rate, count = _profile(num_layers, placed, speed)
    for n in joiners:
        target = max(1, min(n.cap, round(c * n.speed)))
        start, k = _best_window(rate, count, n.speed, (target, n.cap), target)
        placed[n.node_id] = (start, start + k)
        rate[start : start + k] += n.speed / k
        count[start : start + k] += 1


def _plan_with_lanes(
    useful: Sequence[_Node], num_layers: int, lanes: int
) -> tuple[dict[str, Span], float, float] | None:
    """The plan with exactly ``lanes`` lanes: (spans, scale c, bottleneck), or None if they cannot be packed."""
    L = num_layers
    c = _water_level([n.speed for n in useful], [1.0] * len(useful), [float(n.cap) for n in useful], float(lanes * L))
    result = _build_lanes(useful, L, lanes, c)
    if result is None:
        return None
    return _finish(useful, L, result, c)


def _finish(
    useful: Sequence[_Node], num_layers: int, result: tuple[list[tuple[list[int], list[int]]], list[int]], c: float
) -> tuple[dict[str, Span], float, float]:
    built, extras = result
    placed, rate = _arrange(useful, built, num_layers)
    if extras:
        speed = {n.node_id: n.speed for n in useful}
        _place_greedily(num_layers, placed, speed, [useful[i] for i in sorted(extras)], c)
        rate, _ = _profile(num_layers, placed, speed)
    return placed, c, float(rate.min()) if built or extras else 0.0


def _plan(useful: Sequence[_Node], num_layers: int, min_replicas: int) -> tuple[dict[str, Span], float]:
    """plan_spans on already-filtered nodes; also returns the span scale c used.

    A few lane counts are built and the highest bottleneck wins; ties go to the preferred count
    (proportional spans of moderate length), then to more lanes.
    """
    L = num_layers
    total_cap = sum(n.cap for n in useful)
    if total_cap < L:
        raise NoRouteError(f"the grid's memory holds {total_cap} layer slots; the model needs {L}")
    r_lo, r_pref, r_hi = _lane_counts(useful, L, min_replicas)
    candidates = sorted({r_lo, r_pref, r_hi, max(r_lo, r_pref - 1), min(r_hi, r_pref + 1), min(r_hi, 2 * r_pref)})
    best: tuple[tuple[float, bool, int], dict[str, Span], float] | None = None
    for r in candidates:
        got = _plan_with_lanes(useful, L, r)
        if got is None:
            continue
        placed, c, bottleneck = got
        if _DEBUG:
            print("lanes", r, "bottleneck", bottleneck, "pref" if r == r_pref else "")
        key = (round(bottleneck, 9), r == r_pref, r)
        if best is None or key > best[0]:
            best = (key, placed, c)
    if best is None:
        for r in range(min(r_lo, r_pref) - 1, max(0, min(r_lo, r_pref) - 1 - _LANE_RETRIES), -1):
            got = _plan_with_lanes(useful, L, r)
            if got is not None:
                return got[0], got[1]
        groups, extras = _next_fit_by_cap(useful, L)
        built = []
        for g in groups:
            lengths = _lane_lengths([useful[i] for i in g], L)
            if lengths is None:  # cannot happen: a next-fit lane holds >= L layers by construction
                extras.extend(g)
            else:
                built.append((g, lengths))
        log.debug("plan_spans: lane packing fell back to memory-first packing (%d lanes)", len(built))
        c = _water_level([n.speed for n in useful], [1.0] * len(useful), [float(n.cap) for n in useful], float(total_cap))
        placed, c, _ = _finish(useful, L, (built, extras), c)
        return placed, c
    return best[1], best[2]


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


def _bottleneck(num_layers: int, placed: Mapping[str, Span], speed: Mapping[str, float]) -> float:
    if not placed:
        return 0.0
    rate, count = _profile(num_layers, placed, speed)
    if int(count.min()) == 0:
        return 0.0
    return max(0.0, float(rate.min()))


# ------------------------------------------------------------------------------------------- public


def plan_spans(
    model: ModelShape, nodes: Sequence[NodeCapacity], *, min_replicas: int = 2
) -> dict[str, tuple[int, int]]:
    """One contiguous span [start, end) per useful node: every layer covered, replicated, fast.

    Every node that can hold a layer and measured a non-zero speed gets a span (more hosts never
    lower the bottleneck). Lanes (see the module docstring) guarantee coverage and ``min_replicas``
    copies whenever memory allows the lanes to be packed, else as many copies as it does; span
    lengths are proportional to *measured* speed within one layer, capped by memory. Raises
    ``NoRouteError`` when the nodes' memory cannot hold the model even once.
    """
    _check_min_replicas(min_replicas)
    useful = _useful_nodes(model, nodes)
    placed, _ = _plan(useful, model.num_layers, min_replicas)
    return dict(sorted(placed.items()))


def bottleneck_throughput(
    model: ModelShape, nodes: Sequence[NodeCapacity], spans: Mapping[str, tuple[int, int]]
) -> float:
    """Tokens per second the grid sustains: min over layers of sum(layers_per_s / span length).

    Spans of nodes not in ``nodes`` are ignored (those nodes are gone); a layer nobody serves
    makes the answer 0.0. Raises ``ConfigError`` for a span outside the model.
    """
    _validate_spans(model, spans)
    speed = {n.node_id: float(n.layers_per_s) for n in nodes}
    live = {nid: s for nid, s in spans.items() if nid in speed}
    return _bottleneck(model.num_layers, live, speed)


def _restrict(model: ModelShape, nodes: Sequence[NodeCapacity], current: Mapping[str, Span]) -> dict[str, Span]:
    """The spans of ``current`` that still make sense: the node is live, useful, and still fits it."""
    by_id = {n.node_id: n for n in nodes}
    live: dict[str, Span] = {}
    for nid, (a, b) in current.items():
        n = by_id.get(nid)
        if n is not None and n.layers_per_s > 0 and b - a <= model.max_layers(n):
            live[nid] = (a, b)
    return live


def _range_min_table(values: np.ndarray) -> list[np.ndarray]:
    """Sparse table: table[j][i] = min(values[i : i + 2**j]), for O(1) vectorised range minima."""
    table = [values]
    j = 1
    while (1 << j) <= values.shape[0]:
        prev = table[-1]
        half = 1 << (j - 1)
        table.append(np.minimum(prev[:-half], prev[half:]))
        j += 1
    return table


def _range_min(table: list[np.ndarray], a: np.ndarray, b: np.ndarray) -> np.ndarray:
    span = b - a
    level = np.floor(np.log2(span)).astype(np.int64)
    out = np.empty(a.shape[0], dtype=table[0].dtype)
    for j in np.unique(level):
        sel = level == j
        t = table[int(j)]
        out[sel] = np.minimum(t[a[sel]], t[b[sel] - (1 << int(j))])
    return out


def _fill_holes(
    num_layers: int, placed: dict[str, Span], speed: Mapping[str, float], caps: Mapping[str, int], c: float
) -> None:
    """Move as few nodes as possible to cover layers nobody serves (``placed`` is mutated).

    Each move takes the node whose departure hurts least: every layer it serves keeps another host,
    and the weakest of those layers stays as strong as possible without it. Each move covers at
    least one empty layer, so this ends; it stops early if no node can be spared.
    """
    for _ in range(num_layers):
        rate, count = _profile(num_layers, placed, speed)
        if int(count.min()) > 0:
            return
        ids = sorted(placed)
        a = np.array([placed[i][0] for i in ids])
        b = np.array([placed[i][1] for i in ids])
        own = np.array([speed[i] / (placed[i][1] - placed[i][0]) for i in ids])
        spare = _range_min(_range_min_table(count), a, b) >= 2
        if not spare.any():
            return
        left = _range_min(_range_min_table(rate), a, b) - own
        cand = np.flatnonzero(spare)
        best = cand[np.lexsort((-np.array([caps[ids[i]] for i in cand]), -left[cand]))[0]]
        donor = ids[int(best)]
        del placed[donor]
        rate, count = _profile(num_layers, placed, speed)
        cap = caps[donor]
        target = max(1, min(cap, round(c * speed[donor])))
        start, k = _best_window(rate, count, speed[donor], (target, cap), target)
        placed[donor] = (start, start + k)
        log.debug("rebalance: moved node '%s' to [%d, %d) to cover an empty layer", donor, start, start + k)


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
    empty, move the fewest spare nodes onto it; (2) the fresh ``plan_spans`` plan. (1) is taken
    when it passes the threshold (or restores coverage) and (2) does not beat (1) by the threshold
    again. That last condition makes the result a fixed point: ``rebalance`` of its own output
    returns it unchanged, so plans never thrash. When memory cannot cover the model at all, the
    live plan is returned as is (routing will report the missing layer).

    Note a joiner that alone improves the bottleneck by less than ``min_gain`` is left unplaced
    until enough joiners accumulate (a 1-in-1000 node never passes 15% on its own); pass a
    smaller ``min_gain`` where idle joiners matter more than stability.
    """
    _check_min_replicas(min_replicas)
    if not isinstance(min_gain, int | float) or not math.isfinite(min_gain) or min_gain < 0:
        raise ConfigError(f"min_gain must be a finite number >= 0, got {min_gain!r}")
    _validate_spans(model, current)
    L = model.num_layers
    useful = _useful_nodes(model, nodes)
    speed = {n.node_id: n.speed for n in useful}
    caps = {n.node_id: n.cap for n in useful}
    live = dict(sorted(_restrict(model, nodes, current).items()))
    base = _bottleneck(L, live, speed)
    try:
        full, c = _plan(useful, L, min_replicas)
    except NoRouteError:
        return live
    full = dict(sorted(full.items()))
    b_full = _bottleneck(L, full, speed)

    incremental = dict(live)
    joiners = [n for n in useful if n.node_id not in live]
    if len(joiners) > GREEDY_JOIN_LIMIT and sum(n.cap for n in joiners) >= L:
        own, _ = _plan(joiners, L, 1)
        incremental.update(own)
    elif joiners:
        _place_greedily(L, incremental, speed, joiners, c)
    _fill_holes(L, incremental, speed, caps, c)
    incremental = dict(sorted(incremental.items()))
    b_inc = _bottleneck(L, incremental, speed)

    threshold = base * (1.0 + min_gain)
    if incremental != live and b_inc > threshold and b_full <= b_inc * (1.0 + min_gain):
        return incremental
    if b_full > threshold:
        return full
    return live
