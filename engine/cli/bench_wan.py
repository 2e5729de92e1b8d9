"""``kluster bench wan``: time per token over an emulated WAN against the physics floor.

Three nodes, each on its own emulated host (network namespaces, ``engine.wanemu``), serve the
default model in three fragments; every host's outgoing traffic is delayed by ``--delay-ms`` and
loses ``--loss`` of its packets. In ring mode a token travels n1 -> n2 -> n3 -> n1, so the
floor per token is the sum of the one-way delays along that chain plus the compute of the three
hops. The ratio (time per token / floor) says how much the transport and scheduling add on top:
1.0 is perfect; a star through the client (each hop's output back to the client and out
again) would be about 2. The same run measures the path without loss for comparison. Needs root.
"""

from __future__ import annotations

import argparse
import json
import statistics
import sys
import tempfile
from pathlib import Path
from typing import Any

from engine.errors import ConfigError

PROMPT = "Write a short story about a lighthouse keeper."
NODES = 3
TARGET = 1.15


def register(bsub: Any) -> None:
    p = bsub.add_parser("wan", help="time per token over an emulated WAN vs delay+compute (needs root)")
    p.add_argument("--delay-ms", type=float, default=40.0, help="one-way delay per hop in ms (default 40)")
    p.add_argument("--loss", type=float, default=0.01, help="packet loss per host, 0-0.5 (default 0.01)")
    p.add_argument("--tokens", type=int, default=48, help="tokens per generation (default 48)")
    p.add_argument("--repeats", type=int, default=3, help="generations per condition (default 3)")
    p.add_argument("--json", action="store_true", help="print one JSON object")
    p.set_defaults(handler=run)


def run_stats(done: dict[str, Any], chain_ms: float) -> dict[str, float]:
    """One generation's decode time per token, its compute, and the ratio to the floor."""
    stats = done["stats"]
    if not stats.get("decode_tok_s"):
        raise ConfigError("the generation stopped before decoding; use more --tokens")
    ms_per_token = 1000.0 / float(stats["decode_tok_s"])
    compute_ms = sum(float(h["compute_ms"]) + float(h["queue_ms"]) for h in stats["hops"])
    return {
        "ms_per_token": round(ms_per_token, 2),
        "compute_ms": round(compute_ms, 2),
        "ratio": round(ms_per_token / (chain_ms + compute_ms), 3),
    }


def summarize(runs: list[dict[str, float]]) -> dict[str, float]:
    """Medians over the runs of one condition (a noisy machine makes single runs unreliable)."""
    return {key: round(statistics.median(r[key] for r in runs), 3) for key in runs[0]}


def run(args: argparse.Namespace) -> int:
    from engine.cli.servers import default_pack
    from engine.models.default_model import DEFAULT_MODEL_ID
    from engine.wan_cluster import WanCluster
    from engine.wanemu import unavailable_reason

    if not 0 <= args.delay_ms <= 1000:
        raise ConfigError(f"--delay-ms must be 0-1000, got {args.delay_ms:g}")
    if not 0 <= args.loss <= 0.5:
        raise ConfigError(f"--loss must be 0-0.5, got {args.loss:g}")
    if not 8 <= args.tokens <= 512 or not 1 <= args.repeats <= 20:
        raise ConfigError("--tokens must be 8-512 and --repeats 1-20")
    reason = unavailable_reason()
    if reason is not None:
        raise ConfigError(f"kluster bench wan emulates a network in namespaces and needs root: {reason}")
    say = (lambda *_: None) if args.json else (lambda m: print(m, file=sys.stderr, flush=True))
    chain_ms = NODES * args.delay_ms
    conditions = [0.0, args.loss] if args.loss > 0 else [0.0]
    results: dict[str, dict[str, float]] = {}
    pack = default_pack(NODES)
    with tempfile.TemporaryDirectory(prefix="kluster-wan-") as tmp:
        say(f"starting a coordinator, a client and {NODES} nodes on emulated hosts ...")
        with WanCluster(pack, NODES, Path(tmp), model_id=DEFAULT_MODEL_ID, seed=1) as grid:
            for loss in conditions:
                for host in ("coord", "client", *(f"n{i}" for i in range(1, NODES + 1))):
                    grid.topo.set_link(host, delay_ms=args.delay_ms, loss=loss)
                grid.generate(PROMPT, 4)  # warm-up: links open, caches hot
                runs = []
                for i in range(args.repeats):
                    say(f"{args.delay_ms:g} ms one-way, {loss:.1%} loss: run {i + 1} of {args.repeats} ...")
                    events = grid.generate(PROMPT, args.tokens)
                    runs.append(run_stats(next(e for e in events if e["event"] == "done"), chain_ms))
                results[f"{loss:g}"] = summarize(runs)
    result = {
        "delay_ms": args.delay_ms,
        "hops": NODES,
        "chain_ms": chain_ms,
        "tokens": args.tokens,
        "repeats": args.repeats,
        "by_loss": results,
        "ratio": results[f"{args.loss:g}"]["ratio"],
        "target": TARGET,
    }
    if args.json:
        print(json.dumps(result))
        return 0
    print(
        f"kluster bench wan: {NODES} nodes in a ring, {args.delay_ms:g} ms one-way per hop, "
        f"{args.tokens} tokens, median of {args.repeats}"
    )
    print(f"{'loss':>8}{'ms/token':>12}{'chain ms':>10}{'compute ms':>12}{'ratio':>9}{'target':>10}")
    for loss, r in results.items():
        print(
            f"{float(loss):8.1%}{r['ms_per_token']:12.1f}{chain_ms:10.1f}{r['compute_ms']:12.1f}"
            f"{r['ratio']:9.3f}{'<= ' + str(TARGET):>10}"
        )
    print("ratio = time per token / (sum of one-way delays along the chain + compute); a star would be ~2")
    return 0
