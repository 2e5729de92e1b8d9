"""The skip planner on made-up importance figures: pure functions, no model."""

from __future__ import annotations

import pytest

from engine.errors import ConfigError
from engine.models.config import parse_config
from engine.sparsity.budget import LayerCost, SkipPlan, activation, hops, layer_cost, plan_skips
from engine.sparsity.importance import LayerImportance

#: attention 1/4 of a layer, MLP 3/4 (SmolLM2 at ~250 tokens of context is close to this)
COST = LayerCost(attention=100, mlp=300, neurons=1000, context=1)


def importance(
    bi: list[float], attn: list[float] | None = None, mlp: list[float] | None = None
) -> list[LayerImportance]:
    attn = attn or [b / 2 for b in bi]
    mlp = mlp or [b / 2 for b in bi]
    return [LayerImportance(i, b, a, m) for i, (b, a, m) in enumerate(zip(bi, attn, mlp, strict=True))]


def ramp(n: int) -> list[float]:
    """Importance rising with depth, except the first and last layers are the *least* important."""
    return [0.0, *(0.1 + 0.01 * i for i in range(1, n - 1)), 0.0]


def test_full_budget_skips_nothing() -> None:
    for mode in ("layer", "attention", "block", "neurons"):
        assert plan_skips(importance(ramp(30)), 1.0, mode, COST) == SkipPlan()


@pytest.mark.parametrize(("target", "skipped"), [(0.97, 1), (0.95, 1), (0.93, 2), (0.9, 3), (0.75, 7), (0.5, 15)])
def test_layer_budget_skips_the_count_closest_to_the_target(target: float, skipped: int) -> None:
    plan = plan_skips(importance(ramp(30)), target, "layer", COST)
    # least important first, first and last layer never, however unimportant they look
    assert plan.layers == frozenset(range(1, 1 + skipped))
    assert not plan.attention and not plan.mlp
    assert activation(plan, COST, 30) == pytest.approx(1 - skipped / 30)


def test_ties_run_more() -> None:
    # 0.75 on 30 layers: 7 skipped runs 0.7667, 8 runs 0.7333; 0.75 between 4 layers: 1 skipped runs exactly 0.75
    plan = plan_skips(importance(ramp(4)), 0.75, "layer", COST)
    assert plan.layers == frozenset({1})
    plan = plan_skips(importance(ramp(4)), 0.875, "layer", COST)  # halfway between 1.0 and 0.75
    assert plan == SkipPlan()


def test_unreachable_budget_skips_every_middle_layer() -> None:
    plan = plan_skips(importance(ramp(10)), 0.05, "layer", COST)
    assert plan.layers == frozenset(range(1, 9))


def test_order_follows_importance_not_position() -> None:
    bi = [1.0, 0.5, 0.05, 0.4, 0.01, 0.3, 1.0]
    assert plan_skips(importance(bi), 5 / 7, "layer", COST).layers == frozenset({2, 4})


def test_attention_mode_skips_only_attention() -> None:
    attn = [0.0, 0.3, 0.1, 0.2, 0.05, 0.0]
    plan = plan_skips(importance([1.0] * 6, attn=attn), 1 - 2 * 100 / (6 * 400), "attention", COST)
    assert plan.attention == frozenset({2, 4}) and not plan.layers and not plan.mlp
    assert all(plan.runs_layer(i) for i in range(6))
    # a budget below what attention alone can save skips every middle attention block and stops there
    deepest = plan_skips(importance([1.0] * 6, attn=attn), 0.1, "attention", COST)
    assert deepest.attention == frozenset(range(1, 5))
    assert activation(deepest, COST, 6) == pytest.approx(1 - 4 * 100 / 2400)


def test_block_mode_weighs_importance_per_flop_and_merges_whole_layers() -> None:
    # layer 1's MLP saves three times the FLOPs of its attention for the same importance: MLP first;
    # layer 2's two halves are so unimportant that both go, which makes it a skipped layer
    attn = [1.0, 0.03, 0.001, 1.0]
    mlp = [1.0, 0.03, 0.001, 1.0]
    one = plan_skips(importance([1.0] * 4, attn, mlp), 1 - 400 / 1600, "block", COST)
    assert one.layers == frozenset({2}) and not one.attention and not one.mlp
    two = plan_skips(importance([1.0] * 4, attn, mlp), 1 - 700 / 1600, "block", COST)
    assert two.layers == frozenset({2}) and two.mlp == frozenset({1}) and not two.attention
    assert not two.runs_layer(2) and two.runs_layer(1)
    assert activation(two, COST, 4) == pytest.approx(1 - 700 / 1600)


@pytest.mark.parametrize("target", [0.95, 0.9, 0.8, 0.7])
def test_neuron_mode_keeps_the_fraction_that_meets_the_budget(target: float) -> None:
    plan = plan_skips(importance(ramp(10)), target, "neurons", COST)
    assert plan.neuron_layers == frozenset(range(1, 9)) and not plan.layers and not plan.attention
    assert plan.neuron_keep * COST.neurons == round(plan.neuron_keep * COST.neurons)  # whole neurons
    assert activation(plan, COST, 10) == pytest.approx(target, abs=1 / COST.neurons)


def test_neuron_mode_has_a_floor() -> None:
    # gate projections always run: the most neuron sparsity can save is 2/3 of the middle MLPs
    plan = plan_skips(importance(ramp(10)), 0.1, "neurons", COST)
    assert plan.neuron_keep == 1 / COST.neurons
    assert activation(plan, COST, 10) > 0.1


def test_hops_count_fragments_with_any_layer_left() -> None:
    plan = SkipPlan(layers=frozenset({12, 13, 15}))
    assert hops(plan, 30, 3) == 3
    assert hops(plan, 30, 15) == 14  # fragment 6 holds layers 12-13; 14-15 still runs 14
    assert hops(plan, 30, 30) == 27
    attention_only = SkipPlan(attention=frozenset(range(1, 29)))
    assert hops(attention_only, 30, 30) == 30
    assert hops(SkipPlan(attention=frozenset({12}), mlp=frozenset({12, 13}), layers=frozenset({13})), 30, 15) == 14


def test_layer_cost_adds_attention_scores_to_the_config_count() -> None:
    cfg = parse_config(
        {
            "model_type": "llama",
            "vocab_size": 101,
            "hidden_size": 64,
            "intermediate_size": 96,
            "num_hidden_layers": 6,
            "num_attention_heads": 4,
            "num_key_value_heads": 2,
        }
    )
    cost = layer_cost(cfg, 100)
    assert cost.mlp == 2 * 3 * 64 * 96 and cost.neurons == 96
    assert cost.total == cfg.flops_per_token_layer() + 2 * 2 * 64 * 100
    with pytest.raises(ConfigError):
        layer_cost(cfg, 0)


def test_loss_ranking_orders_by_measured_drop_one_loss() -> None:
    bi = [1.0, 0.01, 0.02, 0.5, 0.6, 1.0]  # block influence says 1 and 2 ...
    loss = [9.0, 0.4, 0.3, 0.05, 0.02, 9.0]  # ... measurement says 4 and 3
    imp = [LayerImportance(i, b, b / 2, b / 2, v, v / 2, v / 2) for i, (b, v) in enumerate(zip(bi, loss, strict=True))]
    assert plan_skips(imp, 4 / 6, "layer", COST).layers == frozenset({1, 2})
    assert plan_skips(imp, 4 / 6, "layer", COST, "loss").layers == frozenset({3, 4})
    with pytest.raises(ConfigError, match="no drop-one losses"):
        plan_skips(importance(bi), 4 / 6, "layer", COST, "loss")
    with pytest.raises(ConfigError, match="unknown ranking"):
        plan_skips(imp, 4 / 6, "layer", COST, "magic")


@pytest.mark.parametrize(
    ("imp", "target", "mode", "match"),
    [
        (importance(ramp(6)), 0.9, "heads", "unknown sparsity mode"),
        (importance(ramp(6)), 0.0, "layer", "must be in"),
        (importance(ramp(6)), 1.5, "layer", "must be in"),
        (importance(ramp(6))[1:], 0.9, "layer", "every layer"),
    ],
)
def test_bad_requests_are_config_errors(imp: list[LayerImportance], target: float, mode: str, match: str) -> None:
    with pytest.raises(ConfigError, match=match):
        plan_skips(imp, target, mode, COST)
