"""The whole app offscreen against a fake coordinator and a fake node process (pytest-qt).

Walks the new user's path: the sign-in dialog, Share GPU from the tray menu, serving, earnings
rising within one refresh, unticking (a drain that waits for the live session), plus crashes,
pauses, a coordinator without accounts or earnings, and the GPU panel with and without NVML.
"""

from __future__ import annotations

import json
import types
from collections.abc import Iterator
from pathlib import Path

import pytest
from PySide6.QtCore import Qt
from PySide6.QtWidgets import QDialogButtonBox
from pytestqt.qtbot import QtBot
from supplier_fakes import FakeCoordinator

from supplier_gui.app import SupplierApp
from supplier_gui.gpu import NO_GPU_NOTE, GpuProbe
from supplier_gui.idle import NullProbe
from supplier_gui.state import TrayState
from supplier_gui.supervisor import ProcState

REFRESH_S = 0.3


class NoNvml:
    """pynvml on a machine without the NVIDIA driver."""

    class NVMLError(Exception):
        pass

    def nvmlInit(self) -> None:
        raise self.NVMLError("NVML Shared Library Not Found")


class FakeNvml:
    NVML_TEMPERATURE_GPU = 0

    def nvmlInit(self) -> None:
        pass

    def nvmlShutdown(self) -> None:
        pass

    def nvmlDeviceGetHandleByIndex(self, i: int) -> str:
        return f"gpu{i}"

    def nvmlDeviceGetName(self, h: str) -> bytes:
        return b"NVIDIA H100 80GB HBM3"

    def nvmlDeviceGetMemoryInfo(self, h: str) -> types.SimpleNamespace:
        return types.SimpleNamespace(used=20 * 2**30, total=80 * 2**30)

    def nvmlDeviceGetUtilizationRates(self, h: str) -> types.SimpleNamespace:
        return types.SimpleNamespace(gpu=45)

    def nvmlDeviceGetTemperature(self, h: str, kind: int) -> int:
        return 61

    def nvmlDeviceGetPowerUsage(self, h: str) -> int:
        raise RuntimeError("not supported on this board")  # a field may be unsupported


@pytest.fixture
def secured() -> Iterator[FakeCoordinator]:
    fake = FakeCoordinator(accounts={"sup-tok": ("alice", "supplier")}).start()
    yield fake
    fake.stop()


@pytest.fixture
def make_app(qtbot: QtBot, config_folder: Path, fake_node_argv: tuple[list[str], Path, Path]) -> Iterator:
    apps: list[SupplierApp] = []

    def make(mode: str = "serve", nvml: object = None) -> SupplierApp:
        argv, _, _ = fake_node_argv
        app = SupplierApp(
            folder=config_folder,
            idle_probe=NullProbe("not available on this platform (test)"),
            gpu_probe=GpuProbe(nvml=nvml or NoNvml()),
            node_argv_factory=lambda settings, device: [*argv, "--mode", mode, "--device", device],
            refresh_s=REFRESH_S,
            tick_s=0.1,
        )
        app.messages = []  # type: ignore[attr-defined]
        app.message = lambda title, text, error=False: app.messages.append((title, text))  # type: ignore[method-assign]
        apps.append(app)
        return app

    yield make
    for app in apps:
        app.shutdown()
        app.dashboard.deleteLater()


def sign_in(qtbot: QtBot, app: SupplierApp, url: str, token: str) -> None:
    dialog = app._signin
    assert dialog is not None and dialog.isVisible()
    dialog.url_edit.setText(url)
    dialog.token_edit.setText(token)
    qtbot.mouseClick(dialog.buttons.button(QDialogButtonBox.StandardButton.Ok), Qt.MouseButton.LeftButton)


def menu_action(app: SupplierApp, name: str):
    app.menu.aboutToShow.emit()  # what opening the tray menu does
    return app.actions[name]


def test_new_user_signs_in_shares_serves_earns_and_drains(
    qtbot: QtBot, make_app, secured: FakeCoordinator, fake_node_argv: tuple[list[str], Path, Path]
) -> None:
    _, control, _ = fake_node_argv
    secured.set_earnings(today=0, week=0, total=0)
    app = make_app()
    app.start()
    # no tray offscreen: the dashboard opens instead, and the first run asks to sign in
    assert app.dashboard.isVisible()
    assert menu_action(app, "share").isEnabled() is False
    dialog = app._signin
    assert "No system keyring found" in dialog.notice.text()
    sign_in(qtbot, app, secured.url, "wrong")
    qtbot.waitUntil(lambda: "unknown account token" in dialog.error.text(), timeout=5_000)
    assert not app.settings.signed_in
    sign_in(qtbot, app, secured.url, "sup-tok")
    qtbot.waitUntil(lambda: app.settings.signed_in, timeout=5_000)
    assert app.settings.account == "alice" and not dialog.isVisible()
    assert app.credentials.get(secured.url).backend == "file"
    assert "readable only by you" in app.settings_tab.token_where.text()
    assert any("token stored in a file" in title for title, _ in app.messages)

    share = menu_action(app, "share")
    assert share.isCheckable() and share.isEnabled() and not share.isChecked()
    share.trigger()
    qtbot.waitUntil(lambda: app.decision.reason == "sharing: ready for requests", timeout=10_000)
    assert app.decision.state is TrayState.SHARING and app.settings.share
    env = json.loads((control / "env").read_text())
    assert env == {"KLUSTER_TOKEN": "sup-tok", "KLUSTER_LOGLEVEL": "INFO"}  # the token goes by env, not argv
    assert menu_action(app, "share").isChecked()

    (control / "session").touch()
    qtbot.waitUntil(lambda: app.decision.state is TrayState.SERVING, timeout=5_000)
    qtbot.waitUntil(lambda: app.dashboard.jobs.rowCount() == 1 and app.dashboard.jobs.item(0, 3) is not None)
    assert app.dashboard.jobs.item(0, 3).text() == "50.0"  # tokens/s
    assert app.dashboard.status_title.text() == "Serving"

    # earnings rise on the coordinator: the dashboard shows them within one refresh
    qtbot.waitUntil(lambda: app.dashboard.today.text() == "0.00", timeout=5_000)
    secured.set_earnings(today=1234, week=5000, total=90000)
    qtbot.waitUntil(lambda: app.dashboard.today.text() == "0.001234", timeout=int(REFRESH_S * 1000) + 1500)
    assert app.dashboard.week.text() == "0.005" and app.dashboard.total.text() == "0.09"
    assert "Predicted at today's rate: 0.005 a day" in app.dashboard.predicted.text()
    assert any(title == "Kluster: first earnings today" for title, _ in app.messages)
    assert app.settings.earnings_notified_day  # remembered, so a restart does not announce it again

    # untick: the node drains; the live session finishes before it exits
    menu_action(app, "share").trigger()
    qtbot.waitUntil(lambda: app.supervisor.state is ProcState.STOPPING, timeout=5_000)
    assert app.decision.state is TrayState.IDLE
    assert app.decision.reason == "not sharing: finishing the sessions in progress"
    qtbot.wait(400)
    assert app.supervisor.state is ProcState.STOPPING
    (control / "session").unlink()
    qtbot.waitUntil(lambda: app.supervisor.state is ProcState.STOPPED, timeout=5_000)
    assert app.view.phase == "stopped" and app.view.finished == 1
    assert app.decision.reason == "not sharing"


def test_crash_shows_error_and_notifies(qtbot: QtBot, make_app, fake_coordinator: FakeCoordinator) -> None:
    app = make_app(mode="crash")
    app.start()
    sign_in(qtbot, app, fake_coordinator.url, "")
    qtbot.waitUntil(lambda: app.settings.signed_in, timeout=5_000)
    app.dashboard.share.click()  # the dashboard has the same switch as the tray menu
    qtbot.waitUntil(lambda: app.decision.state is TrayState.ERROR, timeout=10_000)
    assert app.decision.reason == "cannot reach the coordinator at http://x: boom"
    assert app.dashboard.status_title.text() == "Error"
    errors = [text for title, text in app.messages if "error" in title]
    assert errors == ["cannot reach the coordinator at http://x: boom"]  # once, not per restart
    assert app.supervisor.state in (ProcState.BACKOFF, ProcState.STARTING)
    app.set_share(False)
    qtbot.waitUntil(lambda: app.supervisor.state is ProcState.STOPPED, timeout=5_000)
    assert app.decision.state is TrayState.IDLE


def test_open_coordinator_pause_and_no_earnings(
    qtbot: QtBot, make_app, fake_coordinator: FakeCoordinator, fake_node_argv: tuple[list[str], Path, Path]
) -> None:
    _, control, _ = fake_node_argv
    app = make_app()
    app.start()
    sign_in(qtbot, app, fake_coordinator.url, "")
    qtbot.waitUntil(lambda: app.settings.signed_in, timeout=5_000)
    assert app.settings_tab.token_where.text() == "This coordinator runs without accounts: no token is needed."
    menu_action(app, "share").trigger()
    qtbot.waitUntil(lambda: app.view.phase == "ready", timeout=10_000)
    assert json.loads((control / "env").read_text())["KLUSTER_TOKEN"] is None
    qtbot.waitUntil(
        lambda: app.dashboard.earnings_message.text() == "earnings not available from this coordinator",
        timeout=5_000,
    )
    assert app.dashboard.today.text() == "-" and not app.dashboard.chart.isVisible()
    assert app.dashboard.gpu_name.text().endswith("cores)") and app.dashboard.gpu_note.text() == NO_GPU_NOTE

    pause = menu_action(app, "pause")
    assert pause.text() == "Pause for 1 hour"
    pause.trigger()
    assert app.decision.state is TrayState.PAUSED and app.decision.reason.startswith("paused until ")
    qtbot.waitUntil(lambda: app.supervisor.state is ProcState.STOPPED, timeout=5_000)
    resume = menu_action(app, "pause")
    assert resume.text() == "Resume sharing"
    resume.trigger()
    qtbot.waitUntil(lambda: app.supervisor.state is ProcState.RUNNING, timeout=10_000)
    fake_coordinator.nodes = [{"name": app.settings.node_name, "peer_id": "n-fake", "ready": True, "sessions": 0}]
    view = app.dashboard.coordinator_view
    qtbot.waitUntil(lambda: view.text() == "registered as n-fake (ready), 0 live sessions", timeout=5_000)
    assert app.dashboard.grid.text() == fake_coordinator.url


def test_quit_drains_first(qtbot: QtBot, make_app, fake_coordinator: FakeCoordinator, monkeypatch) -> None:
    quits: list[bool] = []
    monkeypatch.setattr("supplier_gui.app.QApplication.exit", lambda code=0: quits.append(True))
    app = make_app()
    app.start()
    sign_in(qtbot, app, fake_coordinator.url, "")
    qtbot.waitUntil(lambda: app.settings.signed_in, timeout=5_000)
    app.set_share(True)
    qtbot.waitUntil(lambda: app.view.phase == "ready", timeout=10_000)
    menu_action(app, "quit").trigger()
    assert app.quitting and not quits
    qtbot.waitUntil(lambda: bool(quits), timeout=5_000)
    assert app.view.phase == "stopped"  # it drained: the fake node said so before exiting


def test_settings_tab_and_gpu_panel(qtbot: QtBot, make_app, fake_coordinator: FakeCoordinator, tmp_path) -> None:
    app = make_app(nvml=FakeNvml())
    app.start()
    sign_in(qtbot, app, fake_coordinator.url, "")
    qtbot.waitUntil(lambda: app.settings.signed_in, timeout=5_000)
    d = app.dashboard
    app.cuda_build = True
    app.tick()
    assert d.gpu_name.text() == "NVIDIA H100 80GB HBM3" and d.gpu_note.isHidden()
    assert d.util.text() == "45 %" and d.temp.text() == "61 °C" and d.power.text() == "-"
    assert d.vram_bar.text() == "20.0 GiB / 80.0 GiB"
    tab = app.settings_tab
    assert not tab.idle.isEnabled() and not tab.fullscreen.isEnabled()  # said, not pretended
    tab.vram.setValue(8192)
    tab.login.setChecked(True)
    tab.name.setText("render box")
    tab.save.click()
    assert (app.settings.vram_cap_mb, app.settings.node_name, app.settings.start_at_login) == (8192, "render-box", True)
    assert (tmp_path / "xdg" / "autostart" / "kluster-supplier.desktop").is_file()
    assert d.vram_text.text() == "shared with the grid: at most 8.0 GiB"
    # NVML found a GPU: the node uses it if torch is a CUDA build, else says why it shares the CPU
    app.cuda_build = False
    assert app._launch().argv[-2:] == ["--device", "cpu"]
    app.tick()
    assert d.gpu_note.text() == "this install's torch is CPU-only: the node shares the CPU"
    app.cuda_build = True
    assert app._launch().argv[-2:] == ["--device", "cuda"]
    tab.sign_out.click()
    assert not app.settings.signed_in and not app.settings.share
    assert tab.token_where.text() == "Not signed in."
