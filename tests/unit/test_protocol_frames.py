"""Step frames: a session's constant header goes once per link, later steps carry only what changes."""

from __future__ import annotations

import uuid
from dataclasses import replace

import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st

from engine.errors import ProtocolError
from engine.protocol import frames
from engine.protocol import messages as wire

HIDDEN = 576  # SmolLM2-135M


def _hops(n: int = 3) -> tuple[wire.Hop, ...]:
    return tuple(wire.Hop(f"n-{uuid.uuid4().hex[:12]}", 10 * i, 10 * i + 10) for i in range(n))


def _forward(
    hops: tuple[wire.Hop, ...], *, step: int = 5, hop: int = 1, codec: str = "fp32", n: int = 1
) -> wire.Forward:
    timings = tuple(wire.HopTiming(h.peer, 0.04, 12.37) for h in hops[:hop])
    return wire.Forward(
        session=uuid.uuid4().hex,
        step=step,
        pos=40 + step,
        route=hops,
        hop=hop,
        reply_to=f"c-{uuid.uuid4().hex[:12]}",
        sampling=wire.Sampling(0.7, 0.9, 1234),
        max_tokens=200,
        timings=timings,
        tensor=torch.randn(1, n, HIDDEN),
        ring=30,
        stop_ids=(2,),
        codec=codec,
    )


def _next(msg: wire.Forward, tensor: torch.Tensor | None = None) -> wire.Forward:
    t = torch.randn(1, 1, HIDDEN) if tensor is None else tensor
    return replace(msg, step=msg.step + 1, pos=msg.pos + 1, ring=msg.ring - 1, tensor=t)


def _same(a: wire.Forward, b: wire.Forward, codec: str = "fp32") -> None:
    if codec == "fp32":
        assert a == b  # compares every field but the tensor
        assert a.tensor is not None and b.tensor is not None and torch.equal(a.tensor, b.tensor)
    else:
        assert replace(a, tensor=None) == replace(b, tensor=None)


def test_second_step_on_a_link_is_a_small_step_frame_that_reads_back_exactly() -> None:
    hops = _hops()
    writer, reader = frames.FrameWriter(), frames.FrameReader()
    first = _forward(hops)
    full = writer.frame("link-1", frames.prepare(first))
    assert full[:2] == wire.MAGIC
    _same(reader.read("n-a", full), first)
    second = _next(first)
    step = writer.frame("link-1", frames.prepare(second))
    assert step[:2] == frames.STEP_MAGIC
    assert len(step) - HIDDEN * 4 <= 16  # the header: magic, ctx, step, pos, ring, 1 timing, 3 dims
    _same(reader.read("n-a", step), second)


@pytest.mark.parametrize("codec", ["fp16", "bf16", "int8"])
def test_step_frames_carry_every_codec(codec: str) -> None:
    writer, reader = frames.FrameWriter(), frames.FrameReader()
    first = _forward(_hops(), codec=codec)
    reader.read("n-a", writer.frame("l", frames.prepare(first)))
    second = _next(first)
    data = writer.frame("l", frames.prepare(second))
    assert data[:2] == frames.STEP_MAGIC
    got = reader.read("n-a", data)
    _same(got, second, codec)
    assert got.tensor is not None and second.tensor is not None
    assert torch.allclose(got.tensor, wire.decode(wire.encode(second)).tensor, atol=0)  # type: ignore[union-attr, arg-type]


def test_int8_cuts_whole_frame_bytes_per_token_at_least_3_5x() -> None:
    """The issue's figure on the wire, headers included: a decode step's frame between fragments."""
    sizes = {}
    for codec in ("fp32", "int8"):
        writer = frames.FrameWriter()
        msg = _forward(_hops(), codec=codec, step=300)  # positions past 127: two-byte varints
        writer.frame("l", frames.prepare(msg))
        sizes[codec] = len(writer.frame("l", frames.prepare(_next(msg))))
    assert sizes["fp32"] / sizes["int8"] >= 3.5, sizes


def test_another_link_gets_the_full_message_again() -> None:
    writer = frames.FrameWriter()
    first = _forward(_hops())
    writer.frame("old-link", frames.prepare(first))
    assert writer.frame("new-link", frames.prepare(_next(first)))[:2] == wire.MAGIC


def test_replays_and_foreign_timings_go_as_full_messages() -> None:
    writer = frames.FrameWriter()
    first = _forward(_hops())
    writer.frame("l", frames.prepare(first))
    replay = replace(_next(first), chunks=(3, 1))
    assert writer.frame("l", frames.prepare(replay))[:2] == wire.MAGIC
    foreign = replace(_next(first), timings=(wire.HopTiming("n-someone-else", 1.0, 1.0),))
    assert writer.frame("l", frames.prepare(foreign))[:2] == wire.MAGIC


def test_unknown_context_is_refused_not_guessed() -> None:
    writer, reader = frames.FrameWriter(), frames.FrameReader()
    first = _forward(_hops())
    full = writer.frame("l", frames.prepare(first))
    step = writer.frame("l", frames.prepare(_next(first)))
    with pytest.raises(ProtocolError, match="never announced"):
        reader.read("n-a", step)  # the announcement never arrived
    reader.read("n-a", full)
    with pytest.raises(ProtocolError, match="never announced"):
        reader.read("n-b", step)  # contexts belong to the peer that announced them
    reader.forget_session(first.session)
    with pytest.raises(ProtocolError, match="never announced"):
        reader.read("n-a", step)


def test_a_closed_session_starts_over_with_a_full_message() -> None:
    writer = frames.FrameWriter()
    first = _forward(_hops())
    writer.frame("l", frames.prepare(first))
    writer.forget_session(first.session)
    assert writer.frame("l", frames.prepare(_next(first)))[:2] == wire.MAGIC


def test_timings_survive_to_10_microseconds() -> None:
    writer, reader = frames.FrameWriter(), frames.FrameReader()
    first = _forward(_hops(), hop=2)
    reader.read("n-a", writer.frame("l", frames.prepare(first)))
    second = replace(_next(first), timings=(wire.HopTiming(first.route[0].peer, 0.123, 45.678), first.timings[1]))
    got = reader.read("n-a", writer.frame("l", frames.prepare(second)))
    assert isinstance(got, wire.Forward)
    assert [(t.peer, t.queue_ms, t.compute_ms) for t in got.timings] == [
        (first.route[0].peer, 0.12, 45.68),
        (first.route[1].peer, 0.04, 12.37),
    ]


def test_contexts_are_bounded() -> None:
    writer, reader = frames.FrameWriter(capacity=2), frames.FrameReader(capacity=2)
    msgs = [_forward(_hops()) for _ in range(3)]
    for m in msgs:
        reader.read("n-a", writer.frame("l", frames.prepare(m)))
    assert writer.frame("l", frames.prepare(_next(msgs[0])))[:2] == wire.MAGIC  # evicted: announced again
    step = writer.frame("l", frames.prepare(_next(msgs[2])))
    assert reader.read("n-a", step).step == msgs[2].step + 1  # type: ignore[union-attr]


def _announced() -> tuple[frames.FrameReader, bytes]:
    writer, reader = frames.FrameWriter(), frames.FrameReader(max_elements=1 << 20)
    first = _forward(_hops(), codec="int8")
    reader.read("n-a", writer.frame("l", frames.prepare(first)))
    return reader, writer.frame("l", frames.prepare(_next(first)))


@settings(max_examples=300, deadline=None)
@given(st.data())
def test_fuzzed_step_frames_raise_protocol_errors_only(data: st.DataObject) -> None:
    reader, good = _announced()
    kind = data.draw(st.sampled_from(["truncate", "flip", "garbage", "overlong"]))
    if kind == "truncate":
        bad = good[: data.draw(st.integers(2, len(good) - 1))]
    elif kind == "flip":
        i = data.draw(st.integers(2, min(len(good) - 1, 40)))
        bad = good[:i] + bytes([good[i] ^ data.draw(st.integers(1, 255))]) + good[i + 1 :]
    elif kind == "garbage":
        bad = frames.STEP_MAGIC + data.draw(st.binary(max_size=64))
    else:
        bad = frames.STEP_MAGIC + b"\x81" + b"\xff" * data.draw(st.integers(9, 20)) + b"\x01"
    try:
        msg = reader.read("n-a", bad)
    except ProtocolError:
        return
    # A flipped byte may still spell a valid frame: then it must be a sound forward.
    assert isinstance(msg, wire.Forward) and msg.tensor is not None
    assert bool(torch.isfinite(msg.tensor).all()) and msg.tensor.numel() <= 1 << 20


def test_overlong_varints_and_oversized_dims_are_refused() -> None:
    reader, good = _announced()
    with pytest.raises(ProtocolError, match="out of range"):
        reader.read("n-a", frames.STEP_MAGIC + b"\x81\x00" + good[3:])  # ctx 1 spelled in two bytes
    huge = frames.STEP_MAGIC + good[2:7] + b"\x00" + b"\xff\xff\xff\x7f" * 3
    with pytest.raises(ProtocolError):
        reader.read("n-a", huge)
