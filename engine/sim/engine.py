"""One policy's run over the shared trace: node churn, requests, routing, failover, token progress.

Time advances in steps of ``dt_s``. Within a step, node joins/leaves and span loads are handled
in time order, then the placement policy may move spans, then new requests and retries are
routed (each a real ``plan_route`` call, timed), then all running sessions advance at the token
rates of the queueing model (``engine.sim.fluid``). Events inside a step act at their own time
for what they decide (deadlines, replay and load times) but token rates change only per step.

Clients stop sending at ``duration_s``; the run then goes on (churn included) until every
request still in flight has ended, so each measured request is either completed or failed.
"""

from __future__ import annotations

import heapq
import math
import sys
import time
from collections.abc import Callable
from dataclasses import dataclass, field

import numpy as np
from tqdm import tqdm

from engine.errors import NoRouteError
from engine.sim import fluid, routes
from engine.sim.config import SimConfig
from engine.sim.gpus import SimModel
from engine.sim.grid import Grid
from engine.sim.latency import Network, ping_errors
from engine.sim.metrics import Metrics
from engine.sim.policies import MAX_FAILOVERS, ROUTE_RETRY_S, ROUTE_WAIT_S, Policy, backoff_s
from engine.sim.report import RunResult
from engine.sim.workload import RequestSpec, Trace, horizon_s

_JOIN, _LEAVE, _LOADED = 0, 1, 2


@dataclass
class Session:
    """One request in flight: its route, progress and failover state.

    ``waiting`` sessions have no usable route (new, or failed over) and are retried at
    ``next_try_s``; ours gives up at ``give_up_s``, Petals retries until the deadline. ``broken``
    lists the hops Petals still has to replace; ``excluded`` the nodes our client has seen fail;
    ``stall_s`` when the token in flight was lost (its latency includes the failover).
    ``resume`` is how many tokens the client already has: after a retry from scratch the tokens
    up to it are generated again but not delivered again.
    """

    sid: int
    client: int
    k: int
    req: RequestSpec
    sent_s: float
    next_try_s: float
    give_up_s: float
    deadline_at_s: float
    hops: list[routes.Hop] = field(default_factory=list)
    waiting: bool = True
    ready_s: float = math.inf
    tokens: float = 0.0
    delay_s: float = 0.0
    excluded: set[str] = field(default_factory=set)
    failovers_step: int = 0
    attempt: int = 0
    broken: list[routes.Hop] = field(default_factory=list)
    stall_s: float | None = None
    started: bool = False
    resume: float = 0.0
    failed_over: int = 0


class Simulation:
    """One policy on one trace; ``run`` returns its measurements."""

    def __init__(self, trace: Trace, model: SimModel, policy: Policy) -> None:
        self.cfg: SimConfig = trace.config
        self.trace = trace
        self.model = model
        self.policy = policy
        self.grid = Grid(trace.nodes, model, load_aware=policy.load_aware)
        self.net = Network()
        for n in trace.nodes:
            self.net.add(n.node_id, n.region, n.last_mile_ms)
        for c in trace.clients:
            self.net.add(c.client_id, c.region, c.last_mile_ms)
        self.metrics = Metrics(self.cfg.warmup_s, self.cfg.duration_s)
        self.horizon_s = horizon_s(self.cfg)
        self.rng = np.random.default_rng([self.cfg.seed, 4])
        self.sessions: dict[int, Session] = {}
        self.alive: dict[str, int] = {}
        self.events: list[tuple[float, int, int, int, int]] = []  # (time, seq, kind, node, generation)
        self.requests: list[tuple[float, int, int]] = []  # (time, client, k)
        self.ttft_s: list[float] = []
        self._seq = 0
        self._sessions_made = 0

    # ------------------------------------------------------------------------------ set-up

    def _push(self, t: float, kind: int, i: int, generation: int = 0) -> None:
        if t < self.horizon_s:
            self._seq += 1
            heapq.heappush(self.events, (t, self._seq, kind, i, generation))

    def _start(self) -> None:
        first = [n for n in self.trace.nodes if n.join_s == 0.0]
        spans = self.policy.placement.initial(first)
        for i, n in enumerate(self.trace.nodes):
            if n.join_s == 0.0:
                self.grid.start(i, spans.get(n.node_id))
                self.alive[n.node_id] = i
            else:
                self._push(n.join_s, _JOIN, i)
            self._push(n.leave_s, _LEAVE, i)
        for c in range(len(self.trace.clients)):
            heapq.heappush(self.requests, (self.trace.request(c, 0).think_s, c, 0))

    # ------------------------------------------------------------------------------ nodes

    def _node_event(self, t: float, kind: int, i: int, generation: int) -> None:
        spec = self.trace.nodes[i]
        if kind == _JOIN:
            self.grid.alive[i] = True
            self.alive[spec.node_id] = i
            span = self.policy.placement.joined(spec)
            if span is not None:
                self._push(*self._assign_at(i, span, t))
        elif kind == _LEAVE and self.grid.alive[i]:
            self._break(i, t)
            self.policy.placement.left(spec)
            self.grid.leave(i)
            del self.alive[spec.node_id]
        elif kind == _LOADED:
            self.grid.loaded(i, generation)

    def _assign_at(self, i: int, span: tuple[int, int], t: float) -> tuple[float, int, int, int]:
        ready, generation = self.grid.assign(i, span, t)
        return ready, _LOADED, i, generation

    def _placement_step(self, t: float) -> None:
        alive = [self.trace.nodes[i] for i in self.alive.values()]
        changes = self.policy.placement.step(t, self.cfg.dt_s, alive, self.grid.spans, self.rng)
        moved = 0
        for nid, span in sorted(changes.items()):
            i = self.grid.index[nid]
            if not self.grid.alive[i]:
                continue
            if nid in self.grid.spans:
                moved += 1
                self._break(i, t)
            self._push(*self._assign_at(i, span, t))
        if self.metrics.counts(t):
            self.metrics.nodes_moved += moved
            self.metrics.max_moved_at_once = max(self.metrics.max_moved_at_once, moved)

    # ------------------------------------------------------------------------------ sessions

    def _finish(self, s: Session, t: float, reason: str | None) -> None:
        """The request ends at t (``reason`` None: completed); its client thinks, then sends the next."""
        if reason is None:
            if self.metrics.measured(s.sent_s):
                self.metrics.completed += 1
        else:
            self.metrics.fail(s.sent_s, reason)
        for i, _, _ in s.hops:
            self.grid.detach(i, s.sid, s.req.max_length)
        s.hops = []
        del self.sessions[s.sid]
        nxt = self.trace.request(s.client, s.k + 1)
        heapq.heappush(self.requests, (t + nxt.think_s, s.client, s.k + 1))

    def _break(self, i: int, t: float) -> None:
        """Node i stops serving at t: every session using it fails over."""
        nid = self.grid.ids[i]
        for sid in sorted(self.grid.users[i]):
            s = self.sessions[sid]
            if self.metrics.measured(s.sent_s):
                self.metrics.failovers += 1
            s.failed_over += 1
            s.tokens = math.floor(s.tokens)  # the token in flight is lost
            s.resume = max(s.resume, s.tokens)
            s.stall_s = t if s.stall_s is None else s.stall_s
            if self.policy.failover == "replay":
                hop = next(h for h in s.hops if h[0] == i)
                self.grid.detach(i, sid, s.req.max_length)
                s.broken.append(hop)
            elif self.policy.failover == "retry":
                for j, _, _ in s.hops:
                    self.grid.detach(j, sid, s.req.max_length)
                s.hops, s.broken = [], []
                s.tokens = 0.0  # from scratch: the prompt is prefilled again, every token generated again
            else:
                for j, _, _ in s.hops:
                    self.grid.detach(j, sid, s.req.max_length)
                s.hops = []
                s.excluded.add(nid)
                s.failovers_step += 1
                if s.failovers_step > MAX_FAILOVERS:
                    self._finish(s, t, "failovers")
                    continue
                s.give_up_s = t + self.cfg.detect_s + ROUTE_WAIT_S
            if not s.waiting:
                s.waiting = True
                s.next_try_s = t + self.cfg.detect_s

    def _rtt(self, s: Session) -> tuple[str, Callable[[str, str], float]]:
        client = self.trace.clients[s.client].client_id
        rng = np.random.default_rng([self.cfg.seed, 3, s.client])
        errors = ping_errors(rng, self.net.size, self.cfg.ping_error)
        return client, self.net.rtt_for(client, errors)

    def _decide(self, decide: Callable[[], list[routes.Hop]]) -> list[routes.Hop] | None:
        """One routing decision by the real code (exclusions included), timed; None when no route exists.

        Wall-clock and CPU time (``process_time``) are both kept: on a shared machine the wall
        clock also counts time the process spent descheduled.
        """
        t0, c0 = time.perf_counter(), time.process_time()
        try:
            hops = decide()
        except NoRouteError:
            hops = None
        self.metrics.route_ms.append((time.perf_counter() - t0) * 1000)
        self.metrics.route_cpu_ms.append((time.process_time() - c0) * 1000)
        return hops

    def _try_route(self, s: Session, t: float) -> None:
        need = s.req.max_length
        client, rtt = self._rtt(s)
        grid, floor = self.grid, need * self.policy.kv_factor
        new: list[routes.Hop] | None
        if self.policy.failover != "replay" or not s.hops:
            failed = frozenset(s.excluded)
            new = self._decide(lambda: routes.full_route(grid, rtt, client, grid.full(floor) | failed))
            if new is not None:
                s.hops, s.broken = list(new), []
                for i, _, _ in new:
                    self.grid.attach(i, s.sid, need)
        else:
            new = []
            while s.broken:
                _, a, b = hop = s.broken[0]
                # hosts already on the route are left out so that no host holds the session twice
                on_route = frozenset(grid.ids[i] for i, _, _ in s.hops)
                part = self._decide(
                    lambda a=a, b=b, on=on_route: routes.sub_route(grid, a, b, rtt, client, grid.full(floor) | on)
                )
                if part is None:
                    new = None
                    break
                at = s.hops.index(hop)
                s.hops[at : at + 1] = part
                s.broken.pop(0)
                new += part
                for i, _, _ in part:
                    self.grid.attach(i, s.sid, need)
        if new is None:
            if self.policy.failover != "reroute":
                s.attempt += 1
                s.next_try_s = t + backoff_s(s.attempt)
            elif t >= s.give_up_s:
                self._finish(s, t, "no_route")
            else:
                s.next_try_s = t + ROUTE_RETRY_S
            return
        if self.metrics.counts(t):
            self.metrics.routes += 1
            self.metrics.hops += len(s.hops)
        s.waiting, s.attempt = False, 0
        s.delay_s = routes.ring_delay_s(self.grid, self.net, s.hops, client)
        replay = s.req.prompt_tokens + int(s.tokens)
        s.ready_s = t + routes.replay_s(self.grid, self.net, new, client, replay)

    # ------------------------------------------------------------------------------ one step

    def _step(self, t: float, t1: float) -> None:
        while self.events and self.events[0][0] < t1:
            te, _, kind, i, generation = heapq.heappop(self.events)
            self._node_event(te, kind, i, generation)
        self._placement_step(t)
        while self.requests and self.requests[0][0] < min(t1, self.cfg.duration_s):
            ts, c, k = heapq.heappop(self.requests)
            sid = self._sessions_made = self._sessions_made + 1
            req = self.trace.request(c, k)
            deadline = ts + self.cfg.deadline_after(req.new_tokens)
            self.sessions[sid] = Session(sid, c, k, req, ts, ts, ts + ROUTE_WAIT_S, deadline)
            if self.metrics.measured(ts):
                self.metrics.sent += 1
        due = sorted((s.next_try_s, s.sid) for s in self.sessions.values() if s.waiting and s.next_try_s < t1)
        for when, sid in due:
            s = self.sessions.get(sid)
            if s is not None and s.waiting:
                self._try_route(s, max(when, t))
        self._advance(t, t1)
        for s in [s for s in self.sessions.values() if s.deadline_at_s <= t1]:
            # told apart: too slow all along, or late because a node of its route left
            self._finish(s, s.deadline_at_s, "deadline_after_failover" if s.failed_over else "deadline")

    def _advance(self, t: float, t1: float) -> None:
        running = [s for s in self.sessions.values() if not s.waiting and s.ready_s < t1]
        sess = np.repeat(np.arange(len(running)), [len(s.hops) for s in running])
        nodes = np.array([i for s in running for i, _, _ in s.hops], dtype=np.int64)
        layers = np.array([b - a for s in running for _, a, b in s.hops], dtype=np.float64)
        demand = layers / self.grid.speed[nodes] if nodes.size else layers
        delay = np.array([s.delay_s for s in running])
        rates = fluid.solve(sess, nodes, demand, delay, len(self.trace.nodes))
        self.grid.set_present(rates.present, rates.utilisation)
        lat, weight = [], []
        produced_all = regenerated_all = 0.0
        for s, x in zip(running, rates.tokens_per_s.tolist(), strict=True):
            start = max(t, s.ready_s)
            if not s.started:
                s.started = True
                if self.metrics.measured(s.sent_s):
                    self.ttft_s.append(start + 1.0 / x - s.sent_s)
            remaining = s.req.new_tokens - s.tokens
            produced = min(x * (t1 - start), remaining)
            behind = max(s.resume - s.tokens, 0.0)  # tokens the client already had (retry from scratch)
            if s.stall_s is not None and produced >= behind:
                # the first new token after the failure: its latency covers the failover and any regeneration
                lat.append(start + behind / x - s.stall_s + 1.0 / x)
                weight.append(1.0)
                s.stall_s = None
            again = min(produced, behind)
            s.tokens += produced
            produced_all += produced - again
            regenerated_all += again
            if produced - again >= 1.0:
                s.failovers_step = 0
            lat.append(1.0 / x)
            weight.append(produced - again)
            if produced >= remaining:
                self._finish(s, start + remaining / x, None)
        if self.metrics.counts(t):
            self.metrics.tokens += produced_all
            self.metrics.regenerated += regenerated_all
            self.metrics.add_latency(np.array(lat), np.array(weight))
            serving = self.grid.serving
            busy = float(rates.utilisation[serving].mean()) if serving.any() else 0.0
            self.metrics.busy_share.append(busy)
        if t < self.cfg.duration_s:
            self.metrics.tokens_per_step.append(produced_all / (t1 - t))

    def run(self, progress: bool = False) -> RunResult:
        self._start()
        steps = math.ceil(self.cfg.duration_s / self.cfg.dt_s)
        bar = tqdm(total=steps, desc=f"sim {self.policy.name}", file=sys.stderr, disable=not progress, leave=False)
        wall = time.perf_counter()
        for k in range(steps):
            t = k * self.cfg.dt_s
            self._step(t, min(t + self.cfg.dt_s, self.cfg.duration_s))
            bar.update(1)
        bar.close()
        # no new requests: follow those in flight to their end (each is failed at its deadline at the latest)
        t = self.cfg.duration_s
        while self.sessions and t < self.horizon_s:
            self._step(t, t + self.cfg.dt_s)
            t += self.cfg.dt_s
        self.metrics.drain_s = t - self.cfg.duration_s
        return RunResult.collect(
            self.policy.name,
            self.policy.failover,
            self.cfg,
            self.metrics,
            self.policy.placement,
            self.ttft_s,
            time.perf_counter() - wall,
        )
