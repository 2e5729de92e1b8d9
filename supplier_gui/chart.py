"""A bar chart of the last days' earnings, painted by hand (QtCharts is not in PySide6-Essentials)."""

from __future__ import annotations

import datetime as dt

from PySide6.QtCore import QRectF, QSize, Qt
from PySide6.QtGui import QColor, QPainter, QPaintEvent, QPen
from PySide6.QtWidgets import QSizePolicy, QWidget

from supplier_gui.earnings import format_amount

BAR = QColor("#22a45d")
TODAY = QColor("#2f7de1")
GRID = QColor("#c8ccd2")


class EarningsChart(QWidget):
    """(day, amount in micro-units or None) oldest first; None days show "-" (the app was not running)."""

    def __init__(self, parent: QWidget | None = None) -> None:
        super().__init__(parent)
        self.days: list[tuple[str, int | None]] = []
        self.setMinimumHeight(120)
        self.setSizePolicy(QSizePolicy.Policy.Expanding, QSizePolicy.Policy.Preferred)

    def sizeHint(self) -> QSize:
        return QSize(360, 140)

    def set_days(self, days: list[tuple[str, int | None]]) -> None:
        self.days = list(days)
        self.update()

    def paintEvent(self, _event: QPaintEvent) -> None:
        p = QPainter(self)
        p.setRenderHint(QPainter.RenderHint.Antialiasing)
        text = self.palette().windowText().color()
        w, h = self.width(), self.height()
        label_h, top_h = 18, 16
        area = QRectF(4, top_h, w - 8, h - top_h - label_h)
        p.setPen(QPen(GRID, 1))
        p.drawLine(area.bottomLeft(), area.bottomRight())
        if not self.days:
            p.end()
            return
        peak = max((a for _, a in self.days if a), default=0)
        slot = area.width() / len(self.days)
        for i, (day, amount) in enumerate(self.days):
            x = area.left() + i * slot
            bar_w = slot * 0.6
            bx = x + (slot - bar_w) / 2
            p.setPen(text)
            label = dt.date.fromisoformat(day).strftime("%a")
            p.drawText(QRectF(x, area.bottom() + 2, slot, label_h), Qt.AlignmentFlag.AlignCenter, label)
            if amount is None:
                p.setPen(GRID)
                p.drawText(QRectF(x, area.bottom() - 18, slot, 16), Qt.AlignmentFlag.AlignCenter, "-")
                continue
            height = 0.0 if peak == 0 else area.height() * amount / peak
            colour = TODAY if i == len(self.days) - 1 else BAR
            p.fillRect(QRectF(bx, area.bottom() - max(height, 1.0), bar_w, max(height, 1.0)), colour)
            if amount:
                p.setPen(text)
                y = max(area.bottom() - height - top_h, 0)
                p.drawText(QRectF(x - 10, y, slot + 20, top_h), Qt.AlignmentFlag.AlignCenter, format_amount(amount))
        p.end()
