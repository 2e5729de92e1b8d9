"""A request's activation budget, turned into layers to skip and hops to leave out.

Why here: the coordinator answers routes from manifests alone, and the calibration travels in
them (``Manifest.importance``), so the budget can be planned where the route is, with no model
loaded. Only whole layers are skipped on the grid: a node whose every routed layer is skipped
drops out of the route, which is where a budget saves network time, not just compute.

Units are ranked by the calibration's drop-one loss when it was measured (the better predictor),
else by block influence (``engine.sparsity.budget``). The plan is a pure function of the
importance figures and the budget, so every client asking for the same budget gets the same
layers, and a client can check what it was given.
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

from engine.errors import ConfigError
from engine.fragments.manifest import Manifest
from engine.models.config import ModelConfig
from engine.sparsity.budget import SkipPlan, activation, layer_cost, plan_skips
from engine.sparsity.importance import LayerImportance

#: context length the FLOP counts assume (attention's share grows with it)
PLAN_CONTEXT = 512


def pack_importance(manifests: Sequence[Manifest]) -> tuple[LayerImportance, ...] | None:
    """The whole model's importance from its fragments' manifests; None if any fragment lacks it."""
    layers: list[LayerImportance] = []
    for m in sorted(manifests, key=lambda m: m.start):
        if m.importance is None:
            return None
        layers.extend(m.importance.layers)
    return tuple(layers)


def plan_layers(importance: Sequence[LayerImportance], cfg: ModelConfig, budget: float) -> SkipPlan:
    """Whole layers to skip so about ``budget`` of the layer compute still runs."""
    if not 0.0 < budget <= 1.0:
        raise ConfigError(f"activation must be in (0, 1], got {budget:g}")
    ranking = "loss" if all(li.loss is not None for li in importance) else "bi"
    return plan_skips(importance, budget, "layer", layer_cost(cfg, PLAN_CONTEXT), ranking)


def describe(plan: SkipPlan, cfg: ModelConfig, budget: float) -> dict[str, Any]:
    """What the route answer and the ``done`` event say about the budget."""
    n = cfg.num_hidden_layers
    return {
        "requested": budget,
        "activation": round(activation(plan, layer_cost(cfg, PLAN_CONTEXT), n), 4),
        "skip": sorted(plan.layers),
        "layers_run": n - len(plan.layers),
        "layers": n,
    }


def runs_any(skip: frozenset[int], start: int, end: int) -> bool:
    """Whether a hop over layers ``[start, end)`` has anything left to run (else it leaves the route)."""
    return any(i not in skip for i in range(start, end)) or start == end
