"""Peer-to-peer message links over WebRTC data channels (aiortc).

Files and their roles:
  chunking.py  pure framing: whole messages <-> <= 64 KiB data-channel chunks (3-byte header for a
               one-chunk message, 23 bytes per chunk otherwise), and a bounded Reassembler that
               rejects malformed chunks with ProtocolError
  peer.py      PeerManager: opens/reuses one RTCPeerConnection per peer via offer/answer relayed by
               the owner's signaling, sends with back-pressure, delivers whole messages in order,
               survives bad chunks and broken links
  measure.py   ``python -m engine.transport.measure``: RTT and throughput between two processes on
               loopback; also the echo peer the cross-process test talks to
"""

from engine.transport.chunking import (
    DEFAULT_MAX_MESSAGE_BYTES,
    MAX_CHUNK,
    MessageSplitter,
    Reassembler,
    iter_chunks,
)
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
