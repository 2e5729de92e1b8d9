"""Run under a real X server (Xvfb + trayer): dock the tray icon and report what happened as JSON.

Used by test_supplier_tray_x11.py in a child process, since the test process already has an
offscreen QApplication; ``--shot PATH`` also saves a picture of the screen corner with the icon.
"""

from __future__ import annotations

import argparse
import json
import sys
import time

from PySide6.QtCore import QRect
from PySide6.QtGui import QColor
from PySide6.QtWidgets import QApplication, QMenu, QSystemTrayIcon

from supplier_gui.icons import make_icon
from supplier_gui.state import TrayState


def main() -> int:
    p = argparse.ArgumentParser()
    p.add_argument("--shot", default=None)
    args = p.parse_args()
    app = QApplication(["tray-probe", "-platform", "xcb"])
    deadline = time.monotonic() + 10
    while not QSystemTrayIcon.isSystemTrayAvailable() and time.monotonic() < deadline:
        app.processEvents()
        time.sleep(0.05)
    tray = QSystemTrayIcon(make_icon(TrayState.SERVING))
    menu = QMenu()
    menu.addAction("Share GPU").setCheckable(True)
    tray.setContextMenu(menu)
    tray.show()
    # docking is asynchronous (the tray reparents and moves the icon's window): wait for a geometry
    # that is not empty and has not moved for a while
    geo, stable_since = QRect(), time.monotonic()
    while time.monotonic() < deadline:
        app.processEvents()
        time.sleep(0.05)
        now = tray.geometry()
        if now != geo:
            geo, stable_since = now, time.monotonic()
        elif not geo.isEmpty() and geo.x() > 0 and time.monotonic() - stable_since > 0.3:
            break
    for _ in range(20):  # let the tray paint the icon
        app.processEvents()
        time.sleep(0.02)
    screen = app.primaryScreen().grabWindow(0).toImage()
    green = QColor("#22a45d")
    hits = 0
    for y in range(max(geo.top(), 0), min(geo.bottom() + 1, screen.height())):
        for x in range(max(geo.left(), 0), min(geo.right() + 1, screen.width())):
            c = screen.pixelColor(x, y)
            hits += abs(c.red() - green.red()) + abs(c.green() - green.green()) + abs(c.blue() - green.blue()) < 40
    if args.shot:
        screen.copy(max(geo.right() - 300, 0), 0, 320, max(geo.bottom() + 12, 48)).save(args.shot)
    report = {
        "available": QSystemTrayIcon.isSystemTrayAvailable(),
        "visible": tray.isVisible(),
        "geometry": [geo.x(), geo.y(), geo.width(), geo.height()],
        "icon_pixels": hits,
    }
    sys.stdout.write(json.dumps(report) + "\n")
    tray.hide()
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
