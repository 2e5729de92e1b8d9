"""The two schedulers compared, as the knobs where they differ.

Ours (the real code): spans from ``plan_spans`` / ``rebalance``; routes from ``plan_route``
seeing each host's load and queue; a node without room in its KV budget is left out; after a
failure the client asks for a whole new route without the failed node and replays the session
on it (``RemotePipeline``: at most 3 failovers per token, 10 s to get a route, else the request
fails).

Baseline (Petals): spans by weakest window; routes from the same ``plan_route`` but blind to
load (Petals' min-latency Dijkstra: round trips plus 1 / inference_rps per block, no load term),
leaving out a server unless it has twice the session's cache left (``_has_cache_for``); after a
failure the client retries, replacing only the failed server's span and replaying its inputs
there, after an exponential back-off (0 s, 1 s, 2 s, ... up to 60 s, unlimited retries).
Both give up at the request deadline.
"""

from __future__ import annotations

from dataclasses import dataclass

from engine.sim.config import SimConfig
from engine.sim.gpus import SimModel
from engine.sim.placement import OursPlacement, PetalsPlacement, Placement

#: RemotePipeline defaults: route replacements per token, and how long to wait for a route
MAX_FAILOVERS = 3
ROUTE_WAIT_S = 10.0
#: how often our client asks again for a route while none exists (the real one polls every 0.2 s;
#: once a second keeps the number of simulated decisions down)
ROUTE_RETRY_S = 1.0
#: Petals ClientConfig: min_backoff, max_backoff
MIN_BACKOFF_S = 1.0
MAX_BACKOFF_S = 60.0


@dataclass(frozen=True)
class Policy:
    name: str
    load_aware: bool
    #: a host is routed through only if its free KV budget is at least this many times the session's length
    kv_factor: int
    #: True: repair only the failed span with back-off (Petals); False: new whole route (ours)
    repair: bool
    placement: Placement


def backoff_s(attempt: int) -> float:
    """Petals' delay before retry number ``attempt`` (0 = the first try after a failure)."""
    return 0.0 if attempt <= 0 else min(MIN_BACKOFF_S * 2 ** (attempt - 1), MAX_BACKOFF_S)


def ours(cfg: SimConfig, model: SimModel) -> Policy:
    return Policy("ours", True, 1, False, OursPlacement(model, cfg.rebalance_s, cfg.min_gain))


def baseline(cfg: SimConfig, model: SimModel) -> Policy:
    return Policy("baseline", False, 2, True, PetalsPlacement(model))
