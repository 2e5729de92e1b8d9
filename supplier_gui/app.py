"""``kluster-supplier``: the tray app that shares this computer's GPU with a Kluster grid.

The app is a loop (``SupplierApp.tick``, every second): gather the inputs (the user's tick, pause,
idle and full-screen probes, the node process and its events), ``state.decide`` what the icon
shows and whether the node runs, and make the supervisor match. Slower work runs on timers too:
the GPU reading (every 2 s, NVML is fast) and the coordinator poll (node listing and earnings,
every ``refresh_s``, in a worker thread). The package docstring maps the other modules.
"""

from __future__ import annotations

import logging
import os
import signal
import sys
import time
from collections.abc import Callable, Sequence
from dataclasses import replace
from pathlib import Path
from typing import Any

import shiboken6
from PySide6.QtCore import QLockFile, QObject, QTimer
from PySide6.QtGui import QAction
from PySide6.QtWidgets import QApplication, QMenu, QSystemTrayIcon

from supplier_gui import autostart, notify
from supplier_gui.coordinator import CoordinatorClient, CoordinatorError, Earnings, EarningsUnavailable
from supplier_gui.credentials import CredentialStore
from supplier_gui.dashboard import Dashboard, DashboardData
from supplier_gui.earnings import format_amount, last_days, load_history, predict, record, save_history, utc_day
from supplier_gui.gpu import GpuProbe, GpuReading, auto_device, torch_has_cuda
from supplier_gui.icons import make_icon
from supplier_gui.idle import IdleProbe, make_probe
from supplier_gui.nodeview import NodeView, apply_event
from supplier_gui.settings import Settings, SettingsStore, config_dir
from supplier_gui.settings_tab import SettingsTab
from supplier_gui.signin import SignInDialog
from supplier_gui.state import Decision, Inputs, TrayState, decide
from supplier_gui.supervisor import Launch, NodeSupervisor, ProcState, node_argv
from supplier_gui.tasks import Tasks

log = logging.getLogger(__name__)

PAUSE_S = 3600.0
GPU_EVERY_S = 2.0


class SupplierApp(QObject):
    """The controller: owns the tray, the dashboard, the supervisor and the polling."""

    def __init__(
        self,
        *,
        folder: Path | None = None,
        idle_probe: IdleProbe | None = None,
        gpu_probe: GpuProbe | None = None,
        node_extra_args: Sequence[str] = (),
        node_argv_factory: Callable[[Settings, str], list[str]] | None = None,
        refresh_s: float = 10.0,
        tick_s: float = 1.0,
    ) -> None:
        super().__init__()
        self.folder = folder or config_dir()
        self.store = SettingsStore(self.folder)
        self.settings = self.store.load()
        self.credentials = CredentialStore(self.folder)
        self.tasks = Tasks(parent=self)
        self.idle = idle_probe or make_probe()
        self.gpu_probe = gpu_probe or GpuProbe()
        self.gpu: GpuReading = self.gpu_probe.read()
        self.cuda_build = torch_has_cuda()
        self._gpu_read_at = time.monotonic()
        self.node_extra_args = list(node_extra_args)
        self._argv_factory = node_argv_factory
        self.supervisor = NodeSupervisor(self._launch, kill_after_s=self.settings.drain_timeout_s + 15, parent=self)
        self.supervisor.event.connect(self._on_event)
        self.supervisor.crashed.connect(self._on_crash)
        self.supervisor.changed.connect(self.tick)
        self.view = NodeView()
        self.paused_until: float | None = None
        self.client: CoordinatorClient | None = None
        self.coordinator_node: dict[str, Any] | None = None
        self.coordinator_error = ""
        self.earnings: Earnings | None = None
        self.earnings_message = "waiting for the coordinator..."
        self.history = load_history(self.folder)
        self.notify_state = notify.NotifyState(earnings_day=self.settings.earnings_notified_day)
        self.decision = Decision(TrayState.IDLE, False, "")
        self.quitting = False
        self._refreshing = False
        self._in_tick = False
        self._closed = False
        self._signin: SignInDialog | None = None
        self._make_client()

        self.settings_tab = SettingsTab(
            idle_unavailable=self.idle.idle_unavailable,
            fullscreen_unavailable=self.idle.fullscreen_unavailable,
            autostart_unavailable=autostart.unavailable_reason(),
        )
        self.settings_tab.saved.connect(self.apply_settings)
        self.settings_tab.sign_in_requested.connect(self.show_sign_in)
        self.settings_tab.sign_out_requested.connect(self.sign_out)
        self.dashboard = Dashboard(self.settings_tab)
        self.dashboard.share_toggled.connect(self.set_share)
        self.dashboard.pause_clicked.connect(self.toggle_pause)
        self._show_settings()

        self.tray = QSystemTrayIcon(make_icon(TrayState.IDLE), self)
        self.menu = QMenu()
        self.menu.aboutToShow.connect(self.rebuild_menu)
        self.tray.setContextMenu(self.menu)
        self.tray.activated.connect(self._tray_activated)
        self.actions: dict[str, QAction] = {}
        self.rebuild_menu()

        self._tick_timer = QTimer(self)
        self._tick_timer.timeout.connect(self.tick)
        self._tick_timer.start(int(tick_s * 1000))
        self._refresh_timer = QTimer(self)
        self._refresh_timer.timeout.connect(self.refresh)
        self._refresh_timer.start(int(refresh_s * 1000))

    # ------------------------------------------------------------------ start-up and shutdown

    def start(self) -> None:
        """Show the tray (or the dashboard where there is no tray), and the sign-in on first run."""
        if QSystemTrayIcon.isSystemTrayAvailable():
            self.tray.show()
        else:
            log.warning("no system tray here: showing the dashboard window instead")
            self.open_dashboard()
        if not self.settings.signed_in:
            self.show_sign_in()
        self.tick()
        self.refresh()

    def request_quit(self) -> None:
        """Quit after draining the node; a second request stops it at once."""
        if self.quitting or self.supervisor.state in (ProcState.STOPPED, ProcState.BACKOFF):
            self.supervisor.kill_now()
            self._finish_quit()
            return
        self.quitting = True
        self.supervisor.stop()
        self.message("Kluster", "Finishing the sessions in progress, then quitting.")
        self.supervisor.changed.connect(self._quit_when_stopped)

    def _quit_when_stopped(self) -> None:
        if self.supervisor.state is ProcState.STOPPED:
            self._finish_quit()

    def _finish_quit(self) -> None:
        self.shutdown()
        # exit(), not quit(): Qt 6's quit() first asks every window to close, and the dashboard
        # refuses (closing it only hides it), which would cancel the quit.
        QApplication.exit(0)

    def shutdown(self) -> None:
        """Stop timers and threads; kill a node still alive (the app is going away). Idempotent."""
        if self._closed:
            return
        self._closed = True
        self._tick_timer.stop()
        self._refresh_timer.stop()
        self.tasks.close()
        if self.supervisor.state is not ProcState.STOPPED:
            self.supervisor.kill_now()
            self.supervisor.wait_stopped(5.0)
        self.tray.hide()
        self.gpu_probe.close()

    def dispose(self) -> None:
        """Delete the windows now, while the QApplication still exists (teardown order at exit)."""
        self.shutdown()
        for widget in (self._signin, self.menu, self.dashboard):
            if widget is not None and shiboken6.isValid(widget):
                shiboken6.delete(widget)
        self._signin = None

    # ------------------------------------------------------------------ the loop

    def inputs(self, now: float | None = None) -> Inputs:
        s, sup = self.settings, self.supervisor
        error = ""
        if sup.state is ProcState.BACKOFF or (sup.state is ProcState.STARTING and sup.restarts):
            error = sup.last_error
        elif sup.state is ProcState.RUNNING:
            error = self.view.error
        idle_rule = s.idle_minutes * 60.0 if self.idle.idle_unavailable is None else 0.0
        return Inputs(
            signed_in=s.signed_in,
            share=s.share,
            now=time.time() if now is None else now,
            paused_until=self.paused_until,
            idle_required_s=idle_rule,
            idle_s=self.idle.idle_seconds() if idle_rule else None,
            pause_fullscreen=s.pause_fullscreen and self.idle.fullscreen_unavailable is None,
            fullscreen=self.idle.fullscreen() if s.pause_fullscreen else None,
            process=sup.state.value,
            phase=self.view.phase,
            sessions=len(self.view.sessions),
            error=error,
        )

    def tick(self) -> None:
        if self._in_tick or self._closed:  # the supervisor reports changes we cause here: one pass is enough
            return
        self._in_tick = True
        try:
            self._tick()
        finally:
            self._in_tick = False

    def _tick(self) -> None:
        decision = decide(self.inputs())
        sup = self.supervisor
        if not self.quitting and decision.run != sup.wanted:
            if decision.run:
                self.view = NodeView()
                sup.start()
            else:
                sup.stop()
            decision = decide(self.inputs())  # what it looks like now that the process changed
        if decision.state is not self.decision.state:
            self.tray.setIcon(make_icon(decision.state))
            if decision.state is TrayState.ERROR:
                self._notify_error(decision.reason)
        self.decision = decision
        self.tray.setToolTip(f"Kluster: {decision.reason}")
        if time.monotonic() - self._gpu_read_at >= GPU_EVERY_S:
            self.gpu, self._gpu_read_at = self.gpu_probe.read(), time.monotonic()
        if self.dashboard.isVisible():
            self.dashboard.show_data(self.dashboard_data())

    def dashboard_data(self) -> DashboardData:
        today = utc_day(time.time())
        e = self.earnings
        return DashboardData(
            decision=self.decision,
            share=self.settings.share,
            signed_in=self.settings.signed_in,
            paused_until=self.paused_until,
            gpu=self._gpu_with_note(),
            vram_cap_mb=self.settings.vram_cap_mb,
            node_name=self.settings.node_name,
            account=self.settings.account,
            coordinator_url=self.settings.coordinator_url,
            process=self.supervisor.state.value,
            uptime_s=self.supervisor.uptime_s(),
            restarts=self.supervisor.restarts,
            view=self.view,
            coordinator_node=self.coordinator_node,
            coordinator_error=self.coordinator_error,
            earnings=e,
            earnings_message="" if e is not None else self.earnings_message,
            history=last_days(self.history, today),
            prediction=None if e is None else predict(e.last_7_days.amount, self.history, today),
        )

    def _gpu_with_note(self) -> GpuReading:
        _, note = auto_device(self.gpu, self.cuda_build)
        return replace(self.gpu, note=note) if note and self.settings.device == "auto" else self.gpu

    # ------------------------------------------------------------------ the node

    def _launch(self) -> Launch:
        s = self.settings
        device = s.device
        if device == "auto":
            device, _ = auto_device(self.gpu, self.cuda_build)
        if self._argv_factory is not None:
            argv = self._argv_factory(s, device)
        else:
            argv = node_argv(
                s.coordinator_url,
                s.node_name,
                device=device,
                memory_mb=s.vram_cap_mb,
                drain_timeout_s=s.drain_timeout_s,
                extra=self.node_extra_args,
            )
        stored = self.credentials.get(s.coordinator_url) if s.coordinator_url else None
        # An open coordinator refuses account tokens, so one is passed only where accounts are on
        # (as last probed; unknown: pass it, the node then says clearly if it was wrong).
        auth = self.client.auth_known if self.client is not None else None
        token = stored.token if stored is not None and auth is not False else None
        env: dict[str, str | None] = {"KLUSTER_TOKEN": token, "KLUSTER_LOGLEVEL": "INFO"}
        return Launch(argv, env)

    def _on_event(self, ev: dict[str, Any]) -> None:
        self.view = apply_event(self.view, ev)
        if ev.get("event") == "error":
            self._notify_error(str(ev.get("message")))

    def _on_crash(self, reason: str) -> None:
        self.view = NodeView(error=reason)
        self._notify_error(reason)

    def _notify_error(self, message: str) -> None:
        show, self.notify_state = notify.error(self.notify_state, message, time.time())
        if show:
            self.message("Kluster: sharing stopped by an error", message, error=True)

    # ------------------------------------------------------------------ the coordinator

    def _make_client(self) -> None:
        s = self.settings
        if not s.signed_in or not s.coordinator_url:
            self.client = None
            return
        stored = self.credentials.get(s.coordinator_url)
        self.client = CoordinatorClient(s.coordinator_url, stored.token if stored else None)

    def refresh(self) -> None:
        """Poll the coordinator (this node's listing and the earnings) in a worker thread."""
        client = self.client
        if client is None or self._refreshing:
            return
        self._refreshing = True
        name = self.settings.node_name

        def fetch() -> tuple[object, object]:
            node: object
            try:
                node = client.node(name)
            except CoordinatorError as exc:
                node = exc
            try:
                earned: object = client.earnings()
            except CoordinatorError as exc:
                earned = exc
            return node, earned

        self.tasks.run(fetch, self._refreshed)

    def _refreshed(self, result: object) -> None:
        self._refreshing = False
        if not isinstance(result, tuple):
            log.warning("coordinator poll failed: %s", result)
            return
        node, earned = result
        if isinstance(node, Exception):
            self.coordinator_node, self.coordinator_error = None, str(node)
        else:
            self.coordinator_node, self.coordinator_error = node if isinstance(node, dict) else None, ""
        if isinstance(earned, Earnings):
            self._new_earnings(earned)
        elif isinstance(earned, EarningsUnavailable):
            self.earnings, self.earnings_message = None, str(earned)
        elif isinstance(earned, Exception):
            self.earnings_message = f"earnings unavailable right now: {earned}"
            self.earnings = None
        self.tick()

    def _new_earnings(self, e: Earnings) -> None:
        self.earnings, self.earnings_message = e, ""
        day = utc_day(time.time())
        history = record(self.history, day, e.today.amount)
        if history != self.history:
            self.history = history
            try:
                save_history(self.folder, history)
            except OSError as exc:
                log.warning("cannot save the earnings history: %s", exc)
        show, self.notify_state = notify.first_earnings(self.notify_state, day, e.today.amount)
        if show:
            self.message("Kluster: first earnings today", f"{format_amount(e.today.amount)} credits so far today.")
            self._save(replace(self.settings, earnings_notified_day=day))

    # ------------------------------------------------------------------ user actions

    def set_share(self, share: bool) -> None:
        if share and not self.settings.signed_in:
            self.show_sign_in()
            return
        self._save(replace(self.settings, share=share))
        self.tick()

    def toggle_pause(self) -> None:
        now = time.time()
        paused = self.paused_until is not None and self.paused_until > now
        self.paused_until = None if paused else now + PAUSE_S
        self.tick()

    def open_dashboard(self) -> None:
        self._show_settings()
        self.dashboard.show_data(self.dashboard_data())
        self.dashboard.show()
        self.dashboard.raise_()
        self.dashboard.activateWindow()

    def show_sign_in(self) -> None:
        if self._signin is not None and self._signin.isVisible():
            self._signin.raise_()
            return
        dialog = SignInDialog(self.settings, self.credentials, self.tasks)
        dialog.accepted.connect(lambda: self._signed_in(dialog))
        self._signin = dialog
        dialog.show()

    def _signed_in(self, dialog: SignInDialog) -> None:
        result = dialog.result_sign_in
        if result is None:
            return
        if self.supervisor.wanted and dialog.url != self.settings.coordinator_url:
            self.supervisor.stop()
        new = replace(
            self.settings,
            coordinator_url=dialog.url,
            node_name=dialog.node_name,
            signed_in=True,
            account=result.account,
        ).normalised()
        self._save(new)
        self._make_client()
        if dialog.stored is not None and dialog.stored.backend == "file":
            self.message("Kluster: token stored in a file", dialog.stored.where)
        self._show_settings()
        self.refresh()
        self.tick()

    def sign_out(self) -> None:
        url = self.settings.coordinator_url
        self._save(replace(self.settings, signed_in=False, share=False, account=""))
        if url:
            self.credentials.delete(url)
        self.client = None
        self.earnings, self.coordinator_node = None, None
        self._show_settings()
        self.tick()

    def apply_settings(self, new: Settings) -> None:
        old = self.settings
        if new.start_at_login != autostart.is_enabled():
            try:
                autostart.set_enabled(new.start_at_login)
            except autostart.AutostartError as exc:
                self.message("Kluster", str(exc), error=True)
                new = replace(new, start_at_login=autostart.is_enabled())
        self._save(new)
        restart = (new.node_name, new.vram_cap_mb, new.device) != (old.node_name, old.vram_cap_mb, old.device)
        if restart and self.supervisor.wanted:
            self.view = NodeView()
            self.supervisor.restart()
        self._show_settings()
        self.tick()

    def _save(self, settings: Settings) -> None:
        self.settings = settings
        try:
            self.store.save(settings)
        except OSError as exc:
            log.warning("cannot save the settings: %s", exc)

    def _show_settings(self) -> None:
        s = self.settings
        stored = self.credentials.get(s.coordinator_url) if s.signed_in and s.coordinator_url else None
        if not s.signed_in:
            where = "Not signed in."
        elif stored is None:
            where = "This coordinator runs without accounts: no token is needed."
        else:
            who = f"Signed in as {s.account}. " if s.account else ""
            where = f"{who}Token stored {stored.where}" if stored.backend == "keyring" else f"{who}{stored.where}"
        self.settings_tab.show_settings(s, where, autostart.is_enabled())

    # ------------------------------------------------------------------ the tray

    def rebuild_menu(self) -> None:
        """Rebuilt every time it opens, so every label says the current state (Vorta does the same)."""
        menu, s = self.menu, self.settings
        menu.clear()
        self.actions = {}
        status = menu.addAction(self.decision.reason or "Kluster")
        status.setEnabled(False)
        menu.addSeparator()
        if not s.signed_in:
            self.actions["sign_in"] = menu.addAction("Sign in...", self.show_sign_in)
        share = menu.addAction("Share GPU")
        share.setCheckable(True)
        share.setChecked(s.share)
        share.setEnabled(s.signed_in)
        share.toggled.connect(self.set_share)
        self.actions["share"] = share
        paused = self.paused_until is not None and self.paused_until > time.time()
        pause = menu.addAction("Resume sharing" if paused else "Pause for 1 hour", self.toggle_pause)
        pause.setEnabled(s.signed_in and s.share)
        self.actions["pause"] = pause
        self.actions["dashboard"] = menu.addAction("Open dashboard", self.open_dashboard)
        menu.addSeparator()
        self.actions["quit"] = menu.addAction("Quit", self.request_quit)

    def _tray_activated(self, reason: QSystemTrayIcon.ActivationReason) -> None:
        if reason in (QSystemTrayIcon.ActivationReason.Trigger, QSystemTrayIcon.ActivationReason.DoubleClick):
            self.open_dashboard()

    def message(self, title: str, text: str, *, error: bool = False) -> None:
        """A desktop notification through the tray (logged as well: there may be no tray)."""
        (log.warning if error else log.info)("%s: %s", title, text)
        if self.tray.isVisible() and QSystemTrayIcon.supportsMessages():
            icon = QSystemTrayIcon.MessageIcon.Critical if error else QSystemTrayIcon.MessageIcon.Information
            self.tray.showMessage(title, text, icon, 8000)


def main(argv: list[str] | None = None) -> int:
    logging.basicConfig(
        level=getattr(logging, os.environ.get("KLUSTER_LOGLEVEL", "INFO").upper(), logging.INFO),
        format="%(asctime)s %(levelname)s %(name)s: %(message)s",
    )
    qt_app = QApplication(list(sys.argv if argv is None else argv))
    qt_app.setApplicationName("kluster-supplier")
    qt_app.setQuitOnLastWindowClosed(False)  # closing the dashboard leaves the tray running
    folder = config_dir()
    folder.mkdir(parents=True, exist_ok=True)
    # One app per user: a second one would start a second node under the same name and key.
    lock = QLockFile(str(folder / "supplier.lock"))
    if not lock.tryLock(100):
        log.error("kluster-supplier is already running for this user (lock: %s)", folder / "supplier.lock")
        return 1
    supplier = SupplierApp(folder=folder)
    qt_app.setWindowIcon(make_icon(TrayState.SHARING))
    # Ctrl-C / SIGTERM: drain and quit like the menu's Quit (Python sees the signal at the next tick).
    signal.signal(signal.SIGINT, lambda *_: supplier.request_quit())
    signal.signal(signal.SIGTERM, lambda *_: supplier.request_quit())
    supplier.start()
    code = int(qt_app.exec())
    supplier.dispose()
    lock.unlock()
    return code


if __name__ == "__main__":
    raise SystemExit(main())
