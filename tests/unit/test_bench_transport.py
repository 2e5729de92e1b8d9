"""``kluster bench transport``'s JSON summary and table, from canned measurements (no sockets)."""

from __future__ import annotations

from engine.cli.bench_transport import table
from engine.transport.benchmark import BenchConfig, summarize

CFG = BenchConfig()


def _lane(mbps: float, p50: float) -> dict:
    return {
        "rtt_ms": {"p50": p50, "p99": p50 * 3, "max": p50 * 4},
        "bulk": {"MBps": mbps, "send_cpu_ms_per_MB": 2.5, "recv_cpu_ms_per_MB": 2.7, "retransmits": 0, "timeouts": 0},
    }


LOOPBACK = {"ours": _lane(150.0, 0.5), "stock": _lane(20.0, 0.7)}
WAN = {
    "bulk": {
        "ours": {repr(loss): {"MBps": 5.6} for loss in CFG.wan_losses},
        "stock": {"0.0": {"MBps": 5.4}, "0.001": {"MBps": 0.9}, "0.01": {"error": "TransportError: boom"}},
    },
    "small": {"ours": {"p50": 83.0, "p99": 95.0, "max": 99.0}, "stock": {"p50": 83.0, "p99": 1150.0, "max": 2000.0}},
    "burst": {"sent": 24, "intact_in_order": 24, "seconds": 3.0},
}


def test_json_has_the_headline_keys_with_loss_levels_as_given() -> None:
    result = summarize(LOOPBACK, WAN, None, CFG)
    assert result["loopback_MBps"] == 150.0
    assert result["rtt_p50_ms"] == 0.5 and result["rtt_p99_ms"] == 1.5
    assert result["wan_MBps"] == {
        "ours": {"0": 5.6, "0.001": 5.6, "0.01": 5.6},
        "stock": {"0": 5.4, "0.001": 0.9, "0.01": None},  # a failed run is None, not a number
    }
    assert result["wan_small_rtt_ms"]["stock"]["p99"] == 1150.0


def test_table_shows_both_variants_and_marks_errors() -> None:
    lines = table(summarize(LOOPBACK, WAN, None, CFG))
    text = "\n".join(lines)
    assert "150.0" in text and "20.0" in text
    loss_rows = [line for line in lines if "1.0% loss, MB/s" in line]
    assert len(loss_rows) == 1 and "5.60" in loss_rows[0] and ">= 3" in loss_rows[0]
    assert "1150" in text and "24/24" in text


def test_without_root_the_wan_rows_say_why() -> None:
    result = summarize(LOOPBACK, None, "WAN emulation needs root (network namespaces, iptables)", CFG)
    assert result["wan_MBps"] is None and result["loopback_MBps"] == 150.0
    last = table(result)[-1]
    assert "skipped" in last and "needs root" in last
