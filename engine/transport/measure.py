"""Loopback figures for the transport, between two real processes: ``python -m engine.transport.measure``.

Why two processes: in one process both ends of a link share one event loop and one core, which
halves what aiortc (pure Python SCTP/DTLS) can do; a real deployment has one peer per machine.

The parent runs a :class:`PeerManager` and spawns ``python -m engine.transport.measure --echo``,
whose PeerManager answers every message (see :func:`_echo_reply`). Signaling goes over the child's
stdin/stdout as JSON lines, standing in for the coordinator relay: the child's first line names its
peer id (derived from its fresh identity key, like every peer id), then come signals, and signals
the child refuses (e.g. failing the identity check) are reported back as ``{"refused": reason}``.
Printed figures:

* RTT p50/p99 of 2.3 KB messages (one token's hidden state; ``--size``), one at a time;
* throughput of 1 MB messages sent back to back, each acknowledged by a tiny reply.

:class:`EchoProcess` is also what the cross-process integration test uses.
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import hashlib
import json
import logging
import os
import statistics
import struct
import sys
import time
from collections.abc import Awaitable, Callable
from pathlib import Path
from types import TracebackType
from typing import Any

from engine.errors import KlusterError, TransportError
from engine.transport.identity import Identity
from engine.transport.peer import OnLinkLost, PeerManager

log = logging.getLogger(__name__)

#: Seconds the parent waits for the echo child to start and name its peer id.
START_TIMEOUT_S = 30.0
#: What a test relay may do to each signal: return it (changed or not), or None to drop it.
#: Awaited with the direction ("to_echo" or "from_echo") and the signal's data.
RelayFilter = Callable[[str, dict[str, Any]], Awaitable[dict[str, Any] | None]]

#: First byte of a request to the echo peer: E = send it back, H = reply sha256, else reply its length.
ECHO = b"E"
HASH = b"H"


def _echo_reply(data: bytes) -> bytes:
    """What the echo peer answers to ``data``."""
    if data[:1] == ECHO:
        return data
    if data[:1] == HASH:
        return HASH + hashlib.sha256(data[1:]).digest()
    return b"A" + struct.pack("!Q", len(data))


async def _run_echo() -> None:
    """Child side: a PeerManager that answers messages, signaling over stdin/stdout."""
    loop = asyncio.get_running_loop()
    reader = asyncio.StreamReader()
    await loop.connect_read_pipe(lambda: asyncio.StreamReaderProtocol(reader), sys.stdin)
    out = sys.stdout
    identity = Identity.ephemeral()
    echo_id = identity.peer_id("echo")

    def write(obj: dict[str, Any]) -> None:
        out.write(json.dumps(obj) + "\n")
        out.flush()

    async def send_signal(peer_id: str, data: dict[str, Any]) -> None:
        write({"to": peer_id, "from": echo_id, "data": data})

    async def on_message(peer_id: str, data: bytes) -> None:
        await manager.send(peer_id, _echo_reply(data))

    manager = PeerManager(echo_id, send_signal, on_message, identity=identity)
    write({"hello": echo_id})
    try:
        while line := await reader.readline():
            msg = json.loads(line)
            try:
                await manager.handle_signal(msg["from"], msg["data"])
            except KlusterError as exc:
                log.warning("echo: refused a signal from %s: %s", msg.get("from"), exc)
                write({"refused": str(exc)})
            except Exception:
                log.exception("echo: bad signal")
    finally:
        await manager.shutdown()


def child_env() -> dict[str, str]:
    """The environment for a child peer process: it must import this very ``engine`` package."""
    root = str(Path(__file__).resolve().parents[2])
    env = dict(os.environ)
    env["PYTHONPATH"] = os.pathsep.join(p for p in (root, env.get("PYTHONPATH")) if p)
    return env


async def stop_child(proc: asyncio.subprocess.Process | None, reader: asyncio.Task[Any] | None) -> None:
    """End a child peer driven over pipes: EOF on its stdin (it shuts down and exits), kill it
    if it lingers past 10 s, then stop the task reading its stdout."""
    if proc is not None:
        if proc.stdin is not None:
            proc.stdin.close()
        try:
            await asyncio.wait_for(proc.wait(), 10)
        except TimeoutError:
            proc.kill()
            await proc.wait()
    if reader is not None:
        reader.cancel()
        with contextlib.suppress(asyncio.CancelledError):
            await reader


class EchoProcess:
    """An echo peer in a child process plus a local PeerManager wired to it.

    ``async with EchoProcess(on_message) as echo: await echo.manager.send(echo.echo_id, b"E...")``.
    ``relay_filter`` sees (and may change or drop) every signal the parent relays, both ways: the
    identity tests play a tampering signaling relay with it.
    """

    def __init__(
        self,
        on_message: Callable[[str, bytes], Awaitable[None]],
        *,
        connect_timeout: float = 10.0,
        on_link_lost: OnLinkLost | None = None,
        relay_filter: RelayFilter | None = None,
    ) -> None:
        self.identity = Identity.ephemeral()
        self.self_id = self.identity.peer_id("measure")
        self.manager = PeerManager(
            self.self_id,
            self._send_signal,
            on_message,
            identity=self.identity,
            connect_timeout=connect_timeout,
            on_link_lost=on_link_lost,
        )
        self._filter = relay_filter
        #: the echo child's peer id (known once started)
        self.echo_id = ""
        #: signals the echo child refused, with its reasons, in order (refusals are not answered)
        self.refused: asyncio.Queue[str] = asyncio.Queue()
        self.proc: asyncio.subprocess.Process | None = None
        self._relay: asyncio.Task[None] | None = None

    async def __aenter__(self) -> EchoProcess:
        self.proc = await asyncio.create_subprocess_exec(
            sys.executable,
            "-m",
            "engine.transport.measure",
            "--echo",
            stdin=asyncio.subprocess.PIPE,
            stdout=asyncio.subprocess.PIPE,
            env=child_env(),
        )
        try:
            if self.proc.stdout is None:
                raise TransportError("the echo process has no stdout")
            line = await asyncio.wait_for(self.proc.stdout.readline(), START_TIMEOUT_S)
            self.echo_id = str(json.loads(line)["hello"])
        except (TimeoutError, ValueError, KeyError, TypeError) as exc:
            await stop_child(self.proc, None)
            raise TransportError(f"the echo process did not start: {exc or type(exc).__name__}") from None
        self._relay = asyncio.get_running_loop().create_task(self._relay_signals(), name="measure-relay")
        return self

    async def __aexit__(
        self, exc_type: type[BaseException] | None, exc: BaseException | None, tb: TracebackType | None
    ) -> None:
        await self.manager.shutdown()
        await stop_child(self.proc, self._relay)

    async def _send_signal(self, peer_id: str, data: dict[str, Any]) -> None:
        if self.proc is None or self.proc.stdin is None:
            raise TransportError("the echo process is not running")
        if self._filter is not None:
            filtered = await self._filter("to_echo", data)
            if filtered is None:  # the relay dropped it
                return
            data = filtered
        self.proc.stdin.write((json.dumps({"to": peer_id, "from": self.self_id, "data": data}) + "\n").encode())
        await self.proc.stdin.drain()

    async def _relay_signals(self) -> None:
        if self.proc is None or self.proc.stdout is None:
            raise TransportError("the echo process is not running")
        while line := await self.proc.stdout.readline():
            msg = json.loads(line)
            if "refused" in msg:
                self.refused.put_nowait(str(msg["refused"]))
                continue
            data = msg["data"]
            if self._filter is not None and (data := await self._filter("from_echo", data)) is None:
                continue
            try:
                await self.manager.handle_signal(msg["from"], data)
            except KlusterError as exc:
                log.warning("measure: refused a signal from the echo process: %s", exc)
            except Exception:
                log.exception("measure: bad signal from the echo process")


async def _measure(pings: int, bulk: int, size: int) -> None:
    replies: asyncio.Queue[bytes] = asyncio.Queue()

    async def on_message(peer_id: str, data: bytes) -> None:
        replies.put_nowait(data)

    async with EchoProcess(on_message) as echo:
        send = echo.manager.send
        echo_id = echo.echo_id
        t0 = time.perf_counter()
        await send(echo_id, ECHO)
        await replies.get()
        print(f"first round trip (child start-up, link setup): {(time.perf_counter() - t0) * 1e3:.1f} ms")

        token = ECHO + os.urandom(size - 1)
        for _ in range(50):  # warm-up
            await send(echo_id, token)
            await replies.get()
        rtts = []
        for _ in range(pings):
            t = time.perf_counter()
            await send(echo_id, token)
            await replies.get()
            rtts.append(time.perf_counter() - t)
        q = statistics.quantiles(rtts, n=100)
        print(f"RTT {size} B x {pings}: p50 {q[49] * 1e3:.2f} ms, p99 {q[98] * 1e3:.2f} ms")

        block = os.urandom(1_000_000)
        await send(echo_id, block)  # warm-up
        await replies.get()
        t = time.perf_counter()
        for _ in range(bulk):
            await send(echo_id, block)
        for _ in range(bulk):
            await replies.get()
        dt = time.perf_counter() - t
        print(f"bulk 1 MB x {bulk}: {bulk * len(block) / dt / 1e6:.1f} MB/s")


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n", 1)[0])
    parser.add_argument("--echo", action="store_true", help="run the echo peer (child side)")
    parser.add_argument("--pings", type=int, default=1000, help="round trips to time")
    parser.add_argument("--bulk", type=int, default=30, help="1 MB messages to send")
    parser.add_argument(
        "--size", type=int, default=2304, help="bytes per RTT message (2304: one token's 1152 x fp16 state)"
    )
    args = parser.parse_args(argv)
    logging.basicConfig(level=logging.WARNING, stream=sys.stderr)
    asyncio.run(_run_echo() if args.echo else _measure(args.pings, args.bulk, max(args.size, 1)))


if __name__ == "__main__":
    main()
