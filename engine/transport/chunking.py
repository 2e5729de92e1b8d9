"""Splitting whole messages into data-channel chunks and rebuilding them on the other side.

Why this exists: an aiortc data channel refuses messages larger than the remote's advertised
maximum (256 KiB between aiortc peers, 64 KiB assumed for a peer that advertises nothing), while a
Kluster message (an activation tensor for a whole prompt) can be many megabytes. Every message is
therefore cut into chunks of at most :data:`MAX_CHUNK` bytes *including* a small header, and a
:class:`Reassembler` per receiving channel glues them back together.

Pure code: no I/O, no asyncio, no logging. Anything a remote peer can get wrong raises
:class:`~engine.errors.ProtocolError` with a one-line message; nothing here can be made to grow
without bound.

Wire layout (all integers big-endian):

``WHOLE`` — a message that fits in one chunk (the per-token hot path, 3 bytes of overhead)::

    0  u8  magic   0x4B ('K')
    1  u8  version 1
    2  u8  kind    0 = WHOLE
    3  ... payload (the entire message)

``PART`` — one chunk of a message that needed several (23 bytes of header)::

    0  u8  magic    0x4B
    1  u8  version  1
    2  u8  kind     1 = PART
    3  u32 msg_id   sender-chosen id, unique among the sender's unfinished messages on the channel
    7  u32 index    0-based chunk index, chunks arrive in order
    11 u32 count    total number of chunks of this message (>= 1)
    15 u64 total    total payload bytes of the whole message
    23 ... payload  (non-empty unless total == 0)

``ABORT`` — the sender gave up on a message half-way (e.g. its send was cancelled)::

    0  u8  magic, 1 u8 version, 2 u8 kind = 2, 3 u32 msg_id

``PING`` / ``PONG`` — the link heartbeat (not a message; never reaches the reassembler)::

    0  u8  magic, 1 u8 version, 2 u8 kind = 3 (PING) or 4 (PONG), 3 u64 stamp

A PONG echoes the stamp of the PING it answers, so the pinger gets the round trip from its own
clock alone. Pings may interleave with the chunks of a message: the receiver peels them off
before reassembly.
"""

from __future__ import annotations

import struct
import time
from collections import OrderedDict
from collections.abc import Callable, Iterator
from dataclasses import dataclass

from engine.errors import ProtocolError

#: Largest chunk put on the wire, header included. 64 KiB is what every WebRTC stack accepts
#: (the default assumed when a peer advertises no maximum), so no size negotiation is needed.
MAX_CHUNK = 64 * 1024

#: Default largest whole message a :class:`Reassembler` accepts.
DEFAULT_MAX_MESSAGE_BYTES = 256 * 1024 * 1024

MAGIC = 0x4B
VERSION = 1
KIND_WHOLE = 0
KIND_PART = 1
KIND_ABORT = 2
KIND_PING = 3
KIND_PONG = 4

_PREFIX = struct.Struct("!BBB")
_PART = struct.Struct("!BBBIIIQ")
_ABORT = struct.Struct("!BBBI")
_BEAT = struct.Struct("!BBBQ")

WHOLE_HEADER = _PREFIX.size  # 3
PART_HEADER = _PART.size  # 23
ABORT_SIZE = _ABORT.size  # 7
BEAT_SIZE = _BEAT.size  # 11

_WHOLE_PREFIX = _PREFIX.pack(MAGIC, VERSION, KIND_WHOLE)
_U32 = 1 << 32


def _byte_view(data: bytes | bytearray | memoryview) -> memoryview:
    """A flat byte view of ``data`` (a memoryview of another format counts its bytes, not items)."""
    view = memoryview(data)
    return view if view.format == "B" and view.ndim == 1 else view.cast("B")


def encode_whole(data: bytes | bytearray | memoryview) -> bytes:
    """One-chunk encoding of ``data``; the caller guarantees it fits (see :func:`fits_whole`)."""
    return _WHOLE_PREFIX + data


def fits_whole(size: int, max_chunk: int = MAX_CHUNK) -> bool:
    """Whether a message of ``size`` bytes travels as a single ``WHOLE`` chunk."""
    return size + WHOLE_HEADER <= max_chunk


def encode_abort(msg_id: int) -> bytes:
    """The chunk telling the receiver to forget the unfinished message ``msg_id``."""
    return _ABORT.pack(MAGIC, VERSION, KIND_ABORT, msg_id)


def encode_ping(stamp: int) -> bytes:
    """A heartbeat asking for a PONG that echoes ``stamp`` (a u64, e.g. ``time.monotonic_ns()``)."""
    return _BEAT.pack(MAGIC, VERSION, KIND_PING, stamp & 0xFFFFFFFFFFFFFFFF)


def encode_pong(stamp: int) -> bytes:
    """The answer to a PING carrying ``stamp``."""
    return _BEAT.pack(MAGIC, VERSION, KIND_PONG, stamp & 0xFFFFFFFFFFFFFFFF)


def heartbeat_of(chunk: bytes) -> tuple[int, int] | None:
    """``(KIND_PING or KIND_PONG, stamp)`` if ``chunk`` is a heartbeat, else None (a data chunk)."""
    if len(chunk) != BEAT_SIZE or chunk[0] != MAGIC or chunk[1] != VERSION or chunk[2] not in (KIND_PING, KIND_PONG):
        return None
    _, _, kind, stamp = _BEAT.unpack(chunk)
    return kind, stamp


def iter_chunks(data: bytes | bytearray | memoryview, msg_id: int, max_chunk: int = MAX_CHUNK) -> Iterator[bytes]:
    """Yield the wire chunks of one message, each at most ``max_chunk`` bytes long.

    A generator so that a sender applying back-pressure never holds a second copy of a large
    message: each chunk is built just before it is handed to the channel.
    """
    if max_chunk <= PART_HEADER:
        raise ValueError(f"max_chunk must exceed the {PART_HEADER}-byte chunk header, got {max_chunk}")
    view = _byte_view(data)
    size = view.nbytes
    if fits_whole(size, max_chunk):
        yield _WHOLE_PREFIX + view
        return
    if not 0 <= msg_id < _U32:
        raise ValueError(f"msg_id must be a u32, got {msg_id}")
    room = max_chunk - PART_HEADER
    count = -(-size // room)
    if count >= _U32:
        raise ValueError(f"a message of {size} bytes needs too many chunks of {max_chunk} bytes")
    pack = _PART.pack
    for index in range(count):
        start = index * room
        yield pack(MAGIC, VERSION, KIND_PART, msg_id, index, count, size) + view[start : start + room]


class MessageSplitter:
    """Allocates message ids for one sending channel and cuts messages into chunks.

    One per channel: ids only need to be unique among a sender's unfinished messages on that
    channel, so a wrapping u32 counter is plenty.
    """

    __slots__ = ("_next_id", "max_chunk")

    def __init__(self, max_chunk: int = MAX_CHUNK) -> None:
        if max_chunk <= PART_HEADER:
            raise ValueError(f"max_chunk must exceed the {PART_HEADER}-byte chunk header, got {max_chunk}")
        self.max_chunk = max_chunk
        self._next_id = 0

    def next_id(self) -> int:
        """A fresh message id (only consumed by multi-chunk messages)."""
        msg_id = self._next_id
        self._next_id = (msg_id + 1) % _U32
        return msg_id

    def split(self, data: bytes | bytearray | memoryview) -> tuple[int | None, Iterator[bytes]]:
        """Return ``(msg_id, chunks)``; ``msg_id`` is None for a single-chunk message."""
        if fits_whole(_byte_view(data).nbytes, self.max_chunk):
            return None, iter((_WHOLE_PREFIX + data,))
        msg_id = self.next_id()
        return msg_id, iter_chunks(data, msg_id, self.max_chunk)


@dataclass(slots=True)
class _Partial:
    """A message whose first chunks arrived and whose last has not."""

    count: int
    total: int
    next_index: int
    buf: bytearray
    last_seen: float


class Reassembler:
    """Rebuilds whole messages from the chunks of one ordered channel.

    Limits, so that a hostile or broken peer cannot make it grow without bound:

    * ``max_message_bytes``: a message announcing (or reaching) more is rejected;
    * ``max_partials``: at most that many unfinished messages at once (an honest sender that
      serialises its messages has at most one);
    * ``stale_after``: an unfinished message that saw no chunk for that many seconds is dropped
      (counted in :attr:`stale_dropped`).

    Memory held is thus at most ``max_partials * max_message_bytes`` plus a small id list, and in
    practice the bytes actually received. When a message is rejected, its remaining chunks are
    discarded silently instead of raising once per chunk.
    """

    _MAX_DISCARDING = 64

    def __init__(
        self,
        *,
        max_message_bytes: int = DEFAULT_MAX_MESSAGE_BYTES,
        max_partials: int = 8,
        stale_after: float = 60.0,
        clock: Callable[[], float] = time.monotonic,
    ) -> None:
        if max_message_bytes < 0 or max_partials < 1 or stale_after <= 0:
            raise ValueError("Reassembler limits must be positive")
        self.max_message_bytes = max_message_bytes
        self.max_partials = max_partials
        self.stale_after = stale_after
        self._clock = clock
        self._partials: dict[int, _Partial] = {}
        # Ids of rejected messages whose later chunks are still on their way.
        self._discarding: OrderedDict[int, None] = OrderedDict()
        #: Unfinished messages dropped because they went stale.
        self.stale_dropped = 0

    @property
    def partials(self) -> int:
        """Number of unfinished messages being held."""
        return len(self._partials)

    @property
    def buffered_bytes(self) -> int:
        """Payload bytes held for unfinished messages."""
        return sum(len(p.buf) for p in self._partials.values())

    def clear(self) -> None:
        """Forget every unfinished message (the channel closed)."""
        self._partials.clear()
        self._discarding.clear()

    def expire(self) -> int:
        """Drop unfinished messages idle for more than ``stale_after`` seconds; return how many."""
        if not self._partials:
            return 0
        limit = self._clock() - self.stale_after
        stale = [msg_id for msg_id, p in self._partials.items() if p.last_seen < limit]
        for msg_id in stale:
            del self._partials[msg_id]
            self._discard(msg_id)
        self.stale_dropped += len(stale)
        return len(stale)

    def feed(self, chunk: bytes | bytearray | memoryview) -> bytes | None:
        """Take one chunk; return the whole message it completes, else None.

        Raises ProtocolError for a malformed chunk; the unfinished message it belonged to (if
        any could be identified) is dropped, everything else is kept.
        """
        if type(chunk) is bytes and chunk.startswith(_WHOLE_PREFIX):
            # Hot path: one message per chunk.
            if len(chunk) - WHOLE_HEADER > self.max_message_bytes:
                raise ProtocolError(
                    f"message of {len(chunk) - WHOLE_HEADER} bytes exceeds the {self.max_message_bytes}-byte limit"
                )
            return chunk[WHOLE_HEADER:]
        if not isinstance(chunk, bytes | bytearray | memoryview):
            raise ProtocolError(f"chunk must be bytes, got {type(chunk).__name__}")
        chunk = bytes(chunk)
        if len(chunk) < WHOLE_HEADER:
            raise ProtocolError(f"chunk of {len(chunk)} bytes is shorter than any chunk header")
        magic, version, kind = _PREFIX.unpack_from(chunk)
        if magic != MAGIC:
            raise ProtocolError(f"chunk has bad magic 0x{magic:02x} (expected 0x{MAGIC:02x})")
        if version != VERSION:
            raise ProtocolError(f"chunk has unsupported version {version} (expected {VERSION})")
        if kind == KIND_WHOLE:
            return self.feed(chunk)  # only reached for bytearray/memoryview input
        if kind == KIND_PART:
            return self._feed_part(chunk)
        if kind == KIND_ABORT:
            if len(chunk) != ABORT_SIZE:
                raise ProtocolError(f"abort chunk of {len(chunk)} bytes (expected {ABORT_SIZE})")
            (msg_id,) = struct.unpack_from("!I", chunk, WHOLE_HEADER)
            self._partials.pop(msg_id, None)
            self._discarding.pop(msg_id, None)
            return None
        raise ProtocolError(f"chunk has unknown kind {kind}")

    def _discard(self, msg_id: int) -> None:
        self._discarding[msg_id] = None
        self._discarding.move_to_end(msg_id)
        while len(self._discarding) > self._MAX_DISCARDING:
            self._discarding.popitem(last=False)

    def _reject(self, msg_id: int, message: str) -> ProtocolError:
        """Drop message ``msg_id`` for good and build the error to raise."""
        self._partials.pop(msg_id, None)
        self._discard(msg_id)
        return ProtocolError(message)

    def _feed_part(self, chunk: bytes) -> bytes | None:
        if len(chunk) < PART_HEADER:
            raise ProtocolError(f"part chunk of {len(chunk)} bytes is shorter than its {PART_HEADER}-byte header")
        _, _, _, msg_id, index, count, total = _PART.unpack_from(chunk)
        size = len(chunk) - PART_HEADER
        self.expire()
        partial = self._partials.get(msg_id)

        if partial is None:
            if msg_id in self._discarding:
                if index != 0:  # the tail of a message we dropped
                    if index >= count - 1:
                        del self._discarding[msg_id]
                    return None
                del self._discarding[msg_id]  # a new message reusing the id
            if index >= count:
                raise self._reject(msg_id, f"chunk {index} of message {msg_id} claims a count of {count}")
            if index != 0:
                raise self._reject(msg_id, f"chunk {index} of message {msg_id} arrived without its first chunk")
            if total > self.max_message_bytes:
                raise self._reject(
                    msg_id,
                    f"message {msg_id} of {total} bytes exceeds the {self.max_message_bytes}-byte limit",
                )
            if count > max(total, 1):
                raise self._reject(msg_id, f"message {msg_id} of {total} bytes cannot span {count} chunks")
            if len(self._partials) >= self.max_partials:
                raise self._reject(
                    msg_id, f"message {msg_id} exceeds the limit of {self.max_partials} unfinished messages"
                )
            partial = _Partial(count=count, total=total, next_index=0, buf=bytearray(), last_seen=0.0)
            self._partials[msg_id] = partial

        if index != partial.next_index:
            raise self._reject(msg_id, f"message {msg_id}: got chunk {index}, expected {partial.next_index}")
        if count != partial.count or total != partial.total:
            raise self._reject(msg_id, f"message {msg_id}: chunk {index} disagrees on count or total size")
        if (size == 0 and total != 0) or len(partial.buf) + size > total:
            raise self._reject(msg_id, f"message {msg_id}: chunk {index} has a bad payload size {size}")
        partial.buf += memoryview(chunk)[PART_HEADER:]
        partial.next_index = index + 1
        partial.last_seen = self._clock()
        if partial.next_index < count:
            return None
        del self._partials[msg_id]
        if len(partial.buf) != total:
            raise self._reject(msg_id, f"message {msg_id} ended with {len(partial.buf)} of {total} bytes")
        return bytes(partial.buf)
