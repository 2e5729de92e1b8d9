"""A PeerManager in a child process, driven over its stdin/stdout: the two ends of a transport bench.

Why a child process per end: a WAN-emulated host is a network namespace, and only a process
started inside it can use its address; on loopback, two processes are what a real deployment
has (one aiortc event loop per machine). Why JSON lines on pipes: the parent relays signaling
between the two children (standing in for the coordinator) and collects their results, with no
socket of its own in either namespace.

Child: ``python -m engine.transport.probe_peer --name a`` (``KLUSTER_SCTP=stock`` in its
environment: untouched aiortc). Every peer answers messages: ``E...`` comes back as ``R...``,
``H...`` is answered with ``D`` + its sha256, anything else with ``A`` + its length. Requests on
stdin, one JSON object a line, each with an ``id``:

* ``{"op": "signal", "from": peer, "data": {...}}``: relayed signaling (no reply);
* ``{"op": "rtt", "peer": p, "count": n, "size": s}``: ``n`` echo round trips of ``s`` bytes, one
  at a time (a token's hidden state waits for the previous token), reply ``{"rtts_ms": [...]}``;
* ``{"op": "burst", "peer": p, "count": n, "sizes": [...]}``: ``n`` hashed messages back to back,
  reply how many came back intact and in order;
* ``{"op": "bulk", "peer": p, "seconds": t, "warmup": w, "size": s}``: send ``s``-byte messages
  back to back for ``w + t`` seconds, reply the MB/s acknowledged during the last ``t`` seconds and
  this process's CPU seconds over them, then close the link (the queue left behind is dropped);
* ``{"op": "cpu"}``: reply this process's user+system CPU seconds and message bytes received so far;
* ``{"op": "stats", "peer": p}``: reply the SCTP counters of the links to ``p``;
* ``{"op": "ice", "servers": [{urls, username?, credential?}, ...]}``: STUN/TURN servers for links
  opened from now on (as the coordinator's ``welcome`` hands them out), reply ``{}``;
* ``{"op": "path", "peer": p}``: reply the ICE pair the link to ``p`` uses (``local_type``,
  ``remote_type``, ``local``, ``remote``; ``relayed``), or ``{"path": null}``.

Replies and signals go to stdout as ``{"op": "reply", "id": ..., ...}`` and
``{"op": "signal", "to": peer, "data": {...}}``, after a first line ``{"op": "hello", "peer_id": id}``:
each child makes a fresh identity key and its peer id is derived from it, like every peer's.
:class:`ProbePeer` is the parent's handle; ``stock=True`` starts the child on untouched aiortc, so
one bench run can compare both.
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import dataclasses
import hashlib
import json
import logging
import os
import struct
import sys
import time
from collections.abc import Sequence
from types import TracebackType
from typing import Any

from engine.errors import KlusterError, TransportError
from engine.transport.measure import child_env, stop_child
from engine.transport.sctp_tuning import MODE_ENV

log = logging.getLogger(__name__)

#: How long one request may take before the parent gives up on the child.
REQUEST_TIMEOUT_S = 120.0


def _cpu_seconds() -> float:
    t = os.times()
    return t.user + t.system


#: First byte of a request: E = echo it back (as R...), H = reply its sha256 (as D...), anything
#: else = reply its length (as A + u64). Replies are never answered.
ECHO, HASH = b"E", b"H"
REPLIES = (b"R", b"D", b"A")


class _Prober:
    """The child's side: one PeerManager, replies to requests, and the measurements it is asked for."""

    def __init__(self, name: str, connect_timeout: float = 30.0) -> None:
        from engine.transport.identity import Identity
        from engine.transport.peer import PeerManager

        self.name = name
        self._replies: dict[str, asyncio.Queue[bytes]] = {}
        identity = Identity.ephemeral()
        self.manager = PeerManager(
            identity.peer_id("probe"),
            self._send_signal,
            self._on_message,
            identity=identity,
            connect_timeout=connect_timeout,
        )
        self._out = sys.stdout
        self.rx_bytes = 0

    def _write(self, obj: dict[str, Any]) -> None:
        self._out.write(json.dumps(obj) + "\n")
        self._out.flush()

    async def _send_signal(self, peer_id: str, data: dict[str, Any]) -> None:
        self._write({"op": "signal", "to": peer_id, "data": data})

    async def _on_message(self, peer_id: str, data: bytes) -> None:
        self.rx_bytes += len(data)
        kind = data[:1]
        if kind in REPLIES:
            self._queue(peer_id).put_nowait(data)
        elif kind == ECHO:
            await self.manager.send(peer_id, b"R" + data[1:])
        elif kind == HASH:
            await self.manager.send(peer_id, b"D" + hashlib.sha256(memoryview(data)[1:]).digest())
        else:
            await self.manager.send(peer_id, b"A" + struct.pack("!Q", len(data)))

    def _queue(self, peer_id: str) -> asyncio.Queue[bytes]:
        return self._replies.setdefault(peer_id, asyncio.Queue())

    async def rtt(self, peer: str, count: int, size: int) -> dict[str, Any]:
        replies = self._queue(peer)
        body = os.urandom(max(size, 9) - 9)
        rtts = []
        for i in range(-1, count):  # the first round trip opens the link; not counted
            tag = struct.pack("!q", i)
            t0 = time.perf_counter()
            await self.manager.send(peer, ECHO + tag + body)
            got = await replies.get()
            if got != b"R" + tag + body:
                raise TransportError(f"echo {i} came back wrong ({len(got)} bytes)")
            if i >= 0:
                rtts.append((time.perf_counter() - t0) * 1e3)
        return {"rtts_ms": rtts}

    async def burst(self, peer: str, count: int, sizes: list[int]) -> dict[str, Any]:
        """``count`` messages back to back (sizes cycling through ``sizes``), each answered with
        its sha256: checks integrity and order with many messages in flight."""
        replies = self._queue(peer)
        digests = []
        t0 = time.perf_counter()
        for i in range(count):
            payload = struct.pack("!I", i) + os.urandom(max(sizes[i % len(sizes)], 4) - 4)
            digests.append(hashlib.sha256(payload).digest())
            await self.manager.send(peer, HASH + payload)
        ok = 0
        for i in range(count):
            if await replies.get() == b"D" + digests[i]:
                ok += 1
        return {"sent": count, "intact_in_order": ok, "seconds": time.perf_counter() - t0}

    async def bulk(self, peer: str, seconds: float, warmup: float, size: int) -> dict[str, Any]:
        replies = self._queue(peer)
        await self.rtt(peer, 0, 16)  # open the link first
        block = b"B" + os.urandom(max(size, 2) - 1)
        start = time.monotonic()
        t_from, t_to = start + warmup, start + warmup + seconds
        marks: dict[str, float] = {}
        acked = 0

        async def count_acks() -> None:
            nonlocal acked
            while True:
                got = await replies.get()
                now = time.monotonic()
                if now >= t_to:
                    return
                if got[:1] == b"A" and now >= t_from:
                    if "cpu0" not in marks:
                        marks["cpu0"], marks["t0"] = _cpu_seconds(), now
                    acked += struct.unpack("!Q", got[1:9])[0]

        counter = asyncio.get_running_loop().create_task(count_acks())
        try:
            while time.monotonic() < t_to and not counter.done():
                await asyncio.wait_for(self.manager.send(peer, block), timeout=max(t_to - time.monotonic(), 0.01))
        except TimeoutError:
            pass
        with contextlib.suppress(TimeoutError):
            await asyncio.wait_for(asyncio.shield(counter), timeout=max(t_to - time.monotonic(), 0) + 0.5)
        counter.cancel()
        cpu = _cpu_seconds() - marks.get("cpu0", _cpu_seconds())
        sctp = self.manager.transport_stats(peer)
        await self.manager.close_peer(peer, "bulk run over")  # drops what is still queued
        while not replies.empty():
            replies.get_nowait()
        return {"MBps": acked / 1e6 / seconds, "cpu_s": cpu, "bytes": acked, "sctp": sctp}

    async def handle(self, req: dict[str, Any]) -> None:
        op, rid = req.get("op"), req.get("id")
        try:
            if op == "signal":
                try:
                    await self.manager.handle_signal(req["from"], req["data"])
                except KlusterError as exc:  # refused (e.g. the identity check): no answer, no traceback
                    log.warning("probe %s: refused a signal from %s: %s", self.name, req.get("from"), exc)
                return
            if op == "rtt":
                result = await self.rtt(req["peer"], int(req["count"]), int(req["size"]))
            elif op == "burst":
                result = await self.burst(req["peer"], int(req["count"]), [int(x) for x in req["sizes"]])
            elif op == "bulk":
                result = await self.bulk(req["peer"], float(req["seconds"]), float(req["warmup"]), int(req["size"]))
            elif op == "cpu":
                result = {"cpu_s": _cpu_seconds(), "rx_bytes": self.rx_bytes}
            elif op == "stats":
                result = {"sctp": self.manager.transport_stats(req["peer"])}
            elif op == "ice":
                from engine.transport.signaling import ice_servers_from

                self.manager.set_ice_servers(ice_servers_from(req["servers"]))
                result = {}
            elif op == "path":
                path = self.manager.ice_path(req["peer"])
                result = {"path": None if path is None else {**dataclasses.asdict(path), "relayed": path.relayed}}
            else:
                result = {"error": f"unknown op {op!r}"}
        except Exception as exc:
            log.exception("probe %s: %s failed", self.name, op)
            result = {"error": f"{type(exc).__name__}: {exc}"}
        self._write({"op": "reply", "id": rid, **result})

    async def serve(self) -> None:
        self._write({"op": "hello", "peer_id": self.manager.self_id})
        loop = asyncio.get_running_loop()
        reader = asyncio.StreamReader(limit=16 * 1024 * 1024)
        await loop.connect_read_pipe(lambda: asyncio.StreamReaderProtocol(reader), sys.stdin)
        tasks: set[asyncio.Task[None]] = set()
        try:
            while line := await reader.readline():
                req = json.loads(line)
                if req.get("op") == "signal":
                    await self.handle(req)  # in order: an offer before its answer
                    continue
                task = loop.create_task(self.handle(req))
                tasks.add(task)
                task.add_done_callback(tasks.discard)
        finally:
            for task in tasks:
                task.cancel()
            await asyncio.gather(*tasks, return_exceptions=True)
            await self.manager.shutdown()


def _child_env(stock: bool) -> dict[str, str]:
    env = child_env()
    if stock:
        env[MODE_ENV] = "stock"
    else:
        env.pop(MODE_ENV, None)
    return env


class ProbePeer:
    """Parent-side handle of one child prober: start it, send it requests, read its replies.

    ``prefix`` is prepended to the child's command line (e.g. a WAN host's ``ip netns exec``);
    ``stock`` runs it on untouched aiortc. Pair two with :func:`relay` before asking for links.
    ``name`` is a label; the child's peer id (``peer_id``) is derived from its own key.
    """

    def __init__(
        self, name: str, *, prefix: Sequence[str] = (), stock: bool = False, connect_timeout: float = 30.0
    ) -> None:
        self.name = name
        self.stock = stock
        self.connect_timeout = connect_timeout
        self._prefix = list(prefix)
        self.proc: asyncio.subprocess.Process | None = None
        self._pending: dict[int, asyncio.Future[dict[str, Any]]] = {}
        self._next_id = 0
        self._reader: asyncio.Task[None] | None = None
        self.peer: ProbePeer | None = None
        #: the child's peer id, from its first line
        self.peer_id = ""
        self._hello: asyncio.Future[str] | None = None

    async def __aenter__(self) -> ProbePeer:
        argv = [*self._prefix, sys.executable, "-m", "engine.transport.probe_peer", "--name", self.name]
        argv += ["--connect-timeout", str(self.connect_timeout)]
        self.proc = await asyncio.create_subprocess_exec(
            *argv,
            stdin=asyncio.subprocess.PIPE,
            stdout=asyncio.subprocess.PIPE,
            env=_child_env(self.stock),
            limit=16 * 1024 * 1024,
        )
        self._hello = asyncio.get_running_loop().create_future()
        self._reader = asyncio.get_running_loop().create_task(self._read(), name=f"probe-{self.name}")
        try:
            self.peer_id = await asyncio.wait_for(asyncio.shield(self._hello), REQUEST_TIMEOUT_S)
        except BaseException:
            await stop_child(self.proc, self._reader)
            raise
        return self

    async def __aexit__(
        self, exc_type: type[BaseException] | None, exc: BaseException | None, tb: TracebackType | None
    ) -> None:
        await stop_child(self.proc, self._reader)
        for fut in self._pending.values():
            if not fut.done():
                fut.set_exception(TransportError(f"probe {self.name} exited"))

    def _write(self, obj: dict[str, Any]) -> None:
        if self.proc is None or self.proc.stdin is None:
            raise TransportError(f"probe {self.name} is not running")
        self.proc.stdin.write((json.dumps(obj) + "\n").encode())

    async def request(self, op: str, timeout: float = REQUEST_TIMEOUT_S, **fields: Any) -> dict[str, Any]:
        """Send one request and wait for its reply; a reply carrying ``error`` raises TransportError.

        A ``peer`` field naming the paired probe by its label is sent as that probe's peer id.
        """
        if self.peer is not None and fields.get("peer") == self.peer.name:
            fields["peer"] = self.peer.peer_id
        self._next_id += 1
        rid = self._next_id
        fut: asyncio.Future[dict[str, Any]] = asyncio.get_running_loop().create_future()
        self._pending[rid] = fut
        self._write({"op": op, "id": rid, **fields})
        try:
            reply = await asyncio.wait_for(fut, timeout)
        finally:
            self._pending.pop(rid, None)
        if "error" in reply:
            raise TransportError(f"probe {self.name}: {op} failed: {reply['error']}")
        return reply

    async def _read(self) -> None:
        if self.proc is None or self.proc.stdout is None:
            return
        while line := await self.proc.stdout.readline():
            try:
                msg = json.loads(line)
            except ValueError:
                log.warning("probe %s wrote a non-JSON line: %r", self.name, line[:200])
                continue
            if msg.get("op") == "hello" and self._hello is not None and not self._hello.done():
                self._hello.set_result(str(msg.get("peer_id")))
            elif msg.get("op") == "signal":
                if self.peer is not None and msg.get("to") == self.peer.peer_id:
                    try:
                        self.peer._write({"op": "signal", "from": self.peer_id, "data": msg["data"]})
                    except TransportError:
                        log.warning("probe %s: its peer %s is gone; signal dropped", self.name, self.peer.name)
            elif msg.get("op") == "reply":
                fut = self._pending.get(msg.get("id"))
                if fut is not None and not fut.done():
                    fut.set_result(msg)
        for fut in self._pending.values():
            if not fut.done():
                fut.set_exception(TransportError(f"probe {self.name} exited"))
        if self._hello is not None and not self._hello.done():
            self._hello.set_exception(TransportError(f"probe {self.name} exited before naming its peer id"))


def relay(a: ProbePeer, b: ProbePeer) -> None:
    """Make each of the two probes deliver the other's signals (the coordinator's job)."""
    a.peer, b.peer = b, a


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n", 1)[0])
    parser.add_argument("--name", required=True, help="this peer's label in logs (its id comes from its key)")
    parser.add_argument("--connect-timeout", type=float, default=30.0, help="seconds a link may take to open")
    args = parser.parse_args(argv)
    logging.basicConfig(level=os.environ.get("KLUSTER_LOGLEVEL", "WARNING"), stream=sys.stderr)
    from engine import aio

    aio.run(_Prober(args.name, args.connect_timeout).serve())


if __name__ == "__main__":
    main()
