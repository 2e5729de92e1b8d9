"""The ``kluster`` command: argument parsing, logging set-up and one-line errors.

Every user mistake surfaces as a ``KlusterError`` whose message is printed on one line
(``kluster: error: ...``, exit status 2); a traceback means a bug.

  generate    one prompt through a coordinator's route, or --local in this process
  demo        coordinator + N nodes on loopback, then a chat prompt through them
  coordinator the maintainers' control-plane server
  node        a supplier's worker hosting one fragment
  fragments   pack a model into Tensor Fragments
  calibrate   measure each layer's importance over a text, for fragment manifests
  bench       benchmarks that print a table of ratios measured in one run
  sim         simulate a large grid: our scheduler vs a Petals-style baseline
  ledger      verify the ledger's hash chain; supplier earnings and developer spend
"""

from __future__ import annotations

import os

# Before torch loads libgomp: idle OpenMP workers spin for GOMP_SPINCOUNT iterations before they
# sleep. The default (300,000: ~14 ms here) lets an idle node's workers spin through the next
# node's compute on a shared machine; measured on a 2-core box with 3 nodes: per-hop compute
# 14.6 / 14.3 / 19.5 ms at the default, 11.5 / 11.9 / 17.3 ms at 20,000 (equal to the same
# fragments in one process), and no loss for single-process decode. Override by setting it.
os.environ.setdefault("GOMP_SPINCOUNT", "20000")

import argparse
import logging
import sys
from collections.abc import Sequence

from engine.errors import KlusterError

log = logging.getLogger("kluster")

LOGLEVEL_ENV = "KLUSTER_LOGLEVEL"


def setup_logging(default: str = "WARNING") -> None:
    level = os.environ.get(LOGLEVEL_ENV, default).upper()
    logging.basicConfig(
        level=getattr(logging, level, logging.WARNING),
        format="%(asctime)s %(levelname)s %(name)s: %(message)s",
        stream=sys.stderr,
    )
    # aiortc/aioice are chatty at INFO; their warnings still show.
    for noisy in ("aioice", "aiortc"):
        logging.getLogger(noisy).setLevel(max(logging.WARNING, logging.getLogger().level))


def add_generation_options(p: argparse.ArgumentParser, *, prompt_required: bool) -> None:
    p.add_argument("--prompt", required=prompt_required, help="the prompt text")
    p.add_argument("--chat", action="store_true", help="wrap the prompt in the model's chat template")
    p.add_argument("--max-new-tokens", type=int, default=64, help="tokens to generate at most (default 64)")
    p.add_argument("--temperature", type=float, default=0.0, help="0 = greedy (default); >0 samples")
    p.add_argument("--top-p", type=float, default=1.0, help="nucleus sampling threshold (default 1.0)")
    p.add_argument("--seed", type=int, default=0, help="sampling seed: same seed, same tokens (default 0)")
    p.add_argument("--json", action="store_true", help="print one JSON event per line")
    p.add_argument(
        "--route-wait",
        type=float,
        default=60.0,
        help="seconds a failover waits for a replacement route, e.g. for a node to come back (default 60)",
    )
    p.add_argument(
        "--codec",
        default="fp32",
        choices=["fp32", "fp16", "bf16", "int8"],
        help="how activations travel between nodes: fp32 exact (default); int8 is ~3.6x smaller, "
        "output identical for ~93%% of prompts (kluster bench codec)",
    )
    p.add_argument(
        "--private-nodes",
        default="",
        metavar="NODE,...",
        help="a private job: only these nodes (names or peer ids) may hold its embeddings and head, which "
        "see its tokens; also after a failover (default: any node)",
    )
    p.add_argument(
        "--spot-check",
        type=float,
        default=0.0,
        metavar="FRACTION",
        help="verify this share of steps: the coordinator re-executes the session so far and bans a node "
        "that returned wrong work; the output is regenerated from where it went wrong (default 0: off)",
    )
    p.add_argument(
        "--activation",
        type=float,
        default=1.0,
        help="share of layer compute each token runs (Selective Activation, needs a calibrated model): "
        "the least important layers are skipped, nodes left with nothing to run leave the route (default 1.0)",
    )
    p.add_argument(
        "--verify",
        action="store_true",
        help="lossless: the --activation model drafts here and the whole route verifies several tokens per "
        "pass (self-speculative, greedy only); the output is the whole model's",
    )
    p.add_argument(
        "--draft-tokens",
        type=int,
        default=2,
        help="tokens drafted per verify pass (default 2, the fastest measured over a WAN)",
    )
    p.add_argument("--tenant", default="default", help="who the job is queued for (fair share per tenant)")
    p.add_argument("--priority", type=int, default=5, help="job priority 0-9, higher first (default 5)")
    p.add_argument(
        "--wait-for-route",
        action="store_true",
        help="queue until nodes serve the model (up to the coordinator's queue timeout) instead of failing at once",
    )


def build_parser() -> argparse.ArgumentParser:
    from engine.cli import bench, calibrate, demo, fragments, generate, ledger, servers, sim

    parser = argparse.ArgumentParser(prog="kluster", description="Run open models across a grid of GPUs.")
    sub = parser.add_subparsers(dest="command", required=True, metavar="COMMAND")
    generate.register(sub)
    demo.register(sub)
    servers.register(sub)
    fragments.register(sub)
    calibrate.register(sub)
    bench.register(sub)
    sim.register(sub)
    ledger.register(sub)
    return parser


def main(argv: Sequence[str] | None = None) -> int:
    parser = build_parser()
    args = parser.parse_args(argv)
    setup_logging(getattr(args, "default_loglevel", "WARNING"))
    try:
        return int(args.handler(args) or 0)
    except KlusterError as exc:
        print(f"kluster: error: {exc}", file=sys.stderr)
        return 2
    except KeyboardInterrupt:
        print("kluster: interrupted", file=sys.stderr)
        return 130
