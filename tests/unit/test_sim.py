"""kluster sim: the pieces (queueing model, Petals' rules, network, trace) and small end-to-end runs."""

from __future__ import annotations

import itertools
import json
import math

import numpy as np
import pytest

from engine.cli import main
from engine.errors import ConfigError
from engine.sim import SimConfig, fluid, petals, run
from engine.sim.engine import _LEAVE, Session, Simulation
from engine.sim.gpus import GPUS, LLAMA_70B, prefill_s
from engine.sim.grid import Grid
from engine.sim.latency import RTT_MS, Network
from engine.sim.metrics import weighted_percentile
from engine.sim.policies import MAX_BACKOFF_S, backoff_s, baseline, ours
from engine.sim.workload import make_trace

#: a small grid where nodes leave every few minutes and half the requests are long generations
CHURNY = dict(nodes=120, clients=24, duration_s=360.0, warmup_s=60.0, node_mean_life_s=900.0, long_share=0.5)

SMALL = dict(nodes=60, clients=12, duration_s=150.0, warmup_s=30.0)


@pytest.fixture(scope="module")
def small_run() -> tuple[dict, object, object]:
    return run(SimConfig(**SMALL, seed=1))


# ------------------------------------------------------------------------------ queueing model


def test_one_saturated_node_serves_one_request_at_a_time() -> None:
    n = 5
    rates = fluid.solve(np.arange(n), np.zeros(n, dtype=np.int64), np.full(n, 0.1), np.zeros(n), 1)
    assert rates.tokens_per_s.sum() == pytest.approx(10.0, rel=1e-3)  # 1 / 0.1 s, shared by all
    assert rates.tokens_per_s == pytest.approx(np.full(n, 2.0), rel=1e-3)
    assert rates.utilisation[0] == pytest.approx(1.0, rel=1e-3)


def test_sessions_on_separate_nodes_do_not_wait() -> None:
    rates = fluid.solve(np.array([0, 1]), np.array([0, 1]), np.array([0.05, 0.05]), np.array([0.15, 0.15]), 2)
    assert rates.tokens_per_s == pytest.approx([5.0, 5.0])
    empty = np.array([], dtype=np.int64)
    assert fluid.solve(empty, empty, np.array([]), np.array([]), 3).tokens_per_s.size == 0


def test_a_shared_node_slows_both_sessions_but_less_than_twice_when_network_dominates() -> None:
    rates = fluid.solve(np.array([0, 1]), np.array([0, 0]), np.array([0.05, 0.05]), np.array([0.5, 0.5]), 1)
    alone = 1 / 0.55
    assert alone / 2 < rates.tokens_per_s[0] < alone


# ------------------------------------------------------------------------------ Petals' rules


def test_petals_joiner_takes_the_lexicographically_weakest_window() -> None:
    assert petals.choose_best_start(np.array([1.0, 1.0, 0.0, 0.0, 1.0, 1.0]), 2) == 2
    # windows sort to [0, 5], [0, 5], [0, 1]: the last one is weakest
    assert petals.choose_best_start(np.array([0.0, 5.0, 0.0, 1.0]), 2) == 2
    assert petals.choose_best_start(np.ones(6), 3) == 0  # ties: lowest start


def test_petals_throughput_is_capped_by_the_network() -> None:
    fast_link = petals.server_throughput(LLAMA_70B, 12, 71.0, 10e9)
    slow_link = petals.server_throughput(LLAMA_70B, 12, 71.0, 100e6)
    assert slow_link == pytest.approx(100e6 / (LLAMA_70B.hidden_size * 16))
    assert fast_link > slow_link
    assert petals.server_throughput(LLAMA_70B, 2, 71.0, 10e9) > fast_link  # fewer blocks, more per block


def test_petals_server_moves_only_when_the_swarm_is_unbalanced() -> None:
    balanced = np.full(8, 10.0)
    assert petals.rebalanced_start(balanced, 0, 4, 10.0) is None
    holed = np.array([20.0, 20.0, 20.0, 20.0, 10.0, 10.0, 1.0, 1.0])
    assert petals.rebalanced_start(holed, 0, 2, 10.0) == 6


def test_backoff_is_petals_schedule() -> None:
    assert [backoff_s(a) for a in range(5)] == [0.0, 1.0, 2.0, 4.0, 8.0]
    assert backoff_s(30) == MAX_BACKOFF_S


# ------------------------------------------------------------------------------ world model


def test_gpu_speeds_follow_bandwidth_and_memory_is_the_cards() -> None:
    by_name = {g.name: g for g in GPUS}
    assert by_name["H100 SXM"].layers_per_s(LLAMA_70B) > by_name["RTX 4090"].layers_per_s(LLAMA_70B)
    assert by_name["RTX 3060"].memory_bytes() < by_name["RTX 3090"].memory_bytes() == by_name["RTX 4090"].memory_bytes()
    assert sum(g.share for g in GPUS) == pytest.approx(1.0)
    shape = LLAMA_70B.shape()
    assert shape.bytes_per_layer == LLAMA_70B.layer_bytes + 4096 * 16384


def test_prefill_is_compute_bound_for_long_prompts_and_bandwidth_bound_for_one_token() -> None:
    one = prefill_s(LLAMA_70B, 10, 1, 71.0, 400.0)
    assert one == pytest.approx(10 / 400.0)
    long = prefill_s(LLAMA_70B, 10, 2000, 71.0, 400.0)
    assert long > 10 * one
    assert prefill_s(LLAMA_70B, 0, 2000, 71.0, 400.0) == 0.0


def test_round_trips_include_both_last_miles_and_client_errors_only_on_client_edges() -> None:
    net = Network()
    net.add("a", 0, 5.0)
    net.add("b", 3, 10.0)
    net.add("c", 2, 1.0)
    assert net.rtt("a", "b") == RTT_MS[0][3] + 30.0 == net.rtt("b", "a")
    assert net.rtt("a", "a") == 0.0
    seen = net.rtt_for("c", np.array([2.0, 3.0, 1.0]))
    assert seen("c", "a") == pytest.approx(2.0 * net.rtt("c", "a"))
    assert seen("b", "c") == pytest.approx(3.0 * net.rtt("b", "c"))
    assert seen("a", "b") == net.rtt("a", "b")


def test_weighted_percentile_reads_the_histogram() -> None:
    edges = np.array([0.0, 1.0, 2.0, 3.0])
    weights = np.array([1.0, 0.0, 99.0])
    assert weighted_percentile(edges, weights, 0.5) == 1.0
    assert weighted_percentile(edges, weights, 50) == 3.0
    assert math.isnan(weighted_percentile(edges, np.zeros(3), 50))


def test_grid_excludes_full_nodes_and_loads_only_new_layers() -> None:
    trace = make_trace(SimConfig(nodes=4, clients=1, node_mean_life_s=0), LLAMA_70B)
    grid = Grid(trace.nodes, LLAMA_70B, load_aware=True)
    grid.start(0, (0, 4))
    grid.start(1, (4, 8))
    grid.attach(0, 1, LLAMA_70B.kv_tokens - 100)
    assert grid.full(200) == frozenset({trace.nodes[0].node_id})
    assert grid.views[trace.nodes[0].node_id].load == 1
    ready, gen = grid.assign(1, (6, 10), 0.0)  # keeps 6..8, downloads 8..10
    expected = 2 * LLAMA_70B.layer_bytes * 8 / trace.nodes[1].download_bps
    assert ready == pytest.approx(expected)
    assert trace.nodes[1].node_id not in grid.views
    grid.loaded(1, gen)
    assert grid.views[trace.nodes[1].node_id].start == 6
    blind = Grid(trace.nodes, LLAMA_70B, load_aware=False)
    blind.start(0, (0, 4))
    blind.attach(0, 1, 10)
    assert blind.views[trace.nodes[0].node_id].load == 0


def test_trace_is_a_pure_function_of_the_seed() -> None:
    cfg = SimConfig(nodes=50, clients=5, node_mean_life_s=600.0)
    a, b = make_trace(cfg, LLAMA_70B), make_trace(cfg, LLAMA_70B)
    assert a.nodes == b.nodes and a.clients == b.clients
    assert a.request(3, 7) == b.request(3, 7)
    assert len(a.nodes) > 50  # churn: joiners arrive during the run
    assert any(n.leave_s < cfg.duration_s for n in a.nodes)
    other = make_trace(SimConfig(nodes=50, clients=5, node_mean_life_s=600.0, seed=1), LLAMA_70B)
    assert other.nodes != a.nodes


# ------------------------------------------------------------------------------ config and CLI


@pytest.mark.parametrize(
    "bad",
    [
        dict(nodes=2),
        dict(nodes=10, clients=0),
        dict(duration_s=100.0, warmup_s=100.0),
        dict(deadline_s=0.0),
        dict(churn_alpha=1.0),
        dict(dt_s=float("nan")),
        dict(min_gain=-0.1),
        dict(long_share=1.5),
        dict(baseline_failover="forever"),
    ],
)
def test_bad_settings_are_config_errors(bad: dict) -> None:
    with pytest.raises(ConfigError):
        SimConfig(**bad)


def test_cli_rejects_bad_arguments_with_one_line(capsys: pytest.CaptureFixture[str]) -> None:
    assert main(["sim", "--nodes", "2"]) == 2
    assert main(["sim", "--nodes", "60", "--plot", "out.txt"]) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert err[0].startswith("kluster: error: --nodes") and err[1].startswith("kluster: error: --plot")


def test_cli_json_has_the_promised_keys(capsys: pytest.CaptureFixture[str]) -> None:
    argv = ["sim", "--nodes", "40", "--clients", "4", "--duration", "60", "--warmup", "10", "--json"]
    assert main(argv) == 0
    out = json.loads(capsys.readouterr().out, parse_constant=lambda c: pytest.fail(f"{c} is not JSON"))
    assert out["baseline"]["placement_p99_ms"] is None  # Petals makes no placement decision we time
    for key in ("throughput_ratio", "failed_ours", "failed_baseline", "decision_p99_ms", "decision_p99_cpu_ms"):
        assert isinstance(out[key], int | float), key
    assert out["baseline_failover"] == "retry" == out["baseline"]["failover"]  # the baseline by default
    argv += ["--baseline-failover", "replay"]
    assert main(argv) == 0
    assert json.loads(capsys.readouterr().out)["baseline_failover"] == "replay"
    assert out["throughput_ratio"] == pytest.approx(
        out["ours"]["throughput_tok_s"] / out["baseline"]["throughput_tok_s"], rel=1e-2
    )


def test_cli_writes_the_plot(tmp_path: object, capsys: pytest.CaptureFixture[str]) -> None:
    pytest.importorskip("matplotlib")
    path = tmp_path / "sim.png"  # type: ignore[operator]
    argv = ["sim", "--nodes", "40", "--clients", "4", "--duration", "60", "--warmup", "10", "--plot", str(path)]
    assert main(argv) == 0
    assert path.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    out = capsys.readouterr().out
    assert "throughput ratio" in out and "baseline failover: retry" in out


# ------------------------------------------------------------------------------ whole runs


def test_run_is_deterministic_for_a_seed(small_run: tuple) -> None:
    result, ours, base = small_run
    again, ours2, base2 = run(SimConfig(**SMALL, seed=1))
    for a, b in ((ours, ours2), (base, base2)):
        assert a.tokens_per_s_series == b.tokens_per_s_series
        assert (a.completed, a.failed, a.failovers, a.route_decisions) == (
            b.completed,
            b.failed,
            b.failovers,
            b.route_decisions,
        )
    assert result["throughput_ratio"] == again["throughput_ratio"]


def test_both_policies_serve_the_same_clients(small_run: tuple) -> None:
    result, ours, base = small_run
    for r in (ours, base):
        assert r.throughput_tok_s > 0 and r.completed > 0
        assert 1 <= r.mean_hops <= LLAMA_70B.num_layers
        assert 0 < r.token_p50_ms <= r.token_p99_ms
        assert r.route_decisions >= r.completed
        # clients stop at duration_s, and every request sent in the window is then followed to its end
        assert r.sent == r.completed + r.failed and r.drain_s > 0
    assert ours.placement_decisions >= 1 and base.placement_decisions == 0  # rebalance calls are timed
    assert result["decision_p99_ms"] == pytest.approx(ours.route_p99_ms, abs=1e-3)
    assert result["failed_ours"] == ours.failed and result["failed_baseline"] == base.failed


def _decoding_session(sim: Simulation) -> tuple[float, Session]:
    """Step a fresh simulation until some session has produced a few tokens."""
    sim._start()
    t = 0.0
    while True:
        sim._step(t, t + 1.0)
        t += 1.0
        busy = [s for s in sim.sessions.values() if not s.waiting and s.tokens >= 3]
        if busy:
            return t, busy[0]
        assert t < 100, "no session started"


def _quiet(failover: str) -> SimConfig:
    """No churn and no rebalance: only the client's failover is under test."""
    return SimConfig(
        nodes=40,
        clients=3,
        duration_s=400.0,
        warmup_s=0.0,
        node_mean_life_s=0,
        rebalance_s=1e6,
        seed=5,
        baseline_failover=failover,
        deadline_s=1000.0,
    )


@pytest.mark.parametrize("make", [ours, baseline])
def test_a_node_leaving_mid_request_fails_over_and_keeps_the_tokens(make: object) -> None:
    cfg = _quiet("replay")
    sim = Simulation(make_trace(cfg, LLAMA_70B), LLAMA_70B, make(cfg, LLAMA_70B))  # type: ignore[operator]
    t, s = _decoding_session(sim)
    before, tokens = list(s.hops), math.floor(s.tokens)
    victim = before[len(before) // 2][0]
    affected = len(sim.grid.users[victim])
    sim._node_event(t, _LEAVE, victim, 0)
    assert s.waiting and s.tokens == tokens and sim.metrics.failovers == affected >= 1
    while s.sid in sim.sessions and s.waiting:
        sim._step(t, t + 1.0)
        t += 1.0
    assert victim not in [i for i, _, _ in s.hops]
    assert s.hops[0][1] == 0 and s.hops[-1][2] == LLAMA_70B.num_layers
    assert all(x[2] == y[1] for x, y in itertools.pairwise(s.hops))  # contiguous layers
    kept = [h for h in before if h in s.hops]
    if sim.policy.failover == "replay":  # Petals: only the failed span is replaced
        assert kept == [h for h in before if h[0] != victim]
    while s.sid in sim.sessions:
        sim._step(t, t + 1.0)
        t += 1.0
    assert sim.metrics.completed >= 1 and sim.metrics.failed == 0
    assert sim.metrics.regenerated == 0


def test_the_retry_baseline_restarts_from_scratch_and_regenerates_what_the_client_had() -> None:
    cfg = _quiet("retry")
    sim = Simulation(make_trace(cfg, LLAMA_70B), LLAMA_70B, baseline(cfg, LLAMA_70B))
    t, s = _decoding_session(sim)
    before, tokens = list(s.hops), math.floor(s.tokens)
    victim = before[0][0]
    affected = [sim.sessions[sid] for sid in sim.grid.users[victim]]
    had = {a.sid: math.floor(a.tokens) for a in affected}
    sim._node_event(t, _LEAVE, victim, 0)
    assert s.waiting and s.tokens == 0 and s.resume == tokens >= 3 and s.hops == []
    assert all(s.sid not in sim.grid.users[i] for i, _, _ in before)  # every host of the old route let go
    while s.sid in sim.sessions and s.waiting:
        sim._step(t, t + 1.0)
        t += 1.0
    assert s.hops[0][1] == 0 and s.hops[-1][2] == LLAMA_70B.num_layers and s.stall_s is not None
    # the lost tokens are generated again but not counted again: the clients already had them
    tokens_before = sim.metrics.tokens
    while any(a.sid in sim.sessions and a.tokens < had[a.sid] for a in affected):
        sim._step(t, t + 1.0)
        t += 1.0
    assert sim.metrics.regenerated == pytest.approx(sum(had.values()))
    assert s.stall_s is None and sim.metrics.tokens > tokens_before
    while s.sid in sim.sessions:
        sim._step(t, t + 1.0)
        t += 1.0
    assert sim.metrics.completed >= 1 and sim.metrics.failed == 0


def test_retry_from_scratch_loses_work_that_replay_keeps() -> None:
    # the same churny trace with each baseline failover: restarting long generations from scratch
    # costs both new tokens and requests that then miss their deadline
    runs = {}
    for mode in ("retry", "replay"):
        cfg = SimConfig(**CHURNY, seed=0, baseline_failover=mode)
        runs[mode] = Simulation(make_trace(cfg, LLAMA_70B), LLAMA_70B, baseline(cfg, LLAMA_70B)).run()
    retry, replay = runs["retry"], runs["replay"]
    assert retry.failovers > 0 and replay.failovers > 0
    assert retry.regenerated_tokens > 0 == replay.regenerated_tokens
    assert retry.throughput_tok_s < replay.throughput_tok_s
    assert retry.failed > replay.failed
    late = "deadline_after_failover"
    assert retry.failed_reasons.get(late, 0) > replay.failed_reasons.get(late, 0)


def test_the_baseline_piles_sessions_on_the_fastest_routes_and_ours_spreads_them() -> None:
    # many clients, no churn: Petals' load-blind min-latency routes share a few hosts
    cfg = dict(nodes=200, clients=100, duration_s=150.0, warmup_s=60.0, node_mean_life_s=0)
    result, ours, base = run(SimConfig(**cfg))
    assert base.mean_hops < ours.mean_hops  # Petals' memory-filling spans mean fewer, longer hops ...
    assert base.token_p50_ms > ours.token_p50_ms  # ... but the shared hosts queue
    assert result["throughput_ratio"] > 1.0
    # clients that disagree on the best hosts (noisy pings) scatter the baseline's load
    _, _, scattered = run(SimConfig(**cfg, ping_error=1.0))
    assert scattered.token_p50_ms < base.token_p50_ms
