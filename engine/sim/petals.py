"""Petals' block selection, rewritten as pure functions for the baseline (petals/server/block_selection.py).

A Petals server hosts as many blocks as its memory holds. It reports a throughput of
``min(forward_rps / ((num_blocks + 1) / 2), network_rps)`` (petals/server/throughput.py: the
compute figure is measured on 1,024-token forward passes and divided by the mean number of its
blocks a request uses; the network figure is its measured bandwidth over one hidden state of 16
bits per value). A block's throughput is the sum over the servers hosting it. A joining server
takes the window whose sorted block throughputs are lexicographically smallest (the weakest
span; ties to the lowest start). Every ~``BALANCE_CHECK_S`` a server checks whether the swarm
is balanced and moves to the weakest window if not (``should_choose_other_blocks`` with the
default ``balance_quality`` 0.75).

That check simulates every server re-choosing its window, thousands of times per simulated
minute at 10,000 servers; here the swarm quality is estimated as min / mean of the block
throughputs instead (the mean is what perfect re-balancing could reach at best, so the estimate
errs towards moving more often than Petals does).
"""

from __future__ import annotations

import numpy as np

from engine.sim.gpus import PREFILL_EFFICIENCY, SimModel

BALANCE_QUALITY = 0.75
BALANCE_CHECK_S = 120.0
_EPS = 1e-3


def server_throughput(model: SimModel, num_blocks: int, tflops: float, uplink_bps: float) -> float:
    """What a Petals server announces for its span (requests per second, per its own formula)."""
    forward_rps = PREFILL_EFFICIENCY * tflops * 1e12 / (2.0 * model.params_per_layer)
    network_rps = uplink_bps / (model.hidden_size * 16)
    return min(forward_rps / ((num_blocks + 1) / 2.0), network_rps)


def choose_best_start(throughputs: np.ndarray, num_blocks: int) -> int:
    """The start of the window whose sorted throughputs are lexicographically smallest (lowest start on ties)."""
    windows = np.sort(np.lib.stride_tricks.sliding_window_view(throughputs, num_blocks), axis=1)
    keys = [np.arange(windows.shape[0])] + [windows[:, j] for j in range(num_blocks - 1, -1, -1)]
    return int(np.lexsort(keys)[0])


def swarm_quality(throughputs: np.ndarray) -> float:
    """min / mean of the block throughputs: 1 is perfectly balanced, 0 means a block has no server."""
    mean = float(throughputs.mean())
    return float(throughputs.min()) / mean if mean > 0 else 0.0


def rebalanced_start(throughputs: np.ndarray, start: int, num_blocks: int, own: float) -> int | None:
    """Where a server at [start, start + num_blocks) would move when it checks, or None to stay.

    As in Petals: its own throughput is taken out (times 1 + eps, so staying wins near-ties), and
    it only moves if the swarm is unbalanced and moving would not leave a block without a server.
    """
    if swarm_quality(throughputs) >= BALANCE_QUALITY - _EPS:
        return None
    rest = throughputs.copy()
    rest[start : start + num_blocks] -= own * (1 + _EPS)
    if float(throughputs.min()) > _EPS and float(rest.min()) <= 0:
        return None
    new = choose_best_start(rest, num_blocks)
    return None if new == start else new
