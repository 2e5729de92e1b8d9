"""The delay-and-loss program for one NFQUEUE queue: ``python -m engine.wanemu.delayer``.

Why a user-space program: this kernel has no ``netem``, so the router namespace sends each host's
forwarded packets to an NFQUEUE and this program holds each verdict for the delay (and drops a
seeded random fraction). It must run in the router namespace: holding packets on the sending host
instead counts them against that socket's send limits and chokes TCP.

Control protocol (one line each way, so the parent can change the link at run time):
  stdout, once bound:  ``ready <queue>``
  stdin:  ``set <delay_ms> <loss>``  ->  stdout ``ok <delay_ms> <loss>``
  stdin:  ``stats``                  ->  stdout ``stats <accepted> <dropped>``
End of stdin (the parent exited, however it died) or SIGTERM makes it release every held packet
and exit, so a crashed harness never leaves a delayer behind.
"""

from __future__ import annotations

import argparse
import asyncio
import collections
import logging
import os
import random
import signal
import sys
from typing import Protocol

log = logging.getLogger(__name__)

#: Packets the kernel may hold for us at once; at 50 Mbit and 40 ms about 200 full-size ones are
#: in flight, so this leaves room for much faster links before the kernel drops.
QUEUE_MAX_LEN = 8192


class Verdict(Protocol):
    """What the delay line needs of a queued packet (netfilterqueue's Packet has both)."""

    def accept(self) -> None: ...

    def drop(self) -> None: ...


class DelayLine:
    """A FIFO that releases each packet ``delay_s`` after it arrived, dropping a seeded fraction.

    Why a FIFO and not one timer per packet: timers with equal deadlines may fire in any order,
    and a fixed-delay link must keep packet order. Lowering the delay at run time never lets a new
    packet overtake an older one (it waits behind it), as on a real link.
    """

    def __init__(self, loop: asyncio.AbstractEventLoop, delay_s: float, loss: float, seed: int) -> None:
        self._loop = loop
        self._rng = random.Random(seed)
        self._held: collections.deque[tuple[float, Verdict]] = collections.deque()
        self._timer: asyncio.TimerHandle | None = None
        self.delay_s = 0.0
        self.loss = 0.0
        self.accepted = 0
        self.dropped = 0
        self.configure(delay_s, loss)

    def configure(self, delay_s: float, loss: float) -> None:
        """Change the link for packets that arrive from now on."""
        if delay_s < 0 or not 0.0 <= loss <= 1.0:
            raise ValueError(f"need delay >= 0 and 0 <= loss <= 1, got {delay_s}, {loss}")
        self.delay_s = delay_s
        self.loss = loss

    def submit(self, pkt: Verdict) -> None:
        """Take one packet from the queue: drop it now, or hold it for the delay."""
        if self.loss > 0.0 and self._rng.random() < self.loss:
            pkt.drop()
            self.dropped += 1
            return
        if self.delay_s == 0.0 and not self._held:
            pkt.accept()
            self.accepted += 1
            return
        self._held.append((self._loop.time() + self.delay_s, pkt))
        if self._timer is None:
            self._arm()

    def flush(self) -> None:
        """Release every held packet now (on exit: never strand packets in the kernel)."""
        if self._timer is not None:
            self._timer.cancel()
            self._timer = None
        while self._held:
            self._held.popleft()[1].accept()
            self.accepted += 1

    def _arm(self) -> None:
        self._timer = self._loop.call_at(self._held[0][0], self._release_due)

    def _release_due(self) -> None:
        self._timer = None
        now = self._loop.time()
        while self._held and self._held[0][0] <= now:
            self._held.popleft()[1].accept()
            self.accepted += 1
        if self._held:
            self._arm()


def _reply(line: str) -> None:
    """One protocol line to the parent (stdout is the control channel, not a log)."""
    sys.stdout.write(line + "\n")
    sys.stdout.flush()


def _handle_command(line: str, line_obj: DelayLine) -> None:
    parts = line.split()
    if not parts:
        return
    if parts[0] == "set" and len(parts) == 3:
        try:
            line_obj.configure(float(parts[1]) / 1000.0, float(parts[2]))
        except ValueError as exc:
            _reply(f"error {exc}")
            return
        _reply(f"ok {parts[1]} {parts[2]}")
    elif parts[0] == "stats":
        _reply(f"stats {line_obj.accepted} {line_obj.dropped}")
    else:
        _reply(f"error unknown command {line!r}")


async def serve(queue: int, delay_ms: float, loss: float, seed: int) -> None:
    """Bind ``queue`` and delay its packets until stdin closes or SIGTERM/SIGINT arrives."""
    from netfilterqueue import COPY_META, NetfilterQueue

    loop = asyncio.get_running_loop()
    delay_line = DelayLine(loop, delay_ms / 1000.0, loss, seed)
    stop = asyncio.Event()
    nfq = NetfilterQueue()
    # COPY_META: the verdict needs no payload, so the kernel copies none to us.
    nfq.bind(queue, delay_line.submit, max_len=QUEUE_MAX_LEN, mode=COPY_META, range=0)
    pending = b""

    def on_stdin() -> None:
        nonlocal pending
        data = os.read(sys.stdin.fileno(), 4096)
        if not data:
            stop.set()
            return
        pending += data
        while b"\n" in pending:
            raw, pending = pending.split(b"\n", 1)
            _handle_command(raw.decode(errors="replace"), delay_line)

    fd = nfq.get_fd()
    loop.add_reader(fd, nfq.run, False)
    loop.add_reader(sys.stdin.fileno(), on_stdin)
    for sig in (signal.SIGTERM, signal.SIGINT):
        loop.add_signal_handler(sig, stop.set)
    _reply(f"ready {queue}")
    try:
        await stop.wait()
    finally:
        loop.remove_reader(fd)
        loop.remove_reader(sys.stdin.fileno())
        delay_line.flush()
        nfq.unbind()
        log.info("queue %d done: %d accepted, %d dropped", queue, delay_line.accepted, delay_line.dropped)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m engine.wanemu.delayer", description=__doc__.splitlines()[0])
    parser.add_argument("--queue", type=int, required=True, help="NFQUEUE number to bind")
    parser.add_argument("--delay-ms", type=float, default=0.0, help="one-way delay added to each packet")
    parser.add_argument("--loss", type=float, default=0.0, help="fraction of packets dropped, 0..1")
    parser.add_argument("--seed", type=int, default=0, help="seed of the per-packet loss draw")
    args = parser.parse_args(argv)
    logging.basicConfig(level=os.environ.get("KLUSTER_LOGLEVEL", "WARNING"), stream=sys.stderr)
    asyncio.run(serve(args.queue, args.delay_ms, args.loss, args.seed))
    return 0


if __name__ == "__main__":
    sys.exit(main())
