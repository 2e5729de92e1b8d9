"""Cheaper per-packet DTLS and ICE work in aiortc 1.16 / aioice 0.13 / pyOpenSSL (same wire bytes).

Why: a data-channel packet carries at most 1,172 bytes, so on a fast path the Python work *per
packet* is the throughput limit (py-spy on a loopback bulk transfer). Three costs here do no
useful work and are removed:

* aioice parses every datagram as STUN first and learns from the ValueError that it is not; a
  DTLS record's first byte (20-63) can never start a STUN message (0-3), so those skip the parse.
* After each decrypted record aiortc asks OpenSSL for outgoing bytes with ``bio_read``, which
  raises (and pyOpenSSL builds) a ``WantReadError`` when, as almost always, there are none; the
  same ``BIO_read`` called directly just returns -1.
* ``recv``/``bio_read`` allocate a fresh buffer per call and go through pyOpenSSL's error
  checks even when the call succeeded; here each transport reuses its own two buffers.

Measured (loopback, 2 processes, 1,160-byte chunks): CPU per MB 17-20 -> 15 ms on each side.

The replacements call the same OpenSSL functions through pyOpenSSL's own cffi binding, fall back
to the original code during the handshake and on any error, and are installed only when the
private attributes they rely on exist (:func:`install` returns False otherwise).
"""

from __future__ import annotations

import logging
from typing import Any

log = logging.getLogger(__name__)

#: Largest DTLS record plaintext (2^14) plus slack: one SSL_read never returns more.
_READ_SIZE = 16 * 1024 + 2048
#: What aiortc reads from the outgoing BIO per datagram (one record; it never exceeds this).
_WRITE_SIZE = 1500
#: Room for one whole record of up to 2^14 plaintext bytes plus DTLS overhead: what is read
#: from the outgoing BIO on a same-host path (``_kluster_record_bytes``).
RECORD_READ_BYTES = 16 * 1024 + 2048

_installed = False


def installed() -> bool:
    """Whether :func:`install` succeeded in this process."""
    return _installed


def install() -> bool:
    """Patch aioice's datagram dispatch and aiortc's DTLS record I/O. Idempotent."""
    global _installed
    if _installed:
        return True
    try:
        import pylibsrtp
        from aioice.ice import StunProtocol
        from aiortc import clock
        from aiortc.rtcdtlstransport import RTCDtlsTransport
        from aiortc.rtp import is_rtcp
        from OpenSSL import SSL
        from OpenSSL._util import ffi, lib
    except ImportError as exc:  # pragma: no cover - the dependencies are pinned
        log.warning("transport fast path not installed: %s", exc)
        return False
    needed = (
        hasattr(lib, "SSL_read")
        and hasattr(lib, "BIO_read")
        and hasattr(SSL.Connection, "_raise_ssl_error")
        and hasattr(RTCDtlsTransport, "_recv_next")
        and hasattr(RTCDtlsTransport, "_write_ssl")
        and hasattr(StunProtocol, "datagram_received")
    )
    if not needed:
        log.warning("transport fast path not installed: aiortc/aioice/pyOpenSSL internals differ")
        return False

    stock_recv_next = RTCDtlsTransport._recv_next
    stock_datagram_received = StunProtocol.datagram_received

    def datagram_received(self: Any, data: bytes, addr: tuple[Any, ...]) -> None:
        if data and 19 < data[0] < 64 and self.local_candidate is not None:
            self.receiver.data_received(data, self.local_candidate.component)
            return
        stock_datagram_received(self, data, addr)

    def buffers(self: Any) -> tuple[Any, Any]:
        """This transport's own (read, write) buffers, reused for every record."""
        bufs = self.__dict__.get("_kluster_bufs")
        if bufs is None:
            bufs = self._kluster_bufs = (ffi.new("char[]", _READ_SIZE), ffi.new("char[]", RECORD_READ_BYTES))
        return bufs

    def take_outgoing(self: Any) -> bytes | None:
        """What OpenSSL wrote to the outgoing BIO: 1,500 bytes at most like aiortc, or a whole
        jumbo record where the SCTP association set ``_kluster_record_bytes`` (a same-host path,
        :mod:`engine.transport.sctp_jumbo`). None, without an exception, when there is nothing."""
        write_buf = buffers(self)[1]
        n = lib.BIO_read(self._ssl._from_ssl, write_buf, getattr(self, "_kluster_record_bytes", _WRITE_SIZE))
        return ffi.buffer(write_buf, n)[:] if n > 0 else None

    async def send_outgoing(self: Any, data: bytes) -> None:
        await self.transport._send(data)
        self._RTCDtlsTransport__tx_bytes += len(data)
        self._RTCDtlsTransport__tx_packets += 1

    async def write_ssl(self: Any) -> None:
        """Flush what OpenSSL wrote to the outgoing BIO (one record at most) to the ICE transport."""
        data = take_outgoing(self)
        if data is not None:
            await send_outgoing(self, data)

    async def recv_next(self: Any) -> None:
        if not self._RTCDtlsTransport__handshake_done:
            await stock_recv_next(self)
            return
        data = await self.transport._recv()
        self._RTCDtlsTransport__rx_bytes += len(data)
        self._RTCDtlsTransport__rx_packets += 1
        first = data[0]
        if not 19 < first < 64:
            if 127 < first < 192 and self._rx_srtp:
                await _srtp(self, data)  # media: not used by Kluster, kept working as in aiortc
            return
        conn = self._ssl
        conn.bio_write(data)
        read_buf = buffers(self)[0]
        n = lib.SSL_read(conn._ssl, read_buf, _READ_SIZE)
        plain: bytes | None = b""
        if n > 0:
            plain = ffi.buffer(read_buf, n)[:]
        else:
            try:
                conn._raise_ssl_error(conn._ssl, n)
            except SSL.ZeroReturnError:
                plain = None
            except SSL.Error:
                pass
        out = take_outgoing(self)  # an alert, a handshake retransmission: rarely anything
        if out is not None:
            await send_outgoing(self, out)
        if plain is None:
            raise ConnectionError  # the peer shut DTLS down (what the original raises)
        if plain and self._data_receiver is not None:
            await self._data_receiver._handle_data(plain)

    async def _srtp(self: Any, data: bytes) -> None:
        """aiortc's own SRTP/SRTCP branch of ``_recv_next``, unchanged."""
        arrival_time_ms = clock.current_ms()
        try:
            if is_rtcp(data):
                await self._handle_rtcp_data(self._rx_srtp.unprotect_rtcp(data))
            else:
                await self._handle_rtp_data(self._rx_srtp.unprotect(data), arrival_time_ms=arrival_time_ms)
        except pylibsrtp.Error as exc:
            log.debug("SRTP unprotect failed: %s", exc)

    StunProtocol.datagram_received = datagram_received  # type: ignore[method-assign]
    RTCDtlsTransport._write_ssl = write_ssl  # type: ignore[method-assign]
    RTCDtlsTransport._recv_next = recv_next  # type: ignore[method-assign]
    _installed = True
    return True
