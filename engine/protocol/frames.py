"""Step frames: per-token messages that carry only what changes from one token to the next.

Why: a decode step's hidden state is small (SmolLM2: 2304 bytes in fp32, 642 in int8), while a
full ``Forward`` header spells out the session id, the route with every peer id, the client's id,
the sampling parameters and the per-hop timings as JSON: about 450 bytes, which would eat most of
what int8 compression saves. All of that except the step counters and the timings is constant for
a session on one hop, so it is sent once, as a full message announcing a *context* id
(``Forward.ctx``), and every later step on the same link is a step frame::

    "KS" | ctx | step | pos | ring | n | n x (queue, compute) | dims | payload

with every number an unsigned LEB128 varint, timings in units of 10 us (they belong to the
route's first ``n`` hops, in order), ``dims`` the tensor's shape (its rank and codec fields are
part of the context) and ``payload`` the codec's bytes, unchanged. A decode step between two
SmolLM2 fragments costs 12-20 bytes of header instead of ~450.

Safety: the writer numbers contexts per *link* (``PeerManager.send`` hands the builder the key of
the link the frame will travel on), so a frame can only ever refer to a context announced earlier
on the same ordered, reliable link; a reconnect (a restarted peer, a new link) starts with full
messages again. Ids come from one counter per writer and are never reused, so a late frame can
never be read against another session's context. A reader that lacks a context (evicted, or a
buggy peer) refuses the frame with ``ProtocolError``; it never guesses. Anything else unusual
(a replay's ``chunks``, timings from another route) simply goes as a full message.
"""

from __future__ import annotations

import json
import threading
from collections import OrderedDict
from collections.abc import Callable
from dataclasses import dataclass, replace
from typing import Any

from engine.errors import ProtocolError
from engine.protocol import codec as codec_mod
from engine.protocol import messages as wire
from engine.protocol.codec import MAX_TENSOR_ELEMENTS

STEP_MAGIC = b"KS"
#: Timings travel in units of 10 microseconds.
TIMING_UNITS_PER_MS = 100
#: Contexts a writer or reader remembers (least recently used first out); sessions close theirs.
MAX_CONTEXTS = 16384
_MAX_VARINT_BYTES = 10
#: Fields of a full header that change from step to step (everything else is the context).
_PER_STEP = ("step", "pos", "ring", "timings", "ctx")
#: What ``FrameWriter.counts`` reports: messages sent in full, as step frames, and bytes of each.
COUNTERS = ("full", "step", "full_bytes", "step_bytes")


@dataclass(frozen=True)
class Prepared:
    """A message with its tensor already encoded (on the torch thread); framing waits for the link."""

    msg: wire.Message
    header: dict[str, Any]
    payload: bytes

    @property
    def session(self) -> str | None:
        return getattr(self.msg, "session", None)


def prepare(msg: wire.Message) -> Prepared:
    header, payload = wire.encode_parts(msg)
    return Prepared(msg, header, payload)


# ---------------------------------------------------------------- varints


def _varint(n: int) -> bytes:
    if n < 0:
        raise ProtocolError("varints are unsigned")
    out = bytearray()
    while True:
        byte, n = n & 0x7F, n >> 7
        out.append(byte | (0x80 if n else 0))
        if not n:
            return bytes(out)


class _Cursor:
    def __init__(self, view: memoryview, offset: int) -> None:
        self.view, self.offset = view, offset

    def varint(self, name: str, hi: int) -> int:
        value, shift = 0, 0
        for i in range(_MAX_VARINT_BYTES):
            if self.offset >= len(self.view):
                raise _fail(f"truncated {name}")
            byte = self.view[self.offset]
            self.offset += 1
            value |= (byte & 0x7F) << shift
            if not byte & 0x80:
                if value > hi or (i and not byte):  # no overlong encodings: one frame, one spelling
                    raise _fail(f"{name} out of range")
                return value
            shift += 7
        raise _fail(f"{name} is not a varint")

    def rest(self) -> memoryview:
        return self.view[self.offset :]


def _fail(what: str) -> ProtocolError:
    return ProtocolError(f"malformed step frame: {what}")


# ---------------------------------------------------------------- writing


def _context_key(header: dict[str, Any]) -> str | None:
    """The constant part of a Forward header, as a string; None when it cannot go as step frames."""
    if header.get("type") != "forward" or header.get("chunks") or "tensor" not in header:
        return None
    route = header["route"]
    timings = header.get("timings", [])
    if len(timings) > len(route) or any(t["peer"] != h["peer"] for t, h in zip(timings, route, strict=False)):
        return None
    constant = {k: v for k, v in header.items() if k not in _PER_STEP}
    desc = dict(header["tensor"])
    desc["rank"] = len(desc.pop("shape"))
    constant["tensor"] = desc
    return json.dumps(constant, sort_keys=True, separators=(",", ":"))


def _units(ms: float) -> int:
    return max(0, round(ms * TIMING_UNITS_PER_MS))


class FrameWriter:
    """Sender side: full messages announce contexts, later steps on the same link go as step frames."""

    def __init__(self, capacity: int = MAX_CONTEXTS) -> None:
        self._ids: OrderedDict[tuple[str, str], tuple[int, str]] = OrderedDict()
        self._next = 1
        self._capacity = capacity
        self._lock = threading.Lock()  # frames are built on the event loop, sessions end on the torch thread
        self._counts = dict.fromkeys(COUNTERS, 0)

    def counts(self) -> dict[str, int]:
        """Forwards framed so far (``COUNTERS``): how often the per-session header was saved, and its bytes."""
        return dict(self._counts)

    def _sent(self, kind: str, data: bytes) -> bytes:
        self._counts[kind] += 1
        self._counts[f"{kind}_bytes"] += len(data)
        return data

    def builder(self, p: Prepared | bytes) -> bytes | Callable[[str], bytes]:
        """What to hand ``PeerManager.send``: plain bytes, or a builder called with the chosen link."""
        if isinstance(p, bytes | bytearray):
            return bytes(p)
        return lambda link: self.frame(link, p)

    def frame(self, link: str, p: Prepared) -> bytes:
        key = _context_key(p.header)
        if key is None:
            return self._sent("full", wire.pack(p.header, p.payload))
        with self._lock:
            known = self._ids.get((link, key))
            if known is None:
                ctx = self._next
                self._next += 1
                self._ids[(link, key)] = (ctx, str(p.session))
                if len(self._ids) > self._capacity:
                    self._ids.popitem(last=False)
            else:
                self._ids.move_to_end((link, key))
        if known is None:
            return self._sent("full", wire.pack({**p.header, "ctx": ctx}, p.payload))
        msg = p.msg
        if not isinstance(msg, wire.Forward):  # _context_key only accepts forwards
            raise ProtocolError("only forwards travel as step frames")
        parts = [STEP_MAGIC, _varint(known[0]), _varint(msg.step), _varint(msg.pos), _varint(msg.ring)]
        parts.append(_varint(len(msg.timings)))
        for t in msg.timings:
            parts += [_varint(_units(t.queue_ms)), _varint(_units(t.compute_ms))]
        parts += [_varint(d) for d in p.header["tensor"]["shape"]]
        parts.append(p.payload)
        return self._sent("step", b"".join(parts))

    def forget_session(self, session: str) -> None:
        with self._lock:
            for k in [k for k, (_, s) in self._ids.items() if s == session]:
                del self._ids[k]


# ---------------------------------------------------------------- reading


@dataclass(frozen=True)
class _Context:
    template: wire.Forward
    tensor: dict[str, Any]  # the tensor description without its shape
    rank: int


class FrameReader:
    """Receiver side: remembers contexts per sending peer and rebuilds step frames into Forwards."""

    def __init__(self, capacity: int = MAX_CONTEXTS, *, max_elements: int = MAX_TENSOR_ELEMENTS) -> None:
        self._contexts: OrderedDict[tuple[str, int], _Context] = OrderedDict()
        self._capacity = capacity
        self._max_elements = max_elements

    def read(self, sender: str, data: bytes | bytearray | memoryview) -> wire.Message:
        """Decode a full message or a step frame from ``sender``; malformed input raises ``ProtocolError``."""
        view = memoryview(data)
        if view[:2] == STEP_MAGIC:
            return self._step(sender, view)
        msg, desc = wire.decode_with_tensor(view, max_elements=self._max_elements)
        if isinstance(msg, wire.Forward) and msg.ctx and desc is not None:
            desc = dict(desc)
            rank = len(desc.pop("shape"))
            self._contexts[(sender, msg.ctx)] = _Context(replace(msg, tensor=None, ctx=0, timings=()), desc, rank)
            self._contexts.move_to_end((sender, msg.ctx))
            if len(self._contexts) > self._capacity:
                self._contexts.popitem(last=False)
            return replace(msg, ctx=0)
        return msg

    def _step(self, sender: str, view: memoryview) -> wire.Forward:
        cur = _Cursor(view, len(STEP_MAGIC))
        ctx_id = cur.varint("ctx", 2**62)
        ctx = self._contexts.get((sender, ctx_id))
        if ctx is None:
            raise ProtocolError(f"step frame for context {ctx_id}, which {sender} never announced (or it expired)")
        self._contexts.move_to_end((sender, ctx_id))
        t = ctx.template
        step, pos, ring = cur.varint("step", 2**62), cur.varint("pos", 10_000_000), cur.varint("ring", 10_000_000)
        n = cur.varint("timings", len(t.route))
        timings = tuple(
            wire.HopTiming(
                t.route[i].peer,
                cur.varint("queue", 2**40) / TIMING_UNITS_PER_MS,
                cur.varint("compute", 2**40) / TIMING_UNITS_PER_MS,
            )
            for i in range(n)
        )
        dims = [cur.varint("dim", self._max_elements) for _ in range(ctx.rank)]
        tensor = codec_mod.decode({**ctx.tensor, "shape": dims}, cur.rest(), max_elements=self._max_elements)
        return replace(t, step=step, pos=pos, ring=ring, timings=timings, tensor=tensor)

    def forget_session(self, session: str) -> None:
        for k in [k for k, c in self._contexts.items() if c.template.session == session]:
            del self._contexts[k]
