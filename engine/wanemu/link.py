"""A link's shape and the handle on one running delayer process.

Why a long-lived process per host with a line protocol: changing a link at run time (a bench step,
a test phase) then takes one write and one reply instead of a restart, and packets already held
keep their place.
"""

from __future__ import annotations

import contextlib
import logging
import os
import select
import subprocess
import sys
import time
from dataclasses import dataclass

from engine.wanemu._sh import WanEmuError, in_netns

log = logging.getLogger(__name__)

#: How long a delayer may take to import, bind its queue and say ``ready``.
START_TIMEOUT_S = 15.0
#: How long one control command may take to be answered.
REPLY_TIMEOUT_S = 5.0


@dataclass(frozen=True)
class LinkShape:
    """What happens to packets sent by one host: one-way delay, loss fraction, rate cap."""

    delay_ms: float = 0.0
    loss: float = 0.0
    rate_mbit: float | None = None

    def __post_init__(self) -> None:
        if self.delay_ms < 0:
            raise ValueError(f"delay_ms must be >= 0, got {self.delay_ms}")
        if not 0.0 <= self.loss <= 1.0:
            raise ValueError(f"loss must be a fraction in [0, 1], got {self.loss}")
        if self.rate_mbit is not None and self.rate_mbit <= 0:
            raise ValueError(f"rate_mbit must be > 0 or None, got {self.rate_mbit}")

    @property
    def needs_queue(self) -> bool:
        """Whether packets must pass through the delayer (a plain link bypasses user space)."""
        return self.delay_ms > 0 or self.loss > 0


class DelayerProcess:
    """One ``engine.wanemu.delayer`` in the router namespace, serving one NFQUEUE number."""

    def __init__(self, netns: str, queue: int, shape: LinkShape, seed: int) -> None:
        self.queue = queue
        argv = [
            sys.executable, "-m", "engine.wanemu.delayer", "--queue", str(queue),
            "--delay-ms", repr(shape.delay_ms), "--loss", repr(shape.loss), "--seed", str(seed),
        ]  # fmt: skip
        self._proc = subprocess.Popen(in_netns(netns, argv), stdin=subprocess.PIPE, stdout=subprocess.PIPE, bufsize=0)
        self._buf = b""
        try:
            reply = self._read_line(START_TIMEOUT_S)
            if reply != f"ready {queue}":
                raise WanEmuError(f"delayer for queue {queue} did not start: {reply!r}")
        except BaseException:
            self.stop()
            raise

    def configure(self, shape: LinkShape) -> None:
        """Apply a new delay and loss; returns once the delayer has confirmed it."""
        reply = self._command(f"set {shape.delay_ms!r} {shape.loss!r}")
        if not reply.startswith("ok "):
            raise WanEmuError(f"delayer for queue {self.queue} refused {shape}: {reply}")

    def stats(self) -> tuple[int, int]:
        """(accepted, dropped) packets since the delayer started."""
        parts = self._command("stats").split()
        if len(parts) != 3 or parts[0] != "stats":
            raise WanEmuError(f"delayer for queue {self.queue} gave bad stats: {parts}")
        return int(parts[1]), int(parts[2])

    def stop(self) -> None:
        """Close its stdin (it releases held packets and exits); kill it if it lingers."""
        if self._proc.stdin is not None and not self._proc.stdin.closed:
            with contextlib.suppress(OSError):
                self._proc.stdin.close()
        try:
            self._proc.wait(timeout=3.0)
        except subprocess.TimeoutExpired:
            self._proc.kill()
            self._proc.wait(timeout=3.0)
        if self._proc.stdout is not None:
            self._proc.stdout.close()

    def _command(self, line: str) -> str:
        if self._proc.poll() is not None or self._proc.stdin is None:
            raise WanEmuError(f"delayer for queue {self.queue} exited with {self._proc.returncode}")
        self._proc.stdin.write(line.encode() + b"\n")
        return self._read_line(REPLY_TIMEOUT_S)

    def _read_line(self, timeout: float) -> str:
        """One reply line, read with a deadline (a wedged delayer must not hang the harness)."""
        if self._proc.stdout is None:
            raise WanEmuError("delayer has no stdout")
        fd = self._proc.stdout.fileno()
        deadline = time.monotonic() + timeout
        while b"\n" not in self._buf:
            left = deadline - time.monotonic()
            if left <= 0:
                raise WanEmuError(f"delayer for queue {self.queue} did not answer within {timeout} s")
            ready, _, _ = select.select([fd], [], [], left)
            if ready:
                chunk = os.read(fd, 4096)
                if not chunk:
                    raise WanEmuError(f"delayer for queue {self.queue} closed its output (exit {self._proc.poll()})")
                self._buf += chunk
        raw, self._buf = self._buf.split(b"\n", 1)
        return raw.decode(errors="replace").strip()
