"""Every knob of one simulation, validated once so a bad value is a one-line ``ConfigError``."""

from __future__ import annotations

import math
from dataclasses import dataclass, fields

from engine.errors import ConfigError

#: the baseline's failover modes (see engine.sim.policies)
FAILOVERS = ("retry", "replay")


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
    #: clients send requests during [0, duration_s); the requests sent in [warmup_s, duration_s)
    #: are followed to their end (completed or failed), however long after duration_s that is
    duration_s: float = 600.0
    #: tokens and requests before this time are not counted (the grid fills with sessions)
    warmup_s: float = 180.0
    seed: int = 0
    #: simulation step: token progress and queue lengths are updated once a step
    dt_s: float = 1.0
    #: mean node session (heavy-tailed: Lomax with shape ``churn_alpha``); 0 disables churn. With
    #: 1 h and 1.5 the median session is 18 min and one in five lasts under 5 min
    node_mean_life_s: float = 3600.0
    churn_alpha: float = 1.5
    #: median prompt and generated lengths (lognormal, sigma 0.6, capped) of a chat request
    prompt_tokens: int = 512
    new_tokens: int = 256
    #: share of requests that are long generations, and their median generated length
    long_share: float = 0.2
    long_new_tokens: int = 1536
    think_s: float = 10.0
    #: lognormal sigma of a client's error on its pings to hosts (see engine.sim.latency)
    ping_error: float = 0.15
    #: a request fails if it has not ended ``deadline_s + deadline_per_token_s * new_tokens`` after it
    #: was sent: a user waits a minute for the start, then for 4 tokens/s on average (~3 words/s,
    #: below reading speed)
    deadline_s: float = 60.0
    deadline_per_token_s: float = 0.25
    #: time to notice that a node of a route is gone (coordinator notice or broken connection)
    detect_s: float = 2.0
    #: how often our coordinator calls ``rebalance``, and with which ``min_gain``
    rebalance_s: float = 30.0
    min_gain: float = 0.15
    #: the baseline's failover (engine.sim.policies): "retry" restarts the request from scratch on a
    #: new route (the issue's baseline), "replay" replaces the failed span and replays it (Petals)
    baseline_failover: str = "retry"

    def __post_init__(self) -> None:
        def positive_int(name: str, value: object, minimum: int) -> None:
            if not isinstance(value, int) or isinstance(value, bool) or value < minimum:
                raise ConfigError(f"--{name.replace('_', '-')} must be an integer >= {minimum}, got {value!r}")

        positive_int("nodes", self.nodes, 4)
        if self.clients is not None:
            positive_int("clients", self.clients, 1)
        positive_int("prompt_tokens", self.prompt_tokens, 1)
        positive_int("new_tokens", self.new_tokens, 1)
        positive_int("long_new_tokens", self.long_new_tokens, 1)
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
        if self.long_share > 1:
            raise ConfigError(f"--long-share must be in [0, 1], got {self.long_share!r}")
        if self.baseline_failover not in FAILOVERS:
            choices = ", ".join(FAILOVERS)
            raise ConfigError(f"--baseline-failover must be one of {choices}, got {self.baseline_failover!r}")

    @property
    def n_clients(self) -> int:
        return self.clients if self.clients is not None else max(4, self.nodes // 20)

    def deadline_after(self, new_tokens: int) -> float:
        """Seconds a request generating ``new_tokens`` tokens may take before it is failed."""
        return self.deadline_s + self.deadline_per_token_s * new_tokens
