"""Start the tray app at login: an XDG autostart entry on Linux, the Run key on Windows.

The system is the source of truth (the user may delete the entry by hand), so the settings
checkbox shows ``is_enabled()`` rather than a remembered flag. macOS (a LaunchAgent) is not done
yet and is reported as not available instead of pretending.
"""

from __future__ import annotations

import contextlib
import logging
import os
import shlex
import subprocess
import sys
from pathlib import Path

log = logging.getLogger(__name__)

APP_ID = "kluster-supplier"
RUN_KEY = r"Software\Microsoft\Windows\CurrentVersion\Run"


class AutostartError(Exception):
    """Could not change the login item; ``str()`` is one line for the UI."""


def default_command() -> list[str]:
    """How to start this app again: the console script if it is installed, else ``python -m``."""
    script = Path(sys.executable).with_name(APP_ID + (".exe" if sys.platform == "win32" else ""))
    if script.is_file():
        return [str(script)]
    return [sys.executable, "-m", "supplier_gui.app"]


def desktop_entry(command: list[str]) -> str:
    """The XDG autostart file (Desktop Entry Specification; Exec quoted per its rules)."""
    exec_line = " ".join(shlex.quote(part).replace("%", "%%") for part in command)
    return (
        "[Desktop Entry]\n"
        "Type=Application\n"
        "Name=Kluster supplier\n"
        "Comment=Share this computer's GPU with the Kluster grid\n"
        f"Exec={exec_line}\n"
        "Icon=kluster-supplier\n"
        "Terminal=false\n"
        "X-GNOME-Autostart-enabled=true\n"
    )


def autostart_dir() -> Path:
    base = os.environ.get("XDG_CONFIG_HOME") or str(Path.home() / ".config")
    return Path(base) / "autostart"


def unavailable_reason() -> str | None:
    """None where start-at-login is supported here, else why not."""
    if sys.platform == "win32" or sys.platform.startswith("linux") or "bsd" in sys.platform:
        return None
    return "not available on this platform yet"


def is_enabled() -> bool:
    if sys.platform == "win32":  # pragma: no cover - Windows only
        return _win_get() is not None
    return (autostart_dir() / f"{APP_ID}.desktop").is_file()


def set_enabled(enabled: bool, command: list[str] | None = None) -> None:
    reason = unavailable_reason()
    if reason is not None:
        raise AutostartError(f"start at login is {reason}")
    cmd = command or default_command()
    try:
        if sys.platform == "win32":  # pragma: no cover - Windows only
            _win_set(subprocess_line(cmd) if enabled else None)
            return
        path = autostart_dir() / f"{APP_ID}.desktop"
        if enabled:
            path.parent.mkdir(parents=True, exist_ok=True)
            path.write_text(desktop_entry(cmd), encoding="utf-8")
            log.info("start at login: wrote %s", path)
        elif path.exists():
            path.unlink()
            log.info("start at login: removed %s", path)
    except OSError as exc:
        raise AutostartError(f"cannot change start at login: {exc}") from None


def subprocess_line(command: list[str]) -> str:
    """A Windows command line (the Run key holds one string)."""
    return subprocess.list2cmdline(command)


def _win_get() -> str | None:  # pragma: no cover - Windows only
    import winreg

    try:
        with winreg.OpenKey(winreg.HKEY_CURRENT_USER, RUN_KEY) as key:
            return str(winreg.QueryValueEx(key, APP_ID)[0])
    except OSError:
        return None


def _win_set(line: str | None) -> None:  # pragma: no cover - Windows only
    import winreg

    with winreg.OpenKey(winreg.HKEY_CURRENT_USER, RUN_KEY, 0, winreg.KEY_SET_VALUE) as key:
        if line is None:
            with contextlib.suppress(FileNotFoundError):
                winreg.DeleteValue(key, APP_ID)
        else:
            winreg.SetValueEx(key, APP_ID, 0, winreg.REG_SZ, line)
