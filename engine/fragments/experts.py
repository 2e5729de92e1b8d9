"""Mixture-of-Experts packs: a trunk plus expert fragments that different nodes hold.

Why split a MoE model this way: a token runs only ``k`` of each layer's ``E`` routed experts, and
the experts hold nearly all of the bytes. With each layer's experts spread over nodes, a token's
hidden state has to reach only the nodes of its top-k experts, and each node holds ``1/M`` of the
expert weights. ``pack_moe_model`` therefore writes, besides the usual ``pack.json`` and
tokenizer::

    frag-00-of-01/      the trunk: embeddings, attention, norms, routers, shared experts, head
                        (manifest ``experts: []``: its routed experts live elsewhere)
    experts-00-of-04/   routed experts of every MoE layer, group 0 (manifest ``experts: [[l, e], ...]``)
    ...

``pack.json`` lists the trunk under ``fragments`` (so ``read_pack`` reads it like any pack) and
the expert fragments under ``expert_fragments``. ``split_experts`` decides which experts go
together; ``read_expert_pack`` checks that every routed expert is in exactly one expert fragment.
"""

from __future__ import annotations

import json
import logging
from collections.abc import Sequence
from dataclasses import dataclass, replace
from pathlib import Path

import torch

from engine.errors import ConfigError, FragmentError, ModelFormatError
from engine.fragments.manifest import FORMAT_VERSION, Manifest, read_manifest, verify_files
from engine.fragments.pack import (
    _DTYPES,
    PACK_INDEX,
    copy_tokenizer,
    fragment_flops,
    fragment_tensors,
    split_layers,
    write_fragment,
    write_pack_index,
)
from engine.fragments.store import Pack, read_pack
from engine.models.config import ModelConfig, load_config
from engine.models.llama import FragmentModel, hf_tensor_names
from engine.models.loading import read_tensors
from engine.models.moe_trunk import ExpertCall, ExpertWeights, build_trunk
from engine.models.moe_weights import moe_layer_names

log = logging.getLogger(__name__)

#: ``pack.json`` key listing the expert fragments
EXPERT_INDEX_KEY = "expert_fragments"

Pair = tuple[int, int]


def split_experts(cfg: ModelConfig, count: int) -> list[tuple[Pair, ...]]:
    """``count`` groups of (layer, expert) pairs: group j holds the same contiguous block of expert
    indices in every MoE layer (as even as possible; earlier groups take the remainder).

    The router has no order over experts, so any even split balances a node's expected load at
    ``1/count`` of each layer's routed rows; equal blocks per layer also give every node the same
    bytes.
    """
    if not cfg.is_moe:
        raise ConfigError("only a Mixture-of-Experts model has experts to split")
    if not 1 <= count <= cfg.num_experts:
        raise ConfigError(f"cannot split {cfg.num_experts} experts per layer into {count} groups (1-{cfg.num_experts})")
    blocks = split_layers(cfg.num_experts, count)
    return [tuple((layer, e) for layer in cfg.moe_layers for e in range(a, b)) for a, b in blocks]


def _routed_names(cfg: ModelConfig, pairs: Sequence[Pair]) -> list[str]:
    return [n for layer, e in pairs for n in moe_layer_names(cfg, layer).experts[e].all()]


def _all_pairs(cfg: ModelConfig) -> list[Pair]:
    return [(layer, e) for layer in cfg.moe_layers for e in range(cfg.num_experts)]


def pack_moe_model(
    model_dir: Path,
    out: Path,
    expert_fragments: int,
    *,
    model_id: str,
    trunk_fragments: int = 1,
    dtype: str = "float32",
) -> tuple[list[Manifest], list[Manifest]]:
    """Write the trunk (``trunk_fragments`` layer ranges) and ``expert_fragments`` expert fragments.

    Returns (trunk manifests, expert manifests). An expert fragment's ``flops_per_token`` is the
    expected per-token cost under uniform routing (each of its experts runs for ``k/E`` of tokens);
    the trunk's counts no routed expert.
    """
    if dtype not in _DTYPES:
        raise ConfigError(f"unknown dtype {dtype!r} (choose from {', '.join(_DTYPES)})")
    cfg = load_config(model_dir)
    groups = split_experts(cfg, expert_fragments)
    out.mkdir(parents=True, exist_ok=True)
    tokenizer = copy_tokenizer(model_dir, out)
    routed = set(_routed_names(cfg, _all_pairs(cfg)))
    per_expert = cfg.expert_flops_per_token()
    trunk, experts = [], []
    for index, (start, end) in enumerate(split_layers(cfg.num_hidden_layers, trunk_fragments)):
        embed, head = index == 0, index == trunk_fragments - 1
        names = [n for n in hf_tensor_names(cfg, start, end, embed=embed, head=head) if n not in routed]
        moe_here = sum(1 for layer in cfg.moe_layers if start <= layer < end)
        flops = fragment_flops(cfg, start, end, head) - moe_here * cfg.num_experts_per_tok * per_expert
        template = Manifest(
            FORMAT_VERSION, model_id, index, trunk_fragments, start, end, embed, head, dtype, 0, flops, {}, experts=()
        )
        trunk.append(_write(model_dir, out, cfg, names, template))
    for index, pairs in enumerate(groups):
        layers = sorted({layer for layer, _ in pairs})
        flops = len(pairs) * per_expert * cfg.num_experts_per_tok // cfg.num_experts
        template = Manifest(
            FORMAT_VERSION, model_id, index, len(groups), layers[0], layers[-1] + 1, False, False, dtype, 0, flops, {},
            experts=pairs,
        )  # fmt: skip
        experts.append(_write(model_dir, out, cfg, _routed_names(cfg, pairs), template))
    write_pack_index(
        out, model_id, cfg.num_hidden_layers, trunk, tokenizer, **{EXPERT_INDEX_KEY: [m.name for m in experts]}
    )
    log.info(
        "packed %s: a trunk of %d fragments and %d expert fragments in %s", model_id, len(trunk), len(experts), out
    )
    return trunk, experts


def _write(model_dir: Path, out: Path, cfg: ModelConfig, names: list[str], template: Manifest) -> Manifest:
    """Write the named tensors as the fragment ``template`` describes (its files and bytes filled in)."""
    tensors = fragment_tensors(model_dir, cfg, names, head=template.head, dtype=template.dtype)
    return write_fragment(
        model_dir,
        out,
        tensors,
        template.model_id,
        lambda files: replace(template, files=files, bytes=sum(e.bytes for e in files.values())),
    )


# ---------------------------------------------------------------- reading


@dataclass(frozen=True)
class ExpertPack:
    """A MoE pack on disk: the trunk (a ``Pack``) and the expert fragments."""

    trunk: Pack
    experts: tuple[Manifest, ...]

    @property
    def model_id(self) -> str:
        return self.trunk.model_id

    @property
    def root(self) -> Path:
        return self.trunk.root

    def manifest(self, name: str) -> Manifest | None:
        """The trunk or expert fragment called ``name``."""
        return next((m for m in (*self.trunk.manifests, *self.experts) if m.name == name), None)


def is_expert_pack(root: Path) -> bool:
    """Whether ``root`` holds a pack with expert fragments (anything unreadable is left to ``read_pack``)."""
    try:
        raw = json.loads((root / PACK_INDEX).read_text(encoding="utf-8"))
    except (OSError, ValueError):
        return False
    return isinstance(raw, dict) and EXPERT_INDEX_KEY in raw


def read_expert_pack(root: Path) -> ExpertPack:
    """Read a MoE pack; check the trunk holds no routed expert and the expert fragments hold each exactly once."""
    trunk = read_pack(root)
    try:
        raw = json.loads((root / PACK_INDEX).read_text(encoding="utf-8"))
        names = [str(n) for n in raw[EXPERT_INDEX_KEY]]
    except (OSError, ValueError, KeyError, TypeError) as exc:
        raise FragmentError(f"cannot read the expert fragments of {root / PACK_INDEX}: {exc!r}") from None
    experts = tuple(read_manifest(root / n) for n in names)
    if any(m.experts != () for m in trunk.manifests):
        raise FragmentError(f"{root}: the trunk fragments of a pack with expert fragments must hold no routed expert")
    for i, m in enumerate(experts):
        if m.model_id != trunk.model_id or m.index != i or m.count != len(experts) or not m.expert_only:
            raise FragmentError(f"{root}: {m.name} is not expert fragment {i} of {len(experts)} of {trunk.model_id}")
    try:
        cfg = load_config(trunk.fragment_dir(0))
    except ModelFormatError as exc:
        raise FragmentError(f"{root}: {exc}") from None
    held = [pair for m in experts for pair in m.experts or ()]
    if sorted(held) != _all_pairs(cfg):
        raise FragmentError(f"{root}: the expert fragments do not hold every routed expert exactly once")
    return ExpertPack(trunk, experts)


# ---------------------------------------------------------------- loading


def load_expert_fragment(
    folder: Path, *, dtype: torch.dtype | None = None, device: torch.device | str = "cpu"
) -> tuple[Manifest, ExpertWeights]:
    """Verify an expert fragment against its manifest (sizes, sha256), then load its experts."""
    manifest = read_manifest(folder)
    if not manifest.expert_only:
        raise FragmentError(f"{folder} is not an expert fragment")
    verify_files(folder, manifest)
    try:
        cfg = load_config(folder)
        weights = ExpertWeights.from_tensors(
            cfg,
            read_tensors(folder, None),
            manifest.experts or (),
            dtype=dtype or _DTYPES.get(manifest.dtype, torch.float32),
            device=device,
        )
    except ModelFormatError as exc:
        raise FragmentError(f"expert fragment {manifest.name} of {manifest.model_id}: {exc}") from None
    log.info("loaded %d experts of %s from %s", len(weights.weights), manifest.model_id, manifest.name)
    return manifest, weights


def load_trunk(
    folders: Sequence[Path],
    call: ExpertCall,
    *,
    dtype: torch.dtype | None = None,
    device: torch.device | str = "cpu",
) -> tuple[tuple[Manifest, ...], FragmentModel]:
    """Verify consecutive trunk fragments, then build one trunk model whose routed experts go through ``call``."""
    if not folders:
        raise FragmentError("a trunk needs at least one fragment")
    manifests = tuple(read_manifest(f) for f in folders)
    for folder, m in zip(folders, manifests, strict=True):
        if m.experts != ():
            raise FragmentError(f"{m.name} of {m.model_id} is not a trunk fragment (it holds routed experts)")
        verify_files(folder, m)
    expected = manifests[0].start
    for m in manifests:
        if m.start != expected or m.model_id != manifests[0].model_id:
            raise FragmentError(f"trunk fragment {m.name} does not continue the trunk at layer {expected}")
        expected = m.end
    first, last = manifests[0], manifests[-1]
    tensors: dict[str, torch.Tensor] = {}
    for folder in folders:
        tensors.update(read_tensors(folder, None))
    try:
        cfg = load_config(folders[0])
        model = build_trunk(
            cfg,
            tensors,
            first.start,
            last.end,
            call,
            embed=first.embed,
            head=last.head,
            dtype=dtype or _DTYPES.get(first.dtype, torch.float32),
            device=device,
        )
    except ModelFormatError as exc:
        raise FragmentError(f"trunk of {first.model_id}: {exc}") from None
    return manifests, model
