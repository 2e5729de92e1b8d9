"""``kluster bench coordinator``: N node WebSockets registering and heartbeating against one coordinator.

Targets (issue 6): 1,000 sockets registering at once on loopback with p99 registration < 500 ms,
bounded coordinator memory, and dead sockets closed within 2 heartbeats.

1. A real ``kluster coordinator`` process starts (the default pack, auth on, one supplier account
   per socket; the per-IP limit is raised since every socket comes from 127.0.0.1).
2. N sockets register at once, each as a node does: exchange its account token for a session,
   open the WebSocket, sign the challenge with its own ed25519 key, send the hello, wait for the
   welcome. Registration time runs from the exchange to the welcome.
3. All heartbeat for ``--hold`` seconds (a ping each second, pongs to the coordinator's pings)
   while the coordinator's RSS and CPU time are read from /proc.
4. ``--kill`` sockets fall silent: they send nothing and answer no ping, with the TCP connection
   left open (a dead peer as the coordinator sees one). Each is timed from the last frame it sent
   to the coordinator closing it, and ``/v1/health`` must count the others only.

The bench process is the load generator as well, so on a small machine both share the CPUs and
the figures are an upper bound of what the coordinator alone would show.
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import json
import os
import random
import resource
import secrets
import sys
import tempfile
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING, Any

from engine import aio
from engine.errors import ConfigError, KlusterError

if TYPE_CHECKING:
    from engine.transport.identity import Identity

HEARTBEAT_S = 1.0  # the coordinator's default (CoordinatorConfig.heartbeat_s); the target is in these


def register(bsub: Any) -> None:
    p = bsub.add_parser("coordinator", help="N node WebSockets against one coordinator: registration, memory, drops")
    p.add_argument("--sockets", type=int, default=1000, help="node sockets opened at once (default 1000)")
    p.add_argument("--hold", type=float, default=10.0, help="seconds of heartbeating measured (default 10)")
    p.add_argument("--kill", type=int, default=None, help="sockets made silent at the end (default 10%%)")
    p.add_argument(
        "--ramp",
        type=float,
        default=0.0,
        help="spread the registrations evenly over this many seconds (default 0: all at once, the storm a "
        "coordinator restart causes)",
    )
    p.add_argument("--auth", choices=["on", "off"], default="on", help="sessions for every socket (default on)")
    p.add_argument("--json", action="store_true", help="print one JSON object")
    p.set_defaults(handler=run)


@dataclass
class _Sock:
    """One fake node: its socket, and when it last sent a frame (the coordinator's heartbeat clock)."""

    ws: Any
    registered_ms: float
    ws_ms: float
    last_sent: float = field(default_factory=time.monotonic)
    silent: bool = False
    closed_at: float | None = None
    #: WebSocket protocol pings the coordinator sent (it sends one only after a second without a frame)
    pings: int = 0
    tasks: list[asyncio.Task[None]] = field(default_factory=list)


def _rss_mib(pid: int) -> float:
    with open(f"/proc/{pid}/status", encoding="ascii") as f:
        for line in f:
            if line.startswith("VmRSS:"):
                return int(line.split()[1]) / 1024
    return float("nan")


def _cpu_s(pid: int) -> float:
    with open(f"/proc/{pid}/stat", encoding="ascii") as f:
        fields = f.read().rsplit(")", 1)[1].split()
    return (int(fields[11]) + int(fields[12])) / os.sysconf("SC_CLK_TCK")  # utime + stime


def _raise_fd_limit(needed: int) -> None:
    soft, hard = resource.getrlimit(resource.RLIMIT_NOFILE)
    if soft >= needed:
        return
    if hard != resource.RLIM_INFINITY and hard < needed:
        raise ConfigError(
            f"{needed} file descriptors needed, the hard limit is {hard} (raise it, or use fewer --sockets)"
        )
    resource.setrlimit(resource.RLIMIT_NOFILE, (needed, hard))  # the coordinator child inherits it


def _pct(values: list[float], q: float) -> float:
    ordered = sorted(values)
    return ordered[min(len(ordered) - 1, max(0, round(q * (len(ordered) - 1))))]


async def _register(http: Any, url: str, token: str | None, me: Identity, delay_s: float) -> _Sock:
    """What a node does to register (after ``delay_s``); raises on any refusal."""
    import aiohttp  # imported already by _measure, before the clock runs

    from engine.coordinator.auth import SESSION_PATH
    from engine.transport.identity import hello_proof
    from engine.transport.signaling import ws_url

    await asyncio.sleep(delay_s)
    started = time.perf_counter()
    extra: dict[str, str] = {}
    if token is not None:
        headers = {"Authorization": f"Bearer {token}"}
        async with http.post(url + SESSION_PATH, json={"nonce": secrets.token_urlsafe(24)}, headers=headers) as resp:
            body = await resp.json(content_type=None)
            if resp.status != 200:
                raise KlusterError(f"session refused: HTTP {resp.status} {body}")
        extra["session"] = body["session"]
    ws_started = time.perf_counter()
    ws = await http.ws_connect(ws_url(url), autoping=False, max_msg_size=1 << 20)
    try:
        challenge = await ws.receive_json(timeout=30)
        hello = {"type": "hello", "role": "node", "name": f"bench-{me.id[:8]}", "key": me.public_b64}
        hello["sig"] = me.sign_b64(hello_proof("node", str(challenge["nonce"])))
        await ws.send_json({**hello, **extra})
        msg = await ws.receive(timeout=30)
        if msg.type != aiohttp.WSMsgType.TEXT or json.loads(msg.data).get("type") != "welcome":
            raise KlusterError(f"no welcome: {msg.type.name} {msg.extra or msg.data!r}")
    except BaseException:
        await ws.close()
        raise
    done = time.perf_counter()
    sock = _Sock(ws, (done - started) * 1000, (done - ws_started) * 1000)
    sock.tasks = [asyncio.create_task(_read(sock)), asyncio.create_task(_ping(sock))]  # as a node: at once
    return sock


async def _read(sock: _Sock) -> None:
    """Answer pings (unless silenced) and note when the coordinator closes the socket."""
    import aiohttp

    ended = (aiohttp.WSMsgType.CLOSE, aiohttp.WSMsgType.CLOSING, aiohttp.WSMsgType.CLOSED, aiohttp.WSMsgType.ERROR)
    while True:
        msg = await sock.ws.receive()
        if msg.type == aiohttp.WSMsgType.PING and not sock.silent:
            sock.pings += 1
            with contextlib.suppress(ConnectionError, RuntimeError):
                await sock.ws.pong(msg.data)
                sock.last_sent = time.monotonic()
        elif msg.type in ended:
            sock.closed_at = time.monotonic()
            return


async def _ping(sock: _Sock) -> None:
    """A node's own ping every heartbeat, at a random phase (nodes are not in step)."""
    from engine.transport.signaling import PING

    await asyncio.sleep(random.uniform(0, HEARTBEAT_S))
    while not sock.silent and not sock.ws.closed:
        with contextlib.suppress(ConnectionError, RuntimeError):
            await sock.ws.send_str(PING)
            sock.last_sent = time.monotonic()
        await asyncio.sleep(HEARTBEAT_S)


async def _measure(url: str, pid: int, tokens: list[str | None], args: argparse.Namespace, say: Any) -> dict[str, Any]:
    import aiohttp

    from engine.coordinator import auth  # noqa: F401  (loaded before the clock runs)
    from engine.transport.identity import Identity
    from engine.transport.signaling import get_json

    out: dict[str, Any] = {"rss_idle_mib": round(_rss_mib(pid), 1)}
    keys = [Identity.ephemeral() for _ in tokens]  # nodes have their keys before they connect
    connector = aiohttp.TCPConnector(limit=0)
    async with aiohttp.ClientSession(connector=connector, timeout=aiohttp.ClientTimeout(total=None)) as http:
        when = f"over {args.ramp:g} s" if args.ramp else "at once"
        say(f"registering {len(tokens)} node sockets {when} ...")
        delays = [i * args.ramp / len(tokens) for i in range(len(tokens))]
        t0, cpu0, own0 = time.perf_counter(), _cpu_s(pid), time.process_time()
        results = await asyncio.gather(
            *(_register(http, url, *a) for a in zip(tokens, keys, delays, strict=True)), return_exceptions=True
        )
        out["register_wall_s"] = round(time.perf_counter() - t0, 2)
        out["coordinator_cpu_per_register_ms"] = round(1000 * (_cpu_s(pid) - cpu0) / len(tokens), 2)
        out["bench_cpu_per_register_ms"] = round(1000 * (time.process_time() - own0) / len(tokens), 2)
        socks = [r for r in results if isinstance(r, _Sock)]
        failures = [r for r in results if not isinstance(r, _Sock)]
        out["registered"], out["failed"] = len(socks), len(failures)
        if failures:
            out["first_failure"] = str(failures[0])[:200]
        if not socks:
            raise KlusterError(f"no socket registered: {out.get('first_failure')}")
        reg = [s.registered_ms for s in socks]
        ws_only = [s.ws_ms for s in socks]
        out.update(
            register_p50_ms=round(_pct(reg, 0.5), 1),
            register_p99_ms=round(_pct(reg, 0.99), 1),
            register_max_ms=round(max(reg), 1),
            ws_p50_ms=round(_pct(ws_only, 0.5), 1),
            ws_p99_ms=round(_pct(ws_only, 0.99), 1),
        )
        try:
            await asyncio.sleep(2 * HEARTBEAT_S)  # the welcome's follow-ups (measure requests) settle
            say(f"heartbeating for {args.hold:g} s ...")
            out["rss_sockets_mib"] = round(_rss_mib(pid), 1)
            cpu0, w0 = _cpu_s(pid), time.monotonic()
            samples, pings0 = [_rss_mib(pid)], sum(s.pings for s in socks)
            while (left := w0 + args.hold - time.monotonic()) > 0:
                await asyncio.sleep(min(1.0, left))
                samples.append(_rss_mib(pid))
            out["cpu_heartbeat_pct"] = round(100 * (_cpu_s(pid) - cpu0) / (time.monotonic() - w0), 1)
            pings = sum(s.pings for s in socks) - pings0
            out["protocol_pings_per_socket_s"] = round(pings / len(socks) / (time.monotonic() - w0), 3)
            out["rss_after_hold_mib"] = round(samples[-1], 1)
            out["rss_hold_max_mib"] = round(max(samples), 1)
            # growth over the second half of the hold: start-up effects are over by then, a leak is not
            out["rss_growth_second_half_mib"] = round(samples[-1] - samples[len(samples) // 2], 1)
            out["dropped_while_healthy"] = sum(s.closed_at is not None for s in socks)

            kill = len(socks) // 10 if args.kill is None else min(args.kill, len(socks))
            victims = socks[:: max(1, len(socks) // kill)][:kill] if kill else []
            say(f"silencing {len(victims)} sockets ...")
            for s in victims:
                s.silent = True
                s.tasks[1].cancel()
            deadline = time.monotonic() + 10 * HEARTBEAT_S
            while any(s.closed_at is None for s in victims) and time.monotonic() < deadline:
                await asyncio.sleep(0.05)
            gone = [s.closed_at - s.last_sent for s in victims if s.closed_at is not None]
            out["killed"], out["killed_closed"] = len(victims), len(gone)
            if gone:
                out["dead_close_p50_s"] = round(_pct(gone, 0.5), 2)
                out["dead_close_max_s"] = round(max(gone), 2)
                out["dead_close_max_heartbeats"] = round(max(gone) / HEARTBEAT_S, 2)
            await asyncio.sleep(0.5)  # the health count follows the closes
            health = await get_json(http, url + "/v1/health")
            out["coordinator_nodes_after_kill"] = health.get("nodes")
            out["expected_nodes_after_kill"] = len(socks) - len(victims)
            out["rss_after_kill_mib"] = round(_rss_mib(pid), 1)
        finally:
            for s in socks:
                for task in s.tasks:
                    task.cancel()
                with contextlib.suppress(Exception):
                    await s.ws.close()
        await asyncio.sleep(2 * HEARTBEAT_S)
        out["rss_after_close_mib"] = round(_rss_mib(pid), 1)
    return out


def run(args: argparse.Namespace) -> int:
    from engine.cli.servers import default_pack
    from engine.coordinator.accounts import AccountStore
    from engine.launcher import LocalCluster

    if not 1 <= args.sockets <= 20_000:
        raise ConfigError("--sockets must be between 1 and 20000")
    if not 1 <= args.hold <= 600:
        raise ConfigError("--hold must be between 1 and 600 seconds")
    if not 0 <= args.ramp <= 600:
        raise ConfigError("--ramp must be between 0 and 600 seconds")
    if args.kill is not None and not 0 <= args.kill <= args.sockets:
        raise ConfigError("--kill must be between 0 and --sockets")
    if not sys.platform.startswith("linux"):
        raise ConfigError("kluster bench coordinator reads /proc: Linux only")
    say = (lambda *_: None) if args.json else (lambda m: print(m, file=sys.stderr, flush=True))
    _raise_fd_limit(2 * args.sockets + 512)  # both ends of every socket live on this machine
    pack = default_pack()
    root = Path(tempfile.mkdtemp(prefix="kluster-bench-coordinator-"))
    accounts = root / "accounts.sqlite3"
    tokens: list[str | None] = [None] * args.sockets
    if args.auth == "on":
        store = AccountStore(accounts)
        tokens = [store.add(f"supplier-{i}", "supplier") for i in range(args.sockets)]
        store.close()
    coordinator_args = ["--accounts", str(accounts), "--auth", args.auth, "--rate-ip", "1000000:1000000"]
    cluster = LocalCluster(pack, 0, log_dir=root, coordinator_args=coordinator_args)
    say(f"starting a coordinator (logs in {root}) ...")
    try:
        url = cluster.start_coordinator()
        if cluster.coordinator is None:
            raise KlusterError("the coordinator did not start")
        time.sleep(1.0)  # idle RSS after start-up work
        result = aio.run(_measure(url, cluster.coordinator.pid, tokens, args, say))
    finally:
        cluster.stop()
    result.update(sockets=args.sockets, auth=args.auth, ramp_s=args.ramp, heartbeat_s=HEARTBEAT_S, hold_s=args.hold)
    result["cpus"] = os.cpu_count()
    result["targets"] = {"register_p99_ms": 500, "dead_close_max_heartbeats": 2}
    if args.json:
        print(json.dumps(result))
        return 0
    _print_table(result)
    return 0


def _print_table(r: dict[str, Any]) -> None:
    per_socket = (r["rss_sockets_mib"] - r["rss_idle_mib"]) * 1024 / max(1, r["registered"])
    rows = [
        ("sockets registered", f"{r['registered']} of {r['sockets']} in {r['register_wall_s']} s", ""),
        *([("first failure", r["first_failure"][:46], "")] if r["failed"] else []),
        (
            "registration p50 / p99 / max",
            f"{r['register_p50_ms']:.0f} / {r['register_p99_ms']:.0f} / {r['register_max_ms']:.0f} ms",
            "p99 < 500 ms",
        ),
        ("  of which WebSocket + hello p50 / p99", f"{r['ws_p50_ms']:.0f} / {r['ws_p99_ms']:.0f} ms", ""),
        (
            "CPU per registration: coordinator, bench",
            f"{r['coordinator_cpu_per_register_ms']:.2f} ms, {r['bench_cpu_per_register_ms']:.2f} ms",
            "",
        ),
        ("coordinator RSS idle", f"{r['rss_idle_mib']:.1f} MiB", ""),
        (
            f"coordinator RSS, {r['registered']} sockets",
            f"{r['rss_sockets_mib']:.1f} MiB ({per_socket:.0f} KiB/socket)",
            "",
        ),
        (
            f"RSS change over {r['hold_s']:g} s of heartbeats",
            f"{r['rss_after_hold_mib'] - r['rss_sockets_mib']:+.1f} MiB "
            f"(second half {r['rss_growth_second_half_mib']:+.1f} MiB, max {r['rss_hold_max_mib']:.1f})",
            "bounded",
        ),
        ("coordinator CPU while heartbeating", f"{r['cpu_heartbeat_pct']:.0f}% of one core", ""),
        ("protocol pings to healthy sockets", f"{r['protocol_pings_per_socket_s']:.2f} per socket per s", ""),
        ("healthy sockets dropped", str(r["dropped_while_healthy"]), "0"),
    ]
    if r.get("killed_closed"):
        rows.append(
            (
                f"silenced sockets closed ({r['killed_closed']} of {r['killed']})",
                f"p50 {r['dead_close_p50_s']} s, max {r['dead_close_max_s']} s "
                f"= {r['dead_close_max_heartbeats']} heartbeats",
                "<= 2 heartbeats",
            )
        )
    rows += [
        (
            "coordinator's node count after",
            f"{r['coordinator_nodes_after_kill']} (expected {r['expected_nodes_after_kill']})",
            "",
        ),
        ("coordinator RSS after all closed", f"{r['rss_after_close_mib']:.1f} MiB", ""),
    ]
    when = f"over {r['ramp_s']:g} s" if r["ramp_s"] else "at once"
    print(
        f"kluster bench coordinator: {r['sockets']} node sockets on loopback registering {when}, auth {r['auth']}, "
        f"heartbeat {r['heartbeat_s']:g} s, {r['cpus']} CPUs shared by the bench and the coordinator"
    )
    print(f"{'':<42}{'value':<46}target")
    for name, value, target in rows:
        print(f"{name:<42}{value:<46}{target}")
