"""Chunk framing: round trips of any size, and nothing but ProtocolError for anything malformed."""

from __future__ import annotations

import os
import struct

import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from engine.errors import ProtocolError
from engine.transport.chunking import (
    KIND_PART,
    MAGIC,
    MAX_CHUNK,
    PART_HEADER,
    VERSION,
    WHOLE_HEADER,
    MessageSplitter,
    Reassembler,
    encode_abort,
    encode_whole,
    iter_chunks,
)

_PART = struct.Struct("!BBBIIIQ")


def part(msg_id: int, index: int, count: int, total: int, payload: bytes) -> bytes:
    return _PART.pack(MAGIC, VERSION, KIND_PART, msg_id, index, count, total) + payload


def feed_all(r: Reassembler, chunks: list[bytes]) -> list[bytes]:
    return [m for m in map(r.feed, chunks) if m is not None]


def one_line_error(exc: pytest.ExceptionInfo[ProtocolError]) -> str:
    text = str(exc.value)
    assert text and "\n" not in text
    return text


# -- round trips -------------------------------------------------------------------------------


@settings(max_examples=150, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(
    size=st.integers(min_value=0, max_value=40_000),
    max_chunk=st.integers(min_value=PART_HEADER + 1, max_value=5_000),
    msg_id=st.integers(min_value=0, max_value=2**32 - 1),
)
def test_round_trip_any_size_and_chunk_limit(size: int, max_chunk: int, msg_id: int) -> None:
    data = os.urandom(size)
    chunks = list(iter_chunks(data, msg_id, max_chunk))
    assert all(len(c) <= max_chunk for c in chunks)
    r = Reassembler()
    results = [r.feed(c) for c in chunks]
    assert results[:-1] == [None] * (len(chunks) - 1)
    assert results[-1] == data
    assert r.partials == 0


@settings(max_examples=60, deadline=None)
@given(sizes=st.lists(st.integers(min_value=0, max_value=3 * MAX_CHUNK), min_size=1, max_size=6))
def test_splitter_round_trips_a_stream_of_messages(sizes: list[int]) -> None:
    splitter, r = MessageSplitter(), Reassembler()
    messages = [os.urandom(n) for n in sizes]
    out: list[bytes] = []
    for m in messages:
        _, chunks = splitter.split(m)
        out += feed_all(r, list(chunks))
    assert out == messages


@pytest.mark.parametrize("size", [0, 1, 2300, MAX_CHUNK - WHOLE_HEADER])
def test_one_chunk_messages_cost_three_bytes(size: int) -> None:
    data = os.urandom(size)
    msg_id, chunks = MessageSplitter().split(data)
    (chunk,) = list(chunks)
    assert msg_id is None
    assert chunk == encode_whole(data)
    assert len(chunk) == size + WHOLE_HEADER == size + 3
    assert Reassembler().feed(chunk) == data


def test_boundary_sizes_and_a_big_message() -> None:
    r = Reassembler()
    for size in (MAX_CHUNK - WHOLE_HEADER + 1, MAX_CHUNK, 5_000_000):
        data = os.urandom(size)
        chunks = list(iter_chunks(data, 7))
        assert len(chunks) == -(-size // (MAX_CHUNK - PART_HEADER))
        assert all(len(c) <= MAX_CHUNK for c in chunks)
        assert feed_all(r, chunks) == [data]


def test_memoryview_and_bytearray_inputs() -> None:
    data = os.urandom(200_000)
    assert feed_all(Reassembler(), list(iter_chunks(memoryview(data), 1))) == [data]
    assert feed_all(Reassembler(), list(iter_chunks(bytearray(data), 1))) == [data]
    wide = memoryview(bytearray(data)).cast("I")  # counts bytes, not items
    assert feed_all(Reassembler(), list(iter_chunks(wide, 1))) == [data]
    assert Reassembler().feed(bytearray(encode_whole(b"abc"))) == b"abc"


def test_interleaved_messages_reassemble() -> None:
    a, b = os.urandom(300_000), os.urandom(200_000)
    ca, cb = list(iter_chunks(a, 1)), list(iter_chunks(b, 2))
    mixed = [c for pair in zip(ca, cb, strict=False) for c in pair] + ca[len(cb) :]
    r = Reassembler()
    assert sorted(feed_all(r, mixed), key=len) == [b, a]


def test_splitter_ids_wrap() -> None:
    s = MessageSplitter()
    s._next_id = 2**32 - 1
    assert s.next_id() == 2**32 - 1
    assert s.next_id() == 0


def test_bad_arguments() -> None:
    with pytest.raises(ValueError):
        MessageSplitter(max_chunk=PART_HEADER)
    with pytest.raises(ValueError):
        list(iter_chunks(b"x" * 100, 1, max_chunk=10))
    with pytest.raises(ValueError):
        list(iter_chunks(b"x" * 100_000, -1))
    with pytest.raises(ValueError):
        Reassembler(max_partials=0)


# -- malformed input ---------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("chunk", "fragment"),
    [
        (b"", "shorter"),
        (b"K", "shorter"),
        (b"\x00\x01\x00abc", "magic"),
        (bytes([MAGIC, 9, 0]) + b"abc", "version"),
        (bytes([MAGIC, VERSION, 7]) + b"abc", "kind"),
        (bytes([MAGIC, VERSION, KIND_PART]) + b"abc", "shorter"),
        (part(1, 0, 0, 10, b"x"), "count"),
        (part(1, 2, 2, 10, b"x"), "count"),
        (part(1, 1, 3, 10, b"x"), "without its first chunk"),
        (part(1, 0, 5, 3, b"x"), "cannot span"),
        (part(1, 0, 2, 10, b""), "payload size"),
        (part(1, 0, 2, 4, b"abcde"), "payload size"),
        (part(1, 0, 2, 10**12, b"x"), "limit"),
        (encode_abort(1) + b"x", "abort"),
    ],
)
def test_malformed_chunks_raise_one_line_protocol_errors(chunk: bytes, fragment: str) -> None:
    r = Reassembler()
    with pytest.raises(ProtocolError) as exc:
        r.feed(chunk)
    assert fragment in one_line_error(exc)
    assert r.partials == 0


def test_text_and_oversize_whole_messages() -> None:
    with pytest.raises(ProtocolError):
        Reassembler().feed("text")  # type: ignore[arg-type]
    r = Reassembler(max_message_bytes=10)
    assert r.feed(encode_whole(b"0123456789")) == b"0123456789"
    with pytest.raises(ProtocolError) as exc:
        r.feed(encode_whole(b"0123456789A"))
    assert "limit" in one_line_error(exc)


def test_out_of_order_and_inconsistent_chunks_drop_the_message_once() -> None:
    data = os.urandom(1000)
    chunks = list(iter_chunks(data, 5, max_chunk=PART_HEADER + 100))  # 10 chunks
    r = Reassembler()
    r.feed(chunks[0])
    with pytest.raises(ProtocolError) as exc:
        r.feed(chunks[2])
    assert "expected 1" in one_line_error(exc)
    # The rest of the dropped message is discarded quietly, then the channel works again.
    assert [r.feed(c) for c in chunks[3:]] == [None] * 7
    assert r.partials == 0
    assert feed_all(r, chunks) == [data]

    r.feed(chunks[0])
    with pytest.raises(ProtocolError, match="disagrees"):
        r.feed(part(5, 1, 11, 1000, b"x" * 100))
    r.feed(chunks[0])
    with pytest.raises(ProtocolError, match="disagrees"):
        r.feed(part(5, 1, 10, 999, b"x" * 100))


def test_short_message_end_is_rejected() -> None:
    r = Reassembler()
    r.feed(part(3, 0, 2, 10, b"abc"))
    with pytest.raises(ProtocolError, match="ended with 6 of 10"):
        r.feed(part(3, 1, 2, 10, b"abc"))
    assert r.partials == 0


def test_oversize_multi_chunk_message_is_rejected_at_its_first_chunk() -> None:
    r = Reassembler(max_message_bytes=1000)
    chunks = list(iter_chunks(os.urandom(5000), 9, max_chunk=PART_HEADER + 1000))
    with pytest.raises(ProtocolError, match="limit"):
        r.feed(chunks[0])
    assert [r.feed(c) for c in chunks[1:]] == [None] * 4
    assert r.partials == 0 and r.buffered_bytes == 0


def test_partial_message_limit() -> None:
    r = Reassembler(max_partials=2)
    r.feed(part(1, 0, 2, 2, b"a"))
    r.feed(part(2, 0, 2, 2, b"a"))
    with pytest.raises(ProtocolError, match="unfinished"):
        r.feed(part(3, 0, 2, 2, b"a"))
    assert r.partials == 2
    assert r.feed(part(1, 1, 2, 2, b"b")) == b"ab"
    assert r.feed(part(4, 0, 2, 2, b"c")) is None


def test_stale_partials_are_dropped() -> None:
    now = [0.0]
    r = Reassembler(stale_after=5.0, clock=lambda: now[0])
    r.feed(part(1, 0, 2, 2, b"a"))
    assert r.buffered_bytes == 1
    now[0] = 10.0
    assert r.feed(part(2, 0, 2, 2, b"x")) is None  # any part chunk triggers the sweep
    assert r.stale_dropped == 1 and r.partials == 1
    assert r.feed(part(1, 1, 2, 2, b"b")) is None  # late tail of the stale message: discarded
    assert r.feed(part(2, 1, 2, 2, b"y")) == b"xy"
    now[0] = 20.0
    r.feed(part(3, 0, 2, 2, b"a"))
    now[0] = 30.0
    assert r.expire() == 1


def test_abort_forgets_a_partial_message() -> None:
    r = Reassembler()
    chunks = list(iter_chunks(os.urandom(200_000), 4))
    r.feed(chunks[0])
    assert r.partials == 1
    assert r.feed(encode_abort(4)) is None
    assert r.partials == 0
    assert r.feed(encode_abort(12345)) is None  # unknown id: harmless


@settings(max_examples=400, deadline=None)
@given(st.lists(st.binary(max_size=300), max_size=20))
def test_random_garbage_only_raises_protocol_error(chunks: list[bytes]) -> None:
    r = Reassembler(max_message_bytes=10_000, max_partials=3)
    for chunk in chunks:
        try:
            r.feed(chunk)
        except ProtocolError as exc:
            assert "\n" not in str(exc)
        assert r.partials <= 3
        assert r.buffered_bytes <= 3 * 10_000


@st.composite
def framed_garbage(draw: st.DrawFn) -> bytes:
    """Chunks with a valid prefix and a random header: reaches the deeper checks."""
    return part(
        draw(st.integers(0, 3)),
        draw(st.integers(0, 4)),
        draw(st.integers(0, 4)),
        draw(st.integers(0, 50)),
        draw(st.binary(max_size=30)),
    )


@settings(max_examples=400, deadline=None)
@given(st.lists(framed_garbage() | st.binary(max_size=40), max_size=30))
def test_well_framed_garbage_only_raises_protocol_error(chunks: list[bytes]) -> None:
    r = Reassembler(max_partials=2)
    for chunk in chunks:
        try:
            out = r.feed(chunk)
        except ProtocolError:
            continue
        if out is not None:
            assert len(out) <= 50 or chunk[2] == 0
        assert r.partials <= 2


@settings(max_examples=300, deadline=None)
@given(
    size=st.integers(min_value=1, max_value=3000),
    data=st.data(),
)
def test_truncated_or_mutated_chunks_only_raise_protocol_error(size: int, data: st.DataObject) -> None:
    message = os.urandom(size)
    chunks = list(iter_chunks(message, 11, max_chunk=PART_HEADER + 500))
    i = data.draw(st.integers(0, len(chunks) - 1))
    victim = bytearray(chunks[i])
    if data.draw(st.booleans()):
        del victim[data.draw(st.integers(0, len(victim) - 1)) :]
    else:
        pos = data.draw(st.integers(0, len(victim) - 1))
        victim[pos] ^= data.draw(st.integers(1, 255))
    chunks[i] = bytes(victim)
    r = Reassembler(max_partials=4)
    for chunk in chunks:
        try:
            r.feed(chunk)
        except ProtocolError as exc:
            assert "\n" not in str(exc)
    # Whatever happened, a fresh message on the same channel still gets through.
    fresh = os.urandom(1500)
    # (an id no single-byte mutation of 11 can reach)
    assert feed_all(r, list(iter_chunks(fresh, 0x5A5A5A5A, max_chunk=PART_HEADER + 500))) == [fresh]
