"""Token sampling, config.json parsing, and the per-session KV cache."""

from __future__ import annotations

import math
from typing import Any

import pytest
import torch

from engine.errors import ConfigError, ModelFormatError, SessionError
from engine.models.config import ModelConfig, parse_config
from engine.models.kv_cache import KVCache
from engine.models.sampling import SamplingParams, sample

# ---------------------------------------------------------------- sampling


def logits(seed: int, vocab: int = 101) -> torch.Tensor:
    return torch.randn(vocab, generator=torch.Generator().manual_seed(seed)) * 3


@pytest.mark.parametrize("seed", range(5))
def test_greedy_is_argmax(seed: int) -> None:
    x = logits(seed)
    expected = int(x.argmax())
    for params in (SamplingParams(), SamplingParams(temperature=0.0, top_p=0.1, seed=99)):
        assert sample(x, params, 0) == expected
        assert sample(x, params, 12345) == expected


def test_greedy_works_on_half_precision() -> None:
    x = logits(7).to(torch.bfloat16)
    assert sample(x, SamplingParams(), 3) == int(x.float().argmax())


def test_same_seed_and_position_same_token() -> None:
    x = logits(1)
    params = SamplingParams(temperature=1.0, seed=7)
    draws = [sample(x, params, p) for p in range(40)]
    assert [sample(x.clone(), SamplingParams(temperature=1.0, seed=7), p) for p in range(40)] == draws
    # Nothing but (seed, position) matters: the order of the calls does not.
    assert [sample(x, params, p) for p in reversed(range(40))] == draws[::-1]
    assert len(set(draws)) > 5  # a flat-ish distribution gives varied tokens across positions


def test_different_seeds_draw_differently() -> None:
    x = torch.zeros(101)  # uniform: any two independent streams of 50 draws differ
    streams = {seed: [sample(x, SamplingParams(temperature=1.0, seed=seed), p) for p in range(50)] for seed in range(4)}
    values = list(streams.values())
    for a in range(len(values)):
        for b in range(a + 1, len(values)):
            same = sum(x == y for x, y in zip(values[a], values[b], strict=True))
            assert same < 10, (a, b, same)


def test_sampling_follows_the_distribution() -> None:
    probs = torch.tensor([0.7, 0.2, 0.1, 0.0])
    x = torch.log(probs)  # -inf for the last token: it must never be drawn
    draws = [sample(x, SamplingParams(temperature=1.0, seed=3), p) for p in range(2000)]
    counts = [draws.count(i) for i in range(4)]
    assert counts[3] == 0
    assert abs(counts[0] / 2000 - 0.7) < 0.05
    assert abs(counts[1] / 2000 - 0.2) < 0.05


def test_small_top_p_keeps_only_the_top_token() -> None:
    for seed in range(5):
        x = logits(seed)
        params = SamplingParams(temperature=2.0, top_p=1e-3, seed=seed)
        assert {sample(x, params, p) for p in range(30)} == {int(x.argmax())}


def test_top_p_cuts_the_tail() -> None:
    x = torch.log(torch.tensor([0.5, 0.3, 0.15, 0.05]))
    params = SamplingParams(temperature=1.0, top_p=0.75, seed=11)
    draws = {sample(x, params, p) for p in range(300)}
    assert draws == {0, 1}  # 0.5 < 0.75 so token 1 is kept; 0.8 >= 0.75 so tokens 2 and 3 are cut


@pytest.mark.parametrize(
    "kwargs",
    [
        dict(temperature=-0.01),
        dict(temperature=100.5),
        dict(temperature=math.nan),
        dict(top_p=0.0),
        dict(top_p=-0.5),
        dict(top_p=1.01),
        dict(top_p=math.nan),
    ],
    ids=repr,
)
def test_invalid_sampling_params(kwargs: dict[str, float]) -> None:
    with pytest.raises(ConfigError):
        SamplingParams(**kwargs)


# ---------------------------------------------------------------- config.json

BASE: dict[str, Any] = dict(
    model_type="llama",
    vocab_size=101,
    hidden_size=64,
    intermediate_size=96,
    num_hidden_layers=6,
    num_attention_heads=4,
    num_key_value_heads=2,
    rms_norm_eps=1e-5,
    max_position_embeddings=256,
    tie_word_embeddings=True,
)


def test_parse_base_config() -> None:
    cfg = parse_config(BASE)
    assert cfg.head_dim == 16 and cfg.kv_dim == 32
    assert (cfg.num_attention_heads, cfg.num_key_value_heads) == (4, 2)
    assert cfg.rope_theta == 10000.0 and cfg.rope_scaling == {}
    assert cfg.tie_word_embeddings and not cfg.qkv_bias and not cfg.o_bias
    assert cfg.sliding_window is None


def test_missing_kv_heads_means_multi_head_attention() -> None:
    raw = {k: v for k, v in BASE.items() if k != "num_key_value_heads"}
    assert parse_config(raw).num_key_value_heads == 4


def test_qwen2_has_qkv_bias_and_ignores_window_unless_enabled() -> None:
    cfg = parse_config({**BASE, "model_type": "qwen2", "sliding_window": 16})
    assert cfg.qkv_bias and not cfg.o_bias and cfg.sliding_window is None
    assert (
        parse_config({**BASE, "model_type": "qwen2", "sliding_window": 16, "use_sliding_window": True}).sliding_window
        == 16
    )
    assert parse_config({**BASE, "model_type": "mistral", "sliding_window": 16}).sliding_window == 16


@pytest.mark.parametrize(
    ("change", "words"),
    [
        (dict(model_type="gpt2"), ["model_type", "gpt2", "llama"]),
        (dict(model_type=None), ["model_type"]),
        (dict(hidden_act="gelu"), ["hidden_act", "gelu", "silu"]),
        (dict(num_key_value_heads=3), ["num_attention_heads 4", "num_key_value_heads 3"]),
        (dict(vocab_size=None), ["vocab_size"]),
        (dict(vocab_size=0), ["vocab_size", "positive"]),
        (dict(vocab_size=True), ["vocab_size"]),
        (dict(vocab_size=101.0), ["vocab_size"]),
        (dict(hidden_size="64"), ["hidden_size"]),
        (dict(num_hidden_layers=-1), ["num_hidden_layers"]),
        (dict(rope_scaling={"type": "yarn", "factor": 4.0}), ["rope", "yarn"]),
        (dict(rope_parameters={"rope_type": "dynamic", "factor": 2.0}), ["rope", "dynamic"]),
    ],
    ids=repr,
)
def test_parse_config_errors(change: dict[str, Any], words: list[str]) -> None:
    raw = {**BASE, **change}
    raw = {k: v for k, v in raw.items() if not (v is None and k in change)}
    with pytest.raises(ModelFormatError) as exc:
        parse_config(raw)
    text = str(exc.value)
    assert "\n" not in text
    for w in words:
        assert w in text, f"{w!r} not in {text!r}"


@pytest.mark.parametrize(
    "change",
    [
        dict(num_key_value_heads="2"),
        dict(num_key_value_heads=-2),
        dict(rms_norm_eps="small"),
        dict(max_position_embeddings="long"),
        dict(rope_theta="big"),
        dict(rope_scaling="linear"),
    ],
    ids=repr,
)
def test_parse_config_wrong_value_types_are_model_format_errors(change: dict[str, Any]) -> None:
    with pytest.raises(ModelFormatError):
        parse_config({**BASE, **change})


@pytest.mark.parametrize(
    ("old", "new"),
    [
        (
            dict(rope_theta=500000.0, rope_scaling={"type": "linear", "factor": 2.0}),
            dict(rope_parameters={"rope_type": "linear", "factor": 2.0, "rope_theta": 500000.0}),
        ),
        (
            dict(
                rope_theta=500000.0,
                rope_scaling={
                    "type": "llama3",
                    "factor": 8.0,
                    "low_freq_factor": 1.0,
                    "high_freq_factor": 4.0,
                    "original_max_position_embeddings": 32,
                },
            ),
            dict(
                rope_parameters={
                    "rope_type": "llama3",
                    "rope_theta": 500000.0,
                    "factor": 8.0,
                    "low_freq_factor": 1.0,
                    "high_freq_factor": 4.0,
                    "original_max_position_embeddings": 32,
                }
            ),
        ),
        (dict(rope_theta=1e6, rope_scaling=None), dict(rope_parameters={"rope_type": "default", "rope_theta": 1e6})),
    ],
    ids=["linear", "llama3", "default"],
)
def test_both_rope_spellings_parse_the_same(old: dict[str, Any], new: dict[str, Any]) -> None:
    a, b = parse_config({**BASE, **old}), parse_config({**BASE, **new})
    assert a == b
    assert a.rope_theta == float(old["rope_theta"])
    kind = (old["rope_scaling"] or {}).get("type", "default")
    assert a.rope_scaling.get("rope_type", "default") == kind
    assert "type" not in a.rope_scaling and "rope_theta" not in a.rope_scaling


def test_eos_ids() -> None:
    assert parse_config({**BASE, "eos_token_id": 2}).eos_token_ids == (2,)
    assert parse_config({**BASE, "eos_token_id": [2, 7]}).eos_token_ids == (2, 7)
    assert parse_config(BASE).eos_token_ids == ()
    with pytest.raises(ModelFormatError, match="eos_token_id"):
        parse_config({**BASE, "eos_token_id": "</s>"})


def test_flops_per_token() -> None:
    cfg: ModelConfig = parse_config(BASE)
    # q and o: 64x64 each; k and v: 64x32 each; gate/up/down: 64x96 each; x2 for multiply-add.
    assert cfg.flops_per_token_layer() == 2 * (64 * 64 * 2 + 64 * 32 * 2 + 3 * 64 * 96)
    assert cfg.flops_per_token_head() == 2 * 64 * 101


# ---------------------------------------------------------------- KV cache


def kv(t: int, start: int = 0, heads: int = 2, dim: int = 4) -> torch.Tensor:
    return torch.arange(start, start + t, dtype=torch.float32).view(1, 1, t, 1).expand(1, heads, t, dim).clone()


def test_cache_appends_and_returns_everything_so_far() -> None:
    cache = KVCache(2, 2, 4, 16)
    k, v = cache.append(0, 0, kv(3), -kv(3))
    assert k.shape == (1, 2, 3, 4) and torch.equal(k, kv(3)) and torch.equal(v, -kv(3))
    k, v = cache.append(0, 3, kv(2, 3), -kv(2, 3))
    assert torch.equal(k, kv(5)) and torch.equal(v, -kv(5))
    k1, _ = cache.append(1, 0, kv(1) + 100, kv(1))
    assert torch.equal(k1, kv(1) + 100)  # layers are independent
    assert torch.equal(cache.append(0, 5, kv(1, 5), -kv(1, 5))[0], kv(6))


def test_cache_growth_keeps_earlier_values() -> None:
    cache = KVCache(1, 2, 4, 1000)
    for start in range(0, 300, 7):  # crosses the initial 128 and the doubled 256 capacities
        t = min(7, 300 - start)
        k, v = cache.append(0, start, kv(t, start), -kv(t, start))
        assert torch.equal(k, kv(start + t)) and torch.equal(v, -kv(start + t))
    assert cache.nbytes() <= KVCache.bytes_for(1, 2, 4, 1000, torch.float32)


def test_cache_capacity_never_exceeds_max_tokens() -> None:
    cache = KVCache(3, 2, 4, 200, dtype=torch.float16)
    for layer in range(3):
        cache.append(layer, 0, kv(200).half(), kv(200).half())
    assert cache.nbytes() == KVCache.bytes_for(3, 2, 4, 200, torch.float16)


def test_cache_exceeding_max_tokens() -> None:
    cache = KVCache(1, 2, 4, 10)
    cache.append(0, 0, kv(8), kv(8))
    with pytest.raises(SessionError, match="10 tokens"):
        cache.append(0, 8, kv(3, 8), kv(3, 8))
    cache.append(0, 8, kv(2, 8), kv(2, 8))  # exactly the limit is fine
    with pytest.raises(SessionError):
        cache.append(0, 10, kv(1, 10), kv(1, 10))
    with pytest.raises(SessionError):
        KVCache(1, 2, 4, 10).append(0, 0, kv(11), kv(11))


def test_cache_truncate() -> None:
    cache = KVCache(1, 2, 4, 32)
    cache.append(0, 0, kv(6), kv(6))
    cache.length = 6
    cache.truncate(4)
    assert cache.length == 4
    k, _ = cache.append(0, 4, kv(1, 50), kv(1, 50))  # overwrite position 4 after the rollback
    assert k.shape[2] == 5 and torch.equal(k[:, :, :4], kv(4)) and torch.equal(k[:, :, 4:], kv(1, 50))
    cache.truncate(0)
    assert cache.length == 0
    for bad in (-1, 1):
        with pytest.raises(SessionError, match="truncate"):
            cache.truncate(bad)


def test_cache_bytes_for() -> None:
    assert KVCache.bytes_for(6, 2, 16, 100, torch.float32) == 2 * 6 * 2 * 16 * 100 * 4
    assert KVCache.bytes_for(6, 2, 16, 100, torch.bfloat16) == 2 * 6 * 2 * 16 * 100 * 2
    assert KVCache(1, 2, 4, 10).nbytes() == 0
