"""Wire messages between client and nodes: versioned, strict, tensor bytes carried raw.

A message is ``magic "KM" | version u8 | header length u32 (big endian) | header JSON | tensor``.
The header is a JSON object whose ``type`` selects one of the frozen dataclasses below; every
field is type-checked and unknown fields are refused, so a peer on another version fails loudly
instead of being half-understood. Tensor bytes are little endian, of an allow-listed dtype, with
a shape whose size must match the payload exactly; hidden states may travel compressed
(fp16/bf16/int8, ``engine.protocol.codec``, chosen per job in ``Forward.codec``). Nothing
received is ever unpickled.

Chunking to the data channel's message limit is the transport's job, not this module's.
"""

from __future__ import annotations

import json
import math
import struct
from collections.abc import Callable
from dataclasses import MISSING, dataclass, field, fields
from typing import Any

import torch

from engine.errors import ProtocolError
from engine.protocol import codec as codec_mod
from engine.protocol.codec import MAX_TENSOR_ELEMENTS

MAGIC = b"KM"
VERSION = 1
_PREFIX = struct.Struct("!2sBI")
MAX_HEADER_BYTES = 64 * 1024


@dataclass(frozen=True)
class Hop:
    """One node of a route and the layers it runs for this request."""

    peer: str
    start: int
    end: int


@dataclass(frozen=True)
class HopTiming:
    """What one hop spent on a step: waiting for its compute thread and computing."""

    peer: str
    queue_ms: float
    compute_ms: float


@dataclass(frozen=True)
class Sampling:
    temperature: float = 0.0
    top_p: float = 1.0
    seed: int = 0


@dataclass(frozen=True)
class Forward:
    """Run ``tensor`` (token ids at hop 0, hidden states after) through the route from ``hop`` on."""

    session: str
    step: int
    pos: int
    route: tuple[Hop, ...]
    hop: int
    reply_to: str
    sampling: Sampling
    max_tokens: int
    timings: tuple[HopTiming, ...] = ()
    tensor: torch.Tensor | None = field(default=None, compare=False)
    #: tokens the route should go on generating by itself after this step: the last hop feeds
    #: its sampled token straight back to the first hop (client out of the per-token loop)
    ring: int = 0
    #: token ids that end the ring early
    stop_ids: tuple[int, ...] = ()
    #: run the tensor's tokens as successive steps of these sizes (empty: one step); a failover
    #: replays a session's exact step sequence this way, so the replacement's KV state is the same
    chunks: tuple[int, ...] = ()
    #: how hidden states travel between hops (``engine.protocol.codec``), chosen per job: every
    #: hop re-encodes its output with it; token ids always travel exactly
    codec: str = codec_mod.DEFAULT_CODEC
    #: a full message announcing this id for later step frames on the same link
    #: (``engine.protocol.frames``); 0: none. A transport detail, never set by callers.
    ctx: int = 0
    #: absolute layers the job's activation budget skips (Selective Activation); fixed per session
    skip: tuple[int, ...] = ()
    #: a self-speculative check: the step may rewind to an earlier position, and the last hop
    #: answers with the greedy token after every position (``Token.tokens``)
    verify: bool = False
    #: the job the coordinator assigned this route under (its route answer's ``job``): hops sign
    #: work receipts for it (``engine.node.receipts``); empty: no receipts (older clients)
    job: str = ""


@dataclass(frozen=True)
class Token:
    """The last hop's sampled token for position ``pos``, sent back to the client."""

    session: str
    step: int
    pos: int
    token_id: int
    timings: tuple[HopTiming, ...] = ()
    #: verify steps: the greedy token after each position of the step (``token_id`` is the last)
    tokens: tuple[int, ...] = ()


@dataclass(frozen=True)
class Close:
    """End a session: each hop frees its cache and passes the message on along the route."""

    session: str
    route: tuple[Hop, ...]
    hop: int


@dataclass(frozen=True)
class ErrorReply:
    """A typed failure sent back to the client (``code`` is an ``engine.errors`` code)."""

    code: str
    message: str
    peer: str
    session: str | None = None
    step: int | None = None
    #: the node at fault when it is not the reporter (e.g. an unreachable next hop)
    failed_peer: str | None = None


@dataclass(frozen=True)
class ExpertForward:
    """Token rows for some routed experts of one MoE layer, all held by the receiving expert node.

    Experts keep no state, so this is a pure request: rows in, each expert's outputs back
    (``ExpertResult``). The tensor holds ``counts[i]`` rows for ``experts[i]``, back to back in
    that order; only the rows routed to those experts travel (``engine.client.experts``).
    """

    #: the sender's id for this exchange (unique per sender); the result echoes it
    request: int
    #: absolute layer index
    layer: int
    #: ascending, distinct expert indices of ``layer``
    experts: tuple[int, ...]
    #: rows per expert (each >= 1), in the order of ``experts``
    counts: tuple[int, ...]
    tensor: torch.Tensor | None = field(default=None, compare=False)
    #: how the rows (and the result) travel (``engine.protocol.codec``)
    codec: str = codec_mod.DEFAULT_CODEC


@dataclass(frozen=True)
class ExpertResult:
    """Each expert's outputs for the rows of an ``ExpertForward``, in the same order and counts."""

    request: int
    layer: int
    experts: tuple[int, ...]
    counts: tuple[int, ...]
    #: what the expert node spent computing
    compute_ms: float = 0.0
    tensor: torch.Tensor | None = field(default=None, compare=False)
    codec: str = codec_mod.DEFAULT_CODEC


Message = Forward | Token | Close | ErrorReply | ExpertForward | ExpertResult
_TYPES: dict[str, type] = {
    "forward": Forward,
    "token": Token,
    "close": Close,
    "error": ErrorReply,
    "expert_forward": ExpertForward,
    "expert_result": ExpertResult,
}
_TYPE_NAMES = {v: k for k, v in _TYPES.items()}


# ---------------------------------------------------------------- encoding


def _plain(value: Any) -> Any:
    if isinstance(value, Hop | HopTiming | Sampling):
        return {f.name: getattr(value, f.name) for f in fields(value)}
    if isinstance(value, tuple):
        return [_plain(v) for v in value]
    return value


def encode(msg: Message) -> bytes:
    """Serialise a message; the tensor (if any) goes after the JSON header as raw bytes."""
    return pack(*encode_parts(msg))


def encode_parts(msg: Message) -> tuple[dict[str, Any], bytes]:
    """The JSON-ready header and the tensor payload of ``msg`` (what ``pack`` joins)."""
    header: dict[str, Any] = {"type": _TYPE_NAMES[type(msg)]}
    payload = b""
    for f in fields(msg):
        value = getattr(msg, f.name)
        if f.name == "tensor":
            if value is None:
                continue
            header["tensor"], payload = codec_mod.encode(value, getattr(msg, "codec", codec_mod.DEFAULT_CODEC))
        elif f.default is MISSING or value != f.default:  # defaults are implied: smaller headers
            header[f.name] = _plain(value)
    return header, payload


def pack(header: dict[str, Any], payload: bytes) -> bytes:
    head = json.dumps(header, separators=(",", ":"), allow_nan=False).encode()
    return b"".join((_PREFIX.pack(MAGIC, VERSION, len(head)), head, payload))


# ---------------------------------------------------------------- decoding


def _fail(what: str) -> ProtocolError:
    return ProtocolError(f"malformed message: {what}")


def _int(v: Any, name: str, lo: int = 0, hi: int = 2**62) -> int:
    if not isinstance(v, int) or isinstance(v, bool) or not lo <= v <= hi:
        raise _fail(f"'{name}' must be an integer in [{lo}, {hi}]")
    return v


def _float(v: Any, name: str) -> float:
    if not isinstance(v, int | float) or isinstance(v, bool) or not math.isfinite(v):
        raise _fail(f"'{name}' must be a finite number")
    return float(v)


def _str(v: Any, name: str, limit: int = 256) -> str:
    if not isinstance(v, str) or len(v) > limit:
        raise _fail(f"'{name}' must be a string of at most {limit} characters")
    return v


def _obj(v: Any, name: str, keys: set[str], optional: frozenset[str] = frozenset()) -> dict[str, Any]:
    if not isinstance(v, dict):
        raise _fail(f"'{name}' must be an object")
    if not keys - optional <= set(v) <= keys:
        raise _fail(f"'{name}' must have fields {sorted(keys)}, got {sorted(v)}")
    return v


def _hops(v: Any) -> tuple[Hop, ...]:
    if not isinstance(v, list) or not 1 <= len(v) <= 256:
        raise _fail("'route' must be a list of 1-256 hops")
    out = []
    for h in v:
        h = _obj(h, "hop", {"peer", "start", "end"})
        start, end = _int(h["start"], "start", 0, 1_000_000), _int(h["end"], "end", 0, 1_000_000)
        if end < start:
            raise _fail("hop end before start")
        out.append(Hop(_str(h["peer"], "peer"), start, end))
    return tuple(out)


def _timings(v: Any) -> tuple[HopTiming, ...]:
    if not isinstance(v, list) or len(v) > 256:
        raise _fail("'timings' must be a list of at most 256 entries")
    out = []
    for t in v:
        t = _obj(t, "timing", {"peer", "queue_ms", "compute_ms"})
        queue, compute = _float(t["queue_ms"], "queue_ms"), _float(t["compute_ms"], "compute_ms")
        out.append(HopTiming(_str(t["peer"], "peer"), queue, compute))
    return tuple(out)


def parse_sampling(v: Any) -> Sampling:
    """A ``{"temperature", "top_p", "seed"}`` object as ``Sampling``; ProtocolError when malformed."""
    s = _obj(v, "sampling", {"temperature", "top_p", "seed"})
    temp, top_p = _float(s["temperature"], "temperature"), _float(s["top_p"], "top_p")
    if not 0.0 <= temp <= 100.0 or not 0.0 < top_p <= 1.0:
        raise _fail("sampling parameters out of range")
    return Sampling(temp, top_p, _int(s["seed"], "seed", 0, 2**63 - 1))


def _stop_ids(v: Any) -> tuple[int, ...]:
    if not isinstance(v, list) or len(v) > 64:
        raise _fail("'stop_ids' must be a list of at most 64 token ids")
    return tuple(_int(t, "stop_ids", 0, 2**31) for t in v)


def _ids(v: Any, name: str, limit: int, hi: int) -> tuple[int, ...]:
    if not isinstance(v, list) or len(v) > limit:
        raise _fail(f"'{name}' must be a list of at most {limit} integers")
    return tuple(_int(t, name, 0, hi) for t in v)


def _bool(v: Any, name: str) -> bool:
    if not isinstance(v, bool):
        raise _fail(f"'{name}' must be true or false")
    return v


def _chunks(v: Any) -> tuple[int, ...]:
    if not isinstance(v, list) or len(v) > 1_000_000:
        raise _fail("'chunks' must be a list of step sizes")
    return tuple(_int(c, "chunks", 1, 10_000_000) for c in v)


def _optional(v: Any, parse: Callable[[Any], Any]) -> Any:
    return None if v is None else parse(v)


def _codec(v: Any) -> str:
    if v not in codec_mod.CODECS:
        raise _fail(f"unknown codec {v!r} (known: {', '.join(codec_mod.CODECS)})")
    return str(v)


def _tensor(desc: Any, payload: memoryview, max_elements: int) -> torch.Tensor:
    return codec_mod.decode(desc, payload, "cpu", max_elements=max_elements)


#: most experts one layer may name in an expert message (DeepSeek-V3 has 256 per layer)
MAX_EXPERTS = 4096


def _expert_message(
    kind: type, h: dict[str, Any], tensor_desc: Any, payload: memoryview, max_elements: int
) -> ExpertForward | ExpertResult:
    """An ``ExpertForward`` or ``ExpertResult``: experts ascending, counts matching the tensor's rows."""
    if tensor_desc is None:
        raise _fail("expert message without a tensor")
    experts = _ids(h["experts"], "experts", MAX_EXPERTS, 1_000_000)
    counts = _ids(h["counts"], "counts", MAX_EXPERTS, 10_000_000)
    if not experts or len(counts) != len(experts) or min(counts) < 1:
        raise _fail("'experts' and 'counts' must be equally long, non-empty, with counts >= 1")
    if list(experts) != sorted(set(experts)):
        raise _fail("'experts' must be ascending and distinct")
    tensor = _tensor(tensor_desc, payload, max_elements)
    if tensor.dim() != 2 or tensor.shape[0] != sum(counts) or not tensor.is_floating_point():
        raise _fail(f"expert rows must be a float [{sum(counts)}, hidden] tensor, got {list(tensor.shape)}")
    common: dict[str, Any] = dict(
        request=_int(h["request"], "request"),
        layer=_int(h["layer"], "layer", 0, 1_000_000),
        experts=experts,
        counts=counts,
        tensor=tensor,
        codec=_codec(h.get("codec", codec_mod.DEFAULT_CODEC)),
    )
    if kind is ExpertResult:
        return ExpertResult(**common, compute_ms=_float(h.get("compute_ms", 0.0), "compute_ms"))
    return ExpertForward(**common)


def decode(data: bytes | bytearray | memoryview, *, max_elements: int = MAX_TENSOR_ELEMENTS) -> Message:
    """Parse one whole message; anything malformed raises ``ProtocolError`` with a one-line reason."""
    return decode_with_tensor(data, max_elements=max_elements)[0]


def _header(view: memoryview) -> tuple[dict[str, Any], int]:
    """The JSON header object of a full message and its length in bytes (fields not yet validated)."""
    if len(view) < _PREFIX.size:
        raise _fail("shorter than its prefix")
    magic, version, head_len = _PREFIX.unpack_from(view)
    if magic != MAGIC:
        raise _fail("bad magic")
    if version != VERSION:
        raise ProtocolError(f"protocol version {version} not supported (this node speaks {VERSION})")
    if head_len > MAX_HEADER_BYTES or _PREFIX.size + head_len > len(view):
        raise _fail("header length out of range")
    try:
        header = json.loads(bytes(view[_PREFIX.size : _PREFIX.size + head_len]))
    except (UnicodeDecodeError, ValueError, RecursionError):
        raise _fail("header is not valid JSON") from None
    if not isinstance(header, dict):
        raise _fail("header is not an object")
    return header, head_len


def peek_header(data: bytes | bytearray | memoryview) -> dict[str, Any]:
    """A full message's header, unvalidated and without touching its tensor.

    For routing a message to the thread that decodes it (torch work stays on the torch thread);
    the message must still go through ``decode`` before anything in it is trusted.
    """
    return _header(memoryview(data))[0]


def decode_with_tensor(
    data: bytes | bytearray | memoryview, *, max_elements: int = MAX_TENSOR_ELEMENTS
) -> tuple[Message, dict[str, Any] | None]:
    """``decode``, plus the (validated) tensor description of the header, if any."""
    view = memoryview(data)
    header, head_len = _header(view)
    kind = _TYPES.get(header.pop("type", None)) if isinstance(header.get("type"), str) else None
    if kind is None:
        raise _fail(f"unknown message type {header.get('type')!r}")
    payload = view[_PREFIX.size + head_len :]
    tensor_desc = header.pop("tensor", None)
    names = {f.name for f in fields(kind)} - {"tensor"}
    if not set(header) <= names:
        raise _fail(f"unknown fields {sorted(set(header) - names)}")
    h = header
    try:
        if kind is Forward:
            if tensor_desc is None:
                raise _fail("forward without a tensor")
            route = _hops(h["route"])
            hop = _int(h["hop"], "hop", 0, len(route) - 1)
            msg: Message = Forward(
                session=_str(h["session"], "session"),
                step=_int(h["step"], "step"),
                pos=_int(h["pos"], "pos", 0, 10_000_000),
                route=route,
                hop=hop,
                reply_to=_str(h["reply_to"], "reply_to"),
                sampling=parse_sampling(h["sampling"]),
                max_tokens=_int(h["max_tokens"], "max_tokens", 1, 10_000_000),
                timings=_timings(h.get("timings", [])),
                tensor=_tensor(tensor_desc, payload, max_elements),
                ring=_int(h.get("ring", 0), "ring", 0, 10_000_000),
                stop_ids=_stop_ids(h.get("stop_ids", [])),
                chunks=_chunks(h.get("chunks", [])),
                codec=_codec(h.get("codec", codec_mod.DEFAULT_CODEC)),
                ctx=_int(h.get("ctx", 0), "ctx", 0, 2**62),
                skip=_ids(h.get("skip", []), "skip", 4096, 1_000_000),
                verify=_bool(h.get("verify", False), "verify"),
                job=_str(h.get("job", ""), "job", 128),
            )
            return msg, tensor_desc
        if kind is ExpertForward or kind is ExpertResult:
            return _expert_message(kind, h, tensor_desc, payload, max_elements), tensor_desc
        if tensor_desc is not None or len(payload):
            raise _fail("unexpected tensor payload")
        if kind is Token:
            msg = Token(
                session=_str(h["session"], "session"),
                step=_int(h["step"], "step"),
                pos=_int(h["pos"], "pos"),
                token_id=_int(h["token_id"], "token_id", 0, 2**31),
                timings=_timings(h.get("timings", [])),
                tokens=_ids(h.get("tokens", []), "tokens", 4096, 2**31),
            )
        elif kind is Close:
            route = _hops(h["route"])
            msg = Close(_str(h["session"], "session"), route, _int(h["hop"], "hop", 0, len(route) - 1))
        else:
            msg = ErrorReply(
                code=_str(h["code"], "code", 64),
                message=_str(h["message"], "message", 2000),
                peer=_str(h["peer"], "peer"),
                session=_optional(h.get("session"), lambda v: _str(v, "session")),
                step=_optional(h.get("step"), lambda v: _int(v, "step")),
                failed_peer=_optional(h.get("failed_peer"), lambda v: _str(v, "failed_peer")),
            )
        return msg, None
    except KeyError as exc:
        raise _fail(f"missing field {exc.args[0]!r}") from None
