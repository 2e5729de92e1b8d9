"""engine.node.events: the JSON-lines channel ``kluster node --events-jsonl`` writes."""

from __future__ import annotations

import io
import json
from pathlib import Path

import pytest

from engine.errors import ConfigError, CoordinatorError
from engine.node import events
from engine.node.events import EventSink


def lines(buf: io.StringIO) -> list[dict]:
    return [json.loads(x) for x in buf.getvalue().splitlines()]


def test_session_lifecycle(monkeypatch: pytest.MonkeyPatch) -> None:
    buf = io.StringIO()
    sink = EventSink(buf)
    sink.emit("registered", name="n", peer_id="n-1")
    sink.step("s1", 37, "m", (0, 10))
    sink.step("s1", 1, "m", (0, 10))
    sink.step("s2", 5, "m", (0, 10))
    sink.sweep()
    sink.session_closed("s1")
    sink.session_closed("unknown")  # a Close for a session that never ran here: nothing
    monkeypatch.setattr(events, "SESSION_IDLE_S", -1.0)
    sink.sweep()  # s2 went idle
    out = lines(buf)
    kinds = [(e["event"], e.get("session")) for e in out]
    assert kinds == [
        ("registered", None),
        ("session_start", "s1"),
        ("session_start", "s2"),
        ("session_progress", "s1"),
        ("session_progress", "s2"),
        ("session_end", "s1"),
        ("session_end", "s2"),
    ]
    end = out[5]
    assert (end["tokens"], end["steps"], end["reason"], end["layers"]) == (38, 2, "closed", [0, 10])
    assert out[6]["reason"] == "idle"
    assert all(isinstance(e["t"], float) for e in out)
    sink.step("s3", 1, "m", (0, 10))
    sink.close()
    tail = lines(buf)[-2:]
    assert [e["event"] for e in tail] == ["session_end", "stopped"] and tail[0]["reason"] == "stopped"
    sink.close()  # idempotent
    sink.emit("late")
    assert lines(buf)[-1]["event"] == "stopped"


def test_silent_by_default_and_closed_pipe() -> None:
    sink = EventSink()
    assert not sink.enabled
    sink.emit("x")
    sink.step("s", 1, "m", (0, 1))

    class Broken(io.StringIO):
        def write(self, s: str) -> int:
            raise BrokenPipeError("reader gone")

    broken = EventSink(Broken())
    broken.emit("x")  # never raises into the node
    assert not broken.enabled


def test_open_targets(tmp_path: Path) -> None:
    path = tmp_path / "ev.jsonl"
    sink = EventSink.open(str(path))
    sink.emit("ready", layers=[0, 30])
    with pytest.raises(CoordinatorError), sink.reporting_errors():
        raise CoordinatorError("cannot reach the coordinator")
    sink.close()
    out = [json.loads(x) for x in path.read_text().splitlines()]
    assert [e["event"] for e in out] == ["ready", "error", "stopped"]
    assert out[1]["message"] == "cannot reach the coordinator"
    assert not EventSink.open(None).enabled
    with pytest.raises(ConfigError, match="cannot open the events file"):
        EventSink.open(str(tmp_path / "missing" / "dir" / "x.jsonl"))
