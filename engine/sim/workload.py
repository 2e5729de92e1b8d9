"""The shared event trace: which nodes exist when, where clients sit, and what they ask.

Both schedulers replay exactly this trace (same seed, same nodes joining and leaving at the same
times, same clients, and the k-th request of a client has the same sizes and think time in both
runs); only what the schedulers decide differs.

Node sessions are heavy-tailed: Lomax (Pareto II) with shape alpha and the configured mean, the
law volunteer-computing traces follow (many short sessions, a few very long ones). The nodes
present at time 0 have been up for a while, so their remaining time follows the stationary
residual law, Lomax with shape alpha - 1 and the same scale; joins are Poisson at the rate that
keeps the population steady (nodes / mean session). Churn goes on after ``duration_s`` until
``horizon_s``, while the last requests are followed to their end.

Requests mix chat (median ``new_tokens`` generated) and long generations (median
``long_new_tokens``, share ``long_share``): the long ones run for minutes, long enough that a
node of their route may leave meanwhile.
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import numpy as np

from engine.sim.config import SimConfig
from engine.sim.gpus import GPUS, SimModel
from engine.sim.latency import LAST_MILE_MS, LAST_MILE_SIGMA, REGION_SHARE

#: lognormal sigma of a card's measured speed around its type's figure (clocks, cooling, PCIe)
SPEED_SIGMA = 0.1
#: median uplink and weight-download bandwidth of a node (bit/s) and their lognormal sigma
UPLINK_BPS = 200e6
DOWNLOAD_BPS = 1e9
BANDWIDTH_SIGMA = 0.5
#: lognormal sigma of prompt and generation lengths, and their caps
LENGTH_SIGMA = 0.6
MAX_PROMPT = 4096
MAX_NEW = 1024
MAX_LONG_NEW = 4096


def horizon_s(cfg: SimConfig) -> float:
    """When the last request sent before ``duration_s`` has surely ended: it is failed at its deadline."""
    return cfg.duration_s + cfg.deadline_after(MAX_LONG_NEW)


@dataclass(frozen=True)
class NodeSpec:
    """One node of the trace: its card, place, links and when it is online."""

    node_id: str
    gpu: str
    region: int
    memory_bytes: int
    layers_per_s: float
    tflops: float
    uplink_bps: float
    download_bps: float
    last_mile_ms: float
    join_s: float
    leave_s: float


@dataclass(frozen=True)
class ClientSpec:
    client_id: str
    region: int
    last_mile_ms: float


@dataclass(frozen=True)
class RequestSpec:
    """The k-th request of a client: sent ``think_s`` after the previous one ended."""

    prompt_tokens: int
    new_tokens: int
    think_s: float

    @property
    def max_length(self) -> int:
        """Tokens of KV cache the request reserves on every host it uses."""
        return self.prompt_tokens + self.new_tokens


@dataclass(frozen=True)
class Trace:
    nodes: tuple[NodeSpec, ...]
    clients: tuple[ClientSpec, ...]
    config: SimConfig

    def request(self, client: int, k: int) -> RequestSpec:
        """Deterministic in (seed, client, k), whatever order the runs ask in."""
        cfg = self.config
        rng = np.random.default_rng([cfg.seed, 2, client, k])
        prompt = int(np.clip(round(cfg.prompt_tokens * rng.lognormal(0.0, LENGTH_SIGMA)), 1, MAX_PROMPT))
        long = float(rng.uniform()) < cfg.long_share
        median, cap = (cfg.long_new_tokens, MAX_LONG_NEW) if long else (cfg.new_tokens, MAX_NEW)
        new = int(np.clip(round(median * rng.lognormal(0.0, LENGTH_SIGMA)), 1, cap))
        # first requests are spread over the first half of the warm-up
        think = float(rng.uniform(0.0, cfg.warmup_s / 2)) if k == 0 else float(rng.exponential(cfg.think_s))
        return RequestSpec(prompt, new, think)


def _node(rng: np.random.Generator, index: int, model: SimModel, join_s: float, leave_s: float) -> NodeSpec:
    gpu = GPUS[int(rng.choice(len(GPUS), p=[g.share for g in GPUS]))]
    return NodeSpec(
        node_id=f"n{index:05d}",
        gpu=gpu.name,
        region=int(rng.choice(len(REGION_SHARE), p=REGION_SHARE)),
        memory_bytes=gpu.memory_bytes(),
        layers_per_s=gpu.layers_per_s(model) * float(rng.lognormal(0.0, SPEED_SIGMA)),
        tflops=gpu.fp16_tflops,
        uplink_bps=UPLINK_BPS * float(rng.lognormal(0.0, BANDWIDTH_SIGMA)),
        download_bps=DOWNLOAD_BPS * float(rng.lognormal(0.0, BANDWIDTH_SIGMA)),
        last_mile_ms=LAST_MILE_MS * float(rng.lognormal(0.0, LAST_MILE_SIGMA)),
        join_s=join_s,
        leave_s=leave_s,
    )


def make_trace(cfg: SimConfig, model: SimModel) -> Trace:
    """Nodes (initial ones first, then joiners by time) and clients, all from ``cfg.seed``."""
    rng = np.random.default_rng([cfg.seed, 1])
    churn = cfg.node_mean_life_s > 0
    scale = cfg.node_mean_life_s * (cfg.churn_alpha - 1.0)  # Lomax mean = scale / (alpha - 1)
    nodes: list[NodeSpec] = []
    for i in range(cfg.nodes):
        residual = scale * float(rng.pareto(cfg.churn_alpha - 1.0)) if churn else math.inf
        nodes.append(_node(rng, i, model, 0.0, residual))
    if churn:
        rate = cfg.nodes / cfg.node_mean_life_s
        t = float(rng.exponential(1.0 / rate))
        end = horizon_s(cfg)
        while t < end:
            life = scale * float(rng.pareto(cfg.churn_alpha))
            nodes.append(_node(rng, len(nodes), model, t, t + life))
            t += float(rng.exponential(1.0 / rate))
    clients = tuple(
        ClientSpec(
            f"c{j:05d}",
            int(rng.choice(len(REGION_SHARE), p=REGION_SHARE)),
            LAST_MILE_MS * float(rng.lognormal(0.0, LAST_MILE_SIGMA)),
        )
        for j in range(cfg.n_clients)
    )
    return Trace(tuple(nodes), clients, cfg)
