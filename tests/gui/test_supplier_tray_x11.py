"""Under a real X server: the icon docks in a system tray (Xvfb + trayer), and idle time is read.

Skipped where Xvfb or trayer are missing (``.ci/run`` installs both). Runs the Qt side in a child
process (``supplier_tray_probe.py``): this process already has an offscreen QApplication.
"""

from __future__ import annotations

import contextlib
import json
import os
import shutil
import subprocess
import sys
import time
from collections.abc import Iterator
from pathlib import Path

import pytest

from supplier_gui.idle import X11Probe, make_probe

pytestmark = pytest.mark.skipif(
    shutil.which("Xvfb") is None or shutil.which("trayer") is None, reason="needs Xvfb and trayer"
)
ROOT = Path(__file__).parents[2]


def _stop(proc: subprocess.Popen[bytes]) -> None:
    if proc.poll() is None:
        proc.terminate()
        try:
            proc.wait(5)
        except subprocess.TimeoutExpired:
            proc.kill()
            proc.wait()


@pytest.fixture(scope="module")
def display() -> Iterator[str]:
    """A private Xvfb display with a trayer system tray on it."""
    read, write = os.pipe()
    xvfb = subprocess.Popen(
        ["Xvfb", "-displayfd", str(write), "-screen", "0", "800x600x24", "-nolisten", "tcp"],
        pass_fds=(write,),
        stdout=subprocess.DEVNULL,
        stderr=subprocess.DEVNULL,
    )
    os.close(write)
    with os.fdopen(read) as f:
        number = f.readline().strip()
    if not number:
        _stop(xvfb)
        pytest.fail("Xvfb is installed but did not start")
    name = f":{number}"
    trayer = subprocess.Popen(
        ["trayer", "--edge", "top", "--align", "right", "--widthtype", "request", "--height", "32"],
        env=dict(os.environ, DISPLAY=name),
        stdout=subprocess.DEVNULL,
        stderr=subprocess.DEVNULL,
    )
    try:
        time.sleep(0.5)
        yield name
    finally:
        _stop(trayer)
        _stop(xvfb)


def test_icon_docks_in_the_tray(display: str, tmp_path: Path) -> None:
    env = dict(os.environ, DISPLAY=display, QT_QPA_PLATFORM="xcb", PYTHONPATH=str(ROOT))
    shot = tmp_path / "tray.png"
    out = subprocess.run(
        [sys.executable, str(Path(__file__).with_name("supplier_tray_probe.py")), "--shot", str(shot)],
        env=env,
        capture_output=True,
        text=True,
        timeout=60,
    )
    assert out.returncode == 0, out.stderr[-2000:]
    report = json.loads(out.stdout.strip().splitlines()[-1])
    assert report["available"] and report["visible"]
    x, y, w, h = report["geometry"]
    assert w > 0 and h > 0 and x > 400 and y < 40  # docked in trayer, top right
    assert report["icon_pixels"] > 20  # the serving icon's green is really painted there
    assert shot.stat().st_size > 0


def test_idle_time_from_the_x_server(display: str, monkeypatch: pytest.MonkeyPatch) -> None:
    try:
        probe = X11Probe(display)
    except OSError as exc:
        pytest.skip(f"no X11/XScreenSaver library here: {exc}")
    with contextlib.closing(probe):
        assert probe.idle_unavailable is None
        idle = probe.idle_seconds()
        assert idle is not None and idle >= 0
        # trayer is no EWMH window manager: full-screen detection says so instead of guessing
        assert probe.fullscreen_unavailable is not None and probe.fullscreen() is None
    monkeypatch.setenv("DISPLAY", display)
    monkeypatch.delenv("WAYLAND_DISPLAY", raising=False)
    assert isinstance(make_probe("xcb"), X11Probe)
    assert make_probe("offscreen").idle_unavailable == "not available on this platform (no display)"
