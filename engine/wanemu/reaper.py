"""``python -m engine.wanemu.reaper NS...``: delete these namespaces once stdin closes.

Why a separate process: it outlives a harness killed outright (SIGKILL, OOM, a CI timeout), whose
own `Topology.close` never runs. The harness holds the other end of stdin; its exit, of any kind,
closes it. See `cleanup.start_reaper`.
"""

from __future__ import annotations

import argparse
import signal
import sys

from engine.wanemu.cleanup import delete_namespaces, list_namespaces


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m engine.wanemu.reaper")
    parser.add_argument("names", nargs="+", help="namespaces to delete when stdin closes")
    args = parser.parse_args(argv)
    # A Ctrl-C meant for the harness must not stop the one process that cleans up after it.
    signal.signal(signal.SIGINT, signal.SIG_IGN)
    while sys.stdin.buffer.read(4096):
        pass
    present = set(list_namespaces())
    left = [name for name in args.names if name in present]
    if left:
        delete_namespaces(left)
    return 0


if __name__ == "__main__":
    sys.exit(main())
