"""Is the user away, and is a full-screen application in front? Where the platform lets us see it.

  X11      idle: the MIT-SCREEN-SAVER extension (libXss); full screen: the EWMH window manager's
           _NET_ACTIVE_WINDOW carrying _NET_WM_STATE_FULLSCREEN (no such WM: not available)
  Windows  idle: GetLastInputInfo; full screen: SHQueryUserNotificationState (busy, D3D full
           screen or presentation mode)
  else     (Wayland, macOS): not available, and the settings say so instead of pretending

Each probe answers None when it cannot tell; the state machine then never holds sharing back on
that rule. Everything here is ctypes against system libraries that may be missing: a failure to
load or query switches that rule to "not available" with the reason, never an exception.
"""

from __future__ import annotations

import ctypes
import ctypes.util
import logging
import os
import sys
from collections.abc import Callable
from typing import Any, Protocol

log = logging.getLogger(__name__)


class IdleProbe(Protocol):
    #: None when available, else why not (shown in the settings)
    idle_unavailable: str | None
    fullscreen_unavailable: str | None

    def idle_seconds(self) -> float | None: ...

    def fullscreen(self) -> bool | None: ...


class NullProbe:
    def __init__(self, reason: str) -> None:
        self.idle_unavailable = reason
        self.fullscreen_unavailable = reason

    def idle_seconds(self) -> float | None:
        return None

    def fullscreen(self) -> bool | None:
        return None


class _XScreenSaverInfo(ctypes.Structure):
    _fields_ = [
        ("window", ctypes.c_ulong),
        ("state", ctypes.c_int),
        ("kind", ctypes.c_int),
        ("til_or_since", ctypes.c_ulong),
        ("idle", ctypes.c_ulong),
        ("eventMask", ctypes.c_ulong),
    ]


_XErrorHandler = ctypes.CFUNCTYPE(ctypes.c_int, ctypes.c_void_p, ctypes.c_void_p)
_XA_ATOM, _XA_WINDOW = 4, 33


def _lib(name: str) -> Any:
    path = ctypes.util.find_library(name)
    if path is None:
        raise OSError(f"lib{name} not found")
    return ctypes.CDLL(path)


class X11Probe:
    """Its own Xlib connection; X errors (a window closing mid-query) are swallowed per call."""

    def __init__(self, display: str | None = None) -> None:
        self.idle_unavailable: str | None = None
        self.fullscreen_unavailable: str | None = None
        x = self._x = _lib("X11")
        x.XOpenDisplay.restype = ctypes.c_void_p
        x.XOpenDisplay.argtypes = [ctypes.c_char_p]
        x.XDefaultRootWindow.restype = ctypes.c_ulong
        x.XDefaultRootWindow.argtypes = [ctypes.c_void_p]
        x.XInternAtom.restype = ctypes.c_ulong
        x.XInternAtom.argtypes = [ctypes.c_void_p, ctypes.c_char_p, ctypes.c_int]
        x.XGetWindowProperty.argtypes = [
            ctypes.c_void_p,
            ctypes.c_ulong,
            ctypes.c_ulong,
            ctypes.c_long,
            ctypes.c_long,
            ctypes.c_int,
            ctypes.c_ulong,
            ctypes.POINTER(ctypes.c_ulong),
            ctypes.POINTER(ctypes.c_int),
            ctypes.POINTER(ctypes.c_ulong),
            ctypes.POINTER(ctypes.c_ulong),
            ctypes.POINTER(ctypes.c_void_p),
        ]
        x.XFree.argtypes = [ctypes.c_void_p]
        x.XSync.argtypes = [ctypes.c_void_p, ctypes.c_int]
        x.XCloseDisplay.argtypes = [ctypes.c_void_p]
        x.XSetErrorHandler.restype = ctypes.c_void_p
        x.XSetErrorHandler.argtypes = [ctypes.c_void_p]
        self._dpy = x.XOpenDisplay(display.encode() if display else None)
        if not self._dpy:
            raise OSError(f"cannot open the X display {display or os.environ.get('DISPLAY', '')!r}")
        self._root = x.XDefaultRootWindow(self._dpy)
        self._ignore = _XErrorHandler(lambda _d, _e: 0)  # kept alive as long as the probe
        self._xss: Any = None
        self._info: Any = None
        try:
            xss = _lib("Xss")
            xss.XScreenSaverQueryExtension.argtypes = [
                ctypes.c_void_p,
                ctypes.POINTER(ctypes.c_int),
                ctypes.POINTER(ctypes.c_int),
            ]
            xss.XScreenSaverAllocInfo.restype = ctypes.POINTER(_XScreenSaverInfo)
            xss.XScreenSaverQueryInfo.argtypes = [ctypes.c_void_p, ctypes.c_ulong, ctypes.POINTER(_XScreenSaverInfo)]
            ev, err = ctypes.c_int(), ctypes.c_int()
            if not xss.XScreenSaverQueryExtension(self._dpy, ctypes.byref(ev), ctypes.byref(err)):
                raise OSError("the X server has no MIT-SCREEN-SAVER extension")
            self._xss, self._info = xss, xss.XScreenSaverAllocInfo()
        except OSError as exc:
            self.idle_unavailable = f"not available on this platform ({exc})"
        self._active = x.XInternAtom(self._dpy, b"_NET_ACTIVE_WINDOW", 0)
        self._wm_state = x.XInternAtom(self._dpy, b"_NET_WM_STATE", 0)
        self._fs = x.XInternAtom(self._dpy, b"_NET_WM_STATE_FULLSCREEN", 0)
        if self._active_window() is None:
            self.fullscreen_unavailable = "not available: the window manager does not say which window is active"

    def _guarded(self, fn: Callable[[], Any]) -> Any:
        old = self._x.XSetErrorHandler(ctypes.cast(self._ignore, ctypes.c_void_p))
        try:
            result = fn()
            self._x.XSync(self._dpy, 0)
            return result
        finally:
            self._x.XSetErrorHandler(old)

    def _property(self, window: int, atom: int, kind: int, length: int) -> list[int] | None:
        actual, fmt = ctypes.c_ulong(), ctypes.c_int()
        n, after, data = ctypes.c_ulong(), ctypes.c_ulong(), ctypes.c_void_p()
        status = self._x.XGetWindowProperty(
            self._dpy, window, atom, 0, length, 0, kind, actual, fmt, n, after, ctypes.byref(data)
        )
        try:
            if status != 0 or not data.value or fmt.value != 32:
                return None
            # format-32 properties come back as C longs
            return list(ctypes.cast(data, ctypes.POINTER(ctypes.c_long))[: n.value])
        finally:
            if data.value:
                self._x.XFree(data)

    def _active_window(self) -> int | None:
        found = self._guarded(lambda: self._property(self._root, self._active, _XA_WINDOW, 1))
        return found[0] if found and found[0] else None

    def idle_seconds(self) -> float | None:
        if self._xss is None:
            return None
        ok = self._guarded(lambda: self._xss.XScreenSaverQueryInfo(self._dpy, self._root, self._info))
        return self._info.contents.idle / 1000.0 if ok else None

    def fullscreen(self) -> bool | None:
        if self.fullscreen_unavailable is not None:
            return None
        window = self._active_window()
        if window is None:
            return False
        states = self._guarded(lambda: self._property(window, self._wm_state, _XA_ATOM, 64))
        return bool(states) and self._fs in states

    def close(self) -> None:
        if self._dpy:
            self._x.XCloseDisplay(self._dpy)
            self._dpy = None


class _LastInputInfo(ctypes.Structure):
    _fields_ = [("cbSize", ctypes.c_uint), ("dwTime", ctypes.c_uint)]


class WindowsProbe:  # pragma: no cover - exercised on Windows only
    #: SHQueryUserNotificationState: QUNS_BUSY, QUNS_RUNNING_D3D_FULL_SCREEN, QUNS_PRESENTATION_MODE
    _FULLSCREEN_STATES = frozenset({2, 3, 4})

    def __init__(self) -> None:
        self.idle_unavailable: str | None = None
        self.fullscreen_unavailable: str | None = None
        self._user32 = ctypes.windll.user32  # type: ignore[attr-defined]
        self._kernel32 = ctypes.windll.kernel32  # type: ignore[attr-defined]
        self._shell32 = ctypes.windll.shell32  # type: ignore[attr-defined]

    def idle_seconds(self) -> float | None:
        info = _LastInputInfo(ctypes.sizeof(_LastInputInfo), 0)
        if not self._user32.GetLastInputInfo(ctypes.byref(info)):
            return None
        return ((self._kernel32.GetTickCount() - info.dwTime) & 0xFFFFFFFF) / 1000.0

    def fullscreen(self) -> bool | None:
        state = ctypes.c_int()
        if self._shell32.SHQueryUserNotificationState(ctypes.byref(state)) != 0:
            return None
        return state.value in self._FULLSCREEN_STATES


def make_probe(platform_name: str | None = None) -> IdleProbe:
    """The best probe for this session; a NullProbe (with the reason) where there is none."""
    qpa = (platform_name or os.environ.get("QT_QPA_PLATFORM", "")).lower()
    if sys.platform == "win32":
        try:
            return WindowsProbe()
        except (OSError, AttributeError) as exc:
            return NullProbe(f"not available on this platform ({exc})")
    if qpa.startswith("offscreen") or qpa.startswith("minimal"):
        return NullProbe("not available on this platform (no display)")
    if os.environ.get("WAYLAND_DISPLAY") and not qpa.startswith("xcb"):
        return NullProbe("not available on this platform (Wayland does not tell other applications)")
    if sys.platform.startswith("linux") or "bsd" in sys.platform:
        if not os.environ.get("DISPLAY"):
            return NullProbe("not available on this platform (no X display)")
        try:
            return X11Probe()
        except OSError as exc:
            return NullProbe(f"not available on this platform ({exc})")
    return NullProbe("not available on this platform")
