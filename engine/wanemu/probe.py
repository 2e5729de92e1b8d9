"""Raw UDP round trips and TCP throughput between two emulated hosts.

Why our own and not ping/iperf: they need not be installed, and these give the baseline a bench
compares the real transport with, and the numbers the harness tests assert on. Each side runs as
``python -m engine.wanemu.probe MODE ...`` inside a host and prints one JSON line; every mode ends by
itself (a count or a deadline), so a broken link can only fail a measurement, never hang it.

  udp-echo PORT SECONDS                   echo datagrams back until SECONDS have passed
  udp-ping HOST PORT COUNT INTERVAL WAIT  COUNT numbered datagrams -> {"rtts_ms": [...], "lost": n}
  tcp-sink PORT SECONDS                   read one connection to EOF -> {"bytes": n, "seconds": s}
  tcp-send HOST PORT BYTES SECONDS        send BYTES -> {"bytes": n, "seconds": s}

Server modes first print ``{"listening": PORT}`` once bound. From the harness, call `udp_ping` and
`tcp_throughput`.
"""

from __future__ import annotations

import json
import select
import socket
import struct
import subprocess
import sys
import time
from dataclasses import dataclass
from typing import Any

from engine.wanemu._sh import WanEmuError
from engine.wanemu.topology import Host

_HDR = struct.Struct("!Id")
_MODULE = [sys.executable, "-m", "engine.wanemu.probe"]
#: How long a probe server may take to start and bind.
START_TIMEOUT_S = 15.0


@dataclass(frozen=True)
class PingResult:
    rtts_ms: list[float]
    lost: int


# -- the harness side ---------------------------------------------------------------------------


def udp_ping(src: Host, dst: Host, count: int, interval: float, *, wait: float = 1.0, port: int = 9000) -> PingResult:
    """Round trips of ``count`` datagrams, ``interval`` s apart, from ``src`` to an echo in ``dst``.

    A reply later than ``wait`` s after the last send counts as lost.
    """
    server = _start_server(dst, "udp-echo", port, count * interval + wait + 10.0)
    try:
        out = _run_client(src, ["udp-ping", dst.ip, str(port), str(count), str(interval), str(wait)])
    finally:
        server.kill()
        server.communicate(timeout=5.0)
    return PingResult(rtts_ms=[float(r) for r in out["rtts_ms"]], lost=int(out["lost"]))


def tcp_throughput(src: Host, dst: Host, nbytes: int, *, seconds: float = 20.0, port: int = 9001) -> float:
    """MB/s of one TCP transfer of ``nbytes`` from ``src`` to ``dst``, timed at the receiver."""
    sink = _start_server(dst, "tcp-sink", port, seconds + 5.0)
    try:
        sent = _run_client(src, ["tcp-send", dst.ip, str(port), str(nbytes), str(seconds)], timeout=seconds + 10.0)
        out, _ = sink.communicate(timeout=10.0)
    finally:
        sink.kill()
    got = json.loads(out)
    if got["bytes"] != sent["bytes"] or got["seconds"] <= 0:
        raise WanEmuError(f"transfer incomplete: sent {sent}, received {got}")
    return float(got["bytes"]) / float(got["seconds"]) / 1e6


def _start_server(host: Host, mode: str, port: int, seconds: float) -> subprocess.Popen[str]:
    proc = host.popen([*_MODULE, mode, str(port), str(seconds)], stdout=subprocess.PIPE, text=True)
    if proc.stdout is None or not select.select([proc.stdout], [], [], START_TIMEOUT_S)[0]:
        proc.kill()
        raise WanEmuError(f"probe {mode} in {host.name} did not start")
    line = proc.stdout.readline()
    if not line or json.loads(line) != {"listening": port}:
        proc.kill()
        raise WanEmuError(f"probe {mode} in {host.name} said {line!r}")
    return proc


def _run_client(host: Host, args: list[str], timeout: float = 60.0) -> dict[str, Any]:
    done = host.run([*_MODULE, *args], timeout=timeout, capture_output=True, text=True)
    if done.returncode != 0:
        raise WanEmuError(f"probe {args[0]} in {host.name} failed: {done.stderr.strip()}")
    result: dict[str, Any] = json.loads(done.stdout)
    return result


# -- the side that runs inside a host -----------------------------------------------------------


def _say_listening(port: int) -> None:
    sys.stdout.write(json.dumps({"listening": port}) + "\n")
    sys.stdout.flush()


def _readable(sock: socket.socket, timeout: float) -> bool:
    return bool(select.select([sock], [], [], timeout)[0])


def _udp_echo(port: int, seconds: float) -> dict[str, Any]:
    sock = socket.socket(socket.AF_INET, socket.SOCK_DGRAM)
    sock.bind(("0.0.0.0", port))
    _say_listening(port)
    deadline = time.monotonic() + seconds
    echoed = 0
    while (left := deadline - time.monotonic()) > 0:
        if _readable(sock, left):
            data, addr = sock.recvfrom(2048)
            sock.sendto(data, addr)
            echoed += 1
    return {"echoed": echoed}


def _udp_ping(host: str, port: int, count: int, interval: float, wait: float) -> dict[str, Any]:
    sock = socket.socket(socket.AF_INET, socket.SOCK_DGRAM)
    sock.setblocking(False)
    rtts: dict[int, float] = {}

    def drain() -> None:
        while True:
            try:
                data = sock.recv(2048)
            except BlockingIOError:
                return
            seq, t_sent = _HDR.unpack_from(data)
            rtts.setdefault(seq, (time.monotonic() - t_sent) * 1000.0)

    for seq in range(count):
        now = time.monotonic()
        sock.sendto(_HDR.pack(seq, now) + b"x" * 64, (host, port))
        end = now + interval
        while (left := end - time.monotonic()) > 0:
            if _readable(sock, left):
                drain()
    deadline = time.monotonic() + wait
    while len(rtts) < count and (left := deadline - time.monotonic()) > 0:
        if _readable(sock, left):
            drain()
    return {"rtts_ms": [rtts[s] for s in sorted(rtts)], "lost": count - len(rtts)}


def _tcp_sink(port: int, seconds: float) -> dict[str, Any]:
    srv = socket.socket(socket.AF_INET, socket.SOCK_STREAM)
    srv.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
    srv.bind(("0.0.0.0", port))
    srv.listen(1)
    _say_listening(port)
    srv.settimeout(seconds)
    conn, _ = srv.accept()
    deadline = time.monotonic() + seconds
    total, start = 0, 0.0
    while (left := deadline - time.monotonic()) > 0:
        conn.settimeout(left)
        try:
            chunk = conn.recv(1 << 16)
        except TimeoutError:
            break
        if not chunk:
            break
        if not total:
            start = time.monotonic()
        total += len(chunk)
    conn.close()
    return {"bytes": total, "seconds": time.monotonic() - start if total else 0.0}


def _tcp_send(host: str, port: int, nbytes: int, seconds: float) -> dict[str, Any]:
    sock = socket.create_connection((host, port), timeout=seconds)
    block = b"\0" * (1 << 16)
    start = time.monotonic()
    sent = 0
    while sent < nbytes and time.monotonic() - start < seconds:
        sent += sock.send(block[: min(len(block), nbytes - sent)])
    sock.shutdown(socket.SHUT_WR)
    sock.settimeout(seconds)
    sock.recv(1)  # returns once the sink has read everything and closed
    return {"bytes": sent, "seconds": time.monotonic() - start}


def main(argv: list[str]) -> int:
    mode, args = argv[0], argv[1:]
    if mode == "udp-echo":
        result = _udp_echo(int(args[0]), float(args[1]))
    elif mode == "udp-ping":
        result = _udp_ping(args[0], int(args[1]), int(args[2]), float(args[3]), float(args[4]))
    elif mode == "tcp-sink":
        result = _tcp_sink(int(args[0]), float(args[1]))
    elif mode == "tcp-send":
        result = _tcp_send(args[0], int(args[1]), int(args[2]), float(args[3]))
    else:
        raise SystemExit(f"unknown probe mode {mode!r}")
    sys.stdout.write(json.dumps(result) + "\n")
    return 0


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
