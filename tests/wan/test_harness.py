"""Measured checks of the WAN harness: delay, loss, rate, partitions, and that it always cleans up.

Tolerances are set from what a delayed link must give (never less than the delay; loss within a
binomial band) plus headroom for a shared 2-core machine.
"""

from __future__ import annotations

import os
import statistics
import subprocess
import sys
import time

import pytest

from engine.wanemu import LinkShape, Topology, cleanup_leftovers
from engine.wanemu.cleanup import list_namespaces
from engine.wanemu.probe import tcp_throughput, udp_ping

pytestmark = [pytest.mark.wan, pytest.mark.usefixtures("wan_root")]


def test_round_trip_is_the_sum_of_both_one_way_delays(topology: Topology) -> None:
    a, b = topology.host("a"), topology.host("b")
    topology.set_link("a", delay_ms=40)
    topology.set_link("b", delay_ms=40)
    result = udp_ping(a, b, count=20, interval=0.05)
    assert result.lost == 0
    assert min(result.rtts_ms) >= 79.0, "a delayed packet must never arrive early"
    assert 65.0 <= statistics.median(result.rtts_ms) <= 95.0
    # Changed at run time, without restarting anything.
    topology.set_link("a")
    topology.set_link("b", delay_ms=10)
    result = udp_ping(a, b, count=20, interval=0.02)
    assert result.lost == 0
    assert 9.0 <= statistics.median(result.rtts_ms) <= 25.0
    assert topology.link("a") == LinkShape()


def test_loss_drops_a_binomial_fraction_of_datagrams(topology: Topology) -> None:
    a, b = topology.host("a"), topology.host("b")
    topology.set_link("a", loss=0.10)
    result = udp_ping(a, b, count=500, interval=0.002)
    # 500 draws at p = 0.1: mean 50, sd 6.7; +-4 sd.
    assert 23 <= result.lost <= 77
    accepted, dropped = topology.delayer_stats("a")
    assert dropped == result.lost, "every lost datagram was one the delayer dropped"
    assert accepted == 500 - dropped


def test_tbf_rate_caps_a_tcp_transfer(topology: Topology) -> None:
    a, b = topology.host("a"), topology.host("b")
    unshaped = tcp_throughput(a, b, 30_000_000)
    topology.set_link("a", rate_mbit=50)
    shaped = tcp_throughput(a, b, 12_000_000)
    assert 4.0 <= shaped <= 7.0, f"50 Mbit should give ~6 MB/s, got {shaped:.2f}"
    assert unshaped > 3 * shaped, f"without tbf the link is not the limit ({unshaped:.1f} MB/s)"
    topology.set_link("a")
    assert tcp_throughput(a, b, 30_000_000) > 3 * shaped, "removing the rate lifts the cap"


def test_partition_drops_everything_and_heal_restores(topology: Topology) -> None:
    a, b = topology.host("a"), topology.host("b")
    assert udp_ping(a, b, count=10, interval=0.01).lost == 0
    topology.partition("b")
    assert topology.is_partitioned("b")
    assert udp_ping(a, b, count=10, interval=0.01, wait=0.5).lost == 10
    assert udp_ping(b, a, count=10, interval=0.01, wait=0.5).lost == 10
    topology.heal("b")
    assert udp_ping(a, b, count=10, interval=0.01).lost == 0
    assert udp_ping(b, a, count=10, interval=0.01).lost == 0


def test_block_cuts_one_pair_only_and_counts_what_it_dropped(wan_root: None) -> None:
    with Topology(["a", "b", "c"], seed=5) as topo:
        a, b, c = (topo.host(n) for n in "abc")
        topo.block("a", "b")
        assert udp_ping(a, b, count=5, interval=0.01, wait=0.5).lost == 5
        assert udp_ping(b, a, count=5, interval=0.01, wait=0.5).lost == 5
        assert udp_ping(a, c, count=5, interval=0.01).lost == 0, "a still reaches the rest"
        assert udp_ping(b, c, count=5, interval=0.01).lost == 0, "b still reaches the rest"
        assert topo.blocked_packets("a", "b") == 5 and topo.blocked_packets("b", "a") == 5
        topo.unblock("b", "a")
        assert udp_ping(a, b, count=5, interval=0.01).lost == 0
        assert topo.blocked_packets("a", "b") == 0


def test_hosts_have_routable_addresses_in_a_private_subnet(topology: Topology) -> None:
    a, b = topology.host("a"), topology.host("b")
    assert a.ip == f"10.{topology.subnet}.0.1" and b.ip == f"10.{topology.subnet}.0.2"
    out = a.run(["ip", "-4", "-o", "addr", "show"], timeout=10, capture_output=True, text=True).stdout
    assert f"{a.ip}/24" in out and "127.0.0.1" in out
    routes = a.run(["ip", "route", "show"], timeout=10, capture_output=True, text=True).stdout
    assert "default" not in routes, "hosts must reach only each other"


def test_exception_inside_the_block_still_removes_namespaces_and_processes(wan_root: None) -> None:
    names: list[str] = []
    sleeper: subprocess.Popen[bytes] | None = None
    with pytest.raises(RuntimeError, match="boom"), Topology(3) as topo:
        topo.set_link("h1", delay_ms=20, loss=0.01)
        names = topo.namespaces
        sleeper = topo.host("h2").popen(["sleep", "60"])
        assert set(names) <= set(list_namespaces())
        raise RuntimeError("boom")
    assert len(names) == 4
    assert not set(names) & set(list_namespaces())
    assert sleeper is not None and sleeper.poll() is not None


def test_reaper_removes_namespaces_of_a_killed_harness(wan_root: None) -> None:
    script = (
        "import sys, time\n"
        "from engine.wanemu import Topology\n"
        "t = Topology(2).start()\n"
        "t.set_link('h1', delay_ms=5)\n"
        "t.host('h2').popen(['sleep', '60'])\n"
        "print(' '.join(t.namespaces), flush=True)\n"
        "time.sleep(60)\n"
    )
    harness = subprocess.Popen([sys.executable, "-c", script], stdout=subprocess.PIPE, text=True)
    try:
        assert harness.stdout is not None
        names = harness.stdout.readline().split()
        assert len(names) == 3 and set(names) <= set(list_namespaces())
    finally:
        harness.kill()
        harness.wait(timeout=10)
    deadline = time.monotonic() + 15.0
    while set(names) & set(list_namespaces()) and time.monotonic() < deadline:
        time.sleep(0.1)
    assert not set(names) & set(list_namespaces())


def test_cleanup_leftovers_removes_only_namespaces_of_dead_owners(wan_root: None) -> None:
    prefix = f"kwantest{os.getpid()}"
    dead = subprocess.Popen(["true"])
    dead.wait()
    stale, live = f"{prefix}-1-{dead.pid}-r", f"{prefix}-2-{os.getpid()}-r"
    for name in (stale, live):
        subprocess.run(["ip", "netns", "add", name], check=True, timeout=10)
    try:
        assert cleanup_leftovers(prefix) == [stale]
        present = set(list_namespaces())
        assert stale not in present and live in present
        assert cleanup_leftovers(prefix, force=True) == [live]
        assert live not in set(list_namespaces())
    finally:
        cleanup_leftovers(prefix, force=True)


def test_invalid_shapes_are_refused(topology: Topology) -> None:
    with pytest.raises(ValueError):
        topology.set_link("a", loss=1.5)
    with pytest.raises(ValueError):
        topology.set_link("a", delay_ms=-1)
    with pytest.raises(KeyError):
        topology.set_link("nobody", delay_ms=1)
    assert topology.link("a") == LinkShape()


def test_unshaped_link_is_fast(topology: Topology) -> None:
    """The baseline the shaped tests compare against: no delay or loss without `set_link`."""
    result = udp_ping(topology.host("a"), topology.host("b"), count=20, interval=0.01)
    assert result.lost == 0 and len(result.rtts_ms) == 20
    assert statistics.median(result.rtts_ms) < 5.0
    assert topology.delayer_stats("a") == (0, 0), "an unshaped host's packets skip user space"
