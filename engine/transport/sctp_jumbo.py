"""16 KiB SCTP packets between two processes on one machine, when both ends are ours.

Why: a data-channel packet normally carries at most 1,160 bytes of user data, so that it fits a
1,500-byte Internet MTU. Between two processes on the same host (one node per GPU on a multi-GPU
machine, or a bench) there is no such MTU, only the per-packet Python cost of SCTP, DTLS and
ICE; 16 KiB chunks (one full DTLS record) cut it about 5x (loopback, 2 processes: CPU per MB
15 -> 3 ms on each side; 20 -> 130 MB/s).

Both conditions are checked, so nothing changes for anybody else:

* the peer announced it can take such packets, with an INIT parameter of a type other SCTP
  stacks skip silently (:data:`JUMBO_PARAM`; aiortc's own receive path reads at most 1,500
  bytes of a DTLS record, ours reads whole records, see :mod:`engine.transport.fastpath`);
* the ICE pair in use joins two host candidates and the remote address is one of ours.
"""

from __future__ import annotations

import logging

from aiortc.rtcdtlstransport import RTCDtlsTransport
from aiortc.rtcsctptransport import (
    SCTP_DATA_FIRST_FRAG,
    SCTP_DATA_LAST_FRAG,
    SCTP_DATA_UNORDERED,
    SCTP_TSN_MODULO,
    USERDATA_MAX_LENGTH,
    DataChunk,
)

from engine.transport import fastpath
from engine.transport.sctp_receive import BatchedSackReceiver

log = logging.getLogger(__name__)

#: INIT parameter by which our association tells the peer it takes jumbo packets. Types
#: 0x8000-0xBFFF mean "skip if unknown, do not report" (RFC 9260 3.2.1): other stacks ignore it.
JUMBO_PARAM = 0xBF4B
#: User data per DATA chunk on a same-host path: one DTLS record holds at most 2^14 bytes of
#: plaintext, minus the SCTP common (12) and DATA chunk (16) headers, rounded down to 4.
JUMBO_USER_DATA = (16384 - 12 - 16) // 4 * 4
#: Messages up to this size are marked ``_small`` on their chunks (the sender duplicates those).
SMALL_MESSAGE_BYTES = 16 * 1024

_MASK = SCTP_TSN_MODULO - 1


class JumboChunking(BatchedSackReceiver):
    """Cuts messages into chunks of a per-association size (1,160 bytes, or 16 KiB on a
    same-host path with a peer that takes them); :meth:`_chunk_size_changed` tells subclasses."""

    def __init__(self, transport: RTCDtlsTransport, port: int = 5000) -> None:
        super().__init__(transport, port)
        self._peer_jumbo = False
        self._path_checked = False
        self._max_user_data = USERDATA_MAX_LENGTH

    def _chunk_size_changed(self) -> None:
        """Called once if the chunk size grows (before any DATA chunk was cut)."""

    def _set_extensions(self, params: list[tuple[int, bytes]]) -> None:
        super()._set_extensions(params)
        if fastpath.installed():  # our receive path reads whole 16 KiB records; aiortc's reads 1,500 B
            params.append((JUMBO_PARAM, b""))

    def _get_extensions(self, params: list[tuple[int, bytes]]) -> None:
        super()._get_extensions(params)
        self._peer_jumbo = any(k == JUMBO_PARAM for k, _ in params)

    def _check_path(self) -> None:
        """Once, at the first message: on a path to this very host (two processes on one
        machine, e.g. one node per GPU) there is no 1,500-byte MTU, only the per-packet cost of
        Python; if the peer takes jumbo packets, cut messages into 16 KiB chunks there."""
        self._path_checked = True
        if not self._peer_jumbo or not fastpath.installed() or not same_host(self.transport):
            return
        self._max_user_data = JUMBO_USER_DATA
        self._chunk_size_changed()
        self.transport._kluster_record_bytes = fastpath.RECORD_READ_BYTES  # type: ignore[attr-defined]
        log.debug("same-host path: %d-byte SCTP chunks", JUMBO_USER_DATA)

    async def _send(
        self,
        stream_id: int,
        pp_id: int,
        user_data: bytes,
        expiry: float | None = None,
        max_retransmits: int | None = None,
        ordered: bool = True,
    ) -> None:
        """aiortc's ``_send`` with a per-association chunk size (see :meth:`_check_path`)."""
        if not self._path_checked:
            self._check_path()
        size = self._max_user_data
        stream_seq = self._outbound_stream_seq.get(stream_id, 0) if ordered else 0
        fragments = -(-len(user_data) // size)
        flags = 0 if ordered else SCTP_DATA_UNORDERED
        view = memoryview(user_data)
        small = len(user_data) <= SMALL_MESSAGE_BYTES
        for fragment in range(fragments):
            chunk = DataChunk()
            chunk.flags = flags
            if fragment == 0:
                chunk.flags |= SCTP_DATA_FIRST_FRAG
            if fragment == fragments - 1:
                chunk.flags |= SCTP_DATA_LAST_FRAG
            chunk.tsn = self._local_tsn
            chunk.stream_id = stream_id
            chunk.stream_seq = stream_seq
            chunk.protocol = pp_id
            chunk.user_data = bytes(view[fragment * size : (fragment + 1) * size])
            chunk._abandoned = False
            chunk._acked = False
            chunk._book_size = len(chunk.user_data)
            chunk._expiry = expiry
            chunk._in_flight = False
            chunk._max_retransmits = max_retransmits
            chunk._misses = 0
            chunk._retransmit = False
            chunk._sent_count = 0
            chunk._sent_time = None
            chunk._small = small
            self._local_tsn = (self._local_tsn + 1) & _MASK
            self._outbound_queue.append(chunk)
        if ordered:
            self._outbound_stream_seq[stream_id] = (stream_seq + 1) & 0xFFFF
        await self._transmit()


def same_host(dtls: RTCDtlsTransport) -> bool:
    """Whether the ICE pair in use connects two addresses of this host (aioice 0.13 internals)."""
    try:
        connection = dtls.transport._connection
        pair = connection._nominated.get(1)
        if pair is None:
            return False
        local_hosts = {c.host for c in connection.local_candidates if c.type == "host"}
        return (
            pair.local_candidate.type == "host"
            and pair.remote_candidate.type == "host"
            and pair.remote_candidate.host in local_hosts
        )
    except AttributeError:
        return False
