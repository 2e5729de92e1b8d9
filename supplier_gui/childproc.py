"""``python -m supplier_gui.childproc CMD...``: exec CMD so that it dies with the tray app.

QProcess cannot set PR_SET_PDEATHSIG, and a node left running after the tray app is killed would
go on sharing the card behind the user's back. This shim sets it (SIGTERM: the node then drains
gracefully) and execs the real command, so the node is a direct child with nothing in between.
Elsewhere than Linux it only execs; the app stops its node itself on a normal quit.
"""

from __future__ import annotations

import contextlib
import ctypes
import os
import signal
import sys

_PR_SET_PDEATHSIG = 1


def main(argv: list[str] | None = None) -> int:
    args = list(sys.argv[1:] if argv is None else argv)
    if not args:
        sys.stderr.write("usage: python -m supplier_gui.childproc COMMAND [ARGS...]\n")
        return 2
    if sys.platform.startswith("linux"):
        with contextlib.suppress(OSError, AttributeError):
            ctypes.CDLL("libc.so.6", use_errno=True).prctl(_PR_SET_PDEATHSIG, signal.SIGTERM)
        if os.getppid() == 1:  # the parent died before prctl: don't start an orphan
            return 1
    try:
        os.execvp(args[0], args)
    except OSError as exc:
        sys.stderr.write(f"kluster-supplier: cannot start {args[0]}: {exc}\n")
        return 127
    return 0  # not reached


if __name__ == "__main__":
    raise SystemExit(main())
