"""The glue between packs and the span planner / router, and the coordinator's placement state (pure)."""

from __future__ import annotations

import itertools

import pytest

from engine.coordinator.placer import Measurement, Placer
from engine.errors import NoRouteError
from engine.fragments.manifest import CONFIG, FORMAT_VERSION, WEIGHTS, FileEntry, Manifest
from engine.fragments.pack import split_layers
from engine.models.config import ModelConfig, parse_config
from engine.scheduler.capacity import ModelShape
from engine.scheduler.placement import (
    CLIENT,
    DEFAULT_RTT_MS,
    HostView,
    PackLayout,
    changed_spans,
    measured_layers_per_s,
    memory_for_units,
    node_capacity,
    pack_layout,
    place,
    planning_memory,
    route_layers,
    rtt_lookup,
)
from engine.scheduler.spans import bottleneck_throughput, plan_spans

VOCAB, HIDDEN, LAYERS = 1000, 64, 30
LAYER_BYTES = 50_000  # weights of one decoder layer in the synthetic packs
EMBED = VOCAB * HIDDEN * 4
HEAD = EMBED + HIDDEN * 4


def config() -> ModelConfig:
    return parse_config(
        {
            "model_type": "llama",
            "vocab_size": VOCAB,
            "hidden_size": HIDDEN,
            "intermediate_size": 128,
            "num_hidden_layers": LAYERS,
            "num_attention_heads": 4,
            "num_key_value_heads": 2,
        }
    )


def manifests(count: int, model_id: str = "m") -> list[Manifest]:
    """A pack's manifests as ``pack_model`` writes them (sizes synthetic: layers, embeddings, head)."""
    out = []
    for i, (a, b) in enumerate(split_layers(LAYERS, count)):
        embed, head = i == 0, i == count - 1
        size = (b - a) * LAYER_BYTES + EMBED * embed + HEAD * head
        files = {WEIGHTS: FileEntry(size, "0" * 64), CONFIG: FileEntry(0, "0" * 64)}
        out.append(Manifest(FORMAT_VERSION, model_id, i, count, a, b, embed, head, "float32", size, 0, files))
    return out


def layout(count: int = 30, model_id: str = "m") -> PackLayout:
    return pack_layout(model_id, manifests(count, model_id), config())


# ---------------------------------------------------------------- layout and memory


def test_layout_prices_a_unit_like_the_largest_fragment_without_embeddings_or_head() -> None:
    lay = layout(30)
    kv_per_token_layer = 2 * 2 * (HIDDEN // 4) * 4  # k and v, 2 kv heads of head_dim 16, float32
    assert (lay.units, lay.num_layers, lay.layers_per_unit) == (30, 30, 1)
    assert lay.shape == ModelShape(30, LAYER_BYTES, kv_per_token_layer, 2048)
    assert lay.reserve_bytes == HEAD
    coarse = layout(4)  # 8, 8, 7, 7 layers: a unit is priced as the largest
    assert coarse.bounds == (0, 8, 16, 23, 30)
    assert coarse.layers_per_unit == 8
    assert coarse.shape.layer_bytes == 8 * LAYER_BYTES
    assert coarse.shape.kv_bytes_per_token_layer == 8 * kv_per_token_layer
    assert [coarse.unit_of(x) for x in (0, 7, 8, 22, 23, 29)] == [0, 0, 1, 2, 3, 3]
    assert coarse.layers((1, 3)) == (8, 23)


@pytest.mark.parametrize("count", [1, 3, 30])
def test_memory_for_units_is_what_it_takes_to_be_given_that_many(count: int) -> None:
    lay = layout(count)
    for units in range(1, count + 1):
        offered = memory_for_units(lay, units)
        node = node_capacity("a", lay, layers_per_s=100.0, offered_bytes=offered)
        assert lay.shape.max_layers(node) == units
        assert lay.shape.max_layers(node_capacity("a", lay, layers_per_s=100.0, offered_bytes=offered - 1)) < units


def test_hosting_every_unit_needs_the_whole_model() -> None:
    lay = layout(3)
    # Three units' worth plus one reserve is not the whole model: it has both embeddings and head.
    almost = 3 * lay.shape.bytes_per_layer + lay.reserve_bytes
    assert almost < lay.whole_bytes
    assert planning_memory(lay, almost) == 2 * lay.shape.bytes_per_layer
    assert planning_memory(lay, lay.whole_bytes) // lay.shape.bytes_per_layer == 3
    assert planning_memory(lay, lay.reserve_bytes - 1) == 0


def test_measured_speed_is_read_from_the_capability_report() -> None:
    assert measured_layers_per_s({"throughput": {"layers_per_s": 250.5}}) == 250.5
    for bad in (
        None,
        {},
        {"throughput": None},
        {"throughput": {"layers_per_s": "fast"}},
        {"throughput": {"layers_per_s": -1}},
    ):
        assert measured_layers_per_s(bad) == 0.0
    assert measured_layers_per_s({"throughput": {"layers_per_s": float("nan")}}) == 0.0
    assert measured_layers_per_s({"throughput": {"layers_per_s": True}}) == 0.0


def test_speed_is_converted_to_units_per_second() -> None:
    coarse = layout(3)  # 10 layers a unit: a unit takes 10 layer-forwards
    node = node_capacity("a", coarse, layers_per_s=300.0, offered_bytes=10**12, claimed_layers_per_s=3000.0)
    assert node.layers_per_s == 30.0
    assert node.claimed_layers_per_s == 300.0


# ---------------------------------------------------------------- placement


def nodes_of(lay: PackLayout, spec: dict[str, tuple[float, int]], claims: dict[str, float] | None = None) -> list:
    """Nodes from {id: (measured layers/s, units of memory)}."""
    claims = claims or {}
    return [
        node_capacity(
            n, lay, layers_per_s=s, offered_bytes=memory_for_units(lay, u), claimed_layers_per_s=claims.get(n)
        )
        for n, (s, u) in spec.items()
    ]


def test_spans_follow_measured_speed_within_memory() -> None:
    lay = layout(30)
    nodes = nodes_of(lay, {"fast": (900.0, 24), "mid": (300.0, 12), "slow": (100.0, 8)})
    plan = place(lay, nodes, {})
    lengths = {n: b - a for n, (a, b) in plan.items()}
    assert lengths == {"fast": 21, "mid": 7, "slow": 2}  # 30 * speed / total, rounded
    spans = sorted(plan.values())  # one copy (memory allows no second): a chain over every fragment
    assert spans[0][0] == 0 and spans[-1][1] == 30
    assert all(prev[1] == nxt[0] for prev, nxt in itertools.pairwise(spans))


def test_a_claimed_speed_changes_nothing() -> None:
    lay = layout(30)
    spec = {"fast": (900.0, 24), "mid": (300.0, 12), "slow": (100.0, 8)}
    honest = place(lay, nodes_of(lay, spec), {})
    liar = place(lay, nodes_of(lay, spec, claims={"slow": 1000.0}), {})
    assert liar == honest


def test_memory_caps_a_fast_node_and_the_rest_share_by_speed() -> None:
    lay = layout(30)
    plan = place(lay, nodes_of(lay, {"fast": (900.0, 14), "mid": (300.0, 20), "slow": (100.0, 8)}), {})
    lengths = {n: b - a for n, (a, b) in plan.items()}
    assert lengths["fast"] == 14
    assert lengths["mid"] > lengths["slow"]
    assert sum(lengths.values()) == 30


def test_one_fragment_each_when_each_node_holds_one() -> None:
    lay = layout(3)
    plan = place(lay, nodes_of(lay, {"a": (500.0, 1), "b": (350.0, 1), "c": (420.0, 1)}), {})
    assert sorted(plan.values()) == [(0, 1), (1, 2), (2, 3)]


def test_two_replicas_of_two_fragments_over_four_nodes() -> None:
    lay = layout(2)
    plan = place(lay, nodes_of(lay, {"a": (500.0, 1), "b": (350.0, 1), "c": (420.0, 1), "d": (380.0, 1)}), {})
    assert sorted(plan.values()) == [(0, 1), (0, 1), (1, 2), (1, 2)]


def test_too_little_memory_places_nodes_over_the_gaps_first() -> None:
    lay = layout(3)
    first = place(lay, nodes_of(lay, {"a": (500.0, 1)}), {})
    assert first == {"a": (0, 1)}
    second = place(lay, nodes_of(lay, {"a": (500.0, 1), "b": (500.0, 1)}), first)
    assert second == {"a": (0, 1), "b": (1, 2)}
    third = place(lay, nodes_of(lay, {"a": (500.0, 1), "b": (500.0, 1), "c": (100.0, 1)}), second)
    assert third == {"a": (0, 1), "b": (1, 2), "c": (2, 3)}


def test_placement_is_stable_and_small_changes_move_nobody() -> None:
    lay = layout(30)
    spec = {"fast": (900.0, 24), "mid": (300.0, 12), "slow": (100.0, 8)}
    plan = place(lay, nodes_of(lay, spec), {})
    assert place(lay, nodes_of(lay, spec), plan) == plan
    jittered = {"fast": (800.0, 24), "mid": (330.0, 12), "slow": (110.0, 8)}  # re-measured: within 15%
    assert place(lay, nodes_of(lay, jittered), plan) == plan


def test_a_leaving_node_is_covered_again() -> None:
    lay = layout(30)
    spec = {"a": (500.0, 30), "b": (500.0, 30), "c": (500.0, 30), "d": (500.0, 30)}
    plan = place(lay, nodes_of(lay, spec), {})
    del spec["d"]
    after = place(lay, nodes_of(lay, spec), plan)
    assert "d" not in after
    nodes = nodes_of(lay, spec)
    assert bottleneck_throughput(lay.shape, nodes, after) > 0


def test_changed_spans_lists_new_and_moved_nodes_only() -> None:
    old = {"a": (0, 10), "b": (10, 30), "gone": (0, 30)}
    new = {"a": (0, 10), "b": (10, 20), "c": (20, 30)}
    assert changed_spans(old, new) == {"b": (10, 20), "c": (20, 30)}
    assert changed_spans(new, new) == {}


# ---------------------------------------------------------------- routing


def test_rtt_lookup_uses_either_direction_and_a_default() -> None:
    rtt = rtt_lookup({"a": {"b": 3.0}, "c": {"a": 7.5}})
    assert rtt("a", "b") == rtt("b", "a") == 3.0
    assert rtt("a", "c") == 7.5
    assert rtt("b", "c") == DEFAULT_RTT_MS
    assert rtt(CLIENT, "a") == DEFAULT_RTT_MS
    assert rtt("a", "a") == 0.0


def test_route_prefers_the_fast_replica_and_may_enter_a_span_part_way() -> None:
    lay = layout(3)
    hosts = [
        HostView("slow-head", 0, 30, 50.0),
        HostView("a", 0, 10, 1000.0),
        HostView("b", 5, 30, 1000.0),
    ]
    route = route_layers(lay, hosts, {"a": {"b": 1.0}})
    assert route == [("a", 0, 10), ("b", 10, 30)]  # b is entered at layer 10 of its 5-30 span


def test_route_counts_load() -> None:
    lay = layout(3)
    hosts = [HostView("busy", 0, 30, 1000.0, load=9), HostView("idle", 0, 30, 1000.0)]
    assert route_layers(lay, hosts, {}) == [("idle", 0, 30)]


def test_missing_layers_name_the_fragment() -> None:
    lay = layout(3)
    hosts = [HostView("a", 0, 10, 100.0), HostView("c", 20, 30, 100.0), HostView("b", 10, 20, 100.0)]
    assert [h[0] for h in route_layers(lay, hosts, {})] == ["a", "b", "c"]
    with pytest.raises(NoRouteError, match=r"no live node serves layers 10-19 of 'm' \(fragment 1\) \(1 excluded\)"):
        route_layers(lay, hosts, {}, exclude=frozenset({"b"}))


# ---------------------------------------------------------------- the coordinator's placement state


def measured(placer: Placer, peer: str, speed: float, units: int, model: str = "m") -> None:
    placer.measured(peer, Measurement(speed, memory_for_units(placer.layouts[model], units)))


def test_placer_plans_measured_nodes_together_and_ignores_claims() -> None:
    placer = Placer({"m": layout(30)})
    for peer, claim in (("fast", None), ("mid", None), ("slow", 9000.0)):
        placer.joined(peer, "m", claim)
        placer.measuring(peer, now=100.0)
    assert placer.measuring_count(now=101.0, limit_s=20.0) == 3
    measured(placer, "fast", 900.0, 24)
    measured(placer, "mid", 300.0, 12)
    measured(placer, "slow", 100.0, 8)
    assert placer.measuring_count(now=101.0, limit_s=20.0) == 0
    changes = placer.replan()
    lengths = {peer: b - a for peer, _, (a, b) in changes}
    assert lengths == {"fast": 21, "mid": 7, "slow": 2}
    assert placer.describe("slow")["claimed_layers_per_s"] == 9000.0
    assert placer.replan() == []  # nothing changed: nothing to send


def test_placer_forgets_leavers_and_retired_nodes() -> None:
    placer = Placer({"m": layout(3)})
    for peer in "abcd":
        placer.joined(peer, "m")
        measured(placer, peer, 400.0, 1)
    placer.replan()
    placer.retire("d")
    placer.left("c")
    assert {p for p in "abcd" if placer.assigned(p) is not None} <= {"a", "b"}
    changes = placer.replan()
    assert all(peer in "ab" for peer, _, _ in changes)


def test_placer_keeps_what_a_reconnecting_node_hosts() -> None:
    placer = Placer({"m": layout(3)})
    for peer, span in (("a", (0, 1)), ("b", (1, 2)), ("c", (2, 3))):
        placer.joined(peer, "m")
        placer.hosting(peer, "m", span)
        measured(placer, peer, 400.0, 1)
    assert placer.replan() == []


def test_placer_spreads_nodes_over_models() -> None:
    placer = Placer({"m": layout(3, "m"), "k": layout(3, "k")})
    first = placer.choose_model()
    assert first == "k"
    placer.joined("a", first)
    assert placer.choose_model() == "m"


def test_fresh_plan_matches_plan_spans_on_measured_units() -> None:
    lay = layout(30)
    nodes = nodes_of(lay, {"fast": (900.0, 24), "mid": (300.0, 12), "slow": (100.0, 8)})
    assert place(lay, nodes, {}) == plan_spans(lay.shape, nodes)
