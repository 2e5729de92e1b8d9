"""Token rates of all sessions at once: approximate mean value analysis of a closed queueing network.

Simulating every token of every hop of ~thousands of sessions as events is far too slow in
Python at 10,000 nodes, so token progress is fluid: every step the simulator asks how fast each
session generates, given everyone's routes, and advances all sessions at those rates.

Each session is one customer cycling through its ring: a fixed delay (network, per-hop overhead)
plus, at every hop, a FIFO queue on a node that serves one request at a time (a node runs one
decode step at a time, Petals-style; no batching across sessions). Schweitzer's approximation
of mean value analysis gives, with Q the mean number of customers of a session at a hop,

    R(session, hop) = D(session, hop) + sum over the other sessions at that node of Q * D
    X(session)      = 1 / (delay(session) + sum over hops of R)      tokens per second
    Q(session, hop) = X(session) * R(session, hop)

iterated to a fixed point. A node's utilisation never exceeds 1: when it saturates, the waits
grow until its sessions share it.
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np

ITERATIONS = 60
DAMPING = 0.5


@dataclass(frozen=True)
class Rates:
    """Per session: tokens/s. Per node: mean sessions present and utilisation."""

    tokens_per_s: np.ndarray
    present: np.ndarray
    utilisation: np.ndarray


def solve(session: np.ndarray, node: np.ndarray, demand: np.ndarray, delay: np.ndarray, n_nodes: int) -> Rates:
    """Rates for sessions 0..len(delay)-1; entry e is session[e]'s hop on node[e] costing demand[e] s."""
    n_sessions = delay.shape[0]
    if n_sessions == 0:
        zeros = np.zeros(n_nodes)
        return Rates(np.zeros(0), zeros, zeros)
    q = np.zeros(demand.shape[0])
    x = 1.0 / (delay + np.bincount(session, weights=demand, minlength=n_sessions))
    for _ in range(ITERATIONS):
        work = np.bincount(node, weights=q * demand, minlength=n_nodes)
        r = demand + work[node] - q * demand
        x = 1.0 / (delay + np.bincount(session, weights=r, minlength=n_sessions))
        q = DAMPING * q + (1.0 - DAMPING) * x[session] * r
    present = np.bincount(node, weights=q, minlength=n_nodes)
    utilisation = np.bincount(node, weights=x[session] * demand, minlength=n_nodes)
    return Rates(x, present, utilisation)
