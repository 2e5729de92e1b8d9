"""``kluster sim``: our scheduler against a Petals-style baseline on a simulated grid (engine.sim).

Prints one table (or one JSON object with --json) and optionally writes a PNG plot. Progress goes
to stderr when it is a terminal.
"""

from __future__ import annotations

import argparse
import json
import logging
import sys
from pathlib import Path
from typing import Any

from engine.errors import ConfigError

log = logging.getLogger(__name__)


def register(sub: Any) -> None:
    p = sub.add_parser("sim", help="simulate the grid: our scheduler vs a Petals-style baseline")
    p.add_argument("--nodes", type=int, default=10_000, help="nodes online at the start (default 10000)")
    p.add_argument("--clients", type=int, default=None, help="concurrent users (default nodes / 20)")
    p.add_argument(
        "--duration", type=float, default=600.0, help="simulated seconds of requests; those in flight then run on (600)"
    )
    p.add_argument("--warmup", type=float, default=180.0, help="seconds not measured at the start (default 180)")
    p.add_argument("--seed", type=int, default=0, help="trace seed: same seed, same trace (default 0)")
    p.add_argument(
        "--node-life", type=float, default=3600.0, help="mean node session in s, heavy-tailed; 0 = no churn (3600)"
    )
    p.add_argument("--long-share", type=float, default=0.2, help="share of long generations (default 0.2)")
    p.add_argument(
        "--deadline", type=float, default=60.0, help="a request fails after this many s plus --deadline-per-token"
    )
    p.add_argument("--deadline-per-token", type=float, default=0.25, help="deadline s per generated token (0.25)")
    p.add_argument(
        "--baseline-failover",
        choices=("retry", "replay"),
        default="retry",
        help="retry: restart the request from scratch on a new route (default, the issue's baseline); "
        "replay: Petals' client, replace the failed span and replay it there",
    )
    p.add_argument("--rebalance", type=float, default=30.0, help="seconds between our rebalance calls (default 30)")
    p.add_argument("--min-gain", type=float, default=0.15, help="rebalance min_gain (default 0.15)")
    p.add_argument(
        "--ping-error", type=float, default=0.15, help="lognormal sigma of clients' ping errors (default 0.15)"
    )
    p.add_argument("--json", action="store_true", help="print one JSON object")
    p.add_argument("--plot", type=Path, default=None, metavar="FILE.png", help="also write a plot (needs matplotlib)")
    p.set_defaults(handler=run)


def run(args: argparse.Namespace) -> int:
    from engine.sim import SimConfig
    from engine.sim import run as simulate
    from engine.sim.report import plot, table

    if args.plot is not None and args.plot.suffix.lower() != ".png":
        raise ConfigError(f"--plot must name a .png file, got '{args.plot}'")
    if args.plot is not None and not args.plot.parent.is_dir():
        raise ConfigError(f"--plot: folder '{args.plot.parent}' does not exist")
    cfg = SimConfig(
        nodes=args.nodes,
        clients=args.clients,
        duration_s=args.duration,
        warmup_s=args.warmup,
        seed=args.seed,
        node_mean_life_s=args.node_life,
        long_share=args.long_share,
        deadline_s=args.deadline,
        deadline_per_token_s=args.deadline_per_token,
        baseline_failover=args.baseline_failover,
        rebalance_s=args.rebalance,
        min_gain=args.min_gain,
        ping_error=args.ping_error,
    )
    result, ours, base = simulate(cfg, progress=sys.stderr.isatty())
    if args.plot is not None:
        plot(result, ours, base, cfg.dt_s, args.plot)
        log.info("plot written to %s", args.plot)
    print(json.dumps(result) if args.json else table(result))
    return 0
