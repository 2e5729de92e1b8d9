"""Real QProcess supervision of a fake node: events, graceful drain, crash -> backoff -> restart, kill."""

from __future__ import annotations

import time
from pathlib import Path

from pytestqt.qtbot import QtBot

from supplier_gui.supervisor import Launch, NodeSupervisor, ProcState


def supervisor(argv: list[str], mode: str, **kw: object) -> NodeSupervisor:
    return NodeSupervisor(lambda: Launch([*argv, "--mode", mode], {"KLUSTER_TOKEN": None}), **kw)  # type: ignore[arg-type]


def test_events_and_graceful_drain(qtbot: QtBot, fake_node_argv: tuple[list[str], Path, Path]) -> None:
    argv, control, _ = fake_node_argv
    sup = supervisor(argv, "serve")
    events: list[str] = []
    sup.event.connect(lambda ev: events.append(ev["event"]))
    sup.start()
    qtbot.waitUntil(lambda: "ready" in events, timeout=10_000)
    assert sup.state is ProcState.RUNNING and sup.pid is not None
    (control / "session").touch()
    qtbot.waitUntil(lambda: "session_start" in events, timeout=5_000)
    sup.stop()  # SIGTERM: the fake node drains while its session lives
    assert sup.state is ProcState.STOPPING
    qtbot.waitUntil(lambda: "draining" in events, timeout=5_000)
    qtbot.wait(300)
    assert sup.state is ProcState.STOPPING  # still draining: the session is live
    (control / "session").unlink()
    qtbot.waitUntil(lambda: sup.state is ProcState.STOPPED, timeout=5_000)
    assert events[-3:] == ["session_end", "drained", "stopped"]
    assert sup.restarts == 0 and sup.last_error == ""


def test_crash_restarts_with_backoff(qtbot: QtBot, fake_node_argv: tuple[list[str], Path, Path]) -> None:
    argv, _, count = fake_node_argv
    delays: list[int] = []

    def backoff(n: int) -> float:
        delays.append(n)
        return 0.2 * n

    sup = supervisor(argv, "crash", backoff=backoff)
    crashes: list[str] = []
    sup.crashed.connect(crashes.append)
    started = time.monotonic()
    sup.start()
    qtbot.waitUntil(lambda: len(crashes) >= 3, timeout=10_000)
    elapsed = time.monotonic() - started
    assert delays[:3] == [1, 2, 3]  # the failure count grows while it keeps crashing
    assert elapsed >= 0.2 + 0.4 - 0.05  # and the waits were really taken
    assert crashes[0] == "cannot reach the coordinator at http://x: boom"  # the node's own one-line error
    assert sup.last_error == crashes[0]
    qtbot.waitUntil(lambda: sup.state is ProcState.BACKOFF, timeout=5_000)
    sup.stop()  # unticking cancels the pending restart
    assert sup.state is ProcState.STOPPED
    n = len(count.read_text().splitlines())
    qtbot.wait(800)
    assert len(count.read_text().splitlines()) == n


def test_recovers_after_one_crash(qtbot: QtBot, fake_node_argv: tuple[list[str], Path, Path]) -> None:
    argv, _, count = fake_node_argv
    sup = supervisor(argv, "crash-once", backoff=lambda n: 0.1)
    events: list[str] = []
    sup.event.connect(lambda ev: events.append(ev["event"]))
    sup.start()
    qtbot.waitUntil(lambda: "ready" in events, timeout=10_000)
    assert sup.restarts == 1 and sup.failures == 0 and len(count.read_text().splitlines()) == 2
    sup.kill_now()
    qtbot.waitUntil(lambda: sup.state is ProcState.STOPPED, timeout=5_000)


def test_kills_a_node_that_does_not_drain(qtbot: QtBot, fake_node_argv: tuple[list[str], Path, Path]) -> None:
    argv, _, _ = fake_node_argv
    sup = supervisor(argv, "hang", kill_after_s=0.5)
    events: list[str] = []
    sup.event.connect(lambda ev: events.append(ev["event"]))
    sup.start()
    qtbot.waitUntil(lambda: "ready" in events, timeout=10_000)
    sup.stop()
    qtbot.waitUntil(lambda: sup.state is ProcState.STOPPED, timeout=5_000)


def test_retick_while_draining_starts_a_new_node(qtbot: QtBot, fake_node_argv: tuple[list[str], Path, Path]) -> None:
    argv, _, count = fake_node_argv
    sup = supervisor(argv, "serve")
    events: list[str] = []
    sup.event.connect(lambda ev: events.append(ev["event"]))
    sup.start()
    qtbot.waitUntil(lambda: "ready" in events, timeout=10_000)
    sup.restart()
    qtbot.waitUntil(lambda: events.count("ready") == 2, timeout=10_000)
    assert sup.state is ProcState.RUNNING and len(count.read_text().splitlines()) == 2 and sup.restarts == 0
    sup.stop()
    qtbot.waitUntil(lambda: sup.state is ProcState.STOPPED, timeout=5_000)


def test_missing_program_is_an_error_not_a_crash_of_the_app(qtbot: QtBot, tmp_path: Path) -> None:
    sup = NodeSupervisor(lambda: Launch([str(tmp_path / "no-such-program")], {}), backoff=lambda n: 30.0)
    crashes: list[str] = []
    sup.crashed.connect(crashes.append)
    sup.start()
    qtbot.waitUntil(lambda: bool(crashes), timeout=5_000)
    assert crashes[0].startswith("cannot start the node") and sup.state is ProcState.BACKOFF
    sup.stop()
