"""Planning a compute budget: which layers or sub-blocks to skip, what it saves, how many hops remain.

Everything here is pure (no model, no torch tensors), so the planner can be tested on made-up
importance figures and reused by a scheduler that only has manifests.

A budget is an *activation*: the fraction of per-token decoder-layer FLOPs that still runs (0.75
runs three quarters). Units (whole layers, attention or MLP sub-blocks) are skipped least
important per FLOP first, and the plan is the prefix of that order whose activation comes closest
to the budget (ties run more): with 30 equal layers, 0.97 skips one layer (0.967) and 0.93 two.
Importance is the calibration's block influence (``ranking="bi"``) or its drop-one loss
(``"loss"``, the better predictor; see ``engine.sparsity.importance``).

The first and the last layer are never skipped. Their block influence is the largest by far in
every model measured (layer 0 turns raw token embeddings into the residual representation, the
last one shapes the stream for the final norm and the LM head), so skipping them costs far more
than any other layer; and their fragments hold the embeddings and the head, so those nodes stay
in the route whatever else is skipped: skipping their layers could never save a hop.
"""

from __future__ import annotations

from collections.abc import Iterable, Sequence
from dataclasses import dataclass

from engine.errors import ConfigError
from engine.fragments.pack import split_layers
from engine.models.config import ModelConfig
from engine.sparsity.importance import LayerImportance

#: whole decoder layers; attention sub-blocks only; attention or MLP sub-blocks, whichever is
#: cheaper per unit of importance; contextual FFN neuron sparsity (CATS-style top-k per token)
MODES = ("layer", "attention", "block", "neurons")
#: which calibration figure orders the units: block influence, or measured drop-one loss
RANKINGS = ("bi", "loss")


@dataclass(frozen=True)
class LayerCost:
    """Forward FLOPs per token of one decoder layer, split by sub-block.

    ``attention`` counts the q/k/v/o projections and the score and value products over
    ``context`` keys (what ``ModelConfig.flops_per_token_layer`` leaves out: at 512 tokens of
    context it is 40% of SmolLM2's attention). ``mlp`` counts gate, up and down projections.
    """

    attention: int
    mlp: int
    #: the MLP's intermediate width: neuron sparsity keeps a whole number of these per token
    neurons: int
    context: int

    @property
    def total(self) -> int:
        return self.attention + self.mlp


def layer_cost(cfg: ModelConfig, context: int) -> LayerCost:
    """FLOPs per token of one layer of ``cfg`` for a token that attends to ``context`` positions."""
    if context < 1:
        raise ConfigError("the context for FLOP counts must be at least one token")
    h, q_dim = cfg.hidden_size, cfg.num_attention_heads * cfg.head_dim
    projections = 2 * (h * q_dim + 2 * h * cfg.kv_dim + q_dim * h)
    scores = 2 * 2 * q_dim * context  # q.k over the context, then the weighted sum of values
    return LayerCost(projections + scores, 2 * 3 * h * cfg.intermediate_size, cfg.intermediate_size, context)


@dataclass(frozen=True)
class SkipPlan:
    """What to bypass: whole layers, sub-blocks, and the FFN neurons kept per token (absolute layers)."""

    layers: frozenset[int] = frozenset()
    attention: frozenset[int] = frozenset()
    mlp: frozenset[int] = frozenset()
    #: fraction of intermediate neurons each token keeps in ``neuron_layers`` (by |silu(gate)|)
    neuron_keep: float = 1.0
    neuron_layers: frozenset[int] = frozenset()

    def runs_layer(self, layer: int) -> bool:
        """Whether any part of ``layer`` runs (a node holding only skipped layers can leave the route)."""
        return layer not in self.layers and not (layer in self.attention and layer in self.mlp)

    def describe(self) -> dict[str, object]:
        """JSON-able summary for tables and reports."""
        out: dict[str, object] = {
            "layers": sorted(self.layers),
            "attention": sorted(self.attention),
            "mlp": sorted(self.mlp),
        }
        if self.neuron_layers:
            out["neuron_keep"] = round(self.neuron_keep, 4)
            out["neuron_layers"] = len(self.neuron_layers)
        return out


def _normalised(layers: Iterable[int], attention: Iterable[int], mlp: Iterable[int]) -> SkipPlan:
    """A layer whose attention and MLP are both skipped is a skipped layer."""
    attn, ffn = set(attention), set(mlp)
    whole = set(layers) | (attn & ffn)
    return SkipPlan(frozenset(whole), frozenset(attn - whole), frozenset(ffn - whole))


def layer_fraction(plan: SkipPlan, cost: LayerCost, layer: int) -> float:
    """Fraction of ``layer``'s FLOPs per token that ``plan`` still runs."""
    if layer in plan.layers:
        return 0.0
    attn = 0 if layer in plan.attention else cost.attention
    mlp = 0.0 if layer in plan.mlp else float(cost.mlp)
    if layer in plan.neuron_layers and layer not in plan.mlp:
        # CATS-style: the gate projection runs densely to choose the neurons, up and down only for those kept
        mlp = cost.mlp / 3 + cost.mlp * 2 / 3 * plan.neuron_keep
    return (attn + mlp) / cost.total


def activation(plan: SkipPlan, cost: LayerCost, num_layers: int) -> float:
    """Fraction of the model's per-token layer FLOPs that ``plan`` runs."""
    return sum(layer_fraction(plan, cost, i) for i in range(num_layers)) / num_layers


def hops(plan: SkipPlan, num_layers: int, fragments: int) -> int:
    """Nodes a request still visits when the model is packed in ``fragments`` (as ``fragments pack`` cuts it).

    A fragment drops out of the route only when every one of its layers is skipped.
    """
    spans = split_layers(num_layers, fragments)
    return sum(any(plan.runs_layer(i) for i in range(a, b)) for a, b in spans)


def _check(importance: Sequence[LayerImportance], target: float, mode: str, ranking: str) -> None:
    if mode not in MODES:
        raise ConfigError(f"unknown sparsity mode {mode!r} (choose from {', '.join(MODES)})")
    if ranking not in RANKINGS:
        raise ConfigError(f"unknown ranking {ranking!r} (choose from {', '.join(RANKINGS)})")
    if ranking == "loss" and any(li.loss is None for li in importance):
        raise ConfigError("the calibration has no drop-one losses: calibrate with loss tokens, or rank by bi")
    if not 0.0 < target <= 1.0:
        raise ConfigError(f"activation {target} must be in (0, 1]")
    if [li.layer for li in importance] != list(range(len(importance))):
        raise ConfigError("importance must list every layer of the model from layer 0, in order")


def _scores(li: LayerImportance, ranking: str) -> tuple[float, float, float]:
    """(layer, attention, MLP) importance of ``li`` under ``ranking`` (checked to be present)."""
    if ranking == "loss" and li.loss is not None and li.attn_loss is not None and li.mlp_loss is not None:
        return li.loss, li.attn_loss, li.mlp_loss
    return li.bi, li.attn_bi, li.mlp_bi


def plan_skips(
    importance: Sequence[LayerImportance], target: float, mode: str, cost: LayerCost, ranking: str = "bi"
) -> SkipPlan:
    """The skip plan of ``mode`` whose activation is closest to ``target``; see the module docstring.

    ``importance`` covers the whole model, layer 0 first. Units are ordered by importance per
    FLOP saved, least first (for whole layers, equal in cost, that is plain importance order);
    ``neurons`` instead keeps the same fraction of FFN neurons in every middle layer.
    """
    _check(importance, target, mode, ranking)
    n = len(importance)
    middle = [li for li in importance if 0 < li.layer < n - 1]
    if mode == "neurons":
        return _plan_neurons(middle, target, cost, n)
    units: list[tuple[float, int, str, int]] = []  # (importance per FLOP, FLOPs, kind, layer)
    for li in middle:
        whole, attn, mlp = _scores(li, ranking)
        if mode == "layer":
            units.append((whole / cost.total, cost.total, "layer", li.layer))
        else:
            units.append((attn / cost.attention, cost.attention, "attention", li.layer))
            if mode == "block":
                units.append((mlp / cost.mlp, cost.mlp, "mlp", li.layer))
    units.sort(key=lambda u: (u[0], u[3]))
    dense = n * cost.total
    best_count, best_gap, saved = 0, 1.0 - target, 0
    for count, (_, flops, _, _) in enumerate(units, start=1):
        saved += flops
        gap = abs((dense - saved) / dense - target)
        if gap < best_gap - 1e-12:
            best_count, best_gap = count, gap
        if (dense - saved) / dense < target:
            break
    chosen = units[:best_count]
    return _normalised(
        (u[3] for u in chosen if u[2] == "layer"),
        (u[3] for u in chosen if u[2] == "attention"),
        (u[3] for u in chosen if u[2] == "mlp"),
    )


def _plan_neurons(middle: Sequence[LayerImportance], target: float, cost: LayerCost, n: int) -> SkipPlan:
    """Uniform neuron sparsity over the middle layers: keep the whole number of neurons closest to ``target``."""
    if not middle or target >= 1.0:
        return SkipPlan()
    # saved = middle * (1 - keep) * 2/3 * mlp  must equal  (1 - target) * n * total
    keep = 1.0 - (1.0 - target) * n * cost.total / (len(middle) * cost.mlp * 2 / 3)
    kept = min(cost.neurons, max(1, round(keep * cost.neurons)))
    if kept == cost.neurons:
        return SkipPlan()
    return SkipPlan(neuron_keep=kept / cost.neurons, neuron_layers=frozenset(li.layer for li in middle))
