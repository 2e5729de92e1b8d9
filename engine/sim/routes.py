"""Route decisions through the real ``plan_route``, and what a route costs a token or a replay.

A token travels client -> h1 -> ... -> hk -> client (the ring both latency models assume): each
edge costs half the true round trip, each hop a fixed ``HOP_OVERHEAD_S`` (serialisation, kernel
launches) on top of its compute, which the queueing model adds.
"""

from __future__ import annotations

from collections.abc import Callable

from engine.scheduler.routing import HostView, plan_route
from engine.sim.gpus import prefill_s
from engine.sim.grid import Grid
from engine.sim.latency import Network

Hop = tuple[int, int, int]  # (node index, first layer, end layer)

HOP_OVERHEAD_S = 0.005


def full_route(grid: Grid, rtt: Callable[[str, str], float], client: str, exclude: frozenset[str]) -> list[Hop]:
    """The whole ring for a new session (or ours after a failure): raises ``NoRouteError``."""
    route = plan_route(grid.model.num_layers, list(grid.views.values()), rtt, client=client, exclude=exclude)
    return [(grid.index[nid], a, b) for nid, a, b in route]


def sub_route(
    grid: Grid, start: int, end: int, rtt: Callable[[str, str], float], client: str, exclude: frozenset[str]
) -> list[Hop]:
    """Hosts for layers [start, end) only (Petals replaces just the failed span): raises ``NoRouteError``.

    Hosts are clipped to the window so the real router sees a model of ``end - start`` layers.
    """
    hosts = [
        HostView(v.node_id, max(v.start, start) - start, min(v.end, end) - start, v.layers_per_s, v.load, v.queue)
        for v in grid.views.values()
        if v.start < end and v.end > start and v.node_id not in exclude
    ]
    route = plan_route(end - start, hosts, rtt, client=client)
    return [(grid.index[nid], a + start, b + start) for nid, a, b in route]


def ring_delay_s(grid: Grid, net: Network, hops: list[Hop], client: str) -> float:
    """Per-token time outside the nodes' queues: network edges plus per-hop overhead."""
    total, prev = 0.0, client
    for i, _, _ in hops:
        nid = grid.ids[i]
        total += net.rtt(prev, nid) / 2000.0 + HOP_OVERHEAD_S
        prev = nid
    return total + net.rtt(prev, client) / 2000.0


def replay_s(grid: Grid, net: Network, hops: list[Hop], client: str, tokens: int) -> float:
    """Prefill (or failover replay) of ``tokens`` tokens through ``hops``, slowed by their current queues.

    Each hop receives the tokens' hidden states (2 bytes per value) over its uplink figure.
    """
    model = grid.model
    total, prev = 0.0, client
    for i, a, b in hops:
        node = grid.nodes[i]
        nid = grid.ids[i]
        transfer = tokens * model.hidden_size * 16 / node.uplink_bps
        compute = prefill_s(model, b - a, tokens, node.tflops, node.layers_per_s) * (1.0 + float(grid.present[i]))
        total += net.rtt(prev, nid) / 2000.0 + transfer + compute + HOP_OVERHEAD_S
        prev = nid
    return total + net.rtt(prev, client) / 2000.0
