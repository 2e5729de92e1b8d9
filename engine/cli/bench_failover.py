"""``kluster bench failover``: kill -9 a routed node at token 5 and measure what the user sees.

A coordinator and 4 nodes serve the default model in 2 fragments (every span on two nodes). One
greedy 64-token generation runs without a fault, a second one loses a node of its route at token
5. Reported: whether the two outputs are identical, and the stall (kill to next token).
"""

from __future__ import annotations

import argparse
import json
import sys
import time
from typing import Any

from engine import aio, paths
from engine.errors import ConfigError

PROMPT = "Tell me about the history of Rome."


def register(bsub: Any) -> None:
    p = bsub.add_parser("failover", help="kill -9 a routed node mid-generation: identical output? stall?")
    p.add_argument("--tokens", type=int, default=64, help="tokens to generate (default 64)")
    p.add_argument("--kill-at", type=int, default=5, help="kill after this many tokens (default 5)")
    p.add_argument("--victim-hop", type=int, default=0, help="which hop of the route to kill: 0 or 1 (default 0)")
    p.add_argument("--json", action="store_true", help="print one JSON object")
    p.set_defaults(handler=run)


async def _generate(url: str, prompt: list[int], tokens: int, kill: Any = None) -> dict[str, Any]:
    from engine.client.generation import GenerationRequest, generate_events
    from engine.client.remote import RemotePipeline

    class _NoText:
        def decode(self, ids: list[int]) -> str:
            return ""

    remote = RemotePipeline(url, "smollm2-135m", step_timeout_s=30)
    out: dict[str, Any] = {"failovers": [], "arrivals": {}}
    try:
        route = await remote.start()
        async for ev in generate_events(remote, _NoText(), GenerationRequest(prompt, tokens)):  # type: ignore[arg-type]
            if ev["event"] == "token":
                out["arrivals"][ev["index"]] = time.monotonic()
                if kill is not None:
                    kill(ev["index"], route)
            elif ev["event"] == "failover":
                out["failovers"].append(ev)
            elif ev["event"] == "done":
                out["done"] = ev
    finally:
        await remote.shutdown()
    return out


def run(args: argparse.Namespace) -> int:
    from engine.cli.servers import default_pack
    from engine.launcher import LocalCluster
    from engine.models.default_model import DEFAULT_MODEL_ID, ensure_default_model
    from engine.models.tokenizer import ModelTokenizer

    if not 1 <= args.kill_at < args.tokens - 1:
        raise ConfigError("--kill-at must be at least 1 and leave tokens after it")
    if args.victim_hop not in (0, 1):
        raise ConfigError("--victim-hop must be 0 or 1 (the route has two hops)")
    say = (lambda *_: None) if args.json else (lambda m: print(m, file=sys.stderr, flush=True))
    tok = ModelTokenizer(ensure_default_model())
    prompt = tok.encode(tok.render_chat([{"role": "user", "content": PROMPT}]))
    cluster = LocalCluster(default_pack(2), 4, cache_dir=paths.cache_dir())
    killed: dict[str, Any] = {}

    def kill(index: int, route: Any) -> None:
        if index == args.kill_at and not killed:
            victim = route[args.victim_hop].name
            cluster.kill_node(victim)
            killed.update(name=victim, at=time.monotonic())

    try:
        say("starting a coordinator and 4 nodes (2 fragments, each on 2 nodes) ...")
        url = cluster.start()
        aio.run(cluster.wait_for_route(DEFAULT_MODEL_ID))
        say("run without a fault ...")
        clean = aio.run(_generate(url, prompt, args.tokens))
        say(f"run with kill -9 of hop {args.victim_hop} at token {args.kill_at} ...")
        faulty = aio.run(_generate(url, prompt, args.tokens, kill))
    finally:
        cluster.stop()

    identical = clean["done"]["token_ids"] == faulty["done"]["token_ids"]
    stall = faulty["arrivals"][args.kill_at + 1] - killed["at"]
    gaps = [faulty["arrivals"][i + 1] - faulty["arrivals"][i] for i in range(1, args.kill_at)]
    event = faulty["failovers"][0] if faulty["failovers"] else {}
    result = {
        "identical": identical,
        "stall_s": round(stall, 3),
        "normal_token_s": round(sorted(gaps)[len(gaps) // 2], 4) if gaps else None,
        "failed_node": killed.get("name"),
        "failovers": len(faulty["failovers"]),
        "detected_after_ms": event.get("detected_after_ms"),
        "recovery_ms": event.get("recovery_ms"),
        "tokens": args.tokens,
        "kill_at": args.kill_at,
        "targets": {"identical": True, "stall_s": 3.0},
    }
    if args.json:
        print(json.dumps(result))
        return 0
    print(
        f"kluster bench failover: {args.tokens} tokens, kill -9 of {killed.get('name')} (hop {args.victim_hop}) "
        f"after token {args.kill_at}, 4 nodes on loopback"
    )
    print(f"{'measure':<36}{'value':>12}{'target':>12}")
    print(f"{'output identical to no-fault run':<36}{identical!s:>12}{'True':>12}")
    print(f"{'stall: kill -> next token (s)':<36}{stall:12.3f}{'<= 3.0':>12}")
    print(f"{'normal time per token (s)':<36}{result['normal_token_s']:12.4f}")
    print(f"{'detection after last token (ms)':<36}{result['detected_after_ms']!s:>12}")
    print(f"{'new route ready after (ms)':<36}{result['recovery_ms']!s:>12}")
    return 0
