"""``kluster demo``: a whole grid on this machine, then a chat prompt through it.

Packs the embedded model into N fragments, starts a coordinator and N node processes on loopback,
waits until every fragment is loaded, asks the prompt through the 3-hop route, and stops every
process on exit or Ctrl-C. ``--serve`` keeps the grid up for other tools instead.
"""

from __future__ import annotations

import argparse
import json
import shutil
import sys
from typing import Any

from engine import aio, paths
from engine.errors import ConfigError

DEFAULT_PROMPT = "What is the capital of France?"


def register(sub: Any) -> None:
    from engine.cli import add_generation_options

    p = sub.add_parser("demo", help="start a coordinator and N nodes on loopback and chat through them")
    p.add_argument("--nodes", type=int, default=3, help="number of node processes / fragments (default 3)")
    p.add_argument("--serve", action="store_true", help="keep the grid running until interrupted")
    p.add_argument(
        "--spare",
        type=int,
        default=None,
        help="extra nodes beyond one per fragment, each with room for one fragment, so a killed node's "
        "layers have somewhere to go (default 1 with --serve, else 0)",
    )
    add_generation_options(p, prompt_required=False)
    p.set_defaults(handler=run, prompt=None)


def run(args: argparse.Namespace) -> int:
    from engine.cli.generate import run_remote
    from engine.cli.servers import _until_signalled, default_pack
    from engine.launcher import LocalCluster, share_memory_mb
    from engine.models.default_model import DEFAULT_MODEL_ID

    if not 1 <= args.nodes <= 30:
        raise ConfigError(f"--nodes must be between 1 and 30 (the model has 30 layers), got {args.nodes}")
    spare = (1 if args.serve else 0) if args.spare is None else args.spare
    if not 0 <= spare <= 8:
        raise ConfigError(f"--spare must be between 0 and 8, got {spare}")
    args.model = DEFAULT_MODEL_ID
    args.prompt = args.prompt or DEFAULT_PROMPT
    args.chat = True
    say = (lambda *_: None) if args.json else (lambda msg: print(msg, file=sys.stderr, flush=True))

    say(f"kluster demo: packing {DEFAULT_MODEL_ID} into {args.nodes} fragments")
    pack = default_pack(args.nodes)
    # Every node, spares too, has room for one fragment: the spare holds a copy of one and is
    # moved to a lost fragment when a node dies, so a failover has somewhere to go.
    cluster = LocalCluster(
        pack, args.nodes + spare, cache_dir=paths.cache_dir(), memory_mb=share_memory_mb(pack, args.nodes)
    )
    ok = False
    try:
        url = cluster.start()
        spares = f" + {spare} spare" if spare else ""
        say(f"coordinator at {url}; waiting for {args.nodes} nodes{spares} to fetch and load their fragments")
        aio.run(cluster.wait_for_route(DEFAULT_MODEL_ID))
        if args.serve:
            if args.json:
                print(
                    json.dumps({"event": "serving", "coordinator": url, "nodes": args.nodes, "spare": spare}),
                    flush=True,
                )
            else:
                print(f"serving: coordinator {url} with {args.nodes} nodes{spares} (Ctrl-C to stop)", flush=True)
            aio.run(_until_signalled())
        else:
            say(f"Q: {args.prompt}")
            aio.run(run_remote(args, url))
            if not args.json:
                print(flush=True)
        ok = True
    finally:
        cluster.stop()
        if ok:
            shutil.rmtree(cluster.log_dir, ignore_errors=True)
        else:
            print(f"kluster demo: process logs kept in {cluster.log_dir}", file=sys.stderr)
    return 0
