"""``kluster bench transport``: our WebRTC data-channel transport vs stock aiortc, in one table.

Loopback between two processes (MB/s, 2.3 KB round trip p50/p99, CPU per MB) and, as root, an
emulated 50 Mbit / 80 ms RTT path at 0 %, 0.1 % and 1 % loss (MB/s), plus the round trip of a
token's 2.3 KB hidden state at 1 % loss. Both variants run in the same invocation with the same
programs (:mod:`engine.transport.benchmark`); without root the WAN rows say why they were skipped.
"""

from __future__ import annotations

import argparse
import json
import sys
from typing import Any

from engine import aio


def register(bsub: Any) -> None:
    p = bsub.add_parser("transport", help="data channels: ours vs stock aiortc on loopback and a lossy emulated WAN")
    p.add_argument("--no-wan", action="store_true", help="skip the emulated-WAN rows (they need root)")
    p.add_argument("--json", action="store_true", help="print one JSON object")
    p.set_defaults(handler=run)


def _num(value: Any, fmt: str) -> str:
    return format(value, fmt) if isinstance(value, int | float) else "-"


def _cell(row: Any, key: str, fmt: str) -> str:
    if not isinstance(row, dict):
        return "-"
    if "error" in row:
        return "error"
    return _num(row.get(key), fmt)


def table(result: dict[str, Any]) -> list[str]:
    """The human-readable table of one run (``--json`` prints ``result`` itself)."""
    cond = result["conditions"]
    lb = result["loopback"]
    width = 46
    lines = [
        "kluster bench transport: WebRTC data channels (aiortc 1.16), ours vs stock, measured in this run",
        f"{'measure':<{width}}{'ours':>10}{'stock':>10}  target",
    ]

    def row(label: str, ours: str, stock: str, target: str = "") -> None:
        lines.append(f"{label:<{width}}{ours:>10}{stock:>10}  {target}")

    def both(part: str, key: str, fmt: str) -> tuple[str, str]:
        return tuple(_cell(lb.get(v, {}).get(part), key, fmt) for v in ("ours", "stock"))  # type: ignore[return-value]

    row(f"loopback, 2 processes, {cond['message_bytes'] // 1000} KB msgs, MB/s", *both("bulk", "MBps", ".1f"), ">= 40")
    row("  CPU ms per MB, sender", *both("bulk", "send_cpu_ms_per_MB", ".1f"))
    row("  CPU ms per MB, receiver", *both("bulk", "recv_cpu_ms_per_MB", ".1f"))
    row(f"loopback RTT, {cond['token_bytes']} B each way, p50 ms", *both("rtt_ms", "p50", ".2f"))
    row("  p99 ms", *both("rtt_ms", "p99", ".2f"))
    skipped = result.get("wan_skipped")
    rate, delay = cond["wan_rate_mbit"], cond["wan_delay_ms_each_way"]
    if skipped:
        lines.append(f"WAN {rate:g} Mbit, {2 * delay:g} ms RTT: skipped ({skipped})")
        return lines
    wan = result["wan"]
    for loss, ours in result["wan_MBps"]["ours"].items():
        stock = result["wan_MBps"]["stock"].get(loss)
        row(
            f"WAN {rate:g} Mbit, {2 * delay:g} ms RTT, {float(loss):.1%} loss, MB/s",
            _num(ours, ".2f"),
            _num(stock, ".2f"),
            ">= 3" if float(loss) == 0.01 else "",
        )
    small = wan.get("small", {})
    ping_loss = cond["wan_ping_loss"]
    row(
        f"WAN {ping_loss:.0%} loss, {cond['token_bytes']} B RTT p50 ms",
        _cell(small.get("ours"), "p50", ".0f"),
        _cell(small.get("stock"), "p50", ".0f"),
        f"floor {2 * delay:g}",
    )
    row("  p99 ms", _cell(small.get("ours"), "p99", ".0f"), _cell(small.get("stock"), "p99", ".0f"), "well under 1000")
    burst = wan.get("burst", {})
    if "sent" in burst:
        lines.append(
            f"WAN {ping_loss:.0%} loss, ours: {burst['intact_in_order']}/{burst['sent']} mixed-size messages "
            "in flight together came back intact and in order"
        )
    return lines


def run(args: argparse.Namespace) -> int:
    from engine.transport.benchmark import BenchConfig, measure_loopback, measure_wan, summarize
    from engine.wanemu import unavailable_reason

    cfg = BenchConfig()
    say = (lambda *_: None) if args.json else (lambda m: print(m, file=sys.stderr, flush=True))
    skipped = "--no-wan" if args.no_wan else unavailable_reason()

    async def measure() -> tuple[dict[str, Any], dict[str, Any] | None]:
        loopback = await measure_loopback(cfg, say)
        wan = None if skipped else await measure_wan(cfg, say)
        return loopback, wan

    loopback, wan = aio.run(measure())
    result = summarize(loopback, wan, skipped, cfg)
    if args.json:
        print(json.dumps(result))
    else:
        print("\n".join(table(result)))
    return 0
