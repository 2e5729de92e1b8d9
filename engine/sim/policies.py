"""The two schedulers compared, as the knobs where they differ.

Ours (the real code): spans from ``plan_spans`` / ``rebalance``; routes from ``plan_route``
seeing each host's load and queue; a node without room in its KV budget is left out; after a
failure the client asks for a whole new route without the failed node and replays the session
on it (``RemotePipeline``: at most 3 failovers per token, 10 s to get a route, else the request
fails).

Baseline (Petals): spans by weakest window; routes from the same ``plan_route`` but blind to
load (Petals' min-latency Dijkstra: round trips plus 1 / inference_rps per block, no load term),
leaving out a server unless it has twice the session's cache left (``_has_cache_for``). Its
failover is one of two (``SimConfig.baseline_failover``):

  retry    the issue's baseline, "failover by retry": the request starts again from scratch on
           a new min-latency route (prompt prefilled again, the tokens generated so far
           discarded and generated again; the client only streams tokens past those it already
           had). No route: Petals' exponential back-off (0 s, 1 s, 2 s, ... up to 60 s).
  replay   Petals' own client (stronger than the issue's baseline): only the failed server's
           span is replaced and its inputs replayed there, with the same back-off.

Neither has a retry budget (Petals' ``max_retries`` defaults to unlimited): a baseline request
fails only at its deadline. Ours also gives up at the deadline, or earlier by the rules above.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Literal

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


#: "reroute": new whole route, replay the session on it (ours); "replay": replace the failed span
#: and replay it (Petals); "retry": restart the request from scratch on a new route
Failover = Literal["reroute", "replay", "retry"]


@dataclass(frozen=True)
class Policy:
    name: str
    load_aware: bool
    #: a host is routed through only if its free KV budget is at least this many times the session's length
    kv_factor: int
    failover: Failover
    placement: Placement


def backoff_s(attempt: int) -> float:
    """Petals' delay before retry number ``attempt`` (0 = the first try after a failure)."""
    return 0.0 if attempt <= 0 else min(MIN_BACKOFF_S * 2 ** (attempt - 1), MAX_BACKOFF_S)


def ours(cfg: SimConfig, model: SimModel) -> Policy:
    return Policy("ours", True, 1, "reroute", OursPlacement(model, cfg.rebalance_s, cfg.min_gain))


def baseline(cfg: SimConfig, model: SimModel) -> Policy:
    failover: Failover = "replay" if cfg.baseline_failover == "replay" else "retry"
    return Policy("baseline", False, 2, failover, PetalsPlacement(model))
