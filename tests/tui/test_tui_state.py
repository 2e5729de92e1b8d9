"""The TUI's pure parts: event-stream framing, rates, job state, the route chain, form checks, config."""

from __future__ import annotations

from pathlib import Path

import pytest

from dev_tui.config import load_config
from dev_tui.grid import GridModel, gpu_label
from dev_tui.localjobs import Health, LaunchSpec, LocalJob
from dev_tui.rates import RateMeter
from dev_tui.screens.launch import FormValues, build_spec, read_prompts
from dev_tui.screens.nodes import sort_nodes
from dev_tui.sse import SseParser
from dev_tui.widgets.route_chain import BOX, render_chain
from engine.errors import ConfigError

ROUTE = [
    {"name": "a", "peer_id": "n-a", "layers": [0, 10]},
    {"name": "b", "peer_id": "n-b", "layers": [10, 20]},
    {"name": "c", "peer_id": "n-c", "layers": [20, 30]},
]


def job() -> LocalJob:
    spec = LaunchSpec("m", ("hi",))
    out = LocalJob("tui-1", spec, "hi", 100.0)
    out.set_route(ROUTE)
    return out


# ----------------------------------------------------------------- event stream


def test_sse_parser_frames_events_and_remembers_the_last_id() -> None:
    parser = SseParser()
    lines = [": connected", "", "id: 7", "event: job.queued", 'data: {"kind": "job.queued",', 'data: "seq": 7}', ""]
    events = [e for e in (parser.feed(line) for line in lines) if e is not None]
    assert events == [{"kind": "job.queued", "seq": 7}]
    assert parser.last_id == "7"
    assert parser.feed("data: not json") is None and parser.feed("") is None  # skipped, not raised


# ----------------------------------------------------------------- rates and grid


def test_rate_meter_buckets_by_second_and_shows_stalls_as_zeros() -> None:
    meter = RateMeter()
    for t in (10.1, 10.5, 10.9, 11.2, 14.0):
        meter.add(1, t)
    assert meter.series(14.5, 5) == [3.0, 1.0, 0.0, 0.0, 1.0]
    assert meter.rate(14.5, 4) == pytest.approx(1.0)


def test_grid_counts_other_clients_tokens_from_their_reports_and_patches_jobs() -> None:
    grid = GridModel()
    grid.set_snapshot([], [], [{"id": "j1", "tokens": 10, "state": "running"}], 100.0, set())
    grid.set_snapshot([], [], [{"id": "j1", "tokens": 40, "state": "running"}], 103.0, set())
    assert grid.throughput.series(103.5, 1) == [30.0]
    assert grid.apply_event({"kind": "job.queued", "job": {"id": "j2", "state": "queued"}}) is False
    assert grid.queue_length() == 1 and grid.running() == 1
    assert grid.apply_event({"kind": "node.left", "peer_id": "n-x"}) is True  # nodes changed: poll now
    assert grid.apply_event({"kind": "stream.dropped", "count": 3}) is True


def test_gpu_label() -> None:
    cuda = {
        "capability": {"gpu": {"kind": "nvidia", "name": "NVIDIA GeForce RTX 4090", "vram_total_bytes": 24 * 2**30}}
    }
    assert gpu_label(cuda) == "RTX 4090 24 GiB"
    assert gpu_label({"capability": {"gpu": {"kind": "cpu"}}}) == "CPU (no GPU)"
    assert gpu_label({}) == "CPU (no GPU)"


def test_nodes_sort_puts_unknown_values_last_both_ways() -> None:
    nodes = [{"name": "x", "measured_layers_per_s": 5.0}, {"name": "y"}, {"name": "z", "measured_layers_per_s": 9.0}]
    assert [n["name"] for n in sort_nodes(nodes, "L/s", False)] == ["x", "z", "y"]
    assert [n["name"] for n in sort_nodes(nodes, "L/s", True)] == ["z", "x", "y"]


# ----------------------------------------------------------------- job state


def test_hop_timings_colour_a_slow_hop() -> None:
    j = job()
    assert all(h.health is Health.WAITING for h in j.route)
    for _ in range(3):
        j.add_timings([("n-a", 0.1, 4.0), ("n-b", 0.5, 60.0), ("n-c", 0.1, 5.0)])
    assert [h.health for h in j.route] == [Health.OK, Health.SLOW, Health.OK]
    assert j.route[1].tok_s == pytest.approx(1000 / 60.5)


def test_a_failed_spot_check_cuts_the_output_back() -> None:
    j = job()
    j.set_state("running", 101.0)
    for piece in ("The", " cap", "ital", " of", " Mars"):
        j.add_token(piece, 101.5)
    j.rewind("The capital of", 3, 102.0)
    assert (j.text, j.tokens) == ("The capital of", 3)
    assert j.events[-1].text == "regenerating from token 3" and j.events[-1].level == "warn"


def test_the_job_runner_passes_spot_check_rewinds_through_to_the_generation_loop() -> None:
    import asyncio

    from dev_tui.runner import _Observed

    class Inner:
        settled = 0

        def pending_rewind(self, session: str) -> int | None:
            return 12 if session == "s" else None

        async def settle(self, session: str) -> None:
            self.settled += 1

    inner = Inner()
    observed = _Observed(inner, job(), lambda: 0.0)
    assert observed.pending_rewind("s") == 12 and observed.pending_rewind("t") is None
    asyncio.run(observed.settle("s"))
    assert inner.settled == 1


def test_node_gone_marks_the_hop_then_failover_draws_the_new_route() -> None:
    j = job()
    j.set_state("running", 101.0)
    j.add_token("x", 101.5)
    assert j.node_gone("n-zz", "zz", 102.0) is False  # not ours
    assert j.node_gone("n-b", "b", 102.0) is True
    assert j.route[1].health is Health.GONE
    assert j.events[-1].text == "b left: finding another node for L10-19 (waits up to 60 s)"
    new = [ROUTE[0], {"name": "d", "peer_id": "n-d", "layers": [10, 20]}, ROUTE[2]]
    j.rerouting(new, 102.2)  # drawn before the replay ends
    assert [h.name for h in j.route] == ["a", "d", "c"] and j.events[
        -1
    ].text == "new route a -> d -> c: replaying 1 tokens"
    event = {"failed_node": "b", "at_token": 1, "detected_after_ms": 120.0, "recovery_ms": 450.0, "new_route": new}
    j.failover(event, 102.5)
    assert [h.name for h in j.route] == ["a", "d", "c"] and j.failovers == 1
    assert [e.text for e in j.events[-2:]] == [
        "token 1: failover from b, noticed in 0.1 s, new route in 0.5 s",
        "resumed on a -> d -> c, 1.0 s after the last token",
    ]


def test_links_come_from_reported_round_trips_and_cost_is_an_estimate() -> None:
    j = job()
    j.set_links({"n-a": {"n-b": 3.0}, "n-b": {"n-c": 1.0}})
    assert [h.link_ms for h in j.route] == [1.5, 0.5, None]
    for t in range(250):
        j.add_token("x", 100 + t / 100)
    assert j.cost(2.0) == pytest.approx(250 * 2.0 / 1e6)


# ----------------------------------------------------------------- route chain


def test_route_chain_fits_80_columns_and_wraps_narrower() -> None:
    j = job()
    j.route[1].health = Health.GONE
    wide = render_chain(j.route, 78)
    lines = wide.plain.split("\n")
    assert len(lines) == 4 and max(len(line) for line in lines) <= 78
    assert "✖ gone" in lines[1] and "L20-29" in lines[1] and "↺" in lines[1]
    narrow = render_chain(j.route, 2 * BOX + 10)
    assert len(narrow.plain.split("\n")) == 8  # two rows of hops
    assert render_chain([], 80).plain == "no route yet"


# ----------------------------------------------------------------- launch form


def test_form_checks_name_the_field(tmp_path: Path) -> None:
    ok = FormValues(model="m", batch=False, prompt="Hi", file="", activation="0.8", private=True, spot_check="0.1")
    spec = build_spec(ok)
    assert spec.prompts == ("Hi",) and spec.activation == 0.8 and spec.params()["private"] is True
    assert spec.spot_check == 0.1 and spec.params()["spot_check"] == 0.1
    assert "Hi" not in str(spec.params())  # prompts stay on this machine
    for change, message in [
        ({"prompt": "  "}, "type a prompt"),
        ({"max_new_tokens": "0"}, "max tokens must be between 1 and 100000"),
        ({"temperature": "warm"}, "temperature must be a number"),
        ({"priority": "10"}, "priority must be between 0 and 9"),
        ({"activation": "0"}, "activation must be above 0"),
        ({"spot_check": "1.5"}, "spot check must be between 0 and 1"),
        ({"model": ""}, "pick a model"),
        ({"batch": True, "file": str(tmp_path / "missing.txt")}, "cannot read"),
    ]:
        with pytest.raises(ConfigError, match=message):
            build_spec(FormValues(**{**ok.__dict__, **change}))


def test_batch_files(tmp_path: Path) -> None:
    plain = tmp_path / "prompts.txt"
    plain.write_text("# questions\nOne?\n\nTwo?\n")
    assert read_prompts(plain) == ("One?", "Two?")
    jsonl = tmp_path / "prompts.jsonl"
    jsonl.write_text('{"prompt": "A"}\n{"prompt": "B"}\n')
    assert read_prompts(jsonl) == ("A", "B")
    jsonl.write_text('{"text": "A"}\n')
    with pytest.raises(ConfigError, match=r"prompts\.jsonl:1"):
        read_prompts(jsonl)
    (tmp_path / "empty.txt").write_text("\n# nothing\n")
    with pytest.raises(ConfigError, match="holds no prompts"):
        read_prompts(tmp_path / "empty.txt")


# ----------------------------------------------------------------- configuration


def test_config_order_flag_env_file(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("PYTHON_KEYRING_BACKEND", "keyring.backends.null.Keyring")
    path = tmp_path / "config.toml"
    path.write_text('coordinator = "http://file:1"\ntoken = "from-file"\ntenant = "lab"\nprice_per_mtok = 0.5\n')
    cfg = load_config(env={}, path=path)
    assert (cfg.coordinator, cfg.token, cfg.token_source, cfg.tenant, cfg.price_per_mtok) == (
        "http://file:1",
        "from-file",
        "file",
        "lab",
        0.5,
    )
    env = {"KLUSTER_COORDINATOR": "http://env:2/", "KLUSTER_TOKEN": "from-env"}
    cfg = load_config(env=env, path=path)
    assert (cfg.coordinator, cfg.token, cfg.token_source) == ("http://env:2", "from-env", "env")
    assert load_config("http://flag:3", env=env, path=path, price_per_mtok=2.0).coordinator == "http://flag:3"
    assert load_config(env={}, path=tmp_path / "none.toml").coordinator == "http://127.0.0.1:8765"
    with pytest.raises(ConfigError, match="must start with http"):
        load_config("ftp://x", env={}, path=path)
    with pytest.raises(ConfigError, match=">= 0"):
        load_config(env={}, path=path, price_per_mtok=-1.0)


def test_headless_keyring_falls_back_quietly(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    import keyring
    import keyring.errors

    def no_keyring(service: str, user: str) -> str:
        raise keyring.errors.NoKeyringError("No recommended backend was available.")

    monkeypatch.setattr(keyring, "get_password", no_keyring)
    cfg = load_config(env={}, path=tmp_path / "none.toml")
    assert (cfg.token, cfg.token_source) == (None, "none")

    monkeypatch.setattr(keyring, "get_password", lambda service, user: "from-keyring" if service == "kluster" else None)
    cfg = load_config("http://c:1", env={}, path=tmp_path / "none.toml")
    assert (cfg.token, cfg.token_source) == ("from-keyring", "keyring")


def test_broken_config_file_is_one_line(tmp_path: Path) -> None:
    path = tmp_path / "config.toml"
    path.write_text("coordinator = [unclosed\n")
    with pytest.raises(ConfigError, match="cannot read"):
        load_config(env={}, path=path)


def test_state_modules_do_not_import_textual() -> None:
    """The state, client and config code stays usable (and testable) without the UI toolkit."""
    import subprocess
    import sys

    modules = "dev_tui.api, dev_tui.config, dev_tui.grid, dev_tui.localjobs, dev_tui.rates, dev_tui.runner, dev_tui.sse"
    code = f"import sys, {modules}; sys.exit('textual' in sys.modules)"
    assert subprocess.run([sys.executable, "-c", code], check=False).returncode == 0
