"""The dashboard's Settings tab: VRAM cap, idle and full-screen rules, start at login, coordinator.

Rules the platform cannot support are shown disabled with the reason next to them (from
``idle`` and ``autostart``), never as a checkbox that silently does nothing.
"""

from __future__ import annotations

from dataclasses import replace

from PySide6.QtCore import Signal
from PySide6.QtWidgets import (
    QCheckBox,
    QFormLayout,
    QHBoxLayout,
    QLabel,
    QLineEdit,
    QPushButton,
    QSpinBox,
    QVBoxLayout,
    QWidget,
)

from supplier_gui.settings import Settings


def _note(text: str) -> QLabel:
    label = QLabel(text)
    label.setWordWrap(True)
    label.setStyleSheet("color: #6b7280")
    return label


class SettingsTab(QWidget):
    #: the user pressed Save: the new settings (the app applies and stores them)
    saved = Signal(object)
    sign_in_requested = Signal()
    sign_out_requested = Signal()

    def __init__(
        self,
        *,
        idle_unavailable: str | None,
        fullscreen_unavailable: str | None,
        autostart_unavailable: str | None,
        parent: QWidget | None = None,
    ) -> None:
        super().__init__(parent)
        self._settings = Settings()
        self.url = QLineEdit()
        self.url.setReadOnly(True)
        self.sign_in = QPushButton("Sign in again...")
        self.sign_in.clicked.connect(self.sign_in_requested)
        self.sign_out = QPushButton("Sign out")
        self.sign_out.clicked.connect(self.sign_out_requested)
        self.token_where = _note("")
        self.name = QLineEdit()
        self.vram = QSpinBox()
        self.vram.setRange(0, 1024 * 1024)
        self.vram.setSingleStep(512)
        self.vram.setSuffix(" MiB")
        self.vram.setSpecialValueText("node default (90% of free VRAM)")
        self.idle = QSpinBox()
        self.idle.setRange(0, 24 * 60)
        self.idle.setSuffix(" min")
        self.idle.setSpecialValueText("always (don't wait)")
        self.fullscreen = QCheckBox("Pause while a full-screen application runs")
        self.login = QCheckBox("Start Kluster when I log in")
        self.save = QPushButton("Save")
        self.save.clicked.connect(self._save)

        coordinator = QHBoxLayout()
        coordinator.addWidget(self.url, 1)
        coordinator.addWidget(self.sign_in)
        coordinator.addWidget(self.sign_out)
        form = QFormLayout()
        form.addRow("Coordinator", coordinator)
        form.addRow("", self.token_where)
        form.addRow("Computer name", self.name)
        form.addRow("VRAM shared at most", self.vram)
        form.addRow("Share only when idle for", self.idle)
        if idle_unavailable:
            self.idle.setEnabled(False)
            form.addRow("", _note(f"Idle detection is {idle_unavailable}."))
        form.addRow("", self.fullscreen)
        if fullscreen_unavailable:
            self.fullscreen.setEnabled(False)
            form.addRow("", _note(f"Full-screen detection is {fullscreen_unavailable}."))
        form.addRow("", self.login)
        if autostart_unavailable:
            self.login.setEnabled(False)
            form.addRow("", _note(f"Start at login is {autostart_unavailable}."))
        layout = QVBoxLayout(self)
        layout.addLayout(form)
        buttons = QHBoxLayout()
        buttons.addStretch(1)
        buttons.addWidget(self.save)
        layout.addLayout(buttons)
        layout.addStretch(1)

    def show_settings(self, settings: Settings, token_where: str, start_at_login: bool) -> None:
        self._settings = settings
        self.url.setText(settings.coordinator_url or "(not signed in)")
        self.sign_out.setEnabled(settings.signed_in)
        self.token_where.setText(token_where)
        self.name.setText(settings.node_name)
        self.vram.setValue(settings.vram_cap_mb or 0)
        self.idle.setValue(settings.idle_minutes if self.idle.isEnabled() else 0)
        self.fullscreen.setChecked(settings.pause_fullscreen and self.fullscreen.isEnabled())
        self.login.setChecked(start_at_login)

    def _save(self) -> None:
        new = replace(
            self._settings,
            node_name=self.name.text().strip(),
            vram_cap_mb=self.vram.value() or None,
            idle_minutes=self.idle.value() if self.idle.isEnabled() else self._settings.idle_minutes,
            pause_fullscreen=self.fullscreen.isChecked() if self.fullscreen.isEnabled() else False,
            start_at_login=self.login.isChecked(),
        ).normalised()
        self.saved.emit(new)
