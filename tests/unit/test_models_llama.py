"""Our Llama-family model code against transformers on tiny random configs (fp32, <= 1e-4)."""

from __future__ import annotations

from pathlib import Path

import pytest
import torch

from engine.models.loading import load_model

transformers = pytest.importorskip("transformers")

BASE = dict(
    vocab_size=101,
    hidden_size=64,
    intermediate_size=96,
    num_hidden_layers=3,
    num_attention_heads=4,
    num_key_value_heads=2,
    max_position_embeddings=256,
)

FAMILIES = {
    "llama2": ("LlamaConfig", "LlamaForCausalLM", dict(rms_norm_eps=1e-5)),
    "llama3-rope-scaling": (
        "LlamaConfig",
        "LlamaForCausalLM",
        dict(
            rope_theta=500000.0,
            rope_scaling=dict(
                rope_type="llama3",
                factor=8.0,
                low_freq_factor=1.0,
                high_freq_factor=4.0,
                original_max_position_embeddings=32,
            ),
        ),
    ),
    "llama-linear-rope": ("LlamaConfig", "LlamaForCausalLM", dict(rope_scaling=dict(rope_type="linear", factor=2.0))),
    "smollm2-tied": ("LlamaConfig", "LlamaForCausalLM", dict(tie_word_embeddings=True, rope_theta=100000.0)),
    "mistral": ("MistralConfig", "MistralForCausalLM", dict(sliding_window=None)),
    "mistral-sliding-window": ("MistralConfig", "MistralForCausalLM", dict(sliding_window=7)),
    "qwen2-qkv-bias": ("Qwen2Config", "Qwen2ForCausalLM", dict(tie_word_embeddings=True)),
}


def _save_random(tmp: Path, family: str) -> tuple[Path, torch.nn.Module]:
    cfg_cls, model_cls, extra = FAMILIES[family]
    torch.manual_seed(0)
    config = getattr(transformers, cfg_cls)(**BASE, **extra)
    config._attn_implementation = "eager"
    ref = getattr(transformers, model_cls)(config).eval()
    # Non-zero biases so the qkv-bias path is exercised (HF initialises them to zero).
    with torch.no_grad():
        for name, p in ref.named_parameters():
            if name.endswith("bias") or "norm" in name:
                p.add_(torch.randn_like(p) * 0.1)
    ref.save_pretrained(tmp)
    return tmp, ref


@pytest.mark.parametrize("family", sorted(FAMILIES))
def test_logits_match_transformers(tmp_path: Path, family: str) -> None:
    folder, ref = _save_random(tmp_path, family)
    ours = load_model(folder)
    ids = torch.randint(0, BASE["vocab_size"], (1, 20), generator=torch.Generator().manual_seed(1))
    with torch.no_grad():
        expected = ref(ids).logits
    got = ours(ids, 0, all_logits=True)
    assert (got - expected).abs().max().item() <= 1e-4


@pytest.mark.parametrize("family", ["llama2", "mistral-sliding-window", "qwen2-qkv-bias"])
def test_incremental_decode_matches_full_forward(tmp_path: Path, family: str) -> None:
    """Prefill + token-by-token decode with the KV cache gives the same logits as one full pass."""
    folder, ref = _save_random(tmp_path, family)
    ours = load_model(folder)
    ids = torch.randint(0, BASE["vocab_size"], (1, 16), generator=torch.Generator().manual_seed(2))
    with torch.no_grad():
        expected = ref(ids).logits[0]
    cache = ours.new_cache(64)
    step_logits = [ours(ids[:, :9], 0, cache, all_logits=True)[0]]
    for pos in range(9, 16):
        step_logits.append(ours(ids[:, pos : pos + 1], pos, cache)[0])
    got = torch.cat(step_logits, 0)
    assert (got - expected).abs().max().item() <= 1e-4


def test_fragments_chain_equals_whole_model(tmp_path: Path) -> None:
    """Three fragments run in sequence produce exactly the whole model's logits."""
    folder, _ = _save_random(tmp_path, "smollm2-tied")
    whole = load_model(folder)
    parts = [load_model(folder, 0, 1), load_model(folder, 1, 2), load_model(folder, 2, 3)]
    assert parts[0].has_embed and not parts[0].has_head and parts[2].has_head
    ids = torch.randint(0, BASE["vocab_size"], (1, 12), generator=torch.Generator().manual_seed(3))
    x: torch.Tensor = ids
    for part in parts:
        x = part(x, 0, all_logits=True)
    assert torch.equal(x, whole(ids, 0, all_logits=True))


@pytest.mark.slow
def test_smollm2_logits_match_transformers(smollm2_dir: Path) -> None:
    """The real default model: our code vs transformers on the same converted folder, fp32."""
    ref = transformers.AutoModelForCausalLM.from_pretrained(smollm2_dir, dtype=torch.float32).eval()
    ours = load_model(smollm2_dir)
    ids = torch.tensor([[1, 504, 3458, 282, 4649, 314, 253, 1345, 30, 62, 2, 198, 28, 17]])
    with torch.no_grad():
        expected = ref(ids).logits
    assert (ours(ids, 0, all_logits=True) - expected).abs().max().item() <= 1e-4
