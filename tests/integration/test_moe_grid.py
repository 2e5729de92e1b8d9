"""Mixture-of-Experts across peers: a tiny random MoE whose experts sit on 4 real node processes.

A real coordinator serves a MoE pack (a trunk + 4 expert fragments); 4 ``kluster node``
processes each get one expert fragment; the trunk runs in this process (``ExpertGrid``) and
sends each MoE layer's rows over WebRTC only to the nodes of the experts the router chose.

Checked: greedy output token-identical to the local model (and transformers' own ``generate``),
logits within 1e-4 of transformers in fp32, and, counted by the nodes themselves where the rows
arrive, that each node received exactly the rows routed to its experts and no message for a
layer pass in which none of its experts was chosen. The measured savings are printed
(``pytest -s``) and written to ``moe_grid_report.json`` in the test's temporary folder.
"""

from __future__ import annotations

import asyncio
import json
import time
import uuid
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import pytest
import torch
from random_moe import randomise

from engine.client.experts import ExpertGrid, ExpertGridPipeline
from engine.client.local import LocalPipeline
from engine.fragments import torch_thread
from engine.fragments.experts import pack_moe_model, read_expert_pack
from engine.launcher import LocalCluster
from engine.models.llama import FragmentModel
from engine.models.loading import load_model
from engine.models.moe import ExpertUsage, SparseMoeBlock, record_expert_usage
from engine.models.sampling import SamplingParams
from engine.transport.signaling import get_json

transformers = pytest.importorskip("transformers")
pytestmark = pytest.mark.slow

MODEL_ID = "tiny-moe"
VOCAB = 101
NODES = 4
PROMPT = 9
NEW_TOKENS = 8
FAMILIES: dict[str, tuple[str, str, dict[str, Any]]] = {
    "mixtral": (
        "MixtralConfig",
        "MixtralForCausalLM",
        dict(num_hidden_layers=3, intermediate_size=48, num_local_experts=8, num_experts_per_tok=2),
    ),
    "qwen2-moe": (
        "Qwen2MoeConfig",
        "Qwen2MoeForCausalLM",
        dict(
            num_hidden_layers=3,
            intermediate_size=80,
            num_experts=8,
            num_experts_per_tok=2,
            moe_intermediate_size=32,
            shared_expert_intermediate_size=48,
            mlp_only_layers=[1],
        ),
    ),
}


def _save_random(folder: Path, family: str) -> torch.nn.Module:
    """N(0, 1/fan_in) weights, perturbed norms: decisive routing and O(1) activations (as the unit tests)."""
    cfg_cls, model_cls, extra = FAMILIES[family]
    torch.manual_seed(0)
    config = getattr(transformers, cfg_cls)(
        vocab_size=VOCAB,
        hidden_size=64,
        num_attention_heads=4,
        num_key_value_heads=2,
        max_position_embeddings=256,
        **extra,
    )
    config._attn_implementation = "eager"
    ref = getattr(transformers, model_cls)(config).eval()
    randomise(ref)
    ref.save_pretrained(folder)
    return ref


@dataclass
class Grid:
    family: str
    model_dir: Path
    ref: torch.nn.Module
    cluster: LocalCluster
    root: Path


@pytest.fixture(scope="module", params=sorted(FAMILIES))
def grid(request: pytest.FixtureRequest, module_tmp: Callable[[str], Path]) -> Iterator[Grid]:
    root = module_tmp(f"moe-{request.param}")
    ref = _save_random(root / "model", request.param)
    pack_moe_model(root / "model", root / "pack", NODES, model_id=MODEL_ID)
    cluster = LocalCluster(
        root / "pack", NODES, cache_dir=root / "node-cache", log_dir=root / "logs", memory_mb=512, node_threads=1
    )
    cluster.start()
    try:
        yield Grid(request.param, root / "model", ref, cluster, root)
    finally:
        cluster.stop()


class PassLog:
    """Which experts each MoE layer's router chose in every forward pass (hooks on the local model)."""

    def __init__(self, model: FragmentModel) -> None:
        self.passes: list[tuple[int, frozenset[int], dict[int, int]]] = []
        for block in model.modules():
            if isinstance(block, SparseMoeBlock):
                block.router.register_forward_hook(self._hook(block.layer))

    def _hook(self, layer: int) -> Any:
        def hook(_: Any, __: Any, out: tuple[torch.Tensor, torch.Tensor]) -> None:
            flat = out[0].reshape(-1).tolist()
            counts = {e: flat.count(e) for e in set(flat)}
            self.passes.append((layer, frozenset(counts), counts))

        return hook


async def _greedy(pipeline: LocalPipeline, prompt: list[int]) -> list[int]:
    session, pos, feed, out = uuid.uuid4().hex, 0, prompt, []
    for _ in range(NEW_TOKENS):
        step = await pipeline.step(session, pos, feed, len(prompt) + NEW_TOKENS, SamplingParams())
        pos += len(feed)
        out.append(step.token_id)
        feed = [step.token_id]
    await pipeline.close_session(session)
    return out


async def _node_reports(url: str, expected: dict[str, int], timeout_s: float = 20.0) -> dict[str, dict[str, Any]]:
    """Each expert node's own counters, once every node has reported as many messages as it was sent."""
    import aiohttp

    deadline = time.monotonic() + timeout_s
    async with aiohttp.ClientSession() as http:
        while True:
            nodes = (await get_json(http, url + "/v1/nodes"))["nodes"]
            got = {n["peer_id"]: n["experts"]["received"] for n in nodes if n.get("experts")}
            seen = {p: sum(e["messages"] for e in r.get("layers", {}).values()) for p, r in got.items()}
            if all(seen.get(p, 0) >= n for p, n in expected.items()) or time.monotonic() > deadline:
                return got
            await asyncio.sleep(0.25)


async def test_moe_experts_on_four_nodes(grid: Grid) -> None:
    model_dir, ref = grid.model_dir, grid.ref
    local = load_model(model_dir)
    cfg = local.cfg
    pack = read_expert_pack(grid.cluster.pack_dir)
    prompt = torch.randint(0, VOCAB, (PROMPT,), generator=torch.Generator().manual_seed(7)).tolist()

    t0 = time.perf_counter()
    experts = ExpertGrid(grid.cluster.url, MODEL_ID, timeout_s=30)
    await experts.start()
    try:
        owners = await experts.wait_ready(timeout_s=180)
        ready_s = time.perf_counter() - t0
        # Four distinct nodes, one expert fragment each, every routed expert owned by exactly one.
        assert len(set(owners.values())) == NODES and len(owners) == len(cfg.moe_layers) * cfg.num_experts
        held = {peer: {pair for pair, p in owners.items() if p == peer} for peer in set(owners.values())}
        assert sorted(sorted(h) for h in held.values()) == sorted(sorted(m.experts or ()) for m in pack.experts)

        trunk = await experts.load_trunk(grid.root / "client-cache")
        pipeline = ExpertGridPipeline(trunk, experts)
        t1 = time.perf_counter()
        with record_expert_usage(trunk) as usage:
            tokens = await _greedy(pipeline, prompt)
            decode_s = time.perf_counter() - t1
            ids = torch.tensor([prompt + tokens])
            logits = await torch_thread.run(trunk, ids, 0, all_logits=True)
        summary = pipeline.summary()["experts"]
        traffic = experts.traffic
        assert traffic is not None
        sent_messages = {p: sum(layers.values()) for p, layers in traffic.messages.items()}
        reports = await _node_reports(grid.cluster.url, sent_messages)
    finally:
        await experts.shutdown()

    # --- the same computation locally, with every router decision logged per pass
    log = PassLog(local)
    local_usage: ExpertUsage
    with record_expert_usage(local) as local_usage:
        local_tokens = await _greedy(LocalPipeline(local), prompt)
        local_logits = local(ids, 0, all_logits=True)
    with torch.no_grad():
        expected = ref(ids).logits
        hf_tokens = ref.generate(torch.tensor([prompt]), max_new_tokens=NEW_TOKENS, do_sample=False, pad_token_id=0)[
            0, PROMPT:
        ].tolist()

    assert tokens == local_tokens == hf_tokens
    assert (logits - expected).abs().max().item() <= 1e-4
    assert (logits - local_logits).abs().max().item() <= 1e-5
    assert usage.counts == local_usage.counts  # the trunk routed exactly as the local model

    # --- what each node says it received, against the local router's choices
    for peer, pairs in held.items():
        report = reports.get(peer)
        assert report is not None, f"node {experts.names[peer]} reported nothing"
        mine = {e for _, e in pairs}
        for layer in cfg.moe_layers:
            got = report["layers"].get(str(layer), {"messages": 0, "rows": {}})
            want_rows = {str(e): n for e, n in enumerate(local_usage.counts[layer]) if n and e in mine}
            assert got["rows"] == want_rows, f"layer {layer} rows at {experts.names[peer]}"
            # one message per pass in which the router chose one of its experts, none otherwise
            want_messages = sum(1 for lay, chosen, _ in log.passes if lay == layer and chosen & mine)
            assert got["messages"] == want_messages, f"layer {layer} messages at {experts.names[peer]}"
        assert report["bytes"] == traffic.bytes_to[peer]
    passes = len([p for p in log.passes if p[0] == cfg.moe_layers[0]])
    total_messages = sum(sent_messages.values())
    assert passes == NEW_TOKENS + 1  # prefill, 7 decode steps, the logits pass
    assert total_messages < passes * len(cfg.moe_layers) * NODES  # some nodes got nothing for some passes

    k, e = cfg.num_experts_per_tok, cfg.num_experts
    decode_passes = ExpertUsage(e, k)
    for layer, _, counts in log.passes:
        if sum(counts.values()) == k:  # one token: a decode step
            decode_passes.add(layer, [counts.get(x, 0) for x in range(e)], 1)
    report = {
        "family": grid.family,
        "experts_per_layer": e,
        "top_k": k,
        "moe_layers": len(cfg.moe_layers),
        "expert_nodes": NODES,
        "compute_skipped_fraction": round(usage.compute_skipped_fraction(), 4),
        "expected_1_minus_k_over_E": 1 - k / e,
        "decode_expert_weights_skipped_fraction": round(decode_passes.weights_skipped_fraction(), 4),
        "node_messages_sent": total_messages,
        "node_messages_if_broadcast": passes * len(cfg.moe_layers) * NODES,
        **summary,
        "max_abs_logit_diff_vs_transformers": (logits - expected).abs().max().item(),
        "ready_s": round(ready_s, 2),
        "generate_s": round(decode_s, 2),
    }
    assert report["compute_skipped_fraction"] == pytest.approx(1 - k / e)
    assert summary["rows_sent"] == usage.routed_rows() and summary["sent_fraction_of_broadcast"] == pytest.approx(
        k / NODES
    )
    (grid.root / "moe_grid_report.json").write_text(json.dumps(report, indent=2))
    print(json.dumps(report, indent=2))  # the measured figures, shown with -s
