"""``kluster sim``: a discrete-event simulation of the grid that runs the real scheduler code.

Both policies replay one trace (``workload``): heterogeneous GPUs (``gpus``), heavy-tailed node
churn, internet round trips between regions (``latency``) and a closed population of clients.
Ours places spans with ``plan_spans``/``rebalance`` and routes with the load-aware
``plan_route``; the baseline is Petals (``petals``, ``policies``), failing over by retrying the
request from scratch (the issue's baseline, default) or by Petals' own span replay. Token
progress follows a queueing model (``fluid``); ``engine`` steps through time, ``report`` prints
and plots. Requests are measured by when they were sent and followed to their end, so each one
is completed or failed (at its deadline); throughput counts new tokens only (not the ones a
retry generates again), including those of requests that later fail.

  gpus, latency, workload   the world: model and cards, network, trace
  config                    SimConfig (validated knobs)
  placement, petals         span placement, ours and Petals'
  policies, routes          the compared policies; route decisions and their costs
  grid, fluid, engine       live state, token rates, the time loop
  metrics, report           measurements, table, JSON, plot

Limits of the model, the same for both policies: token rates come from a queueing
approximation updated once per step, not from per-token events; a node runs one decode step at
a time (no batching across sessions); tokens travel client -> hosts -> client; a node given a
new span stops serving until it has downloaded the layers it lacks. Where the baseline departs
from Petals (its balance check, its ping coverage) the departure is documented in ``petals``
and ``latency``.
"""

from __future__ import annotations

import gc
import time
from typing import Any

from engine.sim.config import SimConfig
from engine.sim.engine import Simulation
from engine.sim.gpus import LLAMA_70B, SimModel
from engine.sim.policies import baseline, ours
from engine.sim.report import RunResult, compare
from engine.sim.workload import make_trace

__all__ = ["SimConfig", "run"]


def run(
    cfg: SimConfig, *, model: SimModel = LLAMA_70B, progress: bool = False
) -> tuple[dict[str, Any], RunResult, RunResult]:
    """Simulate both policies on one trace: (comparison dict, our run, the baseline's run)."""
    wall = time.perf_counter()
    trace = make_trace(cfg, model)
    # The trace (~10^5 long-lived objects) would otherwise be rescanned by every full garbage
    # collection, and those pauses would land inside the timed routing decisions.
    gc.collect()
    gc.freeze()
    try:
        mine = Simulation(trace, model, ours(cfg, model)).run(progress)
        theirs = Simulation(trace, model, baseline(cfg, model)).run(progress)
    finally:
        gc.unfreeze()
    return compare(cfg, model.name, mine, theirs, time.perf_counter() - wall), mine, theirs
