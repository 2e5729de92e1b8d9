"""The dashboard window: status and controls, the GPU, jobs being served, earnings; Settings tab.

It only displays a ``DashboardData`` snapshot the app builds every tick (``show_data``) and emits
what the user asks for (share on/off, pause, settings); it never talks to the node or the
coordinator itself, so tests drive it with plain values.
"""

from __future__ import annotations

import time
from dataclasses import dataclass, field
from typing import Any

from PySide6.QtCore import Qt, Signal
from PySide6.QtGui import QCloseEvent, QFont
from PySide6.QtWidgets import (
    QCheckBox,
    QFormLayout,
    QGridLayout,
    QGroupBox,
    QHBoxLayout,
    QHeaderView,
    QLabel,
    QProgressBar,
    QPushButton,
    QTableWidget,
    QTableWidgetItem,
    QTabWidget,
    QVBoxLayout,
    QWidget,
)

from supplier_gui.chart import EarningsChart
from supplier_gui.coordinator import Earnings
from supplier_gui.earnings import Prediction, format_amount
from supplier_gui.gpu import GpuReading
from supplier_gui.icons import make_icon
from supplier_gui.nodeview import NodeView
from supplier_gui.settings_tab import SettingsTab
from supplier_gui.state import Decision, TrayState

_GIB = 1024**3


@dataclass(frozen=True)
class DashboardData:
    decision: Decision
    share: bool
    signed_in: bool
    paused_until: float | None = None
    gpu: GpuReading | None = None
    vram_cap_mb: int | None = None
    node_name: str = ""
    account: str = ""
    coordinator_url: str = ""
    process: str = "stopped"
    uptime_s: float | None = None
    restarts: int = 0
    view: NodeView = field(default_factory=NodeView)
    #: this node as the coordinator lists it (None: not registered, or not polled yet)
    coordinator_node: dict[str, Any] | None = None
    coordinator_error: str = ""
    earnings: Earnings | None = None
    #: shown instead of the figures when there are none ("earnings not available from this coordinator")
    earnings_message: str = "waiting for the coordinator..."
    history: list[tuple[str, int | None]] = field(default_factory=list)
    prediction: Prediction | None = None


def _duration(seconds: float | None) -> str:
    if seconds is None:
        return "-"
    s = int(seconds)
    return f"{s // 3600}:{s // 60 % 60:02d}:{s % 60:02d}"


def _gib(n: int | None) -> str:
    return "?" if n is None else f"{n / _GIB:.1f} GiB"


def _value_label() -> QLabel:
    label = QLabel("-")
    font = QFont(label.font())
    font.setPointSizeF(font.pointSizeF() * 1.35)
    font.setBold(True)
    label.setFont(font)
    return label


class Dashboard(QWidget):
    share_toggled = Signal(bool)
    pause_clicked = Signal()

    def __init__(self, settings_tab: SettingsTab, parent: QWidget | None = None) -> None:
        super().__init__(parent)
        self.setWindowTitle("Kluster - supplier dashboard")
        self.settings_tab = settings_tab
        self._icon_state: TrayState | None = None
        tabs = QTabWidget()
        tabs.addTab(self._overview(), "Overview")
        tabs.addTab(settings_tab, "Settings")
        self.tabs = tabs
        layout = QVBoxLayout(self)
        layout.addWidget(tabs)
        self.resize(760, 720)

    # ------------------------------------------------------------------ layout

    def _overview(self) -> QWidget:
        page = QWidget()
        self.status_icon = QLabel()
        self.status_title = QLabel("-")
        title_font = QFont(self.status_title.font())
        title_font.setPointSizeF(title_font.pointSizeF() * 1.5)
        title_font.setBold(True)
        self.status_title.setFont(title_font)
        self.status_reason = QLabel("")
        self.share = QCheckBox("Share GPU")
        self.share.toggled.connect(self._share_clicked)
        self.pause = QPushButton("Pause for 1 hour")
        self.pause.clicked.connect(self.pause_clicked)
        top = QHBoxLayout()
        top.addWidget(self.status_icon)
        words = QVBoxLayout()
        words.addWidget(self.status_title)
        words.addWidget(self.status_reason)
        top.addLayout(words, 1)
        top.addWidget(self.share)
        top.addWidget(self.pause)

        # the GPU
        self.gpu_name = QLabel("-")
        self.gpu_note = QLabel("")
        self.gpu_note.setStyleSheet("color: #6b7280")
        self.vram_bar = QProgressBar()
        self.vram_bar.setTextVisible(True)
        self.vram_text = QLabel("-")
        self.util = QLabel("-")
        self.temp = QLabel("-")
        self.power = QLabel("-")
        gpu = QGroupBox("GPU")
        g = QFormLayout(gpu)
        g.addRow("Device", self.gpu_name)
        g.addRow("", self.gpu_note)
        g.addRow("Memory", self.vram_bar)
        g.addRow("", self.vram_text)
        g.addRow("Utilisation", self.util)
        g.addRow("Temperature", self.temp)
        g.addRow("Power", self.power)

        # the node
        self.node_state = QLabel("-")
        self.node_serving = QLabel("-")
        self.uptime = QLabel("-")
        self.coordinator_view = QLabel("-")
        self.coordinator_view.setWordWrap(True)
        self.grid = QLabel("-")
        self.grid.setWordWrap(True)
        node = QGroupBox("Node")
        n = QFormLayout(node)
        n.addRow("State", self.node_state)
        n.addRow("Serving", self.node_serving)
        n.addRow("Uptime", self.uptime)
        n.addRow("Grid", self.grid)
        n.addRow("Coordinator", self.coordinator_view)

        # jobs
        self.jobs = QTableWidget(0, 5)
        self.jobs.setHorizontalHeaderLabels(["Session", "Layers", "Tokens", "Tokens/s", "Time"])
        self.jobs.horizontalHeader().setSectionResizeMode(QHeaderView.ResizeMode.Stretch)
        self.jobs.verticalHeader().setVisible(False)
        self.jobs.setEditTriggers(QTableWidget.EditTrigger.NoEditTriggers)
        self.jobs.setMinimumHeight(90)
        self.jobs_summary = QLabel("")
        jobs = QGroupBox("Jobs being served")
        j = QVBoxLayout(jobs)
        j.addWidget(self.jobs)
        j.addWidget(self.jobs_summary)

        # earnings
        self.today = _value_label()
        self.week = _value_label()
        self.total = _value_label()
        self.predicted = QLabel("")
        self.earnings_message = QLabel("")
        self.earnings_message.setStyleSheet("color: #6b7280")
        self.chart = EarningsChart()
        earnings = QGroupBox("Earnings (credits)")
        e = QGridLayout(earnings)
        captions = (("Today", self.today), ("Last 7 days", self.week), ("Total", self.total))
        for col, (caption, value) in enumerate(captions):
            e.addWidget(QLabel(caption), 0, col, Qt.AlignmentFlag.AlignHCenter)
            e.addWidget(value, 1, col, Qt.AlignmentFlag.AlignHCenter)
        e.addWidget(self.earnings_message, 2, 0, 1, 3)
        e.addWidget(self.chart, 3, 0, 1, 3)
        e.addWidget(self.predicted, 4, 0, 1, 3)

        middle = QHBoxLayout()
        middle.addWidget(gpu, 1)
        middle.addWidget(node, 1)
        layout = QVBoxLayout(page)
        layout.addLayout(top)
        layout.addLayout(middle)
        layout.addWidget(jobs)
        layout.addWidget(earnings)
        return page

    # ------------------------------------------------------------------ updates

    def _share_clicked(self, checked: bool) -> None:
        self.share_toggled.emit(checked)

    def show_data(self, d: DashboardData) -> None:
        state = d.decision.state
        if state is not self._icon_state:
            self._icon_state = state
            self.status_icon.setPixmap(make_icon(state).pixmap(48, 48))
            self.setWindowIcon(make_icon(state))
        self.status_title.setText(state.value.capitalize())
        self.status_reason.setText(d.decision.reason)
        self.share.blockSignals(True)
        self.share.setChecked(d.share)
        self.share.setEnabled(d.signed_in)
        self.share.blockSignals(False)
        paused = d.paused_until is not None and d.paused_until > time.time()
        self.pause.setText("Resume sharing" if paused else "Pause for 1 hour")
        self.pause.setEnabled(d.signed_in and d.share)
        self._show_gpu(d)
        self._show_node(d)
        self._show_earnings(d)

    def _show_gpu(self, d: DashboardData) -> None:
        r = d.gpu
        if r is None:
            return
        self.gpu_name.setText(r.name)
        self.gpu_note.setText(r.note)
        self.gpu_note.setVisible(bool(r.note))
        used, total = r.memory_used_bytes, r.memory_total_bytes
        self.vram_bar.setRange(0, 1000)
        self.vram_bar.setValue(int(1000 * used / total) if used is not None and total else 0)
        self.vram_bar.setFormat(f"{_gib(used)} / {_gib(total)}" + ("" if r.gpu else " RAM"))
        cap = "the node's default" if d.vram_cap_mb is None else f"at most {d.vram_cap_mb / 1024:.1f} GiB"
        self.vram_text.setText(f"shared with the grid: {cap}")
        self.util.setText("-" if r.utilization_pct is None else f"{r.utilization_pct} %")
        self.temp.setText("-" if r.temperature_c is None else f"{r.temperature_c} °C")
        self.power.setText("-" if r.power_w is None else f"{r.power_w:.0f} W")

    def _show_node(self, d: DashboardData) -> None:
        v = d.view
        self.node_state.setText(f"{d.node_name or '-'}: {d.process}" + (f" ({v.phase})" if v.phase else ""))
        if v.layers is not None:
            self.node_serving.setText(f"{v.model_id}, layers {v.layers[0]}-{v.layers[1] - 1}")
        else:
            self.node_serving.setText("-")
        self.grid.setText(d.coordinator_url + (f" as {d.account}" if d.account else "") if d.coordinator_url else "-")
        restarts = f", restarted {d.restarts} time{'s' if d.restarts != 1 else ''}" if d.restarts else ""
        self.uptime.setText(_duration(d.uptime_s) + restarts)
        if d.coordinator_error:
            self.coordinator_view.setText(d.coordinator_error)
        elif d.coordinator_node is not None:
            c = d.coordinator_node
            ready = "ready" if c.get("ready") else "not ready yet"
            sessions = c.get("sessions", 0)
            live = f"{sessions} live session{'s' if sessions != 1 else ''}"
            self.coordinator_view.setText(f"registered as {c.get('peer_id', '?')} ({ready}), {live}")
        else:
            self.coordinator_view.setText("not registered" if d.process != "running" else "registering...")
        rows = list(v.sessions.values())
        self.jobs.setRowCount(len(rows))
        for i, s in enumerate(rows):
            rate = "-" if s.tokens_per_s is None else f"{s.tokens_per_s:.1f}"
            values = [s.session[:16], f"{s.layers[0]}-{s.layers[1] - 1}", str(s.tokens), rate, _duration(s.seconds)]
            for col, text in enumerate(values):
                self.jobs.setItem(i, col, QTableWidgetItem(text))
        last = ""
        if v.last is not None and v.last.tokens_per_s is not None:
            last = f"; the last one ran {v.last.tokens} tokens at {v.last.tokens_per_s:.1f} tokens/s"
        self.jobs_summary.setText(f"{v.finished} finished since the node started{last}")

    def _show_earnings(self, d: DashboardData) -> None:
        e = d.earnings
        self.earnings_message.setText(d.earnings_message)
        self.earnings_message.setVisible(bool(d.earnings_message))
        figures = (e.today, e.last_7_days, e.total) if e is not None else (None, None, None)
        for label, totals in zip((self.today, self.week, self.total), figures, strict=True):
            label.setText("-" if totals is None else format_amount(totals.amount))
            label.setToolTip("" if totals is None else f"{totals.units:,} token-layers")
        self.chart.setVisible(e is not None)
        self.chart.set_days(d.history)
        p = d.prediction
        if e is None or p is None:
            self.predicted.setText("")
        else:
            span = "today's" if p.days == 1 else f"the last {p.days} days'"
            self.predicted.setText(
                f"Predicted at {span} rate: {format_amount(p.per_day)} a day, {format_amount(p.per_month)} a month"
            )

    def closeEvent(self, event: QCloseEvent) -> None:
        """Closing the window hides it; the app lives on in the tray (Quit is in the tray menu)."""
        event.ignore()
        self.hide()
