"""A MoE model split into a trunk and expert holders: the model-side half of experts across peers.

The *trunk* is the model without its routed experts: embeddings, attention, norms, every MoE
layer's router and shared expert, and the head. Its MoE layers are ``RemoteMoeBlock``s, which
route, dispatch and combine exactly like ``SparseMoeBlock`` (they are one) and hand only the
"run these experts on these rows" step to an ``ExpertCall``. Whether that call crosses a network
(``engine.client.experts``) or runs in this process (``ExpertWeights``, for tests and for the
node that holds the experts) is not the model's business, so the model code stays the same and
the routing, the order of the weighted sum and therefore the logits are the local model's.

``ExpertWeights`` is what an expert fragment holds: some ``(layer, expert)`` pairs' weights, and
the pure ``expert_forward`` over rows sent for them.
"""

from __future__ import annotations

import logging
from collections.abc import Callable, Mapping
from dataclasses import dataclass

import torch

from engine.errors import ModelFormatError, ProtocolError
from engine.models.config import ModelConfig
from engine.models.llama import FragmentModel, MoEDecoderLayer, RotaryTable
from engine.models.moe import Dispatch, SparseMoeBlock, expert_forward
from engine.models.moe_weights import moe_layer_names

log = logging.getLogger(__name__)

#: (absolute layer, the layer's dispatch plan, its (N, H) token rows) -> each expert's output on its
#: rows, in the order of ``plan.experts``
ExpertCall = Callable[[int, Dispatch, torch.Tensor], list[torch.Tensor]]


class RemoteMoeBlock(SparseMoeBlock):
    """A MoE layer's MLP whose routed experts run through ``call``; router and shared expert stay here."""

    def __init__(self, cfg: ModelConfig, layer: int, call: ExpertCall) -> None:
        super().__init__(cfg, layer, local_experts=False)
        #: a plain attribute, not a submodule: the caller owns the network (or the local weights)
        self.call = call

    def run_experts(self, plan: Dispatch, rows: torch.Tensor) -> list[torch.Tensor]:
        return self.call(self.layer, plan, rows)


def build_trunk(
    cfg: ModelConfig,
    tensors: Mapping[str, torch.Tensor],
    start: int,
    end: int,
    call: ExpertCall,
    *,
    embed: bool,
    head: bool,
    dtype: torch.dtype = torch.float32,
    device: torch.device | str = "cpu",
) -> FragmentModel:
    """Layers ``[start, end)`` of a MoE model without routed experts, from a trunk fragment's tensors.

    Built on the meta device and materialised after the MoE blocks were swapped, so no memory is
    ever taken for the routed experts (most of a MoE model's bytes: Mixtral 8x7B holds ~45 of its
    47 B parameters in them).
    """
    if not cfg.is_moe:
        raise ModelFormatError("a trunk without routed experts only exists for Mixture-of-Experts models")
    with torch.device("meta"):
        model = FragmentModel(cfg, start, end, embed=embed, head=head)
        for layer in model.layers:
            if isinstance(layer, MoEDecoderLayer):
                layer.moe = RemoteMoeBlock(cfg, layer.moe.layer, call)
    model = model.to_empty(device=device).to(dtype)
    model.load_hf_tensors(tensors)
    model.rotary = RotaryTable(cfg)  # built outside the meta context: it holds real values
    return model.eval()


@dataclass
class ExpertWeights:
    """The routed experts one expert fragment holds: ``(layer, expert) -> (gate_up (2I, H), down (H, I))``."""

    cfg: ModelConfig
    weights: dict[tuple[int, int], tuple[torch.Tensor, torch.Tensor]]

    @classmethod
    def from_tensors(
        cls,
        cfg: ModelConfig,
        tensors: Mapping[str, torch.Tensor],
        pairs: tuple[tuple[int, int], ...],
        *,
        dtype: torch.dtype = torch.float32,
        device: torch.device | str = "cpu",
    ) -> ExpertWeights:
        """Stack each expert's gate and up projections, from its canonical HF tensor names."""
        width, hidden = cfg.moe_intermediate_size, cfg.hidden_size
        weights = {}
        for layer, expert in pairs:
            if not cfg.is_moe_layer(layer) or not 0 <= expert < cfg.num_experts:
                raise ModelFormatError(f"layer {layer} has no routed expert {expert}")
            names = moe_layer_names(cfg, layer).experts[expert]
            missing = [n for n in names.all() if n not in tensors]
            if missing:
                raise ModelFormatError(f"weights are missing tensor '{missing[0]}'")
            gate_up = torch.cat([tensors[names.gate], tensors[names.up]], 0)
            down = tensors[names.down]
            if gate_up.shape != (2 * width, hidden) or down.shape != (hidden, width):
                raise ModelFormatError(f"expert {expert} of layer {layer} has the wrong shape")
            weights[(layer, expert)] = (
                gate_up.to(device=device, dtype=dtype).contiguous(),
                down.to(device=device, dtype=dtype).contiguous(),
            )
        return cls(cfg, weights)

    @property
    def pairs(self) -> tuple[tuple[int, int], ...]:
        return tuple(sorted(self.weights))

    def run(self, layer: int, experts: tuple[int, ...], counts: tuple[int, ...], rows: torch.Tensor) -> torch.Tensor:
        """The experts' outputs on their rows (``counts[i]`` rows for ``experts[i]``, back to back)."""
        missing = [e for e in experts if (layer, e) not in self.weights]
        if missing:
            raise ProtocolError(f"this node does not hold expert {missing[0]} of layer {layer}")
        if rows.dim() != 2 or rows.shape[1] != self.cfg.hidden_size or rows.shape[0] != sum(counts):
            raise ProtocolError(f"expected [{sum(counts)}, {self.cfg.hidden_size}] rows, got {list(rows.shape)}")
        some = next(iter(self.weights.values()))[0]
        x = rows.to(device=some.device, dtype=some.dtype)
        parts = [
            expert_forward(*self.weights[(layer, e)], part) for e, part in zip(experts, x.split(counts), strict=True)
        ]
        return torch.cat(parts, 0)

    def __call__(self, layer: int, plan: Dispatch, rows: torch.Tensor) -> list[torch.Tensor]:
        """An in-process ``ExpertCall`` (every routed expert of the trunk's layers must be held)."""
        counts = tuple(len(r) for r in plan.rows)
        out = self.run(layer, tuple(plan.experts), counts, torch.cat([rows[r] for r in plan.rows], 0))
        return list(out.to(rows.dtype).split(counts))
