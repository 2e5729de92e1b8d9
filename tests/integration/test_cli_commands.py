"""The user-facing commands as a user runs them: demo, generate --json, bench (real processes)."""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest

from engine.cli import main
from engine.launcher import LocalCluster

pytestmark = pytest.mark.slow


def _children_of_session(session_root: Path) -> list[str]:
    """Kluster processes started for this test session (their command lines name its folders)."""
    out = subprocess.run(["pgrep", "-af", "engine.cli"], capture_output=True, text=True, check=False).stdout
    return [line for line in out.splitlines() if str(session_root) in line]


def test_demo_answers_the_france_question_with_paris(session_root: Path) -> None:
    proc = subprocess.run(
        [sys.executable, "-m", "engine.cli", "demo", "--json", "--max-new-tokens", "24"],
        capture_output=True,
        text=True,
        timeout=300,
        check=False,
    )
    assert proc.returncode == 0, proc.stderr[-2000:]
    events = [json.loads(line) for line in proc.stdout.splitlines()]
    route, tokens, done = events[0], events[1:-1], events[-1]
    assert route["event"] == "route"
    assert [n["layers"] for n in route["nodes"]] == [[0, 10], [10, 20], [20, 30]]
    assert len({n["name"] for n in route["nodes"]}) == 3
    assert tokens and all(ev["event"] == "token" for ev in tokens)
    assert done["event"] == "done"
    assert "Paris" in done["text"]
    assert done["token_ids"] == [ev["token_id"] for ev in tokens]
    assert [h["peer"] for h in done["stats"]["hops"]] == [n["peer_id"] for n in route["nodes"]]
    assert _children_of_session(session_root) == []


def test_demo_serve_stops_every_process_on_ctrl_c(session_root: Path) -> None:
    proc = subprocess.Popen(
        [sys.executable, "-m", "engine.cli", "demo", "--serve", "--json", "--nodes", "2"],
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        text=True,
    )
    try:
        assert proc.stdout is not None
        line = proc.stdout.readline()
        serving = json.loads(line)
        assert serving["event"] == "serving" and serving["coordinator"].startswith("http://127.0.0.1:")
        assert serving["spare"] == 1  # --serve keeps one spare node for failovers
        assert len(_children_of_session(session_root)) == 4  # coordinator + 2 nodes + the spare
        proc.send_signal(signal.SIGINT)
        assert proc.wait(30) == 0
    finally:
        if proc.poll() is None:
            proc.kill()
    deadline = time.monotonic() + 10
    while _children_of_session(session_root) and time.monotonic() < deadline:
        time.sleep(0.2)
    assert _children_of_session(session_root) == []


def test_generate_json_through_a_running_grid(cluster3: LocalCluster, capsys: pytest.CaptureFixture[str]) -> None:
    code = main(
        [
            "generate",
            "--coordinator",
            cluster3.url,
            "--chat",
            "--prompt",
            "Say hello.",
            "--max-new-tokens",
            "6",
            "--json",
        ]
    )
    assert code == 0
    events = [json.loads(line) for line in capsys.readouterr().out.splitlines()]
    assert [e["event"] for e in events] == ["route"] + ["token"] * (len(events) - 2) + ["done"]
    done = events[-1]
    assert 1 <= done["stats"]["generated_tokens"] <= 6
    assert done["stats"]["prompt_tokens"] > 10
    assert all(h["compute_ms"] > 0 for h in done["stats"]["hops"])


def test_bench_pipeline_json_reports_the_three_rates(capsys: pytest.CaptureFixture[str]) -> None:
    assert main(["bench", "pipeline", "--tokens", "4", "--repeats", "1", "--json"]) == 0
    result = json.loads(capsys.readouterr().out.strip().splitlines()[-1])
    for key in ("local_tok_s", "transformers_tok_s", "distributed_tok_s"):
        assert result[key] > 0, key
    assert result["distributed_vs_local"] == pytest.approx(
        result["distributed_tok_s"] / result["local_tok_s"], rel=0.01
    )
    assert len(result["distributed_hops"]) == 3


def test_env_points_into_the_session(session_root: Path) -> None:
    """Guard for the checks above: the commands' data and cache dirs are the session's own."""
    assert os.environ["KLUSTER_DATA_DIR"].startswith(str(session_root))
