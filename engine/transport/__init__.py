"""Peer-to-peer message links over WebRTC data channels (aiortc).

Files and their roles:
  chunking.py   pure framing: whole messages <-> <= 64 KiB data-channel chunks (3-byte header for a
                one-chunk message, 23 bytes per chunk otherwise) and a bounded Reassembler that
                rejects malformed chunks with ProtocolError; no I/O, no aiortc
  peer.py       PeerManager: opens/reuses one RTCPeerConnection per peer through offer/answer relayed
                by the owner's signaling, sends with back-pressure, delivers whole messages in order,
                survives bad chunks, failing handlers and broken links
  signaling.py  the coordinator WebSocket client whose relayed signals feed PeerManager.handle_signal
  identity.py   ed25519 peer keys, self-certifying peer ids and the signature binding each SDP's DTLS
                fingerprints to its sender, receiver and link (a relay cannot swap them unnoticed)
  ice_path.py   which ICE candidate pair a link was nominated on (direct, or through a TURN relay)
  sctp_tuning.py  aiortc's SCTP association made loss-tolerant and cheaper (RACK loss detection,
                redundancy for small messages and tails, tail loss probe, batched SACKs, 16 KiB
                packets on same-host paths); installed by peer.py unless KLUSTER_SCTP=stock
  sctp_cc.py    pure RTT estimation and the delay-driven congestion window sctp_tuning uses
  fastpath.py   per-packet DTLS/ICE shortcuts in aiortc/aioice/pyOpenSSL (same bytes on the wire)
  measure.py    ``python -m engine.transport.measure``: RTT and throughput between two processes on
                loopback; also the echo peer the cross-process test talks to
  probe_peer.py a PeerManager in a child process driven over pipes (optionally inside a WAN host's
                network namespace): both ends of ``kluster bench transport`` and the WAN test
  benchmark.py  the measurements of ``kluster bench transport``: ours vs stock aiortc

``PeerManager`` and ``LinkInfo`` are imported lazily so that code needing only the framing does
not pay for importing aiortc.
"""

from __future__ import annotations

from typing import TYPE_CHECKING, Any

from engine.transport.chunking import (
    DEFAULT_MAX_MESSAGE_BYTES,
    MAX_CHUNK,
    MessageSplitter,
    Reassembler,
    iter_chunks,
)

if TYPE_CHECKING:
    from engine.transport.peer import CHANNEL_LABEL, LinkInfo, PeerManager

__all__ = [
    "CHANNEL_LABEL",
    "DEFAULT_MAX_MESSAGE_BYTES",
    "MAX_CHUNK",
    "LinkInfo",
    "MessageSplitter",
    "PeerManager",
    "Reassembler",
    "iter_chunks",
]

_LAZY = {"CHANNEL_LABEL", "LinkInfo", "PeerManager"}


def __getattr__(name: str) -> Any:
    if name in _LAZY:
        from engine.transport import peer

        return getattr(peer, name)
    raise AttributeError(f"module {__name__!r} has no attribute {name!r}")
