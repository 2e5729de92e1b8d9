"""Message links between Kluster peers over aiortc data channels.

A :class:`PeerManager` gives its owner (a node or a client) one operation, "deliver this whole
message to peer X, in order", and one callback, "here is a whole message from peer X". Everything
in between is hidden here:

* **Links.** A link is one ``RTCPeerConnection`` carrying one ordered, reliable data channel. The
  first :meth:`PeerManager.send` to a peer opens a link (SDP offer/answer relayed by the owner's
  signaling path, normally the coordinator); later sends reuse it. A link the *other* side opened
  is just as good for sending back, so replies need no second connection. When both sides open at
  the same moment ("glare") each gets its own link; both work, and each side keeps sending on the
  first one that opened, which is all ordering needs.
* **Chunking.** Messages are cut into <= 64 KiB chunks (:mod:`engine.transport.chunking`), because
  data channels refuse larger messages; a message that fits one chunk pays 3 bytes.
* **Back-pressure.** ``RTCDataChannel.send`` never blocks, it queues without limit. A sender
  therefore waits for the ``bufferedamountlow`` event once ``bufferedAmount`` passes
  :data:`HIGH_WATER`, so a multi-megabyte message cannot balloon memory.
* **Failures.** A link that does not open within ``connect_timeout`` raises :class:`PeerError`; a
  link that breaks raises :class:`TransportError` to senders and is dropped, so the next send
  reconnects (through the signaling path: aiortc cannot restart ICE, a new link is the only way).
* **Heartbeat.** Every open link sends a PING chunk each ``heartbeat_s`` (1 s) and answers the
  other side's with a PONG; a link that has received nothing at all for ``heartbeat_misses``
  intervals (3 s) is dropped as silent, and the owner hears of every lost peer through
  ``on_link_lost``. Without this a peer that vanished (kill -9 behind a NAT, a partition) is only
  noticed after aiortc's ~30 s consent timeout. The PONGs also give each link a measured round
  trip (:meth:`PeerManager.rtt_ms`), which the scheduler routes by.
* **Bad input.** Bad chunks from a peer are logged and counted, never fatal; exceptions raised by
  the owner's ``on_message`` are logged, never fatal.
* **Identity.** Every offer and answer carries our public key and an ed25519 signature binding its
  DTLS fingerprints to the link, to us and to the receiver (:mod:`engine.transport.identity`); a
  received one whose key does not derive the sender's peer id, or whose signature does not cover
  the fingerprints actually in its SDP, is refused before aiortc sees it. DTLS alone only proves
  the other end holds the certificate named in the SDP, and the SDP passed through the signaling
  relay, which could otherwise swap in its own certificate and sit in the middle of the link.
* **SCTP.** Importing this module swaps aiortc's SCTP association for
  :class:`~engine.transport.sctp_tuning.TunedSctpTransport` in this process (``KLUSTER_SCTP=stock``
  keeps aiortc's): random loss no longer halves the window, a lost packet of a small message
  costs no retransmission timeout, and two processes on one machine exchange 16 KiB packets.

aiortc notes (1.16): it does not trickle ICE, so each SDP already lists every candidate once
``setLocalDescription`` returns; a peer that vanishes without closing is only noticed after about
30 s (consent freshness), as connection state "closed"; there is no ICE restart, a broken link is
simply replaced by a new one.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import secrets
import time
from collections.abc import Awaitable, Callable, Coroutine
from dataclasses import dataclass
from typing import Any

from aiortc import (
    RTCConfiguration,
    RTCDataChannel,
    RTCIceServer,
    RTCPeerConnection,
    RTCSessionDescription,
)
from aiortc.exceptions import InvalidStateError

from engine.errors import ConfigError, IdentityError, KlusterError, PeerError, ProtocolError, TransportError
from engine.transport import sctp_tuning
from engine.transport.chunking import (
    DEFAULT_MAX_MESSAGE_BYTES,
    KIND_PING,
    MessageSplitter,
    Reassembler,
    encode_abort,
    encode_ping,
    encode_pong,
    encode_whole,
    fits_whole,
    heartbeat_of,
)
from engine.transport.ice_path import IcePath, selected_path
from engine.transport.identity import Identity, check_sdp, key_id_of, sign_sdp

log = logging.getLogger(__name__)

# Loss-tolerant, cheaper SCTP for every connection this process makes (KLUSTER_SCTP=stock: off).
sctp_tuning.install_default()

#: Label of the one data channel of every link; channels with another label are refused.
CHANNEL_LABEL = "kluster"
#: A sender pauses once this many bytes wait in the channel's send buffer...
HIGH_WATER = 1024 * 1024
#: ...and resumes when it drains to this many (``bufferedAmountLowThreshold``).
LOW_WATER = 256 * 1024

SendSignal = Callable[[str, dict[str, Any]], Awaitable[None]]
OnMessage = Callable[[str, bytes], Awaitable[None]]
OnLinkLost = Callable[[str, str], Awaitable[None]]

#: Seconds between heartbeat PINGs on every open link...
HEARTBEAT_S = 1.0
#: ...and how many silent intervals drop the link.
HEARTBEAT_MISSES = 3
#: Weight of a new PONG sample in a link's smoothed round trip.
_RTT_ALPHA = 0.25

_MAX_LINK_ID = 64
#: Offers beyond this many live links from one peer are refused (glare needs 2), so a confused or
#: hostile peer cannot make us hold an unbounded number of RTCPeerConnections.
_MAX_LINKS_PER_PEER = 4


@dataclass(frozen=True, slots=True)
class LinkInfo:
    """A snapshot of one link, for status displays and tests."""

    peer_id: str
    link_id: str
    #: True if we sent the offer, False if the peer did.
    outgoing: bool
    #: "connecting" or "open".
    state: str
    #: True if this is the link sends to ``peer_id`` currently go out on.
    sending: bool
    #: Bytes queued in the data channel, not yet handed to SCTP.
    buffered: int
    messages_sent: int
    messages_received: int
    bad_chunks: int
    #: Smoothed heartbeat round trip in ms (None until the first PONG).
    rtt_ms: float | None = None
    #: Milliseconds since anything arrived on the link.
    silent_ms: float = 0.0


def _fail(fut: asyncio.Future[Any] | None, exc: BaseException) -> None:
    """Fail ``fut`` if still pending, without asyncio logging it when nobody awaits it."""
    if fut is not None and not fut.done():
        fut.set_exception(exc)
        fut.exception()  # marks the exception as retrieved


class _Link:
    """One RTCPeerConnection with its single data channel, plus per-link chunking state."""

    def __init__(
        self, peer_id: str, link_id: str, pc: RTCPeerConnection, outgoing: bool, max_message_bytes: int
    ) -> None:
        loop = asyncio.get_running_loop()
        self.peer_id = peer_id
        self.link_id = link_id
        self.pc = pc
        self.outgoing = outgoing
        self.key = f"out:{link_id}" if outgoing else f"in:{peer_id}:{link_id}"
        self.channel: RTCDataChannel | None = None
        self.state = "connecting"
        self.answer: asyncio.Future[RTCSessionDescription] | None = loop.create_future() if outgoing else None
        self.opened: asyncio.Future[None] = loop.create_future()
        self.open_timer: asyncio.TimerHandle | None = None
        self.splitter = MessageSplitter()
        self.reassembler = Reassembler(max_message_bytes=max_message_bytes)
        self.inbox: asyncio.Queue[bytes | None] = asyncio.Queue()
        self.consumer: asyncio.Task[None] | None = None
        self.send_lock = asyncio.Lock()
        # Senders inside the slow path (lock held or waited for); the lock-free fast path is only
        # taken when this is 0, so a small message can never overtake a large one.
        self.slow_sends = 0
        self.writable = asyncio.Event()
        self.messages_sent = 0
        self.messages_received = 0
        self.bad_chunks = 0
        self._stale_seen = 0
        self.last_rx = time.monotonic()
        self.rtt_ms: float | None = None

    def info(self, sending: bool) -> LinkInfo:
        return LinkInfo(
            peer_id=self.peer_id,
            link_id=self.link_id,
            outgoing=self.outgoing,
            state=self.state,
            sending=sending,
            buffered=self.channel.bufferedAmount if self.channel is not None else 0,
            messages_sent=self.messages_sent,
            messages_received=self.messages_received,
            bad_chunks=self.bad_chunks,
            rtt_ms=None if self.rtt_ms is None else round(self.rtt_ms, 3),
            silent_ms=round((time.monotonic() - self.last_rx) * 1000, 1),
        )

    # -- sending -------------------------------------------------------------------------------

    def _closed_error(self) -> TransportError:
        return TransportError(f"link to peer {self.peer_id} is closed")

    def _put(self, chunk: bytes) -> None:
        channel = self.channel
        if self.state != "open" or channel is None:
            raise self._closed_error()
        try:
            channel.send(chunk)
        except InvalidStateError:
            raise self._closed_error() from None
        except ValueError as exc:  # a non-aiortc peer advertising a maximum below 64 KiB
            raise TransportError(f"link to peer {self.peer_id} refused a chunk: {exc}") from None

    async def _wait_writable(self) -> None:
        channel = self.channel
        if channel is None:
            raise self._closed_error()
        while channel.bufferedAmount > HIGH_WATER:
            if self.state != "open":
                raise self._closed_error()
            self.writable.clear()
            await self.writable.wait()
        if self.state != "open":
            raise self._closed_error()

    async def send(self, data: bytes) -> None:
        """Queue one whole message on the channel, waiting while its buffer is over the high-water mark."""
        channel = self.channel
        if self.state != "open" or channel is None:
            raise self._closed_error()
        if not self.slow_sends and channel.bufferedAmount <= HIGH_WATER and fits_whole(len(data)):
            # Hot path (one token's hidden state): no lock, no await, one small copy.
            self._put(encode_whole(data))
            self.messages_sent += 1
            return
        self.slow_sends += 1
        try:
            async with self.send_lock:
                msg_id, chunks = self.splitter.split(data)
                started = False
                try:
                    for chunk in chunks:
                        if channel.bufferedAmount > HIGH_WATER:
                            await self._wait_writable()
                        self._put(chunk)
                        started = True
                except BaseException:
                    # Cancelled half-way: tell the receiver to drop the partial message now
                    # rather than hold it until it goes stale.
                    if started and msg_id is not None and self.state == "open":
                        with contextlib.suppress(Exception):  # the link is going away anyway
                            channel.send(encode_abort(msg_id))
                    raise
                self.messages_sent += 1
        finally:
            self.slow_sends -= 1

    # -- receiving -----------------------------------------------------------------------------

    def on_chunk(self, chunk: bytes | str) -> None:
        """Data-channel "message" handler: synchronous, so aiortc creates no task per chunk.

        Must never raise: pyee would turn the exception into an error inside aiortc's receive
        path. Complete messages go to :attr:`inbox`, drained in order by one consumer task.
        """
        self.last_rx = time.monotonic()
        try:
            if type(chunk) is not bytes:
                raise ProtocolError("text message on the binary Kluster channel")
            beat = heartbeat_of(chunk)
            if beat is not None:
                self._on_beat(*beat)
                return
            whole = self.reassembler.feed(chunk)
        except ProtocolError as exc:
            self.bad_chunks += 1
            log.warning("dropped a bad chunk from peer %s: %s", self.peer_id, exc)
            return
        except Exception:
            self.bad_chunks += 1
            log.exception("unexpected error reassembling a chunk from peer %s", self.peer_id)
            return
        if whole is not None:
            self.inbox.put_nowait(whole)
        elif self.reassembler.stale_dropped != self._stale_seen:
            log.warning(
                "dropped %d stale partial message(s) from peer %s",
                self.reassembler.stale_dropped - self._stale_seen,
                self.peer_id,
            )
            self._stale_seen = self.reassembler.stale_dropped

    def _on_beat(self, kind: int, stamp: int) -> None:
        if kind == KIND_PING:
            if self.state == "open" and self.channel is not None:
                with contextlib.suppress(Exception):  # a closing channel: the heartbeat will notice
                    self.channel.send(encode_pong(stamp))
            return
        sample = (time.monotonic_ns() - stamp) / 1e6
        if 0 <= sample < 600_000:  # ignore echoes of stamps we never sent
            self.rtt_ms = sample if self.rtt_ms is None else (1 - _RTT_ALPHA) * self.rtt_ms + _RTT_ALPHA * sample

    def ping(self) -> None:
        """Send one heartbeat PING (best effort: a failure shows up as silence)."""
        if self.state == "open" and self.channel is not None:
            with contextlib.suppress(Exception):
                self.channel.send(encode_ping(time.monotonic_ns()))


class PeerManager:
    """All WebRTC links of one Kluster participant (node or client), keyed by peer id.

    ``send_signal(peer_id, data)`` must deliver ``data`` (a JSON-able dict) to that peer's
    :meth:`handle_signal`, normally via the coordinator. ``on_message(peer_id, data)`` is awaited
    once per whole message received, in order per link, from one task per link: a slow handler
    delays later messages of that link only. ``on_link_lost(peer_id, reason)`` is awaited when the
    last open link to a peer closes (silence, failure, or the peer closing it), so an owner waiting
    for a reply from that peer can stop waiting at once.

    ``identity`` is the key that signs our offers and answers; ``self_id`` must be derived from it
    (``identity.peer_id(tag)``, as the coordinator assigns), and so must every peer id we talk to.
    """

    def __init__(
        self,
        self_id: str,
        send_signal: SendSignal,
        on_message: OnMessage,
        *,
        identity: Identity,
        ice_servers: list[RTCIceServer] | None = None,
        connect_timeout: float = 10.0,
        max_message_bytes: int = DEFAULT_MAX_MESSAGE_BYTES,
        on_link_lost: OnLinkLost | None = None,
        heartbeat_s: float = HEARTBEAT_S,
        heartbeat_misses: int = HEARTBEAT_MISSES,
    ) -> None:
        if connect_timeout <= 0:
            raise ValueError("connect_timeout must be positive")
        if heartbeat_s <= 0 or heartbeat_misses < 1:
            raise ValueError("heartbeat_s must be positive and heartbeat_misses at least 1")
        if key_id_of(self_id) != identity.id:
            raise ConfigError(f"peer id {self_id!r} is not derived from this identity's key ({identity.id})")
        self.self_id = self_id
        self.identity = identity
        #: signals refused as malformed or failing the identity check (each also raised to the owner)
        self.bad_signals = 0
        self._send_signal = send_signal
        self._on_message = on_message
        self._on_link_lost = on_link_lost
        self._heartbeat_s = heartbeat_s
        self._silent_s = heartbeat_s * heartbeat_misses
        self._heartbeat: asyncio.Task[None] | None = None
        # Explicit (default: none): aiortc's own default is a public STUN server.
        self._ice_servers = list(ice_servers or [])
        self._connect_timeout = connect_timeout
        self._max_message_bytes = max_message_bytes
        self._links: dict[str, _Link] = {}  # every link not yet closed, by _Link.key
        self._send_links: dict[str, _Link] = {}  # peer -> the open link sends go out on
        self._connecting: dict[str, asyncio.Task[_Link]] = {}  # peer -> shared connect attempt
        self._tasks: set[asyncio.Task[Any]] = set()
        self._closed = False
        self._shutdown_done: asyncio.Event | None = None

    # -- public API ----------------------------------------------------------------------------

    async def send(self, peer_id: str, data: bytes | Callable[[str], bytes]) -> None:
        """Deliver one whole message to ``peer_id``, opening a link first if there is none.

        ``data`` may be a builder called with the key of the link the message will travel on, so
        a sender can write frames that refer to what it sent earlier on that very link
        (``engine.protocol.frames``); it is called right before the message is queued.
        Messages to one peer arrive in the order their ``send`` calls started. Raises
        :class:`PeerError` if no link opens within ``connect_timeout`` and
        :class:`TransportError` if the link is or becomes closed (the next send reconnects).
        """
        if not callable(data):
            self._check_size(data)
        link = self._send_links.get(peer_id)
        if link is None:
            link = await self._link_for(peer_id)
        if callable(data):
            data = data(link.key)
            self._check_size(data)
        await link.send(data)

    def _check_size(self, data: bytes) -> None:
        if len(data) > self._max_message_bytes:
            raise ProtocolError(f"message of {len(data)} bytes exceeds the {self._max_message_bytes}-byte limit")

    async def handle_signal(self, from_peer: str, data: dict[str, Any]) -> None:
        """Process a signaling message the owner received for us from ``from_peer``.

        ``{"type": "offer"|"answer", "link": str, "sdp": str}``. Returns at once: an offer is
        answered (through ``send_signal``) from a tracked task, because gathering candidates can
        take seconds with STUN/TURN servers and the owner's signaling read loop, which also
        carries the answers our own connects wait for, must not stall behind it. Raises
        :class:`ProtocolError` for a malformed message and :class:`IdentityError` for one failing
        the identity check (an offer is then left unanswered; the connect an answer was for fails
        with that error at once); a failure to answer is logged.
        """
        try:
            self._handle_signal(from_peer, data)
        except KlusterError:
            self.bad_signals += 1
            raise

    def _handle_signal(self, from_peer: str, data: dict[str, Any]) -> None:
        if self._closed:
            log.debug("%s: ignoring a signal from %s after shutdown", self.self_id, from_peer)
            return
        if not isinstance(data, dict):
            raise ProtocolError(f"signal from peer {from_peer} is not an object")
        kind, link_id, sdp = data.get("type"), data.get("link"), data.get("sdp")
        if not isinstance(link_id, str) or not 0 < len(link_id) <= _MAX_LINK_ID:
            raise ProtocolError(f"signal from peer {from_peer} has no valid link id")
        if not isinstance(sdp, str):
            raise ProtocolError(f"signal from peer {from_peer} has no SDP")
        if kind == "offer":
            self._accept(from_peer, link_id, data, sdp)
        elif kind == "answer":
            link = self._links.get(f"out:{link_id}")
            if link is None or link.peer_id != from_peer or link.answer is None or link.answer.done():
                log.debug("%s: ignoring a stray answer from %s for link %s", self.self_id, from_peer, link_id)
                return
            try:
                check_sdp(data, "answer", link_id, from_peer, self.self_id, sdp)
            except IdentityError as exc:
                _fail(link.answer, exc)
                raise
            link.answer.set_result(RTCSessionDescription(sdp=sdp, type="answer"))
        else:
            raise ProtocolError(f"signal from peer {from_peer} has unknown type {kind!r}")

    def links(self) -> list[LinkInfo]:
        """Snapshots of every link that is connecting or open."""
        return [link.info(self._send_links.get(link.peer_id) is link) for link in self._links.values()]

    def rtt_ms(self, peer_id: str) -> float | None:
        """Smoothed heartbeat round trip to ``peer_id`` over the link sends use (None if unknown)."""
        link = self._send_links.get(peer_id)
        return None if link is None else link.rtt_ms

    def transport_stats(self, peer_id: str) -> dict[str, float]:
        """SCTP counters summed over every link to ``peer_id`` (empty on stock aiortc): packets sent,
        duplicated, retransmitted, timeouts, SACKs, and the sending link's window and smoothed RTT."""
        total: dict[str, float] = {}
        for link in self._links.values():
            if link.peer_id == peer_id:
                for key, value in sctp_tuning.association_stats(link.pc).items():
                    total[key] = total.get(key, 0) + value
        return total

    def is_connected(self, peer_id: str) -> bool:
        """Whether a message to ``peer_id`` would go out right away on an open link."""
        return peer_id in self._send_links

    def set_ice_servers(self, ice_servers: list[RTCIceServer]) -> None:
        """STUN/TURN servers for links opened from now on (open links keep theirs).

        The coordinator hands out TURN credentials that expire; it sends fresh ones before that.
        """
        self._ice_servers = list(ice_servers)

    def ice_path(self, peer_id: str) -> IcePath | None:
        """The ICE candidate pair the link sends to ``peer_id`` use (direct or relayed), if open."""
        link = self._send_links.get(peer_id)
        return None if link is None else selected_path(link.pc)

    async def close_peer(self, peer_id: str, reason: str = "closed locally") -> None:
        """Close every link to ``peer_id``; a pending connect to it fails with TransportError.

        ``reason`` ends up in that error and in the log (e.g. "peer is not on the coordinator").
        """
        closing = [self._drop(link, reason) for link in list(self._links.values()) if link.peer_id == peer_id]
        await asyncio.gather(*(t for t in closing if t is not None), return_exceptions=True)

    async def shutdown(self) -> None:
        """Close every link and wait until no task of ours is left. Idempotent."""
        if self._closed:
            if self._shutdown_done is not None:
                await self._shutdown_done.wait()
            return
        self._closed = True
        self._shutdown_done = asyncio.Event()
        try:
            for link in list(self._links.values()):
                self._drop(link, "shutting down")
            while self._tasks:
                tasks = list(self._tasks)
                for task in tasks:
                    # Connection closes are let finish (aiortc would leave its own tasks behind);
                    # connects and deliveries are cancelled.
                    if not task.get_name().startswith("kluster-pc-close"):
                        task.cancel()
                await asyncio.gather(*tasks, return_exceptions=True)
        finally:
            self._shutdown_done.set()
        log.debug("%s: transport shut down", self.self_id)

    # -- internals -----------------------------------------------------------------------------

    def _spawn(self, coro: Coroutine[Any, Any, Any], name: str) -> asyncio.Task[Any]:
        """Start a task that shutdown() will find and wait for."""
        task = asyncio.get_running_loop().create_task(coro, name=name)
        self._tasks.add(task)
        task.add_done_callback(self._tasks.discard)
        return task

    async def _beat(self) -> None:
        """Ping every open link each interval; drop links silent for ``heartbeat_misses`` intervals."""
        while not self._closed:
            await asyncio.sleep(self._heartbeat_s)
            now = time.monotonic()
            for link in list(self._links.values()):
                if link.state != "open":
                    continue
                silent = now - link.last_rx
                if silent > self._silent_s:
                    self._drop(link, f"peer silent for {silent:.1f} s")
                else:
                    link.ping()

    def _new_link(self, peer_id: str, link_id: str, outgoing: bool) -> _Link:
        if self._heartbeat is None:
            self._heartbeat = self._spawn(self._beat(), name="kluster-heartbeat")
        pc = RTCPeerConnection(RTCConfiguration(iceServers=list(self._ice_servers)))
        link = _Link(peer_id, link_id, pc, outgoing, self._max_message_bytes)
        self._links[link.key] = link

        def on_state() -> None:
            if pc.connectionState in ("failed", "closed"):
                self._drop(link, f"connection {pc.connectionState}")

        pc.on("connectionstatechange", on_state)
        return link

    def _attach(self, link: _Link, channel: RTCDataChannel) -> None:
        """Hook the channel's events; handlers are plain functions (no task per event)."""
        link.channel = channel
        channel.bufferedAmountLowThreshold = LOW_WATER
        channel.on("message", link.on_chunk)
        channel.on("bufferedamountlow", link.writable.set)
        channel.on("open", lambda: self._on_open(link))
        channel.on("close", lambda: self._drop(link, "channel closed"))

    def _on_open(self, link: _Link) -> None:
        if link.state != "connecting":
            return
        link.state = "open"
        link.last_rx = time.monotonic()
        if link.open_timer is not None:
            link.open_timer.cancel()
            link.open_timer = None
        link.consumer = self._spawn(self._deliver(link), name=f"kluster-deliver-{link.peer_id}")
        if link.peer_id not in self._send_links:
            self._send_links[link.peer_id] = link
        if not link.opened.done():
            link.opened.set_result(None)
        path = selected_path(link.pc)
        log.info(
            "%s: %s link %s with peer %s is open (%s)",
            self.self_id,
            "outgoing" if link.outgoing else "incoming",
            link.link_id,
            link.peer_id,
            "unknown path" if path is None else "via TURN relay" if path.relayed else "direct",
        )

    def _drop(self, link: _Link, reason: str) -> asyncio.Task[Any] | None:
        """Forget ``link`` now and close its connection in a tracked task (returned). Idempotent."""
        if link.state == "closed":
            return None
        was_open = link.state == "open"
        link.state = "closed"
        self._links.pop(link.key, None)
        if self._send_links.get(link.peer_id) is link:
            del self._send_links[link.peer_id]
            # Another open link to the same peer (left over from glare) takes over.
            for other in self._links.values():
                if other.peer_id == link.peer_id and other.state == "open":
                    self._send_links[link.peer_id] = other
                    break
        if link.open_timer is not None:
            link.open_timer.cancel()
            link.open_timer = None
        error = TransportError(f"link to peer {link.peer_id} closed ({reason})")
        _fail(link.answer, error)
        _fail(link.opened, error)
        link.writable.set()  # wakes senders waiting on back-pressure; they see the state
        link.reassembler.clear()
        link.inbox.put_nowait(None)  # the consumer delivers what is complete, then stops
        (log.info if was_open else log.debug)(
            "%s: link %s with peer %s closed (%s)", self.self_id, link.link_id, link.peer_id, reason
        )
        if was_open and link.peer_id not in self._send_links and self._on_link_lost is not None and not self._closed:
            self._spawn(self._tell_lost(link.peer_id, reason), name=f"kluster-lost-{link.peer_id}")
        return self._spawn(self._close_pc(link), name=f"kluster-pc-close-{link.link_id}")

    async def _tell_lost(self, peer_id: str, reason: str) -> None:
        if self._on_link_lost is None:
            return
        try:
            await self._on_link_lost(peer_id, reason)
        except Exception:
            log.exception("%s: on_link_lost failed for peer %s", self.self_id, peer_id)

    async def _close_pc(self, link: _Link) -> None:
        try:
            await link.pc.close()
        except Exception:
            log.exception("%s: error closing the connection to %s", self.self_id, link.peer_id)

    async def _deliver(self, link: _Link) -> None:
        """The one consumer of a link's inbox: awaits on_message per message, in order."""
        inbox = link.inbox
        while True:
            data = await inbox.get()
            if data is None:
                return
            link.messages_received += 1
            try:
                await self._on_message(link.peer_id, data)
            except Exception:
                log.exception("%s: on_message failed for a message from %s", self.self_id, link.peer_id)

    async def _signal(self, peer_id: str, data: dict[str, Any]) -> None:
        try:
            await self._send_signal(peer_id, data)
        except KlusterError:
            raise
        except Exception as exc:
            raise TransportError(f"signaling to peer {peer_id} failed: {exc}") from exc

    async def _link_for(self, peer_id: str) -> _Link:
        """The open link to ``peer_id``, connecting (once, shared by all callers) if needed."""
        if self._closed:
            raise TransportError("the transport is shut down")
        if peer_id == self.self_id:
            raise PeerError("cannot open a link to ourselves")
        task = self._connecting.get(peer_id)
        if task is None:
            task = self._spawn(self._connect(peer_id), name=f"kluster-connect-{peer_id}")
            self._connecting[peer_id] = task

            def forget(t: asyncio.Task[_Link], peer_id: str = peer_id) -> None:
                if self._connecting.get(peer_id) is t:
                    del self._connecting[peer_id]

            task.add_done_callback(forget)
        try:
            return await asyncio.shield(task)
        except asyncio.CancelledError:
            current = asyncio.current_task()
            if task.cancelled() and (current is None or not current.cancelling()):
                raise TransportError(f"connecting to peer {peer_id} was aborted") from None
            raise

    async def _connect(self, peer_id: str) -> _Link:
        """Offer a new link to ``peer_id`` and wait until its channel is open."""
        link = self._new_link(peer_id, secrets.token_hex(8), outgoing=True)
        pending_answer = link.answer
        if pending_answer is None:  # outgoing links always carry a future for the answer
            raise TransportError(f"internal: outgoing link to {peer_id} has no answer slot")
        try:
            async with asyncio.timeout(self._connect_timeout):
                self._attach(link, link.pc.createDataChannel(CHANNEL_LABEL, ordered=True))
                await link.pc.setLocalDescription(await link.pc.createOffer())
                sdp = link.pc.localDescription.sdp
                signed = sign_sdp(self.identity, "offer", link.link_id, self.self_id, peer_id, sdp)
                await self._signal(peer_id, {"type": "offer", "link": link.link_id, "sdp": sdp, **signed})
                await link.pc.setRemoteDescription(await pending_answer)
                await link.opened
        except TimeoutError:
            self._drop(link, "connect timed out")
            raise PeerError(f"peer {peer_id} did not open a link within {self._connect_timeout:g} s") from None
        except KlusterError as exc:
            self._drop(link, str(exc))
            raise
        except Exception as exc:  # aiortc rejected the answer, ICE/DTLS failed to start, ...
            self._drop(link, str(exc))
            raise TransportError(f"link to peer {peer_id} failed: {exc}") from exc
        except BaseException:
            self._drop(link, "cancelled")
            raise
        # After glare an earlier-opened link may already be the one to send on.
        return self._send_links.get(peer_id, link)

    def _accept(self, peer_id: str, link_id: str, data: dict[str, Any], sdp: str) -> None:
        """Register the link an offer from ``peer_id`` asks for and answer it in a tracked task."""
        if "m=application" not in sdp:
            raise ProtocolError(f"offer from peer {peer_id} carries no data channel")
        check_sdp(data, "offer", link_id, peer_id, self.self_id, sdp)
        if f"in:{peer_id}:{link_id}" in self._links:
            log.debug("%s: ignoring a repeated offer from %s for link %s", self.self_id, peer_id, link_id)
            return
        if sum(1 for other in self._links.values() if other.peer_id == peer_id) >= _MAX_LINKS_PER_PEER:
            raise ProtocolError(f"peer {peer_id} offered more than {_MAX_LINKS_PER_PEER} links at once")
        link = self._new_link(peer_id, link_id, outgoing=False)

        def on_datachannel(channel: RTCDataChannel) -> None:
            if link.channel is not None or channel.label != CHANNEL_LABEL or link.state != "connecting":
                log.warning("%s: refusing extra channel %r from %s", self.self_id, channel.label, peer_id)
                channel.close()
                return
            self._attach(link, channel)
            if channel.readyState == "open":  # aiortc emits "datachannel" for an open channel
                self._on_open(link)

        link.pc.on("datachannel", on_datachannel)
        # The offerer gives up after connect_timeout; so do we if its channel never arrives.
        link.open_timer = asyncio.get_running_loop().call_later(self._connect_timeout, self._open_deadline, link)
        self._spawn(self._answer(link, sdp), name=f"kluster-answer-{peer_id}")

    async def _answer(self, link: _Link, sdp: str) -> None:
        """Apply the offer, gather our candidates and send the answer back; log any failure."""
        peer_id = link.peer_id
        try:
            await link.pc.setRemoteDescription(RTCSessionDescription(sdp=sdp, type="offer"))
            await link.pc.setLocalDescription(await link.pc.createAnswer())
        except Exception as exc:
            log.warning("%s: bad offer from peer %s: %s", self.self_id, peer_id, exc)
            self._drop(link, "bad offer")
            return
        if link.state == "closed":  # dropped meanwhile (open deadline, close_peer, shutdown)
            return
        try:
            answer = link.pc.localDescription.sdp
            signed = sign_sdp(self.identity, "answer", link.link_id, self.self_id, peer_id, answer)
            await self._signal(peer_id, {"type": "answer", "link": link.link_id, "sdp": answer, **signed})
        except KlusterError as exc:
            log.warning("%s: could not answer peer %s: %s", self.self_id, peer_id, exc)
            self._drop(link, "answer not delivered")

    def _open_deadline(self, link: _Link) -> None:
        link.open_timer = None
        if link.state == "connecting":
            self._drop(link, "no channel opened in time")
