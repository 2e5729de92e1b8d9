"""Running a ``FragmentModel`` under a ``SkipPlan``: whole layers, sub-blocks and FFN neurons.

Whole layers are skipped by ``FragmentModel.forward`` itself (``skip=``); bypassing only a
layer's attention or MLP, or keeping a subset of its FFN neurons, goes through its ``run_layer``
hook, so the embeddings, positions, cache and head are the model's own code. The attention half
is the layer's own ``attend``; ``mlp_update`` is the MLP half (with optional neuron sparsity),
written against the layer's own modules; a test checks that together they reproduce
``DecoderLayer.forward`` and ``FragmentModel.forward`` exactly.

``observe`` hands each layer's residual stream before the layer, between its sub-blocks and
after it to the caller: that is all calibration needs.
"""

from __future__ import annotations

import weakref
from collections.abc import Callable
from typing import cast

import torch
import torch.nn.functional as F

from engine.models.kv_cache import KVCache
from engine.models.llama import AttentionLayer, DecoderLayer, FragmentModel
from engine.sparsity.budget import SkipPlan

#: (absolute layer, stream before the layer, after its attention, after its MLP)
Observer = Callable[[int, torch.Tensor, torch.Tensor, torch.Tensor], None]

#: each layer's down projection transposed (intermediate x hidden), so a decode step gathers the
#: kept neurons' weights as contiguous rows instead of strided columns; dropped with the layer
_DOWN_ROWS: weakref.WeakKeyDictionary[DecoderLayer, torch.Tensor] = weakref.WeakKeyDictionary()


def _down_rows(layer: DecoderLayer) -> torch.Tensor:
    rows = _DOWN_ROWS.get(layer)
    if rows is None:
        rows = _DOWN_ROWS[layer] = layer.down_proj.weight.t().contiguous()
    return rows


def mlp_update(layer: DecoderLayer, x: torch.Tensor, keep: float = 1.0) -> torch.Tensor:
    """What the layer's SwiGLU MLP adds to ``x``; ``keep < 1`` keeps that fraction of neurons per token.

    Contextual sparsity as in CATS (Lee et al. 2024): each token keeps the intermediate neurons
    with the largest ``|silu(gate)|`` and drops the rest, so the up and down projections would
    only need the kept rows. A single token (decode) computes exactly that, gathering the rows;
    a prefill masks, which gives the same values without a per-token gather.
    """
    h = layer.post_attention_layernorm(x)
    if keep >= 1.0:
        return layer.feed_forward(h)
    width = layer.down_proj.in_features
    kept = max(1, round(keep * width))
    w_gate, w_up = layer.gate_up.weight.split(width)
    b_gate, b_up = layer.gate_up.bias.split(width) if layer.gate_up.bias is not None else (None, None)
    act = F.silu(F.linear(h, w_gate, b_gate))
    idx = act.abs().topk(kept, dim=-1).indices
    if h.shape[0] * h.shape[1] == 1:
        rows = idx.view(-1)
        up = F.linear(h, w_up[rows], b_up[rows] if b_up is not None else None)
        out = (act[..., rows] * up) @ _down_rows(layer)[rows]
        return out + layer.down_proj.bias if layer.down_proj.bias is not None else out
    mask = torch.zeros_like(act).scatter_(-1, idx, 1.0)
    up = F.linear(h, w_up, b_up)
    return layer.down_proj(act * mask * up)


@torch.inference_mode()
def forward(
    model: FragmentModel,
    x: torch.Tensor,
    start_pos: int,
    cache: KVCache | None = None,
    plan: SkipPlan = SkipPlan(),  # noqa: B008 - frozen, never mutated
    *,
    all_logits: bool = False,
    observe: Observer | None = None,
) -> torch.Tensor:
    """``model(x, start_pos, cache, all_logits=...)`` with ``plan`` applied; see the module docstring."""

    def run_layer(
        index: int,
        layer: AttentionLayer,
        x: torch.Tensor,
        cos: torch.Tensor,
        sin: torch.Tensor,
        cache: KVCache | None,
        slot: int,
        start: int,
        mask: torch.Tensor | None,
    ) -> torch.Tensor:
        before = x
        if index not in plan.attention:
            x = layer.attend(x, cos, sin, cache, slot, start, mask)
        middle = x
        if index not in plan.mlp:
            keep = plan.neuron_keep if index in plan.neuron_layers else 1.0
            x = x + mlp_update(cast(DecoderLayer, layer), x, keep)  # sub-block plans are for dense layers
        if observe is not None:
            observe(index, before, middle, x)
        return x

    return model(x, start_pos, cache, all_logits=all_logits, skip=plan.layers, run_layer=run_layer)
