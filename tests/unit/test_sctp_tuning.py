"""Our SCTP association (engine.transport.sctp_tuning and the layers below it) over an
in-memory lossy wire.

Two associations are joined by fake DTLS transports that drop a seeded fraction of packets and
deliver the rest after a fixed delay, so loss recovery, redundancy and interoperability with
aiortc's own association are exercised without sockets, in one event loop.
"""

from __future__ import annotations

import asyncio
import random
import statistics
import time
from types import SimpleNamespace

import pytest
from aiortc.rtcdatachannel import RTCDataChannel, RTCDataChannelParameters
from aiortc.rtcsctptransport import (
    SCTP_DATA_FIRST_FRAG,
    SCTP_DATA_LAST_FRAG,
    RTCSctpCapabilities,
    RTCSctpTransport,
    SackChunk,
    parse_packet,
)

from engine.transport import fastpath, sctp_jumbo
from engine.transport.sctp_jumbo import JUMBO_USER_DATA, same_host
from engine.transport.sctp_tuning import DUP_THRESH, TunedSctpTransport

pytestmark = pytest.mark.timeout(60)


class Wire:
    """Both directions of a link: ``loss`` drops, ``delay`` seconds one way, seeded."""

    def __init__(self, loss: float = 0.0, delay: float = 0.0, seed: int = 1) -> None:
        self.loss = loss
        self.delay = delay
        self.rng = random.Random(seed)
        self.dropped_data = 0

    def pair(self) -> tuple[FakeDtls, FakeDtls]:
        a, b = FakeDtls(self, "client"), FakeDtls(self, "server")
        a.peer, b.peer = b, a
        return a, b


class FakeDtls:
    """What RTCSctpTransport needs of an RTCDtlsTransport, sending onto a :class:`Wire`."""

    state = "connected"

    def __init__(self, wire: Wire, role: str) -> None:
        self.wire = wire
        self._role = role
        self._data_receiver: RTCSctpTransport | None = None
        self.peer: FakeDtls | None = None
        self.packets: list[bytes] = []

    def _register_data_receiver(self, receiver: RTCSctpTransport) -> None:
        self._data_receiver = receiver

    def _unregister_data_receiver(self, receiver: RTCSctpTransport) -> None:
        self._data_receiver = None

    async def _send_data(self, data: bytes) -> None:
        self.packets.append(data)
        wire = self.wire
        if wire.rng.random() < wire.loss:
            if data[12] == 0:  # a DATA chunk (aiortc sends one chunk per packet)
                wire.dropped_data += 1
            return
        loop = asyncio.get_running_loop()
        loop.call_later(wire.delay, self._deliver, data)

    def _deliver(self, data: bytes) -> None:
        peer = self.peer
        if peer is not None and peer._data_receiver is not None:
            asyncio.get_running_loop().create_task(peer._data_receiver._handle_data(data))


async def until(condition, timeout: float = 10.0) -> None:  # type: ignore[no-untyped-def]
    deadline = time.monotonic() + timeout
    while not condition():
        if time.monotonic() > deadline:
            raise AssertionError("condition not reached in time")
        await asyncio.sleep(0.005)


class Link:
    """Two started associations with one data channel from ``a`` to ``b``; messages logged."""

    def __init__(self, wire: Wire, a_cls: type = TunedSctpTransport, b_cls: type = TunedSctpTransport) -> None:
        da, db = wire.pair()
        self.a, self.b = a_cls(da), b_cls(db)
        self.got_a: list[tuple[float, bytes]] = []
        self.got_b: list[tuple[float, bytes]] = []
        self.channel_b: RTCDataChannel | None = None

    async def start(self) -> Link:
        caps = RTCSctpCapabilities(maxMessageSize=262144)
        await asyncio.gather(self.a.start(caps, 5000), self.b.start(caps, 5000))

        def on_datachannel(channel: RTCDataChannel) -> None:
            self.channel_b = channel
            channel.on("message", lambda m: self.got_b.append((time.monotonic(), m)))

        self.b.on("datachannel", on_datachannel)
        await until(lambda: self.a.state == "connected" and self.b.state == "connected")
        self.channel_a = RTCDataChannel(self.a, RTCDataChannelParameters(label="t", ordered=True))
        self.channel_a.on("message", lambda m: self.got_a.append((time.monotonic(), m)))
        await until(lambda: self.channel_a.readyState == "open" and self.channel_b is not None)
        return self

    async def stop(self) -> None:
        await self.a.stop()
        await self.b.stop()


def payload(i: int, size: int) -> bytes:
    return (i.to_bytes(4, "big") * (size // 4 + 1))[:size]


@pytest.fixture(autouse=True)
def _fast_path() -> None:
    fastpath.install()  # what engine.transport.peer does on import; needed for jumbo negotiation


async def test_lossy_link_delivers_every_message_intact_in_order_without_wasted_resends() -> None:
    wire = Wire(loss=0.03, delay=0.004, seed=7)
    link = await Link(wire).start()
    try:
        sizes = [1, 2304, 50_000, 200_000, 7]
        sent = [payload(i, sizes[i % len(sizes)]) for i in range(60)]
        for msg in sent:
            link.channel_a.send(msg)
        await until(lambda: len(link.got_b) == len(sent), timeout=40)
        assert [m for _, m in link.got_b] == sent
        stats = link.a.stats
        assert wire.dropped_data > 10  # the wire really lost data
        # Each resend answers a real loss: aiortc resends a chunk every 3rd SACK while its first
        # resend is on its way and, on a timeout, resends what the peer already reported.
        assert stats.retransmits <= 2 * wire.dropped_data + 10
    finally:
        await link.stop()


async def test_small_messages_arrive_in_one_trip_despite_loss() -> None:
    """A token's hidden state must not wait for a retransmission timeout (aiortc: >= 1 s)."""
    wire = Wire(loss=0.10, delay=0.020, seed=3)
    link = await Link(wire).start()
    try:
        rtts = []
        for i in range(60):
            msg = payload(i, 2304)
            t0 = time.monotonic()
            link.channel_a.send(msg)
            await until(lambda n=i: len(link.got_b) > n, timeout=10)
            assert link.got_b[i][1] == msg
            link.channel_b.send(msg)  # type: ignore[union-attr]
            await until(lambda n=i: len(link.got_a) > n, timeout=10)
            rtts.append(time.monotonic() - t0)
        assert link.a.stats.duplicates_sent >= 100  # 2 chunks x 60 messages, each sent twice
        assert statistics.median(rtts) < 0.2  # the floor is 0.04 s; generous for a busy machine
        assert max(rtts) < 0.7  # even a message losing both copies of a chunk beats one aiortc RTO
    finally:
        await link.stop()


async def exchange_both_ways(a_cls: type, b_cls: type) -> Link:
    link = await Link(Wire(loss=0.0, delay=0.002), a_cls, b_cls).start()
    try:
        sent = [payload(i, s) for i, s in enumerate((10, 100_000, 2304, 65_536))]
        for msg in sent:
            link.channel_a.send(msg)
            link.channel_b.send(msg)  # type: ignore[union-attr]
        await until(lambda: len(link.got_a) == len(link.got_b) == len(sent), timeout=20)
        assert [m for _, m in link.got_b] == sent and [m for _, m in link.got_a] == sent
    finally:
        await link.stop()
    return link


@pytest.mark.parametrize("ours_offers", [True, False])
async def test_interoperates_with_stock_aiortc_both_ways(ours_offers: bool) -> None:
    classes = (TunedSctpTransport, RTCSctpTransport) if ours_offers else (RTCSctpTransport, TunedSctpTransport)
    link = await exchange_both_ways(*classes)
    tuned = link.a if isinstance(link.a, TunedSctpTransport) else link.b
    assert tuned._max_user_data < JUMBO_USER_DATA  # the stock side never offered jumbo packets


async def test_jumbo_chunks_only_when_both_sides_offer_them_on_a_same_host_path(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    monkeypatch.setattr(sctp_jumbo, "same_host", lambda dtls: True)
    wire = Wire(loss=0.02, delay=0.001, seed=5)
    link = await Link(wire).start()
    try:
        msg = payload(1, 200_000)
        link.channel_a.send(msg)
        await until(lambda: len(link.got_b) == 1, timeout=20)
        assert link.got_b[0][1] == msg
        assert link.a._max_user_data == JUMBO_USER_DATA
        data_packets = [p for p in link.a.transport.packets if p[12] == 0]
        assert max(len(p) for p in data_packets) > 16_000
    finally:
        await link.stop()


def test_same_host_compares_the_pair_in_use_with_our_own_addresses() -> None:
    def dtls(remote: str) -> SimpleNamespace:
        cand = SimpleNamespace
        pair = SimpleNamespace(
            local_candidate=cand(host="10.0.0.5", type="host"), remote_candidate=cand(host=remote, type="host")
        )
        connection = SimpleNamespace(
            _nominated={1: pair},
            local_candidates=[cand(host="10.0.0.5", type="host"), cand(host="192.168.1.2", type="host")],
        )
        return SimpleNamespace(transport=SimpleNamespace(_connection=connection))

    assert same_host(dtls("192.168.1.2"))  # type: ignore[arg-type]
    assert not same_host(dtls("10.0.0.6"))  # type: ignore[arg-type]
    assert not same_host(SimpleNamespace())  # type: ignore[arg-type]


class Recorder:
    """A DTLS stand-in that only records what the association sends."""

    state = "connected"
    _role = "client"

    def __init__(self) -> None:
        self.packets: list[bytes] = []

    async def _send_data(self, data: bytes) -> None:
        self.packets.append(data)

    def data_tsns(self) -> list[int]:
        out = []
        for packet in self.packets:
            for chunk in parse_packet(packet)[3]:
                if chunk.type == 0:
                    out.append(chunk.tsn)
        return out


def sack(cum: int, gaps: list[tuple[int, int]]) -> SackChunk:
    chunk = SackChunk()
    chunk.cumulative_tsn = cum
    chunk.advertised_rwnd = 1 << 20
    chunk.gaps = gaps
    return chunk


async def sender_with_ten_chunks_in_flight() -> tuple[TunedSctpTransport, Recorder, int]:
    """A 20-chunk message, of which the initial window (10 packets) is on the wire."""
    rec = Recorder()
    t = TunedSctpTransport(rec)  # type: ignore[arg-type]
    t._remote_port = 5000
    t._path_checked = True
    await t._send(1, 53, bytes(20 * 1160))
    tsns = rec.data_tsns()
    assert len(tsns) == 10 and t.stats.data_sent == 10 and t.stats.duplicates_sent == 0
    rec.packets.clear()
    return t, rec, tsns[0]


def resent(rec: Recorder, first: int) -> list[int]:
    """TSNs of the first window (first..first+9) that went out again; new chunks are ignored."""
    return [tsn for tsn in rec.data_tsns() if (tsn - first) % 2**32 < 10]


async def test_a_hole_with_three_chunks_acked_above_is_resent_once() -> None:
    t, rec, first = await sender_with_ten_chunks_in_flight()
    # The peer has first..first+1 and first+3..first+5: first+2 is missing.
    await t._receive_sack_chunk(sack(first + 1, [(2, 4)]))
    assert resent(rec, first) == [first + 2]
    # More SACKs showing the same hole while the resend travels: aiortc would resend again.
    await t._receive_sack_chunk(sack(first + 1, [(2, 5)]))
    await t._receive_sack_chunk(sack(first + 1, [(2, 7)]))
    assert resent(rec, first) == [first + 2]
    assert t.stats.retransmits == 1
    # The resend arrives: the first window is done; only later chunks are outstanding.
    await t._receive_sack_chunk(sack(first + 9, []))
    assert all((c.tsn - first) % 2**32 >= 10 for c in t._sent_queue)
    assert t._flight_size == sum(c._book_size for c in t._sent_queue)


async def test_fewer_than_three_acked_above_a_hole_is_not_yet_a_loss() -> None:
    t, rec, first = await sender_with_ten_chunks_in_flight()
    await t._receive_sack_chunk(sack(first + 1, [(2, 2 + DUP_THRESH - 2)]))
    assert resent(rec, first) == []  # could be reordering: wait


async def test_a_timeout_resends_only_what_the_peer_has_not_reported() -> None:
    t, rec, first = await sender_with_ten_chunks_in_flight()
    await t._receive_sack_chunk(sack(first - 1, [(2, 10)]))  # all of the window but `first` arrived
    while t._rtx:  # whatever that SACK declared lost has gone out; start clean
        await t._transmit()
    rec.packets.clear()
    for c in t._sent_queue:  # pretend every chunk left long ago
        c._sent_time -= 5.0
    t._t3_expired()
    await asyncio.sleep(0)
    again = resent(rec, first)
    assert again == [first]  # not first+1..first+9, which the peer reported
    assert t.stats.timeouts == 1


def test_messages_keep_aiortcs_fragment_flags() -> None:
    async def go() -> list[int]:
        rec = Recorder()
        t = TunedSctpTransport(rec)  # type: ignore[arg-type]
        t._remote_port = 5000
        t._path_checked = True
        await t._send(1, 53, bytes(2500))
        return [c.flags for p in rec.packets for c in parse_packet(p)[3]]

    flags = asyncio.run(go())
    assert flags[0] & SCTP_DATA_FIRST_FRAG and not flags[0] & SCTP_DATA_LAST_FRAG
    assert flags[-1] & SCTP_DATA_LAST_FRAG
