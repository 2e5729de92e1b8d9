"""Placement (which fragment a joining node hosts) and routing (which nodes serve a request)."""

from __future__ import annotations

import itertools

import pytest

from engine.errors import NoRouteError
from engine.scheduler.placement import FragmentSlot, NodeView, choose_fragment, plan_route

SLOTS = [FragmentSlot("m", 0, 0, 10), FragmentSlot("m", 1, 10, 20), FragmentSlot("m", 2, 20, 30)]


def node(peer: str, fragment: int | None, *, model: str | None = "m", ready: bool = True, load: int = 0) -> NodeView:
    return NodeView(peer_id=peer, name=f"name-{peer}", model_id=model, fragment=fragment, ready=ready, load=load)


# ---------------------------------------------------------------- choose_fragment


def test_choose_fragment_without_slots() -> None:
    assert choose_fragment([], [node("a", 0)]) is None


def test_choose_fragment_empty_grid_takes_the_first() -> None:
    assert choose_fragment(SLOTS, []) == SLOTS[0]


def test_choose_fragment_fills_evenly() -> None:
    nodes: list[NodeView] = []
    picks = []
    for i in range(7):
        slot = choose_fragment(SLOTS, nodes)
        assert slot is not None
        picks.append(slot.index)
        nodes.append(node(f"p{i}", slot.index))
    assert picks == [0, 1, 2, 0, 1, 2, 0]


def test_choose_fragment_least_replicated_first() -> None:
    nodes = [node("a", 0), node("b", 0), node("c", 1), node("d", 2), node("e", 2)]
    assert choose_fragment(SLOTS, nodes) == SLOTS[1]


def test_choose_fragment_ties_break_on_lowest_index_whatever_the_order() -> None:
    nodes = [node("a", 0), node("b", 2)]
    for slots in itertools.permutations(SLOTS):
        for ordered in itertools.permutations(nodes):
            assert choose_fragment(list(slots), ordered) == SLOTS[1]


def test_choose_fragment_ties_break_on_earliest_model() -> None:
    slots = [FragmentSlot("zeta", 0, 0, 5), FragmentSlot("alpha", 1, 5, 10), FragmentSlot("alpha", 0, 0, 5)]
    assert choose_fragment(slots, []) == FragmentSlot("alpha", 0, 0, 5)
    assert choose_fragment(slots, [node("x", 0, model="alpha")]) == FragmentSlot("alpha", 1, 5, 10)
    nodes = [node("x", 0, model="alpha"), node("y", 1, model="alpha")]
    assert choose_fragment(slots, nodes) == FragmentSlot("zeta", 0, 0, 5)


def test_choose_fragment_ignores_nodes_of_other_models_and_without_fragment() -> None:
    nodes = [
        node("a", 0, model="other"),
        node("b", 0, model="other"),
        node("c", None),
        node("d", None, model=None),
        node("e", 7),  # a fragment index the model does not have
        node("f", 1),
        node("g", 2),
    ]
    assert choose_fragment(SLOTS, nodes) == SLOTS[0]


def test_choose_fragment_counts_hosts_that_are_still_loading() -> None:
    # A node that has been given fragment 0 but is not ready yet still counts as its host.
    assert choose_fragment(SLOTS, [node("a", 0, ready=False)]) == SLOTS[1]


# ---------------------------------------------------------------- plan_route


def test_plan_route_covers_fragments_in_order() -> None:
    nodes = [node("c", 2), node("a", 0), node("b", 1)]
    route = plan_route("m", list(reversed(SLOTS)), nodes)
    assert [(n.peer_id, s.index) for n, s in route] == [("a", 0), ("b", 1), ("c", 2)]
    assert [s for _, s in route] == SLOTS


def test_plan_route_picks_the_least_loaded_ready_host() -> None:
    nodes = [
        node("a0", 0, load=3),
        node("b0", 0, load=1),
        node("c0", 0, load=0, ready=False),
        node("d0", 0, load=0, model="other"),
        node("a1", 1, load=5),
        node("a2", 2, load=2),
        node("b2", 2, load=2),
    ]
    route = plan_route("m", SLOTS, nodes)
    assert [n.peer_id for n, _ in route] == ["b0", "a1", "a2"]  # equal load: lowest name


def test_plan_route_ties_are_deterministic() -> None:
    nodes = [node("z", 0), node("y", 0), node("x", 0), node("q", 1), node("r", 2)]
    first = [n.peer_id for n, _ in plan_route("m", SLOTS, nodes)]
    assert first == ["x", "q", "r"]
    for ordered in itertools.permutations(nodes):
        assert [n.peer_id for n, _ in plan_route("m", SLOTS, ordered)] == first


def test_plan_route_accepts_a_generator_of_nodes() -> None:
    nodes = [node("a", 0), node("b", 1), node("c", 2)]
    route = plan_route("m", SLOTS, (n for n in nodes))
    assert [n.peer_id for n, _ in route] == ["a", "b", "c"]


@pytest.mark.parametrize(
    ("nodes", "layers", "fragment"),
    [
        ([node("a", 0), node("c", 2)], "10-19", 1),
        ([node("a", 0), node("b", 1, ready=False), node("c", 2)], "10-19", 1),
        ([node("a", 0), node("b", 1, model="other"), node("c", 2)], "10-19", 1),
        ([node("b", 1), node("c", 2)], "0-9", 0),
        ([node("a", 0), node("b", 1)], "20-29", 2),
        ([], "0-9", 0),
    ],
)
def test_plan_route_names_the_missing_layers(nodes: list[NodeView], layers: str, fragment: int) -> None:
    with pytest.raises(NoRouteError) as exc:
        plan_route("m", SLOTS, nodes)
    text = str(exc.value)
    assert f"layers {layers}" in text and f"fragment {fragment}" in text and "'m'" in text


def test_plan_route_unknown_model() -> None:
    with pytest.raises(NoRouteError, match="'nope' is not served"):
        plan_route("nope", SLOTS, [node("a", 0, model="nope")])
    with pytest.raises(NoRouteError, match="not served"):
        plan_route("m", [], [node("a", 0)])


def test_plan_route_uses_only_the_requested_models_slots() -> None:
    slots = [*SLOTS, FragmentSlot("other", 0, 0, 30)]
    route = plan_route("other", slots, [node("a", 0), node("o", 0, model="other")])
    assert [(n.peer_id, s) for n, s in route] == [("o", FragmentSlot("other", 0, 0, 30))]
