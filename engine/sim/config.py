"""Every knob of one simulation, validated once so a bad value is a one-line ``ConfigError``."""

from __future__ import annotations

import math
from dataclasses import dataclass, fields

from engine.errors import ConfigError


@dataclass(frozen=True)
class SimConfig:
    """One simulated run; both schedulers replay the trace these figures and ``seed`` generate.

    Clients form a closed loop: each sends a request, waits for its last token (or its failure),
    thinks for an exponential time and sends the next, so requests from an idle client arrive as
    a Poisson process. A closed loop is used because with open-loop arrivals below capacity the
    throughput equals the offered load for any scheduler, and above capacity the queue of routing
    decisions outgrows what two cores can simulate on a 10,000-node grid; with a fixed population
    of users, throughput is what the scheduler lets those users get.
    """

    nodes: int = 10_000
    #: concurrent users; None = nodes // 20 (at least 4)
    clients: int | None = None
    duration_s: float = 240.0
    #: tokens and failures before this time are not counted (the grid fills with sessions)
    warmup_s: float = 60.0
    seed: int = 0
    #: simulation step: token progress and queue lengths are updated once a step
    dt_s: float = 1.0
    #: mean node session (heavy-tailed: Lomax with shape ``churn_alpha``); 0 disables churn
    node_mean_life_s: float = 4 * 3600.0
    churn_alpha: float = 1.5
    #: median prompt and generated lengths (lognormal, sigma 0.6, capped)
    prompt_tokens: int = 512
    new_tokens: int = 256
    think_s: float = 10.0
    #: lognormal sigma of a client's error on its pings to hosts (see engine.sim.latency)
    ping_error: float = 0.15
    #: a request not finished this long after it was sent is failed
    deadline_s: float = 300.0
    #: time to notice that a node of a route is gone (coordinator notice or broken connection)
    detect_s: float = 2.0
    #: how often our coordinator calls ``rebalance``, and with which ``min_gain``
    rebalance_s: float = 30.0
    min_gain: float = 0.15

    def __post_init__(self) -> None:
        def positive_int(name: str, value: object, minimum: int) -> None:
            if not isinstance(value, int) or isinstance(value, bool) or value < minimum:
                raise ConfigError(f"--{name.replace('_', '-')} must be an integer >= {minimum}, got {value!r}")

        positive_int("nodes", self.nodes, 4)
        if self.clients is not None:
            positive_int("clients", self.clients, 1)
        positive_int("prompt_tokens", self.prompt_tokens, 1)
        positive_int("new_tokens", self.new_tokens, 1)
        positive_int("seed", self.seed, 0)
        for f in fields(self):
            value = getattr(self, f.name)
            if f.type == "float" and (not isinstance(value, int | float) or not math.isfinite(value) or value < 0):
                raise ConfigError(f"{f.name} must be a finite number >= 0, got {value!r}")
        if self.dt_s <= 0 or self.duration_s <= 0 or self.detect_s < 0:
            raise ConfigError("duration and step must be > 0")
        if self.warmup_s >= self.duration_s:
            raise ConfigError(f"--warmup ({self.warmup_s:g} s) must be shorter than --duration ({self.duration_s:g} s)")
        if self.churn_alpha <= 1.0:
            raise ConfigError(f"churn_alpha must be > 1 (finite mean session), got {self.churn_alpha!r}")
        if self.deadline_s <= 0 or self.rebalance_s <= 0:
            raise ConfigError("--deadline and --rebalance must be > 0")

    @property
    def n_clients(self) -> int:
        return self.clients if self.clients is not None else max(4, self.nodes // 20)
