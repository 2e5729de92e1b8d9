"""Hosts in network namespaces on one bridge, with per-host delay, loss, rate and partitions.

Layout: a router namespace holds a bridge ``br0``; each host namespace has one veth ``eth0`` on it
with address ``10.<subnet>.0.<i>/24`` (``<subnet>`` unique among live topologies) and nothing else,
so processes in the hosts can reach only each other. Shaping applies to traffic *sent by* a host:

* delay and loss: the router's FORWARD chain sends the host's packets to an NFQUEUE (one number
  per host) served by a `delayer` process in the router namespace (this kernel has no netem);
* rate: a tbf qdisc on the host's ``eth0``, so the sender's TCP sees ordinary queue back-pressure;
* partition: DROP rules in the router for everything to or from the host.
* block: DROP rules in the router for everything between two hosts (each still reaches the rest).

A one-way trip from A to B therefore takes A's delay; a round trip takes A's plus B's.
IPv6 is off in the hosts: iptables only sees IPv4, and an IPv6 path would bypass the shaping.

The methods block for milliseconds (they run `ip`/`tc`/`iptables`); from async code that is fine,
or use ``async with`` to run set-up and tear-down in a thread.
"""

from __future__ import annotations

import contextlib
import fcntl
import logging
import os
import subprocess
import tempfile
import threading
from collections.abc import Iterator, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from types import TracebackType
from typing import Any, Self

from engine.wanemu._sh import WanEmuError, in_netns, run
from engine.wanemu.cleanup import (
    DEFAULT_PREFIX,
    KILL_GRACE_S,
    cleanup_leftovers,
    delete_namespaces,
    list_namespaces,
    namespace_name,
    start_reaper,
    used_subnets,
)
from engine.wanemu.link import DelayerProcess, LinkShape

log = logging.getLogger(__name__)

#: Subnet numbers X of 10.X.0.0/24 handed out to topologies.
SUBNETS = range(100, 255)
#: Queue of a tbf-shaped link, in milliseconds at its rate: about a WAN router's buffer, and
#: above the bandwidth-delay product of the links we emulate (50 Mbit x 80 ms).
TBF_LATENCY_MS = 200


@dataclass
class Host:
    """One emulated machine: a namespace with one address. Start processes in it with `popen`."""

    name: str
    index: int
    netns: str
    ip: str
    queue: int
    _procs: list[subprocess.Popen[Any]] = field(default_factory=list, repr=False)

    def exec_args(self, argv: Sequence[str]) -> list[str]:
        """``argv`` prefixed so that it runs inside this host's namespace."""
        return in_netns(self.netns, argv)

    def popen(self, argv: Sequence[str], **kwargs: Any) -> subprocess.Popen[Any]:
        """Start ``argv`` in this host; the topology stops it on exit if it is still running."""
        proc: subprocess.Popen[Any] = subprocess.Popen(self.exec_args(argv), **kwargs)
        self._procs.append(proc)
        return proc

    def run(self, argv: Sequence[str], *, timeout: float, **kwargs: Any) -> subprocess.CompletedProcess[Any]:
        """Run ``argv`` to completion in this host (``timeout`` is required: runs must be bounded)."""
        return subprocess.run(self.exec_args(argv), timeout=timeout, check=False, **kwargs)


class Topology:
    """A set of hosts on one emulated switch; a context manager that always removes what it made.

    ``hosts`` is a count (names ``h1``, ``h2``, ...) or a list of names. ``seed`` fixes the loss
    draws (host i's delayer uses ``seed + i``).
    """

    def __init__(self, hosts: int | Sequence[str] = 2, *, prefix: str = DEFAULT_PREFIX, seed: int = 0) -> None:
        names = [f"h{i}" for i in range(1, hosts + 1)] if isinstance(hosts, int) else list(hosts)
        if not 1 <= len(names) <= 250 or len(set(names)) != len(names):
            raise ValueError(f"need 1 to 250 distinct host names, got {names}")
        self._names = names
        self.prefix = prefix
        self.seed = seed
        self.subnet = -1
        self.router_netns = ""
        self._hosts: dict[str, Host] = {}
        self._links: dict[str, LinkShape] = {}
        self._delayers: dict[str, DelayerProcess] = {}
        self._queued: set[str] = set()
        self._partitioned: set[str] = set()
        self._blocked: set[tuple[str, str]] = set()
        self._reaper: subprocess.Popen[bytes] | None = None
        self._started = False
        # Shaping calls may come from several threads (a timer that heals a partition, say);
        # each one is a few iptables/tc runs and a delayer round trip that must not interleave.
        self._lock = threading.RLock()

    # -- lifecycle ------------------------------------------------------------------------------

    def start(self) -> Self:
        """Create the namespaces, bridge and veths; on any failure remove what was made."""
        if self._started:
            raise WanEmuError("topology already started")
        self._started = True
        cleanup_leftovers(self.prefix)
        try:
            with _subnet_lock():
                self.subnet = _free_subnet(self.prefix)
                self.router_netns = namespace_name(self.prefix, self.subnet, os.getpid(), "r")
                run(["ip", "netns", "add", self.router_netns])
            names = [self.router_netns] + [
                namespace_name(self.prefix, self.subnet, os.getpid(), f"h{i}") for i in range(1, len(self._names) + 1)
            ]
            self._reaper = start_reaper(names)
            self._setup_router()
            for i, name in enumerate(self._names, start=1):
                self._hosts[name] = self._setup_host(name, i, names[i])
        except BaseException:
            self.close()
            raise
        log.info("WAN topology %s up: %s", self.router_netns, {h.name: h.ip for h in self._hosts.values()})
        return self

    def close(self) -> None:
        """Stop processes started in the hosts, the delayers, and delete every namespace.

        Safe to call twice and after a failed `start`; each step runs even if an earlier one fails.
        """
        with self._lock:
            self._close()

    def _close(self) -> None:
        for host in self._hosts.values():
            _stop_all(host._procs)
        for delayer in self._delayers.values():
            with _logged("stopping delayer"):
                delayer.stop()
        self._delayers.clear()
        if self.router_netns:
            mine = [n for n in list_namespaces() if n.startswith(self.router_netns[: -len("r")])]
            with _logged("deleting namespaces"):
                delete_namespaces(mine)
        if self._reaper is not None:
            with _logged("stopping reaper"):
                if self._reaper.stdin is not None:
                    self._reaper.stdin.close()
                self._reaper.wait(timeout=10.0)
            self._reaper = None
        self._hosts.clear()

    def __enter__(self) -> Self:
        return self.start()

    def __exit__(
        self, exc_type: type[BaseException] | None, exc: BaseException | None, tb: TracebackType | None
    ) -> None:
        self.close()

    async def __aenter__(self) -> Self:
        import asyncio

        return await asyncio.to_thread(self.start)

    async def __aexit__(
        self, exc_type: type[BaseException] | None, exc: BaseException | None, tb: TracebackType | None
    ) -> None:
        import asyncio

        await asyncio.to_thread(self.close)

    # -- hosts ----------------------------------------------------------------------------------

    def host(self, name: str) -> Host:
        try:
            return self._hosts[name]
        except KeyError:
            raise KeyError(f"no host {name!r} in this topology (have {list(self._hosts)})") from None

    @property
    def hosts(self) -> list[Host]:
        return list(self._hosts.values())

    @property
    def namespaces(self) -> list[str]:
        """Every namespace this topology made (router first)."""
        return [self.router_netns] + [h.netns for h in self._hosts.values()] if self.router_netns else []

    # -- shaping --------------------------------------------------------------------------------

    def set_link(
        self, host: str, *, delay_ms: float = 0.0, loss: float = 0.0, rate_mbit: float | None = None
    ) -> LinkShape:
        """Make packets sent by ``host`` take exactly this shape (unset parts go back to none).

        Takes effect for packets sent after it returns; may be called any time.
        """
        shape = LinkShape(delay_ms=delay_ms, loss=loss, rate_mbit=rate_mbit)
        with self._lock:
            self._apply(self.host(host), shape)
        return shape

    def link(self, host: str) -> LinkShape:
        """The shape last set for ``host`` (no shaping if never set)."""
        self.host(host)
        return self._links.get(host, LinkShape())

    def delayer_stats(self, host: str) -> tuple[int, int]:
        """(accepted, dropped) packets from ``host`` seen by its delayer; (0, 0) if it has none."""
        with self._lock:
            delayer = self._delayers.get(self.host(host).name)
            return delayer.stats() if delayer is not None else (0, 0)

    def partition(self, host: str) -> None:
        """Drop every packet to or from ``host`` at the switch until `heal`."""
        h = self.host(host)
        with self._lock:
            if host in self._partitioned:
                return
            for flag in ("-s", "-d"):
                run(self._router(["iptables", "-I", "FORWARD", "1", flag, h.ip, "-j", "DROP"]))
            self._partitioned.add(host)

    def heal(self, host: str) -> None:
        """Undo `partition` (packets dropped meanwhile stay lost)."""
        h = self.host(host)
        with self._lock:
            if host not in self._partitioned:
                return
            for flag in ("-s", "-d"):
                run(self._router(["iptables", "-D", "FORWARD", flag, h.ip, "-j", "DROP"]))
            self._partitioned.discard(host)

    def is_partitioned(self, host: str) -> bool:
        self.host(host)
        return host in self._partitioned

    def block(self, a: str, b: str) -> None:
        """Drop every packet between hosts ``a`` and ``b`` (both ways) at the switch until `unblock`.

        Unlike `partition`, both still reach every other host: a firewall or NAT pair that cannot
        talk directly but shares a relay (TURN) and the coordinator.
        """
        ha, hb = self.host(a), self.host(b)
        with self._lock:
            if (a, b) in self._blocked:
                return
            for src, dst in ((ha, hb), (hb, ha)):
                run(self._router(["iptables", "-I", "FORWARD", "1", "-s", src.ip, "-d", dst.ip, "-j", "DROP"]))
            self._blocked.update({(a, b), (b, a)})

    def unblock(self, a: str, b: str) -> None:
        """Undo `block` (packets dropped meanwhile stay lost)."""
        ha, hb = self.host(a), self.host(b)
        with self._lock:
            if (a, b) not in self._blocked:
                return
            for src, dst in ((ha, hb), (hb, ha)):
                run(self._router(["iptables", "-D", "FORWARD", "-s", src.ip, "-d", dst.ip, "-j", "DROP"]))
            self._blocked.difference_update({(a, b), (b, a)})

    def blocked_packets(self, a: str, b: str) -> int:
        """Packets from ``a`` to ``b`` dropped by `block` so far (0 if the pair is not blocked)."""
        src, dst = self.host(a).ip, self.host(b).ip
        with self._lock:
            if (a, b) not in self._blocked:
                return 0
            table = run(self._router(["iptables", "-L", "FORWARD", "-n", "-v", "-x"]))
        for line in table.splitlines():
            cols = line.split()
            # pkts bytes target prot opt in out source destination
            if len(cols) >= 9 and cols[2] == "DROP" and cols[7] == src and cols[8] == dst:
                return int(cols[0])
        return 0

    # -- internals ------------------------------------------------------------------------------

    def _apply(self, h: Host, shape: LinkShape) -> None:
        host = h.name
        old = self._links.get(host, LinkShape())
        if shape.needs_queue or host in self._delayers:
            self._configure_delayer(h, shape)
        if shape.needs_queue and host not in self._queued:
            run(self._router(["iptables", "-A", "FORWARD", "-s", h.ip, "-j", "NFQUEUE", "--queue-num", str(h.queue)]))
            self._queued.add(host)
        elif not shape.needs_queue and host in self._queued:
            # A plain link bypasses user space entirely; the idle delayer stays for a quick re-enable.
            run(self._router(["iptables", "-D", "FORWARD", "-s", h.ip, "-j", "NFQUEUE", "--queue-num", str(h.queue)]))
            self._queued.discard(host)
        if shape.rate_mbit != old.rate_mbit:
            self._set_rate(h, shape.rate_mbit)
        self._links[host] = shape

    def _router(self, argv: Sequence[str]) -> list[str]:
        return in_netns(self.router_netns, argv)

    def _setup_router(self) -> None:
        r = self.router_netns
        run(["ip", "-n", r, "link", "set", "lo", "up"])
        run(["ip", "-n", r, "link", "add", "br0", "type", "bridge"])
        run(["ip", "-n", r, "link", "set", "br0", "up"])
        # Bridged frames skip iptables unless this is on (it is per namespace).
        run(self._router(["sysctl", "-q", "-w", "net.bridge.bridge-nf-call-iptables=1"]))

    def _setup_host(self, name: str, index: int, netns: str) -> Host:
        host = Host(name=name, index=index, netns=netns, ip=f"10.{self.subnet}.0.{index}", queue=index)
        run(["ip", "netns", "add", netns])
        run(in_netns(netns, ["sysctl", "-q", "-w", "net.ipv6.conf.all.disable_ipv6=1"]))
        run(in_netns(netns, ["sysctl", "-q", "-w", "net.ipv6.conf.default.disable_ipv6=1"]))
        port, r = f"v{index}", self.router_netns
        run(["ip", "-n", r, "link", "add", port, "type", "veth", "peer", "name", "eth0", "netns", netns])
        run(["ip", "-n", r, "link", "set", port, "master", "br0", "up"])
        run(["ip", "-n", netns, "addr", "add", f"{host.ip}/24", "dev", "eth0"])
        run(["ip", "-n", netns, "link", "set", "eth0", "up"])
        run(["ip", "-n", netns, "link", "set", "lo", "up"])
        return host

    def _configure_delayer(self, host: Host, shape: LinkShape) -> None:
        delayer = self._delayers.get(host.name)
        if delayer is None:
            self._delayers[host.name] = DelayerProcess(self.router_netns, host.queue, shape, self.seed + host.index)
        else:
            delayer.configure(shape)

    def _set_rate(self, host: Host, rate_mbit: float | None) -> None:
        if rate_mbit is None:
            run(["tc", "-n", host.netns, "qdisc", "del", "dev", "eth0", "root"], check=False)
            return
        rate_bytes = rate_mbit * 1e6 / 8
        # A bucket of ~4 ms at rate (at least 4 full frames): small bursts, yet enough tokens
        # per timer tick to reach the rate.
        burst = max(int(rate_bytes * 0.004), 4 * 1514)
        run([
            "tc", "-n", host.netns, "qdisc", "replace", "dev", "eth0", "root", "tbf",
            "rate", f"{rate_mbit}mbit", "burst", str(burst), "latency", f"{TBF_LATENCY_MS}ms",
        ])  # fmt: skip


def _free_subnet(prefix: str) -> int:
    taken = used_subnets(prefix)
    for subnet in SUBNETS:
        if subnet not in taken:
            return subnet
    raise WanEmuError(f"all {len(SUBNETS)} WAN-emulation subnets are in use")


@contextlib.contextmanager
def _subnet_lock() -> Iterator[None]:
    """Serialise subnet choice between harnesses started at the same moment."""
    path = Path(tempfile.gettempdir()) / "kluster-wanemu.lock"
    with open(path, "a") as fh:
        fcntl.flock(fh, fcntl.LOCK_EX)
        try:
            yield
        finally:
            fcntl.flock(fh, fcntl.LOCK_UN)


def _stop_all(procs: list[subprocess.Popen[Any]]) -> None:
    live = [p for p in procs if p.poll() is None]
    for proc in live:
        proc.terminate()
    for proc in live:
        try:
            proc.wait(timeout=KILL_GRACE_S)
        except subprocess.TimeoutExpired:
            proc.kill()
            with _logged("reaping a killed process"):
                proc.wait(timeout=KILL_GRACE_S)
    procs.clear()


@contextlib.contextmanager
def _logged(what: str) -> Iterator[None]:
    """Log and swallow a failure of one cleanup step, so the remaining steps still run."""
    try:
        yield
    except Exception:
        log.exception("WAN harness cleanup: %s failed", what)
