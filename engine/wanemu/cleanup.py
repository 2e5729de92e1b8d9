"""Namespace naming, deletion, and the reaper that cleans up after a harness that died.

Why: a namespace outlives the process that made it, and so do the processes inside it. The normal
path is `Topology.__exit__`; for a harness killed outright (SIGKILL, OOM, a CI timeout) a small
reaper process (`engine.wanemu.reaper`, in its own session) waits on a pipe from the harness and
deletes that topology's namespaces when the pipe closes. `cleanup_leftovers` is the last line: run at every
start, it removes namespaces whose owning process is gone.

Names are ``<prefix>-<subnet>-<owner pid>-<role>``, e.g. ``kwan-17-4242-r``.
"""

from __future__ import annotations

import contextlib
import logging
import os
import re
import signal
import subprocess
import sys
import time

from engine.wanemu._sh import run

log = logging.getLogger(__name__)

DEFAULT_PREFIX = "kwan"

#: How long processes in a namespace get between SIGTERM and SIGKILL.
KILL_GRACE_S = 2.0


def namespace_name(prefix: str, subnet: int, owner_pid: int, role: str) -> str:
    return f"{prefix}-{subnet}-{owner_pid}-{role}"


def _pattern(prefix: str) -> re.Pattern[str]:
    return re.compile(rf"^{re.escape(prefix)}-(\d+)-(\d+)-(\w+)$")


def list_namespaces() -> list[str]:
    """Every named network namespace (`ip netns list` prints ``name (id: N)`` per line)."""
    return [line.split()[0] for line in run(["ip", "netns", "list"], check=False).splitlines() if line.strip()]


def namespaces_with_prefix(prefix: str) -> list[str]:
    pattern = _pattern(prefix)
    return [name for name in list_namespaces() if pattern.match(name)]


def used_subnets(prefix: str) -> set[int]:
    """Subnet numbers taken by live or leftover topologies with this prefix."""
    pattern = _pattern(prefix)
    return {int(m.group(1)) for name in list_namespaces() if (m := pattern.match(name))}


def _pid_alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        return True
    return True


def _pids_in(netns: str) -> list[int]:
    return [int(p) for p in run(["ip", "netns", "pids", netns], check=False).split() if p.isdigit()]


def _signal_all(pids: list[int], sig: signal.Signals) -> None:
    for pid in pids:
        with contextlib.suppress(ProcessLookupError):
            os.kill(pid, sig)


def delete_namespaces(names: list[str]) -> None:
    """Stop every process inside ``names`` (TERM, then KILL after a grace), then delete them.

    Why kill first: `ip netns del` only removes the name; a namespace with processes in it lives
    on, unnamed and unreachable.
    """
    pids = [pid for name in names for pid in _pids_in(name)]
    if pids:
        _signal_all(pids, signal.SIGTERM)
        deadline = time.monotonic() + KILL_GRACE_S
        while time.monotonic() < deadline and any(_pid_alive(p) for p in pids):
            time.sleep(0.05)
        _signal_all([p for p in pids if _pid_alive(p)], signal.SIGKILL)
    for name in names:
        run(["ip", "netns", "del", name], check=False)


def cleanup_leftovers(prefix: str = DEFAULT_PREFIX, *, force: bool = False) -> list[str]:
    """Delete namespaces with ``prefix`` whose owning process has exited; return their names.

    ``force=True`` deletes them all, including those of harnesses still running.
    """
    pattern = _pattern(prefix)
    stale = [
        name for name in list_namespaces() if (m := pattern.match(name)) and (force or not _pid_alive(int(m.group(2))))
    ]
    if stale:
        log.warning("removing leftover WAN-emulation namespaces: %s", ", ".join(stale))
        delete_namespaces(stale)
    return stale


def start_reaper(names: list[str]) -> subprocess.Popen[bytes]:
    """Start a process that deletes ``names`` once the returned Popen's stdin closes.

    The caller keeps stdin open for the topology's lifetime; its own death closes it. The reaper
    runs in a new session so a Ctrl-C or a kill of the caller's process group does not take it
    down before it has cleaned up.
    """
    return subprocess.Popen(
        [sys.executable, "-m", "engine.wanemu.reaper", *names],
        stdin=subprocess.PIPE,
        start_new_session=True,
    )
