"""Private jobs: the scheduler never puts the embeddings or the head on a node the job does not allow.

Property test over random grids: whatever the spans, speeds, round trips, exclusions and allowed
set, ``plan_route(..., ends_on=allowed)`` either returns a route whose first and last hops are on
allowed hosts, or raises ``NoRouteError`` exactly when no such route exists (checked by brute force).
"""

from __future__ import annotations

import itertools

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from engine.errors import NoRouteError
from engine.scheduler.routing import HostView, plan_route

LAYERS = 6


@st.composite
def grids(draw: st.DrawFn) -> tuple[list[HostView], dict[tuple[str, str], float], frozenset[str], frozenset[str]]:
    n = draw(st.integers(1, 7))
    hosts = []
    for i in range(n):
        start = draw(st.integers(0, LAYERS - 1))
        end = draw(st.integers(start + 1, LAYERS))
        speed = draw(st.floats(50, 5000))
        hosts.append(HostView(f"h{i}", start, end, speed, load=draw(st.integers(0, 3))))
    names = [h.node_id for h in hosts]
    rtts = {(a, b): draw(st.floats(0.1, 200)) for a in [*names, "client"] for b in [*names, "client"]}
    allowed = frozenset(draw(st.sets(st.sampled_from(names))))
    excluded = frozenset(draw(st.sets(st.sampled_from(names), max_size=2)))
    return hosts, rtts, allowed, excluded


def _valid_route_exists(hosts: list[HostView], allowed: frozenset[str], excluded: frozenset[str]) -> bool:
    """Brute force: a chain of hops from layer 0 to the end, first and last hop on allowed hosts."""
    live = [h for h in hosts if h.node_id not in excluded]

    def reach(pos: int, last: HostView | None) -> bool:
        if pos == LAYERS:
            return last is not None and last.node_id in allowed
        return any(reach(h.end, h) for h in live if h.start <= pos < h.end and (pos > 0 or h.node_id in allowed))

    return reach(0, None)


@settings(max_examples=400, deadline=None)
@given(grids())
def test_private_route_keeps_embeddings_and_head_on_allowed_nodes(
    grid: tuple[list[HostView], dict[tuple[str, str], float], frozenset[str], frozenset[str]],
) -> None:
    hosts, rtts, allowed, excluded = grid
    exists = _valid_route_exists(hosts, allowed, excluded)
    try:
        route = plan_route(
            LAYERS,
            hosts,
            lambda a, b: rtts[(a, b)],
            client="client",
            exclude=excluded,
            exhaustive=True,
            ends_on=allowed,
        )
    except NoRouteError:
        assert not exists, "a private route existed but the scheduler found none"
        return
    assert exists
    assert route[0][0] in allowed and route[-1][0] in allowed
    assert route[0][1] == 0 and route[-1][2] == LAYERS
    assert all(a[2] == b[1] for a, b in itertools.pairwise(route))
    assert not {hop[0] for hop in route} & excluded


def test_private_route_refuses_when_no_allowed_node_holds_the_head() -> None:
    hosts = [HostView("a", 0, 3, 100.0), HostView("b", 3, 6, 100.0)]
    with pytest.raises(NoRouteError, match="allowed nodes"):
        plan_route(LAYERS, hosts, lambda a, b: 1.0, client="client", ends_on=frozenset({"a"}))
    # the same grid without the restriction routes through both
    assert [h[0] for h in plan_route(LAYERS, hosts, lambda a, b: 1.0, client="client")] == ["a", "b"]


def test_private_route_prefers_an_allowed_end_over_a_faster_one() -> None:
    hosts = [
        HostView("fast-head", 3, 6, 10_000.0),
        HostView("mine-head", 3, 6, 100.0),
        HostView("mine-embed", 0, 3, 100.0),
    ]
    allowed = frozenset({"mine-embed", "mine-head"})
    route = plan_route(LAYERS, hosts, lambda a, b: 1.0, client="client", ends_on=allowed)
    assert [h[0] for h in route] == ["mine-embed", "mine-head"]
    assert plan_route(LAYERS, hosts, lambda a, b: 1.0, client="client")[-1][0] == "fast-head"
