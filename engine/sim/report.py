"""Results: one run's figures, the comparison of both, the table and the plot."""

from __future__ import annotations

import math
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any, Protocol

from engine.errors import ConfigError
from engine.sim.config import SimConfig
from engine.sim.metrics import Metrics, percentile


class _Timed(Protocol):
    timings_ms: list[float]


@dataclass(frozen=True)
class RunResult:
    """One policy's figures; requests are those sent in the measured window, each completed or failed."""

    policy: str
    failover: str
    throughput_tok_s: float
    token_p50_ms: float
    token_p99_ms: float
    ttft_p50_ms: float
    sent: int
    completed: int
    failed: int
    failed_reasons: dict[str, int]
    failovers: int
    regenerated_tokens: float
    mean_hops: float
    route_decisions: int
    route_p50_ms: float
    route_p99_ms: float
    route_cpu_p50_ms: float
    route_cpu_p99_ms: float
    placement_decisions: int
    placement_p99_ms: float
    initial_placement_ms: float
    nodes_moved: int
    max_moved_at_once: int
    busy_share: float
    drain_s: float
    wall_s: float
    tokens_per_s_series: tuple[float, ...]

    @classmethod
    def collect(
        cls,
        policy: str,
        failover: str,
        cfg: SimConfig,
        m: Metrics,
        placement: _Timed,
        ttft_s: list[float],
        wall_s: float,
    ) -> RunResult:
        window = cfg.duration_s - cfg.warmup_s
        return cls(
            policy=policy,
            failover=failover,
            throughput_tok_s=m.tokens / window,
            token_p50_ms=m.latency_ms(50),
            token_p99_ms=m.latency_ms(99),
            ttft_p50_ms=1000 * percentile(ttft_s, 50),
            sent=m.sent,
            completed=m.completed,
            failed=m.failed,
            failed_reasons=dict(sorted(m.failed_reasons.items())),
            failovers=m.failovers,
            regenerated_tokens=m.regenerated,
            mean_hops=m.hops / m.routes if m.routes else float("nan"),
            route_decisions=len(m.route_ms),
            route_p50_ms=percentile(m.route_ms, 50),
            route_p99_ms=percentile(m.route_ms, 99),
            route_cpu_p50_ms=percentile(m.route_cpu_ms, 50),
            route_cpu_p99_ms=percentile(m.route_cpu_ms, 99),
            placement_decisions=len(placement.timings_ms),
            placement_p99_ms=percentile(placement.timings_ms, 99),
            initial_placement_ms=float(getattr(placement, "initial_ms", float("nan"))),
            nodes_moved=m.nodes_moved,
            max_moved_at_once=m.max_moved_at_once,
            busy_share=percentile(m.busy_share, 50),
            drain_s=m.drain_s,
            wall_s=wall_s,
            tokens_per_s_series=tuple(m.tokens_per_step),
        )

    def to_dict(self) -> dict[str, Any]:
        """JSON-ready: floats rounded, NaN (no such decision in this policy) as None."""
        out = asdict(self)
        del out["tokens_per_s_series"]
        return {k: _number(v) if isinstance(v, float) else v for k, v in out.items()}


def _number(value: float) -> float | None:
    return None if math.isnan(value) else round(value, 3)


def compare(cfg: SimConfig, model: str, ours: RunResult, base: RunResult, wall_s: float) -> dict[str, Any]:
    """The headline figures (the keys ``kluster sim --json`` promises) plus both runs in full."""
    ratio = ours.throughput_tok_s / base.throughput_tok_s if base.throughput_tok_s > 0 else float("inf")
    return {
        "nodes": cfg.nodes,
        "clients": cfg.n_clients,
        "duration_s": cfg.duration_s,
        "warmup_s": cfg.warmup_s,
        "seed": cfg.seed,
        "ping_error": cfg.ping_error,
        "node_mean_life_s": cfg.node_mean_life_s,
        "long_share": cfg.long_share,
        "deadline": f"{cfg.deadline_s:g} s + {cfg.deadline_per_token_s:g} s/token",
        "model": model,
        "baseline_failover": base.failover,
        "throughput_ratio": round(ratio, 3),
        "failed_ours": ours.failed,
        "failed_baseline": base.failed,
        # one request's placement+route decision: the real plan_route call (ours), wall clock and
        # CPU; rebalance runs in the background every rebalance_s and is reported apart
        "decision_p99_ms": _number(ours.route_p99_ms),
        "decision_p99_cpu_ms": _number(ours.route_cpu_p99_ms),
        "placement_p99_ms": _number(ours.placement_p99_ms),
        "targets": {"throughput_ratio": 1.3, "decision_p99_ms": 50.0, "failed": "ours < baseline"},
        "wall_s": round(wall_s, 1),
        "ours": ours.to_dict(),
        "baseline": base.to_dict(),
    }


_ROWS = (
    ("throughput (tok/s)", "throughput_tok_s", "{:.1f}"),
    ("token latency p50 (ms)", "token_p50_ms", "{:.0f}"),
    ("token latency p99 (ms)", "token_p99_ms", "{:.0f}"),
    ("first token p50 (ms)", "ttft_p50_ms", "{:.0f}"),
    ("requests sent (measured)", "sent", "{}"),
    ("requests completed", "completed", "{}"),
    ("requests failed", "failed", "{}"),
    ("failovers", "failovers", "{}"),
    ("tokens generated again", "regenerated_tokens", "{:.0f}"),
    ("hops per route", "mean_hops", "{:.2f}"),
    ("node utilisation (mean)", "busy_share", "{:.3f}"),
    ("nodes moved by rebalancing", "nodes_moved", "{}"),
    ("route decisions", "route_decisions", "{}"),
    ("route decision p50 (ms)", "route_p50_ms", "{:.1f}"),
    ("route decision p99 (ms)", "route_p99_ms", "{:.1f}"),
    ("route decision p50 CPU (ms)", "route_cpu_p50_ms", "{:.1f}"),
    ("route decision p99 CPU (ms)", "route_cpu_p99_ms", "{:.1f}"),
    ("placement decision p99 (ms)", "placement_p99_ms", "{:.1f}"),
    ("drain after the last request (s)", "drain_s", "{:.0f}"),
    ("wall time (s)", "wall_s", "{:.1f}"),
)


def table(result: dict[str, Any]) -> str:
    ours, base = result["ours"], result["baseline"]
    lines = [
        f"kluster sim: {result['nodes']} nodes, {result['clients']} clients, {result['model']}, "
        f"{result['duration_s']:g} s simulated ({result['warmup_s']:g} s warm-up), seed {result['seed']}, "
        f"ping error {result['ping_error']:g}",
        f"churn: mean node session {result['node_mean_life_s']:g} s; {result['long_share']:.0%} long generations; "
        f"deadline {result['deadline']}; baseline failover: {result['baseline_failover']}",
        f"{'':<34}{'ours':>12}{'baseline':>12}{'ratio':>9}",
    ]
    for label, key, fmt in _ROWS:
        a, b = ours[key], base[key]
        numbers = isinstance(a, int | float) and isinstance(b, int | float) and b != 0
        ratio = f"{a / b:9.2f}" if numbers else f"{'':>9}"
        cells = [fmt.format(v) if v is not None else "n/a" for v in (a, b)]  # None: no such decision
        lines.append(f"{label:<34}{cells[0]:>12}{cells[1]:>12}{ratio}")
    for name, run in (("ours", ours), ("baseline", base)):
        reasons = ", ".join(f"{k} {v}" for k, v in run["failed_reasons"].items()) or "none"
        lines.append(f"failed requests by reason, {name}: {reasons}")
    lines.append(
        f"throughput ratio {result['throughput_ratio']:.2f} (target >= 1.3); failed {result['failed_ours']} vs "
        f"{result['failed_baseline']}; decision p99 {result['decision_p99_ms'] or 0:.1f} ms wall, "
        f"{result['decision_p99_cpu_ms'] or 0:.1f} ms CPU (target < 50)"
    )
    return "\n".join(lines)


def plot(result: dict[str, Any], ours: RunResult, base: RunResult, dt_s: float, path: Path) -> None:
    """Throughput over time and the per-policy summary bars, as a PNG."""
    try:
        import matplotlib

        matplotlib.use("Agg")
        import matplotlib.pyplot as plt
    except ImportError:
        raise ConfigError("--plot needs matplotlib (pip install matplotlib)") from None
    fig, (ax_t, ax_b) = plt.subplots(1, 2, figsize=(12, 4.5))
    window = max(1, round(10.0 / dt_s))
    for run, colour in ((ours, "tab:blue"), (base, "tab:orange")):
        series = run.tokens_per_s_series
        smooth = [sum(series[i : i + window]) / len(series[i : i + window]) for i in range(0, len(series), window)]
        label = run.policy if run.policy == "ours" else f"{run.policy} ({run.failover} failover)"
        ax_t.plot([i * dt_s for i in range(0, len(series), window)], smooth, label=label, color=colour)
    ax_t.axvline(result["warmup_s"], color="grey", linestyle=":", label="end of warm-up")
    ax_t.set_xlabel("simulated time (s)")
    ax_t.set_ylabel("new tokens / s (10 s mean)")
    ax_t.set_title(f"{result['nodes']} nodes, {result['clients']} clients")
    ax_t.legend()
    labels = ["throughput", "token p50", "token p99", "failed"]
    keys = ["throughput_tok_s", "token_p50_ms", "token_p99_ms", "failed"]
    o = [float(result["ours"][k] or 0.0) for k in keys]
    b = [float(result["baseline"][k] or 0.0) for k in keys]
    rel = [x / y if y else 0.0 for x, y in zip(o, b, strict=True)]
    ax_b.bar(labels, rel, color="tab:blue", label="ours / baseline")
    ax_b.axhline(1.0, color="tab:orange", label="baseline = 1")
    for i, (x, y) in enumerate(zip(o, b, strict=True)):
        ax_b.annotate(f"{x:.4g}\nvs {y:.4g}", (i, rel[i]), ha="center", va="bottom", fontsize=8)
    ax_b.set_ylim(0, max([*rel, 1.0]) * 1.25)
    ax_b.set_title(f"ours / baseline (throughput ratio {result['throughput_ratio']:.2f})")
    ax_b.legend()
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)
