"""Our Mixture-of-Experts model code (Mixtral, Qwen2-MoE) against transformers, fp32, <= 1e-4.

Random tiny configs are saved with transformers' ``save_pretrained`` (both its default per-expert
layout and its fused ``save_original_format=False`` layout) and loaded by our loader; weights are
re-drawn at a realistic scale so routing is decisive and the activations are O(1).
"""

from __future__ import annotations

import inspect
from pathlib import Path
from typing import Any

import pytest
import torch
from random_moe import randomise
from safetensors import safe_open

from engine.errors import ModelFormatError
from engine.models.config import load_config, parse_config
from engine.models.llama import FragmentModel, MoEDecoderLayer, hf_tensor_names
from engine.models.loading import load_model
from engine.models.moe import combine, dispatch, expert_forward, record_expert_usage, route
from engine.models.moe_weights import fused_source

transformers = pytest.importorskip("transformers")

VOCAB = 101
BASE: dict[str, Any] = dict(
    vocab_size=VOCAB,
    hidden_size=64,
    num_attention_heads=4,
    num_key_value_heads=2,
    max_position_embeddings=256,
)
MIXTRAL: dict[str, Any] = dict(num_hidden_layers=3, intermediate_size=48, num_local_experts=8, num_experts_per_tok=2)
QWEN_MOE: dict[str, Any] = dict(
    num_hidden_layers=4,
    intermediate_size=80,
    num_experts=8,
    num_experts_per_tok=2,
    moe_intermediate_size=32,
    shared_expert_intermediate_size=48,
)

FAMILIES: dict[str, tuple[str, str, dict[str, Any]]] = {
    "mixtral": ("MixtralConfig", "MixtralForCausalLM", MIXTRAL),
    "mixtral-sliding-window-top3": (
        "MixtralConfig",
        "MixtralForCausalLM",
        {**MIXTRAL, "sliding_window": 7, "num_experts_per_tok": 3},
    ),
    "qwen2-moe-dense-first-layer": ("Qwen2MoeConfig", "Qwen2MoeForCausalLM", {**QWEN_MOE, "mlp_only_layers": [0]}),
    "qwen2-moe-norm-topk-sparse-step": (
        "Qwen2MoeConfig",
        "Qwen2MoeForCausalLM",
        {**QWEN_MOE, "norm_topk_prob": True, "decoder_sparse_step": 2, "tie_word_embeddings": True},
    ),
}


def _save_random(tmp: Path, family: str, *, fused: bool = False) -> tuple[Path, torch.nn.Module]:
    cfg_cls, model_cls, extra = FAMILIES[family]
    torch.manual_seed(0)
    config = getattr(transformers, cfg_cls)(**BASE, **extra)
    config._attn_implementation = "eager"
    ref = getattr(transformers, model_cls)(config).eval()
    randomise(ref)
    if fused:
        if "save_original_format" not in inspect.signature(ref.save_pretrained).parameters:
            pytest.skip("this transformers has no fused-experts checkpoint layout")
        ref.save_pretrained(tmp, save_original_format=False)
    else:
        ref.save_pretrained(tmp)
    return tmp, ref


def _ids(length: int, seed: int) -> torch.Tensor:
    return torch.randint(0, VOCAB, (1, length), generator=torch.Generator().manual_seed(seed))


def _hf_cached_steps(ref: torch.nn.Module, ids: torch.Tensor, prefill: int) -> torch.Tensor:
    """transformers' own prefill + token-by-token decode through its KV cache (all step logits)."""
    out = ref(ids[:, :prefill], use_cache=True)
    logits = [out.logits[0]]
    for pos in range(prefill, ids.shape[1]):
        cache = out.cache if hasattr(out, "cache") else out.past_key_values
        kwargs = (
            {"cache": cache} if "cache" in inspect.signature(ref.forward).parameters else {"past_key_values": cache}
        )
        out = ref(ids[:, pos : pos + 1], use_cache=True, **kwargs)
        logits.append(out.logits[0])
    return torch.cat(logits, 0)


def _our_cached_steps(parts: list[FragmentModel], ids: torch.Tensor, prefill: int) -> torch.Tensor:
    """Prefill then one token at a time through a chain of fragments, each with its own KV cache."""
    caches = [p.new_cache(64) for p in parts]
    logits = []
    for pos, length in [(0, prefill)] + [(p, 1) for p in range(prefill, ids.shape[1])]:
        x: torch.Tensor = ids[:, pos : pos + length]
        for part, cache in zip(parts, caches, strict=True):
            x = part(x, pos, cache, all_logits=True)
        logits.append(x[0])
    return torch.cat(logits, 0)


@pytest.mark.parametrize("fused", [False, True], ids=["per-expert-layout", "fused-layout"])
@pytest.mark.parametrize("family", sorted(FAMILIES))
def test_logits_match_transformers(tmp_path: Path, family: str, fused: bool) -> None:
    """Full-sequence logits, and prefill + cached decode steps, against transformers (<= 1e-4)."""
    folder, ref = _save_random(tmp_path, family, fused=fused)
    ours = load_model(folder)
    assert any(isinstance(layer, MoEDecoderLayer) for layer in ours.layers)
    ids = _ids(16, seed=1)
    with torch.no_grad():
        expected = ref(ids).logits[0]
        expected_steps = _hf_cached_steps(ref, ids, prefill=9)
    full = ours(ids, 0, all_logits=True)[0]
    steps = _our_cached_steps([ours], ids, prefill=9)
    assert (expected_steps - expected).abs().max().item() <= 1e-4  # the reference agrees with itself
    assert (full - expected).abs().max().item() <= 1e-4
    assert (steps - expected).abs().max().item() <= 1e-4
    assert (steps - expected_steps).abs().max().item() <= 1e-4


@pytest.mark.parametrize(("family", "split"), [("mixtral", 2), ("qwen2-moe-dense-first-layer", 1)])
def test_fragment_split_equals_whole_model(tmp_path: Path, family: str, split: int) -> None:
    """Layers [0, a) then [a, L) as two fragments give exactly the whole model's logits, cached too."""
    folder, _ = _save_random(tmp_path, family)
    whole = load_model(folder)
    parts = [load_model(folder, 0, split), load_model(folder, split)]
    assert parts[0].has_embed and not parts[0].has_head and parts[1].has_head and not parts[1].has_embed
    ids = _ids(12, seed=3)
    x: torch.Tensor = ids
    for part in parts:
        x = part(x, 0, all_logits=True)
    assert torch.equal(x, whole(ids, 0, all_logits=True))
    assert torch.equal(_our_cached_steps(parts, ids, prefill=5), _our_cached_steps([whole], ids, prefill=5))


@pytest.mark.parametrize("family", ["mixtral", "qwen2-moe-norm-topk-sparse-step"])
def test_expert_usage_counts_are_consistent(tmp_path: Path, family: str) -> None:
    folder, _ = _save_random(tmp_path, family)
    model = load_model(folder)
    cfg = model.cfg
    k, e = cfg.num_experts_per_tok, cfg.num_experts
    ids = _ids(10, seed=4)
    with record_expert_usage(model) as prefill:
        model(ids, 0, all_logits=True)
    assert sorted(prefill.counts) == list(cfg.moe_layers)
    for layer, counts in prefill.counts.items():
        assert len(counts) == e and sum(counts) == 10 * k and prefill.tokens[layer] == 10
    assert prefill.compute_skipped_fraction() == pytest.approx(1 - k / e)
    sent, broadcast = prefill.activation_bytes(cfg.hidden_size, 4)
    assert sent == 10 * k * len(cfg.moe_layers) * 2 * cfg.hidden_size * 4 and broadcast * k == sent * e

    cache = model.new_cache(32)
    model(ids[:, :6], 0, cache)
    with record_expert_usage(model) as decode:
        for pos in range(6, 10):
            model(ids[:, pos : pos + 1], pos, cache)
    for layer, counts in decode.counts.items():
        assert sum(counts) == 4 * k and decode.passes[layer] == 4 and max(counts) <= 4
    # One token per pass: exactly k of the E experts' weights are read, the rest skipped.
    assert decode.weights_skipped_fraction() == pytest.approx(1 - k / e)
    assert decode.summary()["routed_rows"] == 4 * k * len(cfg.moe_layers)
    assert all(block.recorder is None for block in model.modules() if hasattr(block, "recorder"))


def test_dense_model_records_no_expert_usage(tmp_path: Path) -> None:
    config = transformers.LlamaConfig(**BASE, intermediate_size=96, num_hidden_layers=2)
    transformers.LlamaForCausalLM(config).save_pretrained(tmp_path)
    model = load_model(tmp_path)
    with record_expert_usage(model) as usage:
        model(_ids(5, seed=5), 0)
    assert usage.counts == {} and usage.compute_skipped_fraction() == 0.0


@pytest.mark.parametrize("family", sorted(FAMILIES))
def test_tensor_names_are_exactly_the_checkpoint(tmp_path: Path, family: str) -> None:
    """``hf_tensor_names`` lists every tensor transformers saved (what packing copies), no more."""
    folder, _ = _save_random(tmp_path, family)
    cfg = load_config(folder)
    with safe_open(str(folder / "model.safetensors"), framework="pt") as sf:
        saved = set(sf.keys())
    names = hf_tensor_names(cfg, 0, cfg.num_hidden_layers, embed=True, head=True)
    if cfg.tie_word_embeddings:
        saved.add("lm_head.weight")  # packing writes the tied head under its own name
    assert len(names) == len(set(names)) and set(names) == saved
    halves = hf_tensor_names(cfg, 0, 1, embed=True, head=False) + hf_tensor_names(
        cfg, 1, cfg.num_hidden_layers, embed=False, head=True
    )
    assert sorted(halves) == sorted(names)


def test_fused_source_names() -> None:
    w1 = fused_source("model.layers.3.block_sparse_moe.experts.5.w1.weight")
    w2 = fused_source("model.layers.3.block_sparse_moe.experts.5.w2.weight")
    up = fused_source("model.layers.0.mlp.experts.7.up_proj.weight")
    router = fused_source("model.layers.3.block_sparse_moe.gate.weight")
    assert w1 is not None and (w1.source, w1.expert, w1.part) == ("model.layers.3.mlp.experts.gate_up_proj", 5, "gate")
    assert w2 is not None and (w2.source, w2.expert, w2.part) == ("model.layers.3.mlp.experts.down_proj", 5, "all")
    assert up is not None and (up.source, up.expert, up.part) == ("model.layers.0.mlp.experts.gate_up_proj", 7, "up")
    assert router is not None and (router.source, router.expert) == ("model.layers.3.mlp.gate.weight", None)
    assert fused_source("model.layers.0.mlp.gate_proj.weight") is None
    assert fused_source("model.layers.0.mlp.shared_expert.up_proj.weight") is None


# ------------------------------------------------------------------ the separable steps


def test_route_dispatch_expert_combine_equal_a_naive_loop() -> None:
    gen = torch.Generator().manual_seed(6)
    n, h, width, e, k = 11, 16, 8, 5, 2
    rows = torch.randn(n, h, generator=gen)
    router = torch.randn(e, h, generator=gen)
    gate_up = torch.randn(e, 2 * width, h, generator=gen) / 4
    down = torch.randn(e, h, width, generator=gen) / 3
    indices, weights = route(router, rows, k, renormalize=True, weights_fp32=True)
    assert indices.shape == weights.shape == (n, k)
    assert torch.allclose(weights.sum(-1), torch.ones(n))
    plan = dispatch(indices, e)
    assert sum(plan.counts) == n * k and plan.experts == [i for i in range(e) if plan.counts[i]]
    outputs = [expert_forward(gate_up[x], down[x], rows[r]) for x, r in zip(plan.experts, plan.rows, strict=True)]
    got = combine(n, plan, weights, outputs, rows)
    naive = torch.stack(
        [
            sum(
                weights[t, j] * expert_forward(gate_up[int(indices[t, j])], down[int(indices[t, j])], rows[t])
                for j in range(k)
            )
            for t in range(n)
        ]
    )
    assert torch.allclose(got, naive, atol=1e-5)


def test_route_without_renormalisation_keeps_softmax_weights() -> None:
    rows = torch.randn(4, 8, generator=torch.Generator().manual_seed(7))
    router = torch.randn(6, 8, generator=torch.Generator().manual_seed(8))
    indices, weights = route(router, rows, 3, renormalize=False, weights_fp32=False)
    probs = torch.softmax(rows @ router.T, dim=-1)
    assert torch.allclose(weights, probs.gather(1, indices))
    assert (weights.sum(-1) < 1).all()


# ------------------------------------------------------------------ config.json


def _raw(model_type: str, **extra: Any) -> dict[str, Any]:
    return {**BASE, "model_type": model_type, "num_hidden_layers": 4, "intermediate_size": 80, **extra}


def test_parse_mixtral_config() -> None:
    cfg = parse_config(_raw("mixtral", num_local_experts=8, num_experts_per_tok=2, sliding_window=16))
    assert cfg.moe_layers == (0, 1, 2, 3) and cfg.num_experts == 8 and cfg.num_experts_per_tok == 2
    assert cfg.moe_intermediate_size == 80 and cfg.norm_topk_prob and cfg.shared_expert_intermediate_size == 0
    assert not cfg.qkv_bias and cfg.sliding_window == 16


def test_parse_qwen2_moe_config_picks_sparse_layers() -> None:
    raw = _raw("qwen2_moe", num_experts=6, moe_intermediate_size=32, shared_expert_intermediate_size=48)
    cfg = parse_config({**raw, "decoder_sparse_step": 2, "mlp_only_layers": [3], "sliding_window": 0})
    assert cfg.moe_layers == (1,) and cfg.num_experts_per_tok == 4 and not cfg.norm_topk_prob
    assert cfg.qkv_bias and not cfg.o_bias and cfg.sliding_window is None
    assert parse_config(raw).moe_layers == (0, 1, 2, 3)
    assert not parse_config({**raw, "qkv_bias": False}).qkv_bias
    assert not parse_config({**raw, "num_experts": 0}).is_moe


@pytest.mark.parametrize(
    ("raw", "words"),
    [
        (_raw("mixtral", num_local_experts=2, num_experts_per_tok=3), ["num_experts_per_tok 3", "2 experts"]),
        (_raw("qwen2_moe", mlp_only_layers=[9]), ["mlp_only_layers"]),
        (_raw("qwen2_moe", mlp_only_layers="0"), ["mlp_only_layers"]),
        (_raw("qwen2_moe", num_experts=-1), ["num_experts"]),
        (_raw("qwen2_moe", use_sliding_window=True, sliding_window=8), ["use_sliding_window"]),
    ],
    ids=repr,
)
def test_bad_moe_configs(raw: dict[str, Any], words: list[str]) -> None:
    with pytest.raises(ModelFormatError) as exc:
        parse_config(raw)
    for w in words:
        assert w in str(exc.value)


def test_moe_flops_count_only_the_routed_experts() -> None:
    raw = _raw("qwen2_moe", num_experts=6, num_experts_per_tok=2, moe_intermediate_size=32)
    cfg = parse_config({**raw, "shared_expert_intermediate_size": 48, "mlp_only_layers": [0]})
    attn = 2 * (64 * 64 * 2 + 64 * 32 * 2)
    dense = attn + 2 * 3 * 64 * 80
    sparse = attn + 2 * 64 * 6 + 2 * (3 * 64 * 48 + 64) + 2 * 2 * 3 * 64 * 32
    assert cfg.flops_per_token_layer(0) == dense and cfg.flops_per_token_layer(1) == sparse
    assert cfg.flops_per_token_layers(0, 4) == dense + 3 * sparse
    assert cfg.flops_per_token_layer() == (dense + 3 * sparse) // 4
    assert cfg.expert_flops_per_token() == 2 * 3 * 64 * 32
