"""The tray app with a real coordinator (accounts on) and the real ``kluster node`` it supervises.

As a new supplier would: sign in with a supplier token (no keyring here: the 0600 file), tick
Share GPU in the tray menu, and the node registers and becomes ready; a developer's ``kluster
generate`` runs through it; unticking mid-generation drains the node, and the generation still
completes. One other supplier's node serves part of the model too, so that the route crosses
suppliers. Earnings: the node signs work receipts, the developer's client countersigns them and the
coordinator credits them to the supplier's account; the dashboard's total must rise after the job.
"""

from __future__ import annotations

import json
import os
import subprocess
import threading
from collections.abc import Iterator
from pathlib import Path

import pytest
from PySide6.QtCore import Qt
from PySide6.QtWidgets import QDialogButtonBox
from pytestqt.qtbot import QtBot

from engine.launcher import LocalCluster, kluster_command, share_memory_mb
from supplier_gui.app import SupplierApp
from supplier_gui.coordinator import CoordinatorClient, CoordinatorError
from supplier_gui.idle import NullProbe
from supplier_gui.state import TrayState
from supplier_gui.supervisor import ProcState

pytestmark = pytest.mark.slow

NODE_ARGS = ["--benchmark-seconds", "0.2", "--throttle", "2"]


def add_user(accounts: Path, name: str, role: str) -> str:
    out = subprocess.run(
        kluster_command("coordinator", "add-user", name, "--role", role, "--accounts", str(accounts), "--json"),
        capture_output=True,
        text=True,
        timeout=60,
        check=True,
    )
    return str(json.loads(out.stdout)["token"])


@pytest.fixture
def coordinator(smollm2_pack3: Path, tmp_path: Path) -> Iterator[tuple[str, str, str]]:
    """(url, supplier token, developer token) of a real coordinator with accounts on, and one other node."""
    accounts = tmp_path / "accounts.sqlite3"
    supplier, developer = add_user(accounts, "alice", "supplier"), add_user(accounts, "dev", "developer")
    other = add_user(accounts, "bob", "supplier")
    cluster = LocalCluster(
        smollm2_pack3,
        2,
        log_dir=tmp_path / "logs",
        benchmark_s=0.2,
        coordinator_args=["--accounts", str(accounts), "--placement-settle", "0.2"],
    )
    url = cluster.start_coordinator()
    os.environ["KLUSTER_TOKEN"] = other  # for the other node only (the app passes its own)
    try:
        cluster.start_node("bob-box")
    finally:
        del os.environ["KLUSTER_TOKEN"]
    try:
        yield url, supplier, developer
    finally:
        cluster.stop()


class Lines:
    """A child's stdout, read in a thread (the Qt loop keeps running in the test)."""

    def __init__(self, proc: subprocess.Popen[str]) -> None:
        self.lines: list[dict] = []
        self._thread = threading.Thread(target=self._read, args=(proc,), daemon=True)
        self._thread.start()

    def _read(self, proc: subprocess.Popen[str]) -> None:
        assert proc.stdout is not None
        for line in proc.stdout:
            if line.startswith("{"):
                self.lines.append(json.loads(line))

    def events(self) -> list[str]:
        return [e.get("event", "") for e in self.lines]


def test_share_serve_and_drain_with_a_real_node(
    qtbot: QtBot, coordinator: tuple[str, str, str], config_folder: Path, smollm2_pack3: Path
) -> None:
    url, supplier_token, developer_token = coordinator
    app = SupplierApp(
        folder=config_folder,
        idle_probe=NullProbe("not available on this platform (test)"),
        # memory for a share of the model, so that routes go through both nodes; throttled, so that
        # the generation runs long enough to untick in the middle of it
        node_extra_args=[*NODE_ARGS, "--memory-mb", str(share_memory_mb(smollm2_pack3, 2))],
        refresh_s=1.0,
        tick_s=0.2,
    )
    events: list[dict] = []
    app.supervisor.event.connect(events.append)
    gen: subprocess.Popen[str] | None = None
    try:
        app.start()
        dialog = app._signin
        assert dialog is not None
        dialog.url_edit.setText(url)
        dialog.token_edit.setText(supplier_token)
        dialog.name_edit.setText("alice-box")
        qtbot.mouseClick(dialog.buttons.button(QDialogButtonBox.StandardButton.Ok), Qt.MouseButton.LeftButton)
        qtbot.waitUntil(lambda: app.settings.signed_in, timeout=15_000)
        assert app.settings.account == "alice" and app.credentials.get(url).backend == "file"

        app.menu.aboutToShow.emit()
        app.actions["share"].trigger()
        qtbot.waitUntil(lambda: app.view.phase == "ready", timeout=120_000)
        client = CoordinatorClient(url, supplier_token)
        node = client.node("alice-box")
        assert node is not None and node["ready"] and node["account"] == "alice"
        assert app.decision.state is TrayState.SHARING
        developer = CoordinatorClient(url, developer_token)

        def routed() -> bool:
            try:
                return bool(developer.get_json("/v1/route?model=smollm2-135m")["route"])
            except CoordinatorError:
                return False

        qtbot.waitUntil(routed, timeout=60_000)
        assert "alice-box" in [hop["name"] for hop in developer.get_json("/v1/route?model=smollm2-135m")["route"]]

        # the coordinator's ledger answers for this supplier: nothing earned yet
        qtbot.waitUntil(lambda: app.earnings is not None, timeout=10_000)
        assert app.earnings is not None and app.earnings.account == "alice"
        earned_before = app.earnings.total.amount

        env = dict(os.environ, KLUSTER_TOKEN=developer_token, KLUSTER_LOGLEVEL="WARNING")
        gen = subprocess.Popen(
            kluster_command(
                "generate", "--coordinator", url, "--chat", "--prompt", "Name three colours.",
                "--max-new-tokens", "40", "--json",
            ),
            stdout=subprocess.PIPE,
            stderr=subprocess.PIPE,
            text=True,
            env=env,
        )  # fmt: skip
        out = Lines(gen)
        qtbot.waitUntil(lambda: "token" in out.events() or gen.poll() is not None, timeout=90_000)
        assert gen.poll() is None, f"generation ended before we could untick: {gen.stderr.read() if gen.stderr else ''}"
        qtbot.waitUntil(lambda: app.decision.state is TrayState.SERVING, timeout=10_000)

        # untick mid-generation: the node drains and the developer's request still completes
        app.menu.aboutToShow.emit()
        app.actions["share"].trigger()
        qtbot.waitUntil(lambda: app.supervisor.state is not ProcState.RUNNING, timeout=5_000)
        qtbot.waitUntil(lambda: gen.poll() is not None, timeout=90_000)
        stderr = gen.stderr.read() if gen.stderr else ""
        assert gen.returncode == 0, stderr
        qtbot.waitUntil(lambda: "done" in out.events(), timeout=5_000)
        done = next(e for e in out.lines if e["event"] == "done")
        assert done["stats"]["generated_tokens"] > 1 and "failover" not in out.events()
        # the node's signed, client-countersigned receipts were credited: the dashboard shows the rise
        # within a few refreshes (refresh_s=1) of the generation's end
        qtbot.waitUntil(lambda: app.earnings is not None and app.earnings.total.amount > earned_before, timeout=5_000)
        app.open_dashboard()
        qtbot.waitUntil(lambda: app.dashboard.total.text() not in ("", "-", "0", "0.00"), timeout=5_000)
        assert app.earnings.total.units > 0 and app.earnings.today.amount == app.earnings.total.amount
        qtbot.waitUntil(lambda: app.supervisor.state is ProcState.STOPPED, timeout=60_000)
        kinds = [e["event"] for e in events]
        assert "draining" in kinds and "drained" in kinds and kinds[-1] == "stopped"
        assert kinds.index("draining") < kinds.index("session_end") < kinds.index("drained")
        ended = next(e for e in events if e["event"] == "session_end")
        assert ended["tokens"] > 1 and ended["tokens_per_s"] > 0
        assert client.node("alice-box") is None
        assert app.decision.state is TrayState.IDLE and app.decision.reason == "not sharing"
        assert app.supervisor.restarts == 0
    finally:
        if gen is not None and gen.poll() is None:
            gen.kill()
            gen.wait()
        app.shutdown()
        app.dashboard.deleteLater()
