"""Pure decisions: which fragment a joining node hosts, and which nodes a request's route uses.

For now placement fills fragments evenly (the least-replicated fragment first) and routing takes,
for each fragment in layer order, the ready host serving the fewest sessions. The scheduler
issue replaces both with throughput- and latency-aware versions behind the same signatures.
"""

from __future__ import annotations

from collections.abc import Iterable, Sequence
from dataclasses import dataclass

from engine.errors import NoRouteError


@dataclass(frozen=True)
class FragmentSlot:
    """One fragment of a served model, as the scheduler sees it."""

    model_id: str
    index: int
    start: int
    end: int


@dataclass(frozen=True)
class NodeView:
    """A live node as the scheduler sees it."""

    peer_id: str
    name: str
    model_id: str | None
    fragment: int | None
    ready: bool
    load: int = 0


def choose_fragment(slots: Sequence[FragmentSlot], nodes: Iterable[NodeView]) -> FragmentSlot | None:
    """The fragment with the fewest hosts (ties: the earliest model, then the lowest index)."""
    if not slots:
        return None
    hosts: dict[tuple[str, int], int] = {(s.model_id, s.index): 0 for s in slots}
    for n in nodes:
        if n.model_id is not None and n.fragment is not None and (n.model_id, n.fragment) in hosts:
            hosts[(n.model_id, n.fragment)] += 1
    return min(slots, key=lambda s: (hosts[(s.model_id, s.index)], s.model_id, s.index))


def plan_route(
    model_id: str, slots: Sequence[FragmentSlot], nodes: Iterable[NodeView]
) -> list[tuple[NodeView, FragmentSlot]]:
    """An ordered list of (node, fragment) covering every layer of ``model_id``, or ``NoRouteError``."""
    mine = sorted((s for s in slots if s.model_id == model_id), key=lambda s: s.index)
    if not mine:
        raise NoRouteError(f"model '{model_id}' is not served by this coordinator")
    ready = [n for n in nodes if n.ready and n.model_id == model_id]
    route = []
    for slot in mine:
        hosts = [n for n in ready if n.fragment == slot.index]
        if not hosts:
            raise NoRouteError(
                f"no live node serves layers {slot.start}-{slot.end - 1} of '{model_id}' (fragment {slot.index})"
            )
        route.append((min(hosts, key=lambda n: (n.load, n.name, n.peer_id)), slot))
    return route
