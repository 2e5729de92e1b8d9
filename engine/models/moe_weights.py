"""Hugging Face tensor names of MoE layers, in both on-disk layouts transformers uses.

Mixtral and Qwen2-MoE checkpoints (the Hub's, and what transformers 5's ``save_pretrained``
writes by default) hold one tensor per expert and projection::

    model.layers.N.block_sparse_moe.gate.weight              Mixtral router (E, H)
    model.layers.N.block_sparse_moe.experts.E.w1|w3|w2.weight  gate | up | down
    model.layers.N.mlp.gate.weight                           Qwen2-MoE router (E, H)
    model.layers.N.mlp.experts.E.gate_proj|up_proj|down_proj.weight
    model.layers.N.mlp.shared_expert.gate_proj|up_proj|down_proj.weight, mlp.shared_expert_gate.weight

These per-expert names are our canonical ones: a fragment (or later a single expert placed on
its own node) lists exactly the experts it holds. transformers 5 keeps experts fused in memory
(``mlp.experts.gate_up_proj`` (E, 2I, H), ``mlp.experts.down_proj`` (E, H, I), and Mixtral's router
renamed to ``mlp.gate.weight``) and writes that layout with ``save_original_format=False``;
``fused_source`` maps a canonical name onto a slice of such a fused tensor so both layouts load.
"""

from __future__ import annotations

import re
from dataclasses import dataclass
from typing import Literal

import torch

from engine.models.config import ModelConfig


@dataclass(frozen=True)
class SwigluNames:
    """The three projections of one SwiGLU expert."""

    gate: str
    up: str
    down: str

    def all(self) -> list[str]:
        return [self.gate, self.up, self.down]


@dataclass(frozen=True)
class MoeLayerNames:
    router: str
    experts: tuple[SwigluNames, ...]
    shared: SwigluNames | None = None
    shared_gate: str | None = None

    def all(self) -> list[str]:
        names = [self.router]
        for expert in self.experts:
            names += expert.all()
        if self.shared is not None and self.shared_gate is not None:
            names += [*self.shared.all(), self.shared_gate]
        return names


def moe_layer_names(cfg: ModelConfig, layer: int) -> MoeLayerNames:
    """Canonical (per-expert) tensor names of MoE layer ``layer`` (absolute index)."""
    if cfg.model_type == "mixtral":
        pre = f"model.layers.{layer}.block_sparse_moe."
        experts = tuple(
            SwigluNames(f"{pre}experts.{e}.w1.weight", f"{pre}experts.{e}.w3.weight", f"{pre}experts.{e}.w2.weight")
            for e in range(cfg.num_experts)
        )
        return MoeLayerNames(pre + "gate.weight", experts)
    pre = f"model.layers.{layer}.mlp."

    def swiglu(p: str) -> SwigluNames:
        return SwigluNames(f"{p}gate_proj.weight", f"{p}up_proj.weight", f"{p}down_proj.weight")

    experts = tuple(swiglu(f"{pre}experts.{e}.") for e in range(cfg.num_experts))
    if not cfg.shared_expert_intermediate_size:
        return MoeLayerNames(pre + "gate.weight", experts)
    return MoeLayerNames(
        pre + "gate.weight", experts, swiglu(pre + "shared_expert."), pre + "shared_expert_gate.weight"
    )


@dataclass(frozen=True)
class FusedSlice:
    """Where a canonical tensor lives in a fused-layout checkpoint: ``source[expert]``, or half of it."""

    source: str
    expert: int | None
    part: Literal["gate", "up", "all"]

    def take(self, tensor: torch.Tensor) -> torch.Tensor:
        """Cut this slice out of ``tensor`` (already indexed by ``expert`` when that is set)."""
        if self.part == "all":
            return tensor
        gate, up = tensor.chunk(2, dim=0)
        return (gate if self.part == "gate" else up).contiguous()


_MIXTRAL_EXPERT = re.compile(r"^(model\.layers\.\d+)\.block_sparse_moe\.experts\.(\d+)\.w([123])\.weight$")
_MIXTRAL_ROUTER = re.compile(r"^(model\.layers\.\d+)\.block_sparse_moe\.gate\.weight$")
_QWEN_EXPERT = re.compile(r"^(model\.layers\.\d+)\.mlp\.experts\.(\d+)\.(gate|up|down)_proj\.weight$")
_PARTS: dict[str, Literal["gate", "up", "all"]] = {"1": "gate", "3": "up", "2": "all", "gate": "gate", "up": "up"}


def fused_source(name: str) -> FusedSlice | None:
    """The fused-layout slice holding canonical tensor ``name``, or None when it has no fused form."""
    if m := _MIXTRAL_ROUTER.match(name):
        return FusedSlice(f"{m[1]}.mlp.gate.weight", None, "all")
    m = _MIXTRAL_EXPERT.match(name) or _QWEN_EXPERT.match(name)
    if m is None:
        return None
    part = _PARTS.get(m[3], "all")
    fused = "down_proj" if part == "all" else "gate_up_proj"
    return FusedSlice(f"{m[1]}.mlp.experts.{fused}", int(m[2]), part)
