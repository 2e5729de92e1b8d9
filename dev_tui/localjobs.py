"""Jobs this TUI runs itself: what was asked, and everything seen while it ran (pure state, no UI).

The runner (``runner.py``) writes here as events arrive; the views read it on a timer and redraw
when ``revision`` moved. Keeping the state free of Textual lets the route and failover bookkeeping
be tested without a terminal, and lets snapshot tests build a job with fixed numbers.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from enum import StrEnum
from typing import Any

from .rates import RateMeter

TERMINAL = frozenset({"done", "failed", "cancelled"})

#: smoothing of per-hop timings (weight of the newest step)
_EWMA = 0.3
#: how long a failover waits for a replacement route (the client's ``route_wait_s``; runner.py passes it)
ROUTE_WAIT_S = 60.0
#: a hop this many times slower than the route's fastest (and above SLOW_MS) is drawn as slow
SLOW_FACTOR = 2.5
SLOW_MS = 20.0


@dataclass(frozen=True)
class LaunchSpec:
    """One launch form's answers; a batch has several prompts, each run as its own job."""

    model: str
    prompts: tuple[str, ...]
    chat: bool = True
    max_new_tokens: int = 64
    temperature: float = 0.0
    top_p: float = 1.0
    seed: int = 0
    priority: int = 5
    #: share of layer compute to run (Selective Activation; below 1 needs a calibrated model)
    activation: float = 1.0
    #: recorded in the job's params for the coordinator; the prompt is never sent there either way
    private: bool = False
    #: share of steps the coordinator re-executes to catch nodes returning wrong work (0: off)
    spot_check: float = 0.0
    #: queue until nodes serve the model, instead of failing at once
    wait_for_route: bool = False

    def params(self) -> dict[str, Any]:
        """What the coordinator stores with the job (no prompt text: prompts stay on this machine)."""
        params: dict[str, Any] = {
            "max_new_tokens": self.max_new_tokens,
            "temperature": self.temperature,
            "top_p": self.top_p,
            "seed": self.seed,
            "chat": self.chat,
            "client": "kluster-tui",
        }
        if self.activation < 1.0:
            params["activation"] = self.activation
        if self.private:
            params["private"] = True
        if self.spot_check > 0:
            params["spot_check"] = self.spot_check
        return params


class Health(StrEnum):
    WAITING = "waiting"  # routed, no timing yet
    OK = "ok"
    SLOW = "slow"
    GONE = "gone"  # left the grid or failed: the route is being replaced


@dataclass
class HopView:
    """One hop of a route as the chain widget draws it."""

    name: str
    peer_id: str
    start: int
    end: int
    health: Health = Health.WAITING
    #: smoothed milliseconds per token on this node: waiting for its compute thread, computing
    queue_ms: float | None = None
    compute_ms: float | None = None
    #: one-way delay to the next hop (half the round trip the node reports), when known
    link_ms: float | None = None

    @property
    def ms_per_token(self) -> float | None:
        if self.compute_ms is None:
            return None
        return self.compute_ms + (self.queue_ms or 0.0)

    @property
    def tok_s(self) -> float | None:
        """The most tokens per second this hop alone could carry at its current cost."""
        ms = self.ms_per_token
        return 1000.0 / ms if ms else None

    def add_timing(self, queue_ms: float, compute_ms: float) -> None:
        if self.compute_ms is None or self.queue_ms is None:
            self.compute_ms, self.queue_ms = compute_ms, queue_ms
        else:
            self.compute_ms += _EWMA * (compute_ms - self.compute_ms)
            self.queue_ms += _EWMA * (queue_ms - self.queue_ms)


@dataclass(frozen=True)
class JobEvent:
    """A line of the job's timeline; ``at`` is seconds since the job was launched."""

    at: float
    text: str
    #: "info", "warn" (failover, node left) or "error"
    level: str = "info"


@dataclass
class LocalJob:
    """A job launched from this TUI and generated in this process."""

    key: str
    spec: LaunchSpec
    prompt: str
    created: float
    #: the coordinator's job id once submitted
    job_id: str | None = None
    state: str = "submitting"
    position: int | None = None
    text: str = ""
    tokens: int = 0
    route: list[HopView] = field(default_factory=list)
    failovers: int = 0
    events: list[JobEvent] = field(default_factory=list)
    rate: RateMeter = field(default_factory=RateMeter)
    started_at: float | None = None
    finished_at: float | None = None
    error: str | None = None
    #: the ``done`` event's stats
    stats: dict[str, Any] = field(default_factory=dict)
    last_token_at: float | None = None
    #: bumped on every change; views redraw when it moved
    revision: int = 0

    @property
    def id(self) -> str:
        return self.job_id or self.key

    @property
    def finished(self) -> bool:
        return self.state in TERMINAL

    def cost(self, price_per_mtok: float) -> float:
        return self.tokens * price_per_mtok / 1e6

    def decode_tok_s(self, now: float) -> float:
        """Live rate while running; the done event's decode rate afterwards."""
        if self.finished and self.stats.get("decode_tok_s"):
            return float(self.stats["decode_tok_s"])
        return self.rate.rate(now, 3)

    def _changed(self) -> None:
        self.revision += 1

    def log(self, now: float, text: str, level: str = "info") -> None:
        self.events.append(JobEvent(round(now - self.created, 1), text, level))
        self._changed()

    def set_state(self, state: str, now: float, *, position: int | None = None, error: str | None = None) -> None:
        if state == "running" and self.started_at is None:
            self.started_at = now
        if state in TERMINAL and self.finished_at is None:
            self.finished_at = now
        self.state, self.position = state, position
        if error is not None:
            self.error = error
        self._changed()

    def set_route(self, nodes: list[dict[str, Any]]) -> None:
        """A route from a ``route`` or ``failover`` event: ``[{name, peer_id, layers: [start, end]}]``."""
        self.route = [
            HopView(str(n.get("name")), str(n.get("peer_id")), int(n["layers"][0]), int(n["layers"][1])) for n in nodes
        ]
        self._changed()

    def add_token(self, text: str, now: float) -> None:
        self.text += text
        self.tokens += 1
        self.last_token_at = now
        self.rate.add(1, now)
        self._changed()

    def rewind(self, text: str, tokens: int, now: float) -> None:
        """A failed spot check: the output is cut back to what came before the first suspect token."""
        self.text, self.tokens = text, tokens
        self.log(now, f"regenerating from token {tokens}", "warn")

    def add_timings(self, timings: list[tuple[str, float, float]]) -> None:
        """One step's per-hop ``(peer_id, queue_ms, compute_ms)``; recolours the hops."""
        by_peer = {h.peer_id: h for h in self.route}
        for peer, queue_ms, compute_ms in timings:
            hop = by_peer.get(peer)
            if hop is not None:
                hop.add_timing(queue_ms, compute_ms)
        self._recolour()
        self._changed()

    def _recolour(self) -> None:
        costs = [h.ms_per_token for h in self.route if h.health is not Health.GONE and h.ms_per_token is not None]
        fastest = min(costs) if costs else None
        for hop in self.route:
            ms = hop.ms_per_token
            if hop.health is Health.GONE or ms is None or fastest is None:
                continue
            hop.health = Health.SLOW if ms > SLOW_FACTOR * fastest and ms > SLOW_MS else Health.OK

    def set_links(self, rtt_ms: dict[str, dict[str, float]]) -> None:
        """Per-link delays from the nodes' reported round trips (``GET /v1/nodes`` ``rtt_ms``)."""
        changed = False
        for hop, nxt in zip(self.route, [*self.route[1:], *self.route[:1]], strict=True):
            rtt = rtt_ms.get(hop.peer_id, {}).get(nxt.peer_id)
            link = round(float(rtt) / 2, 2) if isinstance(rtt, int | float) else None
            if link != hop.link_ms:
                hop.link_ms, changed = link, True
        if changed:
            self._changed()

    def node_gone(self, peer_id: str, name: str, now: float) -> bool:
        """The grid says a node left; if it is on our route, mark it at once (before the failover ends)."""
        hop = next((h for h in self.route if h.peer_id == peer_id), None)
        if hop is None or self.finished:
            return False
        hop.health = Health.GONE
        wait = f" (waits up to {ROUTE_WAIT_S:.0f} s)"
        self.log(now, f"{name} left: finding another node for L{hop.start}-{hop.end - 1}{wait}", "warn")
        return True

    def rerouting(self, nodes: list[dict[str, Any]], now: float) -> None:
        """The client holds a replacement route and replays the session on it (its failover event
        comes only once the replay is done, which takes a step per token so far): draw it now."""
        self.set_route(nodes)
        path = " -> ".join(h.name for h in self.route)
        self.log(now, f"new route {path}: replaying {self.tokens} tokens", "warn")

    def failover(self, event: dict[str, Any], now: float) -> None:
        """The client replaced the route and the session goes on: keep the event in the timeline."""
        self.failovers += 1
        detected = event.get("detected_after_ms")
        recovery = event.get("recovery_ms")
        parts = [f"token {event.get('at_token')}: failover from {event.get('failed_node') or 'a failed node'}"]
        if isinstance(detected, int | float):
            parts.append(f"noticed in {detected / 1000:.1f} s")
        if isinstance(recovery, int | float):
            parts.append(f"new route in {recovery / 1000:.1f} s")
        self.log(now, ", ".join(parts), "warn")
        nodes = event.get("new_route")
        if isinstance(nodes, list) and [str(n.get("peer_id")) for n in nodes] != [h.peer_id for h in self.route]:
            self.set_route(nodes)
        stall = f", {now - self.last_token_at:.1f} s after the last token" if self.last_token_at is not None else ""
        self.log(now, "resumed on " + " -> ".join(h.name for h in self.route) + stall)

    def done(self, event: dict[str, Any], now: float) -> None:
        stats = event.get("stats")
        self.stats = stats if isinstance(stats, dict) else {}
        text = event.get("text")
        if isinstance(text, str):
            self.text = text  # the decoder's whole text: equal to the streamed pieces joined
        rate = self.stats.get("decode_tok_s")
        rate_text = f", {rate:.1f} tok/s" if isinstance(rate, int | float) else ""
        self.log(now, f"done: {self.tokens} tokens ({event.get('finish_reason')}){rate_text}")
        self.set_state("done", now)
