"""``kluster bench ...``: benchmarks that print one table of ratios measured in one run.

Timed assertions do not belong in tests on shared, noisy machines; these commands measure the
targets instead, everything in one process run so the ratios compare like with like.

  pipeline   our local engine vs transformers generate vs a 3-node WebRTC route (decode, batch 1)
  failover   kill -9 a routed node at token 5: identical output? stall? (bench_failover.py)
  codec      fp16/bf16/int8 activations on the wire: bytes/token vs output (bench_codec.py)
  transport  our data channels vs stock aiortc: loopback and a lossy emulated WAN (bench_transport.py)
  wan        time per token over an emulated 40 ms / 1% loss WAN vs delay+compute (bench_wan.py)
  sparsity   skipping layers / sub-blocks / FFN neurons: perplexity vs compute saved (bench_sparsity.py)
  coordinator  1,000 node WebSockets: registration latency, memory, dead-socket drops (bench_coordinator.py)
  verify     spot checks: how far honest and perturbed routes are from the reference (bench_verify.py)
"""

from __future__ import annotations

import argparse
import json
import sys
import time
from pathlib import Path
from typing import Any

from engine import aio, paths

BENCH_PROMPT = "The history of the city of Paris began"


def register(sub: Any) -> None:
    b = sub.add_parser("bench", help="benchmarks (tables of ratios measured in one run)")
    bsub = b.add_subparsers(dest="bench_command", required=True, metavar="BENCH")
    p = bsub.add_parser("pipeline", help="local engine vs transformers vs 3-node WebRTC, tokens/s")
    p.add_argument("--tokens", type=int, default=64, help="decode tokens per run (default 64)")
    p.add_argument("--nodes", type=int, default=3, help="nodes in the distributed route (default 3)")
    p.add_argument("--threads", type=int, default=None, help="torch threads for local runs (default: torch's)")
    p.add_argument("--repeats", type=int, default=3, help="runs per engine; the best is reported (default 3)")
    p.add_argument("--json", action="store_true", help="print one JSON object")
    p.set_defaults(handler=run_pipeline)

    from engine.cli import bench_codec, bench_failover, bench_transport

    bench_failover.register(bsub)
    bench_codec.register(bsub)
    bench_transport.register(bsub)

    from engine.cli import bench_wan

    bench_wan.register(bsub)

    from engine.cli import bench_sparsity

    bench_sparsity.register(bsub)

    from engine.cli import bench_coordinator

    bench_coordinator.register(bsub)

    from engine.cli import bench_verify

    bench_verify.register(bsub)


async def _decode_stats(pipeline: Any, prompt_ids: list[int], tokens: int) -> dict[str, Any]:
    """Stats of one greedy generation of exactly ``tokens`` decode tokens after the prefill."""
    from engine.client.generation import GenerationRequest, generate_events
    from engine.models.sampling import SamplingParams

    class _NoText:
        def decode(self, ids: list[int]) -> str:
            return ""

    request = GenerationRequest(prompt_ids, tokens + 1, SamplingParams(), frozenset())
    done: dict[str, Any] = {}
    async for ev in generate_events(pipeline, _NoText(), request):  # type: ignore[arg-type]
        if ev["event"] == "done":
            done = ev
    return dict(done["stats"])


def _load_transformers(folder: Path) -> Any:
    try:
        from transformers import AutoModelForCausalLM
    except ImportError:
        return None
    import torch

    return AutoModelForCausalLM.from_pretrained(folder, dtype=torch.float32).eval()


def _transformers_rate(model: Any, prompt_ids: list[int], tokens: int) -> float:
    """Decode tokens/s of transformers ``generate`` (a prefill-only run is subtracted)."""
    import torch

    ids = torch.tensor([prompt_ids])
    with torch.no_grad():
        t0 = time.perf_counter()
        model.generate(ids, max_new_tokens=1, min_new_tokens=1, do_sample=False)
        prefill = time.perf_counter() - t0
        t0 = time.perf_counter()
        model.generate(ids, max_new_tokens=tokens + 1, min_new_tokens=tokens + 1, do_sample=False)
        total = time.perf_counter() - t0
    return tokens / max(total - prefill, 1e-9)


def run_pipeline(args: argparse.Namespace) -> int:
    import torch

    from engine.cli.servers import default_pack
    from engine.client.local import LocalPipeline
    from engine.client.remote import RemotePipeline
    from engine.fragments import torch_thread
    from engine.launcher import LocalCluster
    from engine.models.default_model import DEFAULT_MODEL_ID, ensure_default_model
    from engine.models.loading import load_model
    from engine.models.tokenizer import ModelTokenizer

    if args.threads:
        torch_thread.call(torch.set_num_threads, args.threads)
    threads = torch_thread.call(torch.get_num_threads)
    folder = ensure_default_model()
    prompt_ids = ModelTokenizer(folder).encode(BENCH_PROMPT)
    log = (lambda *_: None) if args.json else (lambda m: print(m, file=sys.stderr, flush=True))

    log(f"starting a coordinator and {args.nodes} nodes ...")
    cluster = LocalCluster(default_pack(args.nodes), args.nodes, cache_dir=paths.cache_dir())
    local_rates: list[float] = []
    hf_rates: list[float] = []
    dist_runs: list[dict[str, Any]] = []

    async def measure() -> None:
        """Runs of the three engines interleaved, so a noisy phase of a shared machine hits all alike."""
        await cluster.wait_for_route(DEFAULT_MODEL_ID)
        local = LocalPipeline(await torch_thread.run(load_model, folder))
        hf_model = await torch_thread.run(_load_transformers, folder)
        remote = RemotePipeline(cluster.url, DEFAULT_MODEL_ID)
        try:
            await remote.start()
            await _decode_stats(remote, prompt_ids, 4)  # warm-up: opens the WebRTC links
            for i in range(args.repeats):
                log(f"round {i + 1} of {args.repeats}: local, transformers, {args.nodes}-node route ...")
                local_rates.append(float((await _decode_stats(local, prompt_ids, args.tokens))["decode_tok_s"]))
                if hf_model is not None:
                    hf_rates.append(await torch_thread.run(_transformers_rate, hf_model, prompt_ids, args.tokens))
                dist_runs.append(await _decode_stats(remote, prompt_ids, args.tokens))
        finally:
            await remote.shutdown()
            await local.shutdown()

    try:
        cluster.start()
        aio.run(measure())
    finally:
        cluster.stop()

    local_best = max(local_rates)
    hf_best = max(hf_rates, default=None)
    best_run = max(dist_runs, key=lambda r: float(r["decode_tok_s"]))
    dist_best = float(best_run["decode_tok_s"])
    hops = [{"compute_ms": h["compute_ms"], "queue_ms": h["queue_ms"]} for h in best_run["hops"]]
    result = {
        "tokens": args.tokens,
        "threads": threads,
        "nodes": args.nodes,
        "local_tok_s": round(local_best, 2),
        "transformers_tok_s": round(hf_best, 2) if hf_best else None,
        "distributed_tok_s": round(dist_best, 2),
        "local_vs_transformers": round(local_best / hf_best, 3) if hf_best else None,
        "distributed_vs_local": round(dist_best / local_best, 3),
        "distributed_hops": hops,
        "distributed_network_ms_per_token": best_run["network_ms_per_token"],
        "targets": {"local_vs_transformers": 1.0, "distributed_vs_local": 0.85},
    }
    if args.json:
        print(json.dumps(result))
        return 0
    print(
        f"kluster bench pipeline: {DEFAULT_MODEL_ID}, decode {args.tokens} tokens, batch 1, "
        f"{threads} threads, best of {args.repeats}"
    )
    print(f"{'engine':<34}{'tok/s':>10}{'ratio':>12}{'target':>10}")
    hf_text = f"{hf_best:10.2f}" if hf_best else f"{'n/a':>10}"
    print(f"{'transformers generate':<34}{hf_text}{'1.00':>12}{'':>10}")
    ratio = f"{local_best / hf_best:12.2f}" if hf_best else f"{'n/a':>12}"
    print(f"{'kluster local':<34}{local_best:10.2f}{ratio}{'>= 1.00':>10}")
    print(
        f"{f'kluster {args.nodes}-node WebRTC loopback':<34}{dist_best:10.2f}"
        f"{dist_best / local_best:12.2f}{'>= 0.85':>10}  (vs kluster local)"
    )
    compute = sum(h["compute_ms"] for h in hops)
    queue = sum(h["queue_ms"] for h in hops)
    network = best_run["network_ms_per_token"]
    print(
        f"per token: local {1000 / local_best:.1f} ms; {args.nodes}-node {1000 / dist_best:.1f} ms = the hops' compute "
        f"{compute:.1f} + handing steps to their torch threads {queue:.1f} + transfers and the rest "
        f"{network if network is not None else float('nan'):.1f}"
    )
    return 0
