"""The measurements behind ``kluster bench transport``: our data channels vs stock aiortc, one run.

Why one run: the machine is shared and noisy, so ours and stock are measured side by side,
interleaved per condition, with the same programs (:mod:`engine.transport.probe_peer`), and only
an environment variable (``KLUSTER_SCTP=stock``) telling the stock children to leave aiortc alone.

Conditions:

* loopback: two processes on this machine; 2.3 KB echo round trips one at a time (RTT p50/p99),
  then 1 MB messages back to back (MB/s acknowledged, CPU ms per MB on each side);
* WAN (root only): two network namespaces, each sending through 40 ms of delay, ``loss`` and a
  50 Mbit rate cap (:mod:`engine.wanemu`), so 80 ms RTT; bulk MB/s of 250 KB messages at 0 %,
  0.1 % and 1 % loss, ours and stock alternating per loss level; then at 1 % loss, 2.3 KB echo
  round trips one at a time (a token's hidden state each way), ours and stock concurrently
  (their traffic is tiny; both see the same conditions), and an in-order integrity check of
  mixed-size messages in flight together (ours).
"""

from __future__ import annotations

import asyncio
import logging
import statistics
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

from engine.transport.probe_peer import ProbePeer, relay

log = logging.getLogger(__name__)

VARIANTS = ("ours", "stock")
#: One token's hidden state of the default model (576 x fp32 ... as fp16 on the wire: 1152 x 2).
TOKEN_BYTES = 2304


@dataclass(frozen=True)
class BenchConfig:
    """What one bench run measures (defaults: about 2.5 minutes with root, 20 s without)."""

    loopback_pings: int = 500
    loopback_seconds: float = 4.0
    bulk_message_bytes: int = 1_000_000
    #: Smaller on the WAN so that stock's 0.2 MB/s is still many whole messages in the window.
    wan_message_bytes: int = 250_000
    wan_delay_ms: float = 40.0
    wan_rate_mbit: float = 50.0
    wan_losses: tuple[float, ...] = (0.0, 0.001, 0.01)
    wan_warmup_s: float = 2.0
    wan_seconds: float = 8.0
    wan_pings: int = 250
    wan_ping_loss: float = 0.01
    #: Sizes cycled by the in-order integrity check on the lossy path.
    burst_sizes: tuple[int, ...] = (TOKEN_BYTES, 70_000, 300_000, 11)
    burst_count: int = 24


def _quantiles(samples: list[float]) -> dict[str, float]:
    if len(samples) < 2:
        return {"p50": samples[0] if samples else float("nan"), "p99": samples[0] if samples else float("nan")}
    q = statistics.quantiles(samples, n=100, method="inclusive")
    return {"p50": round(q[49], 3), "p99": round(q[98], 3), "max": round(max(samples), 3)}


def _per_mb(cpu_s: float, nbytes: float) -> float | None:
    return round(cpu_s / (nbytes / 1e6) * 1e3, 2) if nbytes > 0 else None


async def _bulk(a: ProbePeer, b: ProbePeer, seconds: float, warmup: float, size: int) -> dict[str, Any]:
    """a sends to b for ``warmup + seconds``; MB/s and CPU ms per MB on both sides."""
    before = await b.request("cpu")
    res = await a.request("bulk", peer=b.name, seconds=seconds, warmup=warmup, size=size)
    after = await b.request("cpu")
    return {
        "MBps": round(res["MBps"], 3),
        "send_cpu_ms_per_MB": _per_mb(res["cpu_s"], res["bytes"]),
        "recv_cpu_ms_per_MB": _per_mb(after["cpu_s"] - before["cpu_s"], after["rx_bytes"] - before["rx_bytes"]),
        "retransmits": res["sctp"].get("retransmits"),
        "timeouts": res["sctp"].get("timeouts"),
    }


async def _rtts(a: ProbePeer, b: ProbePeer, count: int, size: int) -> dict[str, float]:
    res = await a.request("rtt", peer=b.name, count=count, size=size)
    return _quantiles(res["rtts_ms"])


class _Pair:
    """Two probe children (``a`` sends, ``b`` answers) of one variant, optionally in WAN hosts."""

    def __init__(self, variant: str, prefix_a: list[str] | None = None, prefix_b: list[str] | None = None) -> None:
        stock = variant == "stock"
        self.a = ProbePeer("a", prefix=prefix_a or [], stock=stock)
        self.b = ProbePeer("b", prefix=prefix_b or [], stock=stock)

    async def __aenter__(self) -> _Pair:
        await self.a.__aenter__()
        try:
            await self.b.__aenter__()
        except BaseException:
            await self.a.__aexit__(None, None, None)
            raise
        relay(self.a, self.b)
        return self

    async def __aexit__(self, *exc: object) -> None:
        await asyncio.gather(self.a.__aexit__(None, None, None), self.b.__aexit__(None, None, None))


async def _guard(what: str, coro: Any, out: dict[str, Any], key: str) -> None:
    """Run one measurement; a failure is recorded in the result instead of ending the run."""
    try:
        out[key] = await coro
    except Exception as exc:
        log.warning("%s failed: %s", what, exc)
        out[key] = {"error": f"{type(exc).__name__}: {exc}"}


async def measure_loopback(cfg: BenchConfig, say: Callable[[str], None]) -> dict[str, Any]:
    out: dict[str, Any] = {}
    for variant in VARIANTS:
        say(f"loopback, {variant}: {cfg.loopback_pings} round trips, {cfg.loopback_seconds:g} s bulk ...")
        row: dict[str, Any] = {}
        async with _Pair(variant) as pair:
            await _guard("loopback rtt", _rtts(pair.a, pair.b, cfg.loopback_pings, TOKEN_BYTES), row, "rtt_ms")
            await _guard(
                "loopback bulk",
                _bulk(pair.a, pair.b, cfg.loopback_seconds, 1.0, cfg.bulk_message_bytes),
                row,
                "bulk",
            )
        out[variant] = row
    return out


async def measure_wan(cfg: BenchConfig, say: Callable[[str], None]) -> dict[str, Any]:
    from engine.wanemu import Topology

    out: dict[str, Any] = {"bulk": {v: {} for v in VARIANTS}, "small": {}}
    async with Topology(["a", "b"], seed=2024) as topo:
        ha, hb = topo.host("a"), topo.host("b")
        pairs = {v: _Pair(v, ha.exec_args([]), hb.exec_args([])) for v in VARIANTS}
        for pair in pairs.values():
            await pair.__aenter__()
        try:
            for loss in cfg.wan_losses:
                for host in ("a", "b"):
                    topo.set_link(host, delay_ms=cfg.wan_delay_ms, loss=loss, rate_mbit=cfg.wan_rate_mbit)
                for variant, pair in pairs.items():
                    say(f"WAN {loss:.1%} loss, {variant}: {cfg.wan_warmup_s + cfg.wan_seconds:g} s bulk ...")
                    await _guard(
                        "wan bulk",
                        _bulk(pair.a, pair.b, cfg.wan_seconds, cfg.wan_warmup_s, cfg.wan_message_bytes),
                        out["bulk"][variant],
                        repr(loss),
                    )
            for host in ("a", "b"):
                topo.set_link(host, delay_ms=cfg.wan_delay_ms, loss=cfg.wan_ping_loss, rate_mbit=cfg.wan_rate_mbit)
            say(f"WAN {cfg.wan_ping_loss:.0%} loss: {cfg.wan_pings} round trips of {TOKEN_BYTES} B, both variants ...")
            await asyncio.gather(
                *(
                    _guard("wan rtt", _rtts(pair.a, pair.b, cfg.wan_pings, TOKEN_BYTES), out["small"], variant)
                    for variant, pair in pairs.items()
                )
            )
            say(f"WAN {cfg.wan_ping_loss:.0%} loss: {cfg.burst_count} hashed messages in flight at once (ours) ...")
            ours = pairs["ours"]
            await _guard(
                "wan burst",
                ours.a.request("burst", peer="b", count=cfg.burst_count, sizes=list(cfg.burst_sizes)),
                out,
                "burst",
            )
        finally:
            await asyncio.gather(*(pair.__aexit__() for pair in pairs.values()))
    return out


def _mbps(row: dict[str, Any]) -> float | None:
    value = row.get("MBps") if isinstance(row, dict) else None
    return float(value) if isinstance(value, int | float) else None


def summarize(loopback: dict[str, Any], wan: dict[str, Any] | None, wan_skipped: str | None, cfg: BenchConfig) -> dict:
    """The JSON object of ``kluster bench transport --json`` (headline keys first)."""
    ours_lb = loopback.get("ours", {})
    rtt = ours_lb.get("rtt_ms", {})
    result: dict[str, Any] = {
        "loopback_MBps": _mbps(ours_lb.get("bulk", {})),
        "rtt_p50_ms": rtt.get("p50"),
        "rtt_p99_ms": rtt.get("p99"),
        "wan_MBps": None,
        "wan_small_rtt_ms": None,
        "loopback": loopback,
        "wan_skipped": wan_skipped,
        "wan": None,
        "conditions": {
            "message_bytes": cfg.bulk_message_bytes,
            "wan_message_bytes": cfg.wan_message_bytes,
            "token_bytes": TOKEN_BYTES,
            "wan_delay_ms_each_way": cfg.wan_delay_ms,
            "wan_rate_mbit": cfg.wan_rate_mbit,
            "wan_ping_loss": cfg.wan_ping_loss,
        },
        "targets": {"loopback_MBps": 40.0, "wan_MBps_at_1pct_loss": 3.0, "wan_small_rtt_p99_ms_below": 1000.0},
    }
    if wan is not None:
        result["wan_MBps"] = {
            v: {(f"{loss:g}"): _mbps(wan["bulk"][v].get(repr(loss), {})) for loss in cfg.wan_losses} for v in VARIANTS
        }
        result["wan_small_rtt_ms"] = wan.get("small")
        result["wan"] = wan
    return result
