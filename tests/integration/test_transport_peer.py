"""PeerManager over real aiortc links on loopback: in one process with an in-memory signaling
relay, and once across two OS processes.

Every peer id here is derived from a real identity key (``Mesh.id``), as the coordinator assigns
them, so every link in these tests also passes the identity check."""

from __future__ import annotations

import asyncio
import hashlib
import logging
import os
import signal
import time
from collections import Counter, defaultdict
from collections.abc import AsyncIterator, Awaitable, Callable
from typing import Any

import pytest

from engine.errors import ConfigError, IdentityError, KlusterError, PeerError, ProtocolError, TransportError
from engine.transport.chunking import MAX_CHUNK, encode_whole, iter_chunks
from engine.transport.identity import Identity, sign_sdp
from engine.transport.measure import ECHO, HASH, EchoProcess
from engine.transport.peer import HIGH_WATER, PeerManager

pytestmark = pytest.mark.timeout(60)

OnMessage = Callable[[str, bytes], Awaitable[None]]


async def until(condition: Callable[[], bool], timeout: float = 10.0) -> None:
    """Poll ``condition`` until true; fail the test after ``timeout`` seconds."""
    deadline = time.monotonic() + timeout
    while not condition():
        if time.monotonic() > deadline:
            raise AssertionError("condition not reached in time")
        await asyncio.sleep(0.005)


class Mesh:
    """PeerManagers in one process; send_signal calls the target's handle_signal directly.

    Tests name peers ("a", "b"); each name gets an identity key and the peer id derived from it
    (:meth:`id`). ``inbox`` and ``offers`` speak names. Signals to a name with no manager vanish,
    like a peer that never answers; a signal the target refuses is kept in ``refused`` (a relay
    does not hand the receiver's error back to the sender).
    """

    def __init__(self) -> None:
        self.managers: dict[str, PeerManager] = {}
        self.identities: dict[str, Identity] = {}
        self.names: dict[str, str] = {}
        self.inbox: dict[str, list[tuple[str, bytes]]] = defaultdict(list)
        self.offers: Counter[tuple[str, str]] = Counter()
        self.refused: list[KlusterError] = []

    def id(self, name: str) -> str:
        """The peer id of ``name`` (an identity is made for it on first use, manager or not)."""
        if name not in self.identities:
            self.identities[name] = Identity.ephemeral()
            self.names[self.identities[name].peer_id("t")] = name
        return self.identities[name].peer_id("t")

    def name(self, peer_id: str) -> str:
        return self.names.get(peer_id, peer_id)

    def signed(self, name: str, to: str, data: dict[str, Any]) -> dict[str, Any]:
        """``data`` (an offer/answer) with ``name``'s valid key and signature for ``to``."""
        return {
            **data,
            **sign_sdp(self.identities[name], data["type"], data["link"], self.id(name), self.id(to), data["sdp"]),
        }

    def add(self, name: str, on_message: OnMessage | None = None, **kwargs: Any) -> PeerManager:
        me = self.id(name)

        async def send_signal(to: str, data: dict[str, Any]) -> None:
            to_name = self.name(to)
            if data.get("type") == "offer":
                self.offers[(name, to_name)] += 1
            target = self.managers.get(to_name)
            if target is not None:
                try:
                    await target.handle_signal(me, data)
                except KlusterError as exc:
                    self.refused.append(exc)

        async def record(peer_id: str, data: bytes) -> None:
            self.inbox[name].append((self.name(peer_id), data))

        manager = PeerManager(me, send_signal, on_message or record, identity=self.identities[name], **kwargs)
        self.managers[name] = manager
        return manager

    def received(self, name: str) -> list[bytes]:
        return [data for _, data in self.inbox[name]]

    async def close(self) -> None:
        for manager in self.managers.values():
            await manager.shutdown()


@pytest.fixture
async def mesh() -> AsyncIterator[Mesh]:
    m = Mesh()
    try:
        yield m
    finally:
        await m.close()


async def test_round_trip_and_reply_over_the_incoming_link(mesh: Mesh) -> None:
    a = mesh.add("a")

    async def echo(peer_id: str, data: bytes) -> None:
        await b.send(peer_id, b"re:" + data)

    b = mesh.add("b", on_message=echo)
    for i in range(3):
        await a.send(b.self_id, b"hello %d" % i)
    await until(lambda: len(mesh.inbox["a"]) == 3)
    assert mesh.inbox["a"] == [("b", b"re:hello %d" % i) for i in range(3)]
    # One connection serves both directions.
    assert mesh.offers == {("a", "b"): 1}
    (la,), (lb,) = a.links(), b.links()
    assert (la.peer_id, la.outgoing, la.state, la.sending) == (b.self_id, True, "open", True)
    assert (lb.peer_id, lb.outgoing, lb.state, lb.sending) == (a.self_id, False, "open", True)
    assert la.link_id == lb.link_id
    assert la.messages_sent == lb.messages_received == 3
    assert a.is_connected(b.self_id) and b.is_connected(a.self_id) and not a.is_connected(mesh.id("c"))
    assert not mesh.refused and a.bad_signals == b.bad_signals == 0


async def test_empty_and_boundary_messages(mesh: Mesh) -> None:
    a, _ = mesh.add("a"), mesh.add("b")
    sizes = [0, 1, MAX_CHUNK - 3, MAX_CHUNK - 2, MAX_CHUNK, 3 * MAX_CHUNK]
    messages = [os.urandom(n) for n in sizes]
    for m in messages:
        await a.send(mesh.id("b"), m)
    await until(lambda: len(mesh.inbox["b"]) == len(messages))
    assert mesh.received("b") == messages


async def test_five_megabytes_arrive_intact_under_back_pressure(mesh: Mesh) -> None:
    a, _ = mesh.add("a"), mesh.add("b")
    await a.send(mesh.id("b"), b"warm-up")
    channel = a._send_links[mesh.id("b")].channel
    assert channel is not None
    peak = 0
    real_send = channel.send

    def tracking_send(chunk: bytes | str) -> None:
        nonlocal peak
        real_send(chunk)
        peak = max(peak, channel.bufferedAmount)

    channel.send = tracking_send  # type: ignore[method-assign]
    big = os.urandom(5_000_000)
    await a.send(mesh.id("b"), big)
    await a.send(mesh.id("b"), b"after")
    await until(lambda: len(mesh.inbox["b"]) == 3, timeout=40)
    assert hashlib.sha256(mesh.received("b")[1]).digest() == hashlib.sha256(big).digest()
    assert mesh.received("b")[2] == b"after"
    # send() waited for the buffer to drain instead of queueing 5 MB at once.
    assert 0 < peak <= HIGH_WATER + MAX_CHUNK


async def test_messages_arrive_in_call_order_mixing_sizes(mesh: Mesh) -> None:
    a, _ = mesh.add("a"), mesh.add("b")
    await a.send(mesh.id("b"), b"warm-up")
    # Small messages take a lock-free fast path; they must not overtake big ones.
    messages = [i.to_bytes(4, "big") * (30_000 if i % 7 == 3 else 10) for i in range(120)]
    await asyncio.gather(*(a.send(mesh.id("b"), m) for m in messages))
    await until(lambda: len(mesh.inbox["b"]) == len(messages) + 1, timeout=30)
    assert mesh.received("b")[1:] == messages


async def test_concurrent_first_sends_share_one_connection(mesh: Mesh) -> None:
    a, b = mesh.add("a"), mesh.add("b")
    await asyncio.gather(*(a.send(mesh.id("b"), b"%d" % i) for i in range(10)))
    await until(lambda: len(mesh.inbox["b"]) == 10)
    assert mesh.received("b") == [b"%d" % i for i in range(10)]
    assert mesh.offers == {("a", "b"): 1}
    assert len(a.links()) == len(b.links()) == 1


async def test_glare_both_sides_connect_at_once(mesh: Mesh) -> None:
    a, b = mesh.add("a"), mesh.add("b")
    await asyncio.gather(a.send(mesh.id("b"), b"from a"), b.send(mesh.id("a"), b"from b"))
    for i in range(5):
        await asyncio.gather(a.send(mesh.id("b"), b"a%d" % i), b.send(mesh.id("a"), b"b%d" % i))
    await until(lambda: len(mesh.inbox["a"]) == 6 and len(mesh.inbox["b"]) == 6)
    assert mesh.received("b") == [b"from a"] + [b"a%d" % i for i in range(5)]
    assert mesh.received("a") == [b"from b"] + [b"b%d" % i for i in range(5)]
    assert 1 <= len(a.links()) <= 2 and 1 <= len(b.links()) <= 2


async def test_three_peers_pass_messages_round_a_ring(mesh: Mesh) -> None:
    names = ["a", "b", "c"]
    managers: dict[str, PeerManager] = {}
    done: asyncio.Future[bytes] = asyncio.get_running_loop().create_future()

    def forwarder(me: str) -> OnMessage:
        nxt = names[(names.index(me) + 1) % 3]

        async def on_message(peer_id: str, data: bytes) -> None:
            if me == "a":
                done.set_result(data)
            else:
                await managers[me].send(mesh.id(nxt), data + me.encode())

        return on_message

    for name in names:
        managers[name] = mesh.add(name, on_message=forwarder(name))
    await managers["a"].send(mesh.id("b"), b"a")
    assert await asyncio.wait_for(done, 10) == b"abc"
    assert {mesh.name(info.peer_id) for info in managers["b"].links()} == {"a", "c"}


async def test_send_to_a_peer_that_never_answers_times_out(mesh: Mesh) -> None:
    a = mesh.add("a", connect_timeout=0.5)
    for _ in range(2):  # a failed attempt is forgotten: the next send tries again
        start = time.monotonic()
        with pytest.raises(PeerError, match=mesh.id("ghost")):
            await a.send(mesh.id("ghost"), b"hello?")
        assert time.monotonic() - start < 3
    assert mesh.offers == {("a", "ghost"): 2}
    await until(lambda: not a.links())
    assert not a.is_connected(mesh.id("ghost"))


async def test_malformed_chunks_and_failing_handlers_are_survived(mesh: Mesh, caplog: pytest.LogCaptureFixture) -> None:
    a = mesh.add("a")
    got: list[bytes] = []

    async def picky(peer_id: str, data: bytes) -> None:
        if data == b"boom":
            raise RuntimeError("handler bug")
        got.append(data)

    b = mesh.add("b", on_message=picky)
    await a.send(mesh.id("b"), b"first")
    channel = a._send_links[mesh.id("b")].channel
    assert channel is not None
    with caplog.at_level(logging.WARNING, logger="engine.transport.peer"):
        channel.send(b"\x00garbage")  # bad magic
        channel.send(list(iter_chunks(os.urandom(200_000), 77))[1])  # a tail with no head
        channel.send("text")  # wrong payload type
        channel.send(next(iter_chunks(os.urandom(200_000), 78)))  # a head with no tail...
        await a.send(mesh.id("b"), b"boom")
        await a.send(mesh.id("b"), os.urandom(150_000))  # ...does not stop other messages
        await a.send(mesh.id("b"), b"last")
        await until(lambda: len(got) == 3)
    assert got[0] == b"first" and len(got[1]) == 150_000 and got[2] == b"last"
    (info,) = b.links()
    assert info.bad_chunks == 3 and info.state == "open"
    assert "bad chunk" in caplog.text and "handler bug" in caplog.text


async def test_cancelled_big_send_leaves_no_partial_message(mesh: Mesh) -> None:
    a, b = mesh.add("a"), mesh.add("b")
    await a.send(mesh.id("b"), b"warm-up")
    task = asyncio.create_task(a.send(mesh.id("b"), os.urandom(32_000_000)))
    # Cancel once the receiver holds part of the message (the tuned transport moves ~200 MB/s on
    # loopback, so a sender-side buffer level is too brief to catch; a partial lasts the transfer).
    await until(lambda: any(link.reassembler.partials for link in b._links.values()), timeout=20)
    task.cancel()
    with pytest.raises(asyncio.CancelledError):
        await task
    await a.send(mesh.id("b"), b"next")
    await until(lambda: len(mesh.inbox["b"]) == 2, timeout=30)
    assert mesh.received("b") == [b"warm-up", b"next"]
    link_b = next(iter(b._links.values()))
    assert link_b.reassembler.partials == 0 and link_b.bad_chunks == 0


async def test_closed_link_is_dropped_and_the_next_send_reconnects(mesh: Mesh) -> None:
    a, b = mesh.add("a"), mesh.add("b")
    await a.send(mesh.id("b"), b"one")
    await until(lambda: len(mesh.inbox["b"]) == 1)
    old_link = a._send_links[mesh.id("b")]
    await b.close_peer(a.self_id)
    assert not b.is_connected(a.self_id) and not b.links()
    await until(lambda: not a.is_connected(b.self_id))  # the peer noticed the close
    with pytest.raises(TransportError, match="closed"):
        await old_link.send(b"lost")
    await a.send(mesh.id("b"), b"two")
    await until(lambda: len(mesh.inbox["b"]) == 2)
    assert mesh.received("b") == [b"one", b"two"]
    assert mesh.offers == {("a", "b"): 2}


async def test_close_peer_fails_a_pending_connect(mesh: Mesh) -> None:
    a = mesh.add("a", connect_timeout=5)
    task = asyncio.create_task(a.send(mesh.id("ghost"), b"x"))
    await until(lambda: bool(a.links()))
    await a.close_peer(mesh.id("ghost"), "peer is not on the coordinator")
    with pytest.raises(TransportError, match=rf"{mesh.id('ghost')}.*not on the coordinator"):
        await task


async def test_bad_signals_raise_protocol_error(mesh: Mesh, caplog: pytest.LogCaptureFixture) -> None:
    a = mesh.add("a")
    b = mesh.id("b")
    for bad in ({}, {"type": "offer", "link": "x"}, {"type": "nope", "link": "x", "sdp": ""}, [1]):
        with pytest.raises(ProtocolError):
            await a.handle_signal(b, bad)  # type: ignore[arg-type]
    with pytest.raises(ProtocolError, match="no data channel"):
        await a.handle_signal(b, {"type": "offer", "link": "x", "sdp": "v=0\r\nnonsense"})
    fingerprint = "a=fingerprint:sha-256 " + ":".join(["AB"] * 32)
    garbage = {"type": "offer", "link": "y", "sdp": f"v=0\r\nm=application nonsense\r\n{fingerprint}"}
    with pytest.raises(IdentityError, match=f"peer {b} failed identity check"):  # unsigned
        await a.handle_signal(b, garbage)
    assert not a.links()
    with caplog.at_level(logging.WARNING, logger="engine.transport.peer"):
        await a.handle_signal(b, mesh.signed("b", "a", garbage))  # signed, but aiortc cannot parse it
        await until(lambda: "bad offer" in caplog.text)
    await a.handle_signal(b, {"type": "answer", "link": "unknown", "sdp": "v=0"})  # stray: ignored
    await until(lambda: not a.links())
    flood = mesh.id("flood")
    offer = {"type": "offer", "sdp": f"v=0\r\nm=application 9 UDP/DTLS/SCTP webrtc-datachannel\r\n{fingerprint}"}
    for i in range(4):  # well-formed enough to be held until they fail
        await a.handle_signal(flood, mesh.signed("flood", "a", {**offer, "link": f"f{i}"}))
    with pytest.raises(ProtocolError, match="more than 4 links"):
        await a.handle_signal(flood, mesh.signed("flood", "a", {**offer, "link": "f4"}))
    await until(lambda: not a.links())
    assert a.bad_signals == 7


async def test_oversize_message_is_refused_before_sending(mesh: Mesh) -> None:
    a = mesh.add("a", max_message_bytes=1000)
    with pytest.raises(ProtocolError, match="limit"):
        await a.send(mesh.id("b"), b"x" * 1001)
    assert not mesh.offers


async def test_shutdown_is_idempotent_and_leaves_no_task(mesh: Mesh) -> None:
    a, b = mesh.add("a"), mesh.add("b")
    await a.send(mesh.id("b"), b"x")
    pending = asyncio.create_task(a.send(mesh.id("ghost"), b"y"))  # a connect in flight
    await until(lambda: len(a.links()) == 2)
    await asyncio.gather(a.shutdown(), a.shutdown())
    await a.shutdown()
    with pytest.raises((TransportError, asyncio.CancelledError)):
        await pending
    with pytest.raises(TransportError, match="shut down"):
        await a.send(mesh.id("b"), b"z")
    await b.shutdown()
    assert not a.links() and not b.links() and not a._tasks and not b._tasks
    me = asyncio.current_task()
    await until(lambda: not [t for t in asyncio.all_tasks() if t is not me], timeout=5)
    await a.handle_signal(b.self_id, {"type": "offer", "link": "late", "sdp": "v=0"})  # ignored


def test_ice_servers_are_explicit_and_the_own_id_must_come_from_the_key() -> None:
    # aiortc's default configuration would reach out to a public STUN server.
    async def nothing(*_: Any) -> None:
        return None

    me = Identity.ephemeral()
    assert PeerManager(me.peer_id("n"), nothing, nothing, identity=me)._ice_servers == []
    with pytest.raises(ValueError):
        PeerManager(me.peer_id("n"), nothing, nothing, identity=me, connect_timeout=0)
    for wrong in ("a", Identity.ephemeral().peer_id("n"), me.id):
        with pytest.raises(ConfigError, match="not derived from this identity"):
            PeerManager(wrong, nothing, nothing, identity=me)


@pytest.mark.slow
async def test_two_processes_exchange_messages() -> None:
    replies: asyncio.Queue[tuple[str, bytes]] = asyncio.Queue()

    async def on_message(peer_id: str, data: bytes) -> None:
        replies.put_nowait((peer_id, data))

    async with EchoProcess(on_message, connect_timeout=20) as echo:
        small = ECHO + os.urandom(2303)
        await echo.manager.send(echo.echo_id, small)
        assert await asyncio.wait_for(replies.get(), 20) == (echo.echo_id, small)
        big = os.urandom(1_000_000)
        await echo.manager.send(echo.echo_id, HASH + big)
        assert await asyncio.wait_for(replies.get(), 20) == (echo.echo_id, HASH + hashlib.sha256(big).digest())
        assert echo.manager.links()[0].outgoing
    assert echo.proc is not None and echo.proc.returncode == 0


def test_encode_whole_matches_the_fast_path() -> None:
    # The manager's fast path frames exactly like the splitter (3-byte header).
    assert encode_whole(b"abc") == b"K\x01\x00abc"


async def test_heartbeat_measures_round_trip_and_keeps_idle_links(mesh: Mesh) -> None:
    a, b = mesh.add("a"), mesh.add("b")
    await a.send(mesh.id("b"), b"hello")
    await until(lambda: a.rtt_ms(b.self_id) is not None and b.rtt_ms(a.self_id) is not None, timeout=5)
    rtt = a.rtt_ms(b.self_id)
    assert rtt is not None and 0 < rtt < 500
    # Idle for longer than the silence limit: pings keep the link alive and fresh.
    await asyncio.sleep(4)
    (info,) = a.links()
    assert info.state == "open" and info.silent_ms < 2000 and info.rtt_ms is not None


@pytest.mark.slow
async def test_a_frozen_peer_is_dropped_within_the_heartbeat_limit_and_reconnected_after() -> None:
    """SIGSTOP freezes the echo process (a stall or partition): silence is noticed in ~3 s, not ~30 s."""
    replies: asyncio.Queue[bytes] = asyncio.Queue()
    lost: asyncio.Queue[tuple[str, str, float]] = asyncio.Queue()

    async def on_message(peer_id: str, data: bytes) -> None:
        replies.put_nowait(data)

    async def on_link_lost(peer_id: str, reason: str) -> None:
        lost.put_nowait((peer_id, reason, time.monotonic()))

    async with EchoProcess(on_message, connect_timeout=20, on_link_lost=on_link_lost) as echo:
        assert echo.proc is not None
        await echo.manager.send(echo.echo_id, ECHO + b"one")
        assert await asyncio.wait_for(replies.get(), 20) == ECHO + b"one"
        frozen = time.monotonic()
        echo.proc.send_signal(signal.SIGSTOP)
        try:
            peer, reason, when = await asyncio.wait_for(lost.get(), 10)
        finally:
            echo.proc.send_signal(signal.SIGCONT)
        assert peer == echo.echo_id and "silent" in reason
        assert 2.5 <= when - frozen <= 5.0, when - frozen
        assert not echo.manager.is_connected(echo.echo_id)
        # Thawed, the echo peer has dropped its side too (or will); the next send opens a new link.
        await echo.manager.send(echo.echo_id, ECHO + b"two")
        assert await asyncio.wait_for(replies.get(), 20) == ECHO + b"two"
