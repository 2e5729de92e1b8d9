"""Sparse Mixture-of-Experts MLP (Mixtral, Qwen2-MoE), built from separable pure steps.

A MoE layer's MLP is computed in four steps, each usable on its own so that a later placement can
put the experts of one layer on different nodes:

1. ``route(router_weight, rows, ...)``: which ``k`` experts each token row goes to, with weights
   (runs where the router is, next to the layer's attention);
2. ``dispatch(indices, num_experts)``: per expert, the token rows (and top-k slots) routed to it,
   i.e. exactly the rows a router node must send to each expert's node;
3. ``expert_forward(gate_up, down, rows)``: one SwiGLU expert on its rows (pure: the weights come
   in as arguments, so it runs wherever they live);
4. ``combine(...)``: the weighted sum of the experts' outputs back into token order.

``SparseMoeBlock`` runs all four locally (all experts on one node), plus the Qwen2-MoE shared
expert. Its output equals transformers' ``MixtralSparseMoeBlock`` / ``Qwen2MoeSparseMoeBlock``.

``record_expert_usage`` counts, per layer and expert, the rows each expert processed during the
forward passes run inside it: the measured basis for "fraction of expert compute skipped".
"""

from __future__ import annotations

import logging
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass, field

import torch
import torch.nn.functional as F
from torch import nn

from engine.models.config import ModelConfig

log = logging.getLogger(__name__)


def route(
    router_weight: torch.Tensor,
    rows: torch.Tensor,
    top_k: int,
    *,
    renormalize: bool,
    weights_fp32: bool,
) -> tuple[torch.Tensor, torch.Tensor]:
    """Softmax over all experts, then top-k: ``(indices (N, k) int64, weights (N, k))``.

    Softmax runs in fp32 as in transformers. ``renormalize`` rescales the k weights to sum to 1
    (Mixtral always, Qwen2-MoE with ``norm_topk_prob``). Mixtral keeps the weights in fp32 for the
    weighted sum; Qwen2-MoE casts them back to the activations' dtype (``weights_fp32=False``):
    both are copied from transformers so bf16 runs match it too.
    """
    logits = F.linear(rows, router_weight)
    probs = torch.softmax(logits.float(), dim=-1)
    weights, indices = torch.topk(probs, top_k, dim=-1)
    if renormalize:
        weights = weights / weights.sum(dim=-1, keepdim=True)
    if not weights_fp32:
        weights = weights.to(logits.dtype)
    return indices, weights


@dataclass(frozen=True)
class Dispatch:
    """Which rows go to which expert, for one layer and one batch of token rows."""

    #: rows routed to each of the layer's experts (zero for an expert no token chose)
    counts: list[int]
    #: experts with at least one row, ascending
    experts: list[int]
    #: per entry of ``experts``: the token row indices (into the flattened (N, H) rows) it processes
    rows: list[torch.Tensor]
    #: per entry of ``experts``: which of each row's k choices this expert is (indexes the weights)
    slots: list[torch.Tensor]


def dispatch(indices: torch.Tensor, num_experts: int) -> Dispatch:
    """Group the (N, k) routing choices by expert, with a single device-to-host copy of the counts."""
    top_k = indices.shape[-1]
    flat = indices.reshape(-1)
    counts = torch.bincount(flat, minlength=num_experts).tolist()
    order = torch.argsort(flat, stable=True)
    experts, rows, slots = [], [], []
    for expert, part in enumerate(torch.split(order, counts)):
        if counts[expert]:
            experts.append(expert)
            rows.append(part // top_k)
            slots.append(part % top_k)
    return Dispatch(counts, experts, rows, slots)


def expert_forward(gate_up: torch.Tensor, down: torch.Tensor, rows: torch.Tensor) -> torch.Tensor:
    """One SwiGLU expert: ``down @ (silu(gate @ x) * (up @ x))`` on the (n, H) rows routed to it.

    ``gate_up`` is the expert's gate and up projections stacked (2I, H), ``down`` is (H, I).
    """
    gate, up = F.linear(rows, gate_up).chunk(2, dim=-1)
    return F.linear(F.silu(gate) * up, down)


def combine(
    num_rows: int, plan: Dispatch, weights: torch.Tensor, outputs: list[torch.Tensor], like: torch.Tensor
) -> torch.Tensor:
    """Sum each token's expert outputs times its routing weights; ``outputs`` follow ``plan.experts``.

    Experts are added in ascending order, as transformers does, so fp32 results agree to rounding.
    """
    out = torch.zeros((num_rows, like.shape[-1]), dtype=like.dtype, device=like.device)
    for rows, slots, y in zip(plan.rows, plan.slots, outputs, strict=True):
        out.index_add_(0, rows, (y * weights[rows, slots, None]).to(out.dtype))
    return out


@dataclass
class ExpertUsage:
    """Rows processed per (layer, expert) over the forward passes recorded; see ``record_expert_usage``.

    Every figure is measured from the routing decisions, not assumed from ``k / E``: for a batch
    of tokens, the experts no token chose are exactly the compute (and, distributed, the hidden-
    state traffic and weight reads) that routing skipped.
    """

    num_experts: int
    top_k: int
    #: absolute layer -> rows each expert processed
    counts: dict[int, list[int]] = field(default_factory=dict)
    #: absolute layer -> token rows that went through the layer's router
    tokens: dict[int, int] = field(default_factory=dict)
    #: absolute layer -> experts that processed at least one row, summed over forward passes
    experts_run: dict[int, int] = field(default_factory=dict)
    #: absolute layer -> forward passes recorded (each reads the weights of the experts it runs)
    passes: dict[int, int] = field(default_factory=dict)

    def add(self, layer: int, counts: list[int], tokens: int) -> None:
        total = self.counts.setdefault(layer, [0] * len(counts))
        for expert, n in enumerate(counts):
            total[expert] += n
        self.tokens[layer] = self.tokens.get(layer, 0) + tokens
        self.experts_run[layer] = self.experts_run.get(layer, 0) + sum(1 for n in counts if n)
        self.passes[layer] = self.passes.get(layer, 0) + 1

    def routed_rows(self) -> int:
        """(token, expert) pairs computed: what the experts actually ran."""
        return sum(sum(c) for c in self.counts.values())

    def dense_rows(self) -> int:
        """(token, expert) pairs had every token gone through every expert."""
        return sum(self.tokens.values()) * self.num_experts

    def compute_skipped_fraction(self) -> float:
        """Share of expert FLOPs routing skipped (equally: of hidden-state rows not sent to expert nodes)."""
        dense = self.dense_rows()
        return 1.0 - self.routed_rows() / dense if dense else 0.0

    def weights_skipped_fraction(self) -> float:
        """Share of per-pass expert weight reads skipped: experts no token of a forward pass chose.

        One decode token skips ``1 - k/E`` of the expert bytes; a long prefill usually touches
        every expert, so this is the figure that shows how batch size erodes the saving.
        """
        possible = sum(self.passes.values()) * self.num_experts
        return 1.0 - sum(self.experts_run.values()) / possible if possible else 0.0

    def activation_bytes(self, hidden_size: int, itemsize: int) -> tuple[int, int]:
        """Hidden-state bytes to and from expert nodes: (top-k routing, sending every row to every expert)."""
        row = 2 * hidden_size * itemsize
        return self.routed_rows() * row, self.dense_rows() * row

    def summary(self) -> dict[str, float | int]:
        return {
            "num_experts": self.num_experts,
            "top_k": self.top_k,
            "tokens": sum(self.tokens.values()),
            "routed_rows": self.routed_rows(),
            "dense_rows": self.dense_rows(),
            "compute_skipped_fraction": self.compute_skipped_fraction(),
            "weights_skipped_fraction": self.weights_skipped_fraction(),
        }


class Router(nn.Module):
    """The layer's gate: one (E, H) linear map, then ``route``."""

    def __init__(self, cfg: ModelConfig) -> None:
        super().__init__()
        self.weight = nn.Parameter(torch.empty(cfg.num_experts, cfg.hidden_size))
        self.top_k = cfg.num_experts_per_tok
        self.renormalize = cfg.norm_topk_prob
        self.weights_fp32 = cfg.model_type == "mixtral"

    def forward(self, rows: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        return route(self.weight, rows, self.top_k, renormalize=self.renormalize, weights_fp32=self.weights_fp32)


class ExpertBank(nn.Module):
    """The routed experts' weights, stacked: ``gate_up`` (E, 2I, H) and ``down`` (E, H, I).

    Stacking keeps loading and ``.to()`` simple; ``params(e)`` hands out one expert's weights as
    views, which is all ``expert_forward`` needs (and what a per-expert fragment would hold).
    """

    def __init__(self, num_experts: int, hidden: int, width: int) -> None:
        super().__init__()
        self.gate_up = nn.Parameter(torch.empty(num_experts, 2 * width, hidden))
        self.down = nn.Parameter(torch.empty(num_experts, hidden, width))

    @property
    def count(self) -> int:
        """Experts held: the layer's all, or none in a trunk whose experts run on expert nodes."""
        return self.gate_up.shape[0]

    def params(self, expert: int) -> tuple[torch.Tensor, torch.Tensor]:
        return self.gate_up[expert], self.down[expert]


class SharedExpert(nn.Module):
    """Qwen2-MoE's always-on expert, scaled per token by ``sigmoid(shared_expert_gate(x))``."""

    def __init__(self, hidden: int, width: int) -> None:
        super().__init__()
        self.gate_up = nn.Linear(hidden, 2 * width, bias=False)
        self.down_proj = nn.Linear(width, hidden, bias=False)
        self.gate = nn.Linear(hidden, 1, bias=False)

    def forward(self, rows: torch.Tensor) -> torch.Tensor:
        gate, up = self.gate_up(rows).chunk(2, dim=-1)
        return torch.sigmoid(self.gate(rows)) * self.down_proj(F.silu(gate) * up)


class SparseMoeBlock(nn.Module):
    """The MLP of one MoE layer: route, dispatch, run experts, combine (plus the shared expert).

    ``run_experts`` is the one step a subclass replaces to run the routed experts elsewhere
    (``engine.models.moe_trunk.RemoteMoeBlock``); such a block is built with
    ``local_experts=False`` and holds no routed expert weights at all.
    """

    def __init__(self, cfg: ModelConfig, layer: int, *, local_experts: bool = True) -> None:
        super().__init__()
        self.layer = layer
        self.num_experts = cfg.num_experts
        self.router = Router(cfg)
        held = cfg.num_experts if local_experts else 0
        self.experts = ExpertBank(held, cfg.hidden_size, cfg.moe_intermediate_size)
        width = cfg.shared_expert_intermediate_size
        self.shared = SharedExpert(cfg.hidden_size, width) if width else None
        #: set by ``record_expert_usage`` while recording; a plain attribute, not a submodule
        self.recorder: ExpertUsage | None = None

    def forward(self, h: torch.Tensor) -> torch.Tensor:
        rows = h.reshape(-1, h.shape[-1])
        indices, weights = self.router(rows)
        plan = dispatch(indices, self.num_experts)
        if self.recorder is not None:
            self.recorder.add(self.layer, plan.counts, rows.shape[0])
        outputs = self.run_experts(plan, rows)
        out = combine(rows.shape[0], plan, weights, outputs, rows)
        if self.shared is not None:
            out = out + self.shared(rows)
        return out.view(h.shape)

    def run_experts(self, plan: Dispatch, rows: torch.Tensor) -> list[torch.Tensor]:
        """Each routed expert's output on its rows, in the order of ``plan.experts``."""
        return [expert_forward(*self.experts.params(e), rows[r]) for e, r in zip(plan.experts, plan.rows, strict=True)]


@contextmanager
def record_expert_usage(model: nn.Module) -> Iterator[ExpertUsage]:
    """Count expert usage in every MoE block of ``model`` for the forward passes run inside.

    A dense model yields an empty record (zero experts), so callers need not special-case it.
    """
    blocks = [m for m in model.modules() if isinstance(m, SparseMoeBlock)]
    first = blocks[0] if blocks else None
    usage = ExpertUsage(
        num_experts=first.num_experts if first else 0,
        top_k=first.router.top_k if first else 0,
    )
    for block in blocks:
        block.recorder = usage
    try:
        yield usage
    finally:
        for block in blocks:
            block.recorder = None
        log.debug("expert usage over %d MoE layers: %s", len(blocks), usage.summary())
