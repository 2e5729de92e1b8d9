"""MoE packs with expert fragments: packing, manifests, and the trunk + experts split being exact.

The trunk (attention, routers, shared experts) with its routed experts run from the expert
fragments' weights in this process must give exactly the whole local model's logits; the
network version of the same split is tests/integration/test_moe_grid.py.
"""

from __future__ import annotations

import json
import shutil
from pathlib import Path
from typing import Any

import pytest
import torch
from random_moe import randomise

from engine.errors import ConfigError, FragmentError, ProtocolError
from engine.fragments.experts import (
    is_expert_pack,
    load_expert_fragment,
    load_trunk,
    pack_moe_model,
    read_expert_pack,
    split_experts,
)
from engine.fragments.manifest import parse_manifest, read_manifest
from engine.fragments.store import read_pack
from engine.models.config import load_config
from engine.models.loading import load_model
from engine.models.moe import Dispatch, record_expert_usage
from engine.models.moe_trunk import ExpertWeights
from engine.protocol import messages as wire

transformers = pytest.importorskip("transformers")

BASE: dict[str, Any] = dict(
    vocab_size=101, hidden_size=64, num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=256
)
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
            num_experts=6,
            num_experts_per_tok=2,
            moe_intermediate_size=32,
            shared_expert_intermediate_size=48,
            mlp_only_layers=[0],
        ),
    ),
}


def save_random_moe(folder: Path, family: str) -> Path:
    """A tiny random MoE (N(0, 1/fan_in) weights: decisive routing, O(1) activations) saved as an HF folder."""
    cfg_cls, model_cls, extra = FAMILIES[family]
    torch.manual_seed(0)
    ref = getattr(transformers, model_cls)(getattr(transformers, cfg_cls)(**BASE, **extra)).eval()
    randomise(ref)
    ref.save_pretrained(folder)
    return folder


@pytest.fixture(scope="module", params=sorted(FAMILIES))
def moe_pack(request: pytest.FixtureRequest, tmp_path_factory: pytest.TempPathFactory) -> tuple[Path, Path]:
    root = tmp_path_factory.mktemp(request.param)
    model = save_random_moe(root / "model", request.param)
    pack_moe_model(model, root / "pack", 3 if request.param == "mixtral" else 2, model_id="tiny-moe")
    return model, root / "pack"


def test_split_experts_even_blocks_per_layer(tmp_path: Path) -> None:
    cfg = load_config(save_random_moe(tmp_path, "mixtral"))
    groups = split_experts(cfg, 3)
    assert [len(g) for g in groups] == [9, 9, 6]  # experts 0-2, 3-5, 6-7 of each of 3 layers
    assert groups[0][:3] == ((0, 0), (0, 1), (0, 2)) and groups[2][-1] == (2, 7)
    assert sorted(p for g in groups for p in g) == [(layer, e) for layer in range(3) for e in range(8)]
    with pytest.raises(ConfigError, match="1-8"):
        split_experts(cfg, 9)


def test_pack_layout_and_manifests(moe_pack: tuple[Path, Path]) -> None:
    model_dir, pack_dir = moe_pack
    cfg = load_config(model_dir)
    pack = read_expert_pack(pack_dir)
    assert is_expert_pack(pack_dir) and read_pack(pack_dir).manifests == pack.trunk.manifests
    (trunk,) = pack.trunk.manifests
    assert trunk.name == "frag-00-of-01" and trunk.experts == () and trunk.embed and trunk.head
    assert [m.name for m in pack.experts] == [
        f"experts-{i:02d}-of-{len(pack.experts):02d}" for i in range(len(pack.experts))
    ]
    for m in pack.experts:
        assert m.expert_only and not (m.embed or m.head) and parse_manifest(m.to_json()) == m
    # A routed expert's bytes are in exactly one expert fragment, never in the trunk.
    trunk_bytes = (pack_dir / trunk.name / "weights.safetensors").stat().st_size
    whole = sum(f.stat().st_size for f in model_dir.glob("*.safetensors"))
    expert_bytes = sum(m.files["weights.safetensors"].bytes for m in pack.experts)
    assert trunk_bytes + expert_bytes == pytest.approx(whole, rel=0.01)
    per_token = cfg.expert_flops_per_token() * cfg.num_experts_per_tok * len(cfg.moe_layers)
    assert sum(m.flops_per_token for m in pack.experts) == pytest.approx(per_token, rel=0.01)
    assert trunk.flops_per_token + per_token == cfg.flops_per_token_layers(0, cfg.num_hidden_layers) + (
        cfg.flops_per_token_head()
    )


def test_old_manifests_stay_valid_and_round_trip(moe_pack: tuple[Path, Path]) -> None:
    _, pack_dir = moe_pack
    raw = json.loads((pack_dir / "frag-00-of-01" / "manifest.json").read_text())
    del raw["experts"]
    plain = parse_manifest(raw)
    assert plain.experts is None and not plain.expert_only and "experts" not in plain.to_json()
    assert plain.to_json() == raw


@pytest.mark.parametrize(
    ("change", "words"),
    [
        ({"experts": [[0, 1], [0, 1]]}, "distinct"),
        ({"experts": [[0, "1"]]}, "pair"),
        ({"experts": [[9, 0]]}, "outside its layers"),
        ({"head": True}, "head"),
    ],
)
def test_bad_expert_manifests(moe_pack: tuple[Path, Path], change: dict[str, Any], words: str) -> None:
    _, pack_dir = moe_pack
    name = read_expert_pack(pack_dir).experts[0].name
    raw = json.loads((pack_dir / name / "manifest.json").read_text())
    with pytest.raises(FragmentError, match=words):
        parse_manifest({**raw, **change})


def test_pack_missing_an_expert_is_refused(moe_pack: tuple[Path, Path], tmp_path: Path) -> None:
    _, pack_dir = moe_pack
    copy = tmp_path / "pack"
    shutil.copytree(pack_dir, copy)
    index = json.loads((copy / "pack.json").read_text())
    index["expert_fragments"] = index["expert_fragments"][:-1]
    (copy / "pack.json").write_text(json.dumps(index))
    with pytest.raises(FragmentError, match="is not expert fragment"):
        read_expert_pack(copy)
    shutil.rmtree(copy)
    shutil.copytree(pack_dir, copy)
    last = copy / read_expert_pack(copy).experts[-1].name / "manifest.json"
    raw = json.loads(last.read_text())
    raw["experts"] = raw["experts"][:-1]
    last.write_text(json.dumps(raw))
    with pytest.raises(FragmentError, match="every routed expert exactly once"):
        read_expert_pack(copy)


def test_trunk_with_expert_fragments_equals_whole_model(moe_pack: tuple[Path, Path]) -> None:
    """Trunk + routed experts from the expert fragments (in process) == the whole local model, bit for bit."""
    model_dir, pack_dir = moe_pack
    pack = read_expert_pack(pack_dir)
    held: dict[tuple[int, int], tuple[torch.Tensor, torch.Tensor]] = {}
    for m in pack.experts:
        _, weights = load_expert_fragment(pack_dir / m.name)
        assert weights.pairs == m.experts
        held.update(weights.weights)
    whole = load_model(model_dir)
    calls: list[tuple[int, tuple[int, ...]]] = []
    experts = ExpertWeights(whole.cfg, held)

    def call(layer: int, plan: Dispatch, rows: torch.Tensor) -> list[torch.Tensor]:
        calls.append((layer, tuple(plan.experts)))
        return experts(layer, plan, rows)

    _, trunk = load_trunk([pack_dir / "frag-00-of-01"], call)
    assert sum(p.numel() for p in trunk.parameters()) < sum(p.numel() for p in whole.parameters())
    ids = torch.randint(0, 101, (1, 12), generator=torch.Generator().manual_seed(1))
    with record_expert_usage(trunk) as usage:
        got = trunk(ids, 0, all_logits=True)
    assert torch.equal(got, whole(ids, 0, all_logits=True))
    assert [layer for layer, _ in calls] == list(whole.cfg.moe_layers)
    assert usage.routed_rows() == 12 * whole.cfg.num_experts_per_tok * len(whole.cfg.moe_layers)


def test_expert_weights_refuse_what_they_do_not_hold(moe_pack: tuple[Path, Path]) -> None:
    _, pack_dir = moe_pack
    _, weights = load_expert_fragment(pack_dir / read_expert_pack(pack_dir).experts[1].name)
    layer, expert = weights.pairs[0]
    rows = torch.randn(3, 64)
    assert weights.run(layer, (expert,), (3,), rows).shape == (3, 64)
    with pytest.raises(ProtocolError, match="does not hold expert 0"):
        weights.run(layer, (0,), (3,), rows)
    with pytest.raises(ProtocolError, match=r"expected \[4, 64\]"):
        weights.run(layer, (expert,), (4,), rows)
    with pytest.raises(FragmentError, match="not an expert fragment"):
        load_expert_fragment(pack_dir / "frag-00-of-01")
    assert read_manifest(pack_dir / "frag-00-of-01").experts == ()


# ------------------------------------------------------------------ wire messages


def test_expert_messages_round_trip() -> None:
    rows = torch.randn(5, 16)
    fwd = wire.ExpertForward(9, 3, (1, 6), (2, 3), rows)
    got = wire.decode(wire.encode(fwd))
    assert isinstance(got, wire.ExpertForward) and got == fwd and got.tensor is not None
    assert torch.equal(got.tensor, rows)
    res = wire.ExpertResult(9, 3, (1, 6), (2, 3), 1.25, rows, codec="fp16")
    back = wire.decode(wire.encode(res))
    assert back == res and back.tensor is not None and torch.allclose(back.tensor, rows, atol=1e-2)


@pytest.mark.parametrize(
    ("fields", "words"),
    [
        ({"experts": [2, 1], "counts": [1, 1]}, "ascending"),
        ({"experts": [1, 1], "counts": [1, 1]}, "ascending"),
        ({"experts": [1], "counts": [2, 1]}, "equally long"),
        ({"experts": [], "counts": []}, "non-empty"),
        ({"experts": [1, 2], "counts": [3, 0]}, "counts >= 1"),
        ({"experts": [1, 2], "counts": [1, 1]}, r"\[2, hidden\] tensor, got \[3, 4\]"),
        ({"compute_ms": 1.0}, "unknown fields"),
        ({"request": -1}, "request"),
    ],
)
def test_malformed_expert_messages_are_refused(fields: dict[str, Any], words: str) -> None:
    header, payload = wire.encode_parts(wire.ExpertForward(1, 0, (1, 2), (2, 1), torch.zeros(3, 4)))
    with pytest.raises(ProtocolError, match=words):
        wire.decode(wire.pack({**header, **fields}, payload))
    header.pop("tensor")
    with pytest.raises(ProtocolError, match="without a tensor"):
        wire.decode(wire.pack(header, b""))
