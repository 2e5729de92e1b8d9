"""Bounded command runner for the harness's `ip`, `tc` and `iptables` calls.

Why: every set-up step is an external command; one helper gives them all a timeout (a wedged
`ip netns exec` must not hang a test run), the same logging, and an error that names the command.
"""

from __future__ import annotations

import logging
import subprocess
from collections.abc import Sequence

log = logging.getLogger(__name__)

#: Seconds any single set-up command may take; they normally take milliseconds.
COMMAND_TIMEOUT_S = 15.0


class WanEmuError(RuntimeError):
    """A harness command failed; the message holds the command and its stderr."""


def run(argv: Sequence[str], *, check: bool = True, timeout: float = COMMAND_TIMEOUT_S) -> str:
    """Run one command to completion and return its stdout.

    With ``check=False`` a failure is logged at debug level and its (partial) stdout returned:
    cleanup paths use that, because "already gone" is the normal case there.
    """
    args = list(argv)
    try:
        proc = subprocess.run(args, capture_output=True, text=True, timeout=timeout, check=False)
    except (OSError, subprocess.TimeoutExpired) as exc:
        if check:
            raise WanEmuError(f"{' '.join(args)}: {exc}") from exc
        log.debug("ignored failure of %s: %s", args, exc)
        return ""
    if proc.returncode != 0:
        if check:
            raise WanEmuError(f"{' '.join(args)} exited {proc.returncode}: {proc.stderr.strip()}")
        log.debug("ignored exit %s of %s: %s", proc.returncode, args, proc.stderr.strip())
    return proc.stdout


def in_netns(netns: str, argv: Sequence[str]) -> list[str]:
    """The argv that runs ``argv`` inside network namespace ``netns``.

    `ip netns exec` execs the program itself, so the pid of a Popen on this argv is the program's.
    """
    return ["ip", "netns", "exec", netns, *argv]
