"""Our data channels across an emulated lossy WAN: two processes in two network namespaces.

Each host sends through 40 ms of delay and 1 % loss (80 ms round trip). A token's 2.3 KB hidden
state must come back in about one round trip even when packets are lost (stock aiortc stalls
~1 s, its minimum retransmission timeout, on every few dozen), and messages of mixed sizes in
flight together must arrive intact and in order.
"""

from __future__ import annotations

import statistics

import pytest

from engine.transport.probe_peer import ProbePeer, relay
from engine.wanemu import Topology

pytestmark = [pytest.mark.wan, pytest.mark.slow, pytest.mark.timeout(300)]

DELAY_MS = 40
LOSS = 0.01


async def test_small_messages_cross_a_lossy_link_in_about_one_round_trip(wan_root: None) -> None:
    async with Topology(["a", "b"], seed=4321) as topo:
        for host in ("a", "b"):
            topo.set_link(host, delay_ms=DELAY_MS, loss=LOSS)
        async with (
            ProbePeer("a", prefix=topo.host("a").exec_args([])) as a,
            ProbePeer("b", prefix=topo.host("b").exec_args([])) as b,
        ):
            relay(a, b)
            # 200 echo round trips, one at a time; the probe checks every echo byte for byte.
            rtts = (await a.request("rtt", peer="b", count=200, size=2304))["rtts_ms"]
            # 200 token-sized messages, then mixed sizes, all in flight at once: each answered
            # with its sha256, compared in sending order.
            tokens = await a.request("burst", peer="b", count=200, sizes=[2304])
            mixed = await a.request("burst", peer="b", count=24, sizes=[2304, 70_000, 11, 300_000])
            sctp = (await a.request("stats", peer="b"))["sctp"]
        dropped = topo.delayer_stats("a")[1] + topo.delayer_stats("b")[1]

    assert dropped > 10  # the link really lost packets
    assert len(rtts) == 200
    assert tokens["intact_in_order"] == 200
    assert mixed["intact_in_order"] == 24
    p99 = statistics.quantiles(rtts, n=100, method="inclusive")[98]
    floor = 2 * DELAY_MS
    # No one-second stalls (aiortc's minimum RTO): at worst one extra round trip plus a busy
    # machine's scheduling noise.
    assert p99 < 450, sorted(rtts)[-5:]
    assert statistics.median(rtts) < floor + 60
    assert sctp["duplicates_sent"] > 0  # the redundancy that makes this possible was used
