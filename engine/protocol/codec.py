"""Activation codecs: how a hidden-state tensor is written on the wire, selectable per job.

Why: between fragments only the hidden state travels (one ``hidden_size`` vector per token in
decode), and on home uplinks its bytes, not the compute, set the pace. ``fp16``/``bf16`` halve
them. ``int8`` cuts them about 3.6x against fp32 (SmolLM2's 576-wide rows: 642 bytes instead of
2304): symmetric round-to-nearest into [-127, 127] with one absmax scale per block of ``block``
values along the last dimension, plus the ``outliers`` largest-magnitude values of each row sent
apart (value and index) instead of as codes.

Why the outliers: Llama hidden states carry a few "massive activation" channels (SmolLM2-135M:
channel 507 reaches ~300 at layer 10 and ~25,000 on the first token at layer 20, against a
median of ~2-4). Under plain block absmax such a value sets its block's step so coarse that its
63 neighbours come back as zero. Measured with ``kluster bench codec`` (30 chat prompts, 48
greedy tokens): plain block absmax kept 7 of 30 outputs identical to fp32, 16 outliers apart 28
of 30 (bf16: 28, fp16: 29), mean |logit error| 0.21 -> 0.023.

``encode`` returns header fields that extend the ``tensor`` object of ``engine.protocol.messages``
(``dtype`` and ``shape`` keep their meaning: the tensor the receiver gets back) plus ``codec``
and, for int8, ``block``, ``scale`` (the dtype of the scales and outlier values) and
``outliers`` (per row; omitted when 0). The default codec ``fp32`` is the raw layout of today's
messages and is omitted, so uncompressed headers are unchanged. Integer tensors (token ids at
hop 0) are always sent raw, whatever the job's codec.

int8 payload, rows = elements / last dimension, blocks = ceil(last / block)::

    scales  rows * blocks   (scale dtype)
    values  rows * outliers (scale dtype)   the outliers, exact up to that dtype
    indices rows * outliers (int16)         ascending and distinct within a row
    codes   rows * (last - outliers) (int8) the other values, in row order

``decode`` trusts nothing: unknown codecs or fields, sizes that do not match, non-finite or
negative scales, bad indices, code -128 or a decoded value that is not finite raise
``ProtocolError``, and sizes are checked against ``max_elements`` before anything is allocated.
"""

from __future__ import annotations

import math
from typing import Any

import torch

from engine.errors import ProtocolError

CODECS = ("fp32", "fp16", "bf16", "int8")
DEFAULT_CODEC = "fp32"
DEFAULT_BLOCK = 64
DEFAULT_OUTLIERS = 16
#: Block sizes a peer may announce: big enough that scales stay a small overhead, bounded above.
MIN_BLOCK, MAX_BLOCK = 8, 4096
MAX_OUTLIERS = 256
MAX_RANK = 4
MAX_TENSOR_ELEMENTS = 64 * 1024 * 1024

DTYPES: dict[str, torch.dtype] = {
    "float32": torch.float32,
    "float16": torch.float16,
    "bfloat16": torch.bfloat16,
    "int64": torch.int64,
}
_DTYPE_NAMES = {v: k for k, v in DTYPES.items()}
#: The wire dtype of the float codecs (fp32 writes the tensor in its own dtype).
_CAST = {"fp16": torch.float16, "bf16": torch.bfloat16}
_SIDE_DTYPES = {"float16": torch.float16, "float32": torch.float32}
_FP16 = torch.finfo(torch.float16)
#: Largest scale a peer may send: 127 * scale must stay finite in float32.
_MAX_SCALE = torch.finfo(torch.float32).max / 127
#: Outlier indices are int16: rows may be at most this long when outliers are sent.
_MAX_INDEX = 2**15 - 1
_KEYS = {"dtype", "shape", "codec", "block", "scale", "outliers"}


def _fail(what: str) -> ProtocolError:
    return ProtocolError(f"malformed tensor: {what}")


def _raw_bytes(t: torch.Tensor) -> bytes:
    return t.contiguous().view(torch.uint8).numpy().tobytes() if t.numel() else b""


# ---------------------------------------------------------------- encoding


def encode(
    tensor: torch.Tensor,
    codec: str = DEFAULT_CODEC,
    *,
    block: int = DEFAULT_BLOCK,
    outliers: int = DEFAULT_OUTLIERS,
) -> tuple[dict[str, Any], bytes]:
    """Header fields and payload bytes of ``tensor`` under ``codec`` (see the module docstring).

    Floats beyond float16's range are saturated to its largest finite value under ``fp16``
    rather than sent as infinities a receiver would refuse. Non-finite input raises
    ``ProtocolError`` here, at the sender, since every receiver refuses it anyway.
    """
    if codec not in CODECS:
        raise ProtocolError(f"unknown codec {codec!r} (known: {', '.join(CODECS)})")
    if not MIN_BLOCK <= block <= MAX_BLOCK or not 0 <= outliers <= MAX_OUTLIERS:
        raise ProtocolError(f"block must be in [{MIN_BLOCK}, {MAX_BLOCK}] and outliers in [0, {MAX_OUTLIERS}]")
    t = tensor.detach().to("cpu")
    if t.dtype not in _DTYPE_NAMES or not 1 <= t.dim() <= MAX_RANK:
        raise ProtocolError(f"a {t.dim()}-d tensor of {t.dtype} cannot be sent")
    header: dict[str, Any] = {"dtype": _DTYPE_NAMES[t.dtype], "shape": list(t.shape)}
    if codec == "fp32" or not t.is_floating_point():
        return header, _raw_bytes(t)
    if t.numel() and not bool(torch.isfinite(t).all()):
        raise ProtocolError("tensor holds NaN or infinite values")
    header["codec"] = codec
    if codec in _CAST:
        if _CAST[codec] is torch.float16:
            t = t.clamp(_FP16.min, _FP16.max)
        return header, _raw_bytes(t.to(_CAST[codec]))
    if t.numel() == 0:
        header["block"], header["scale"] = block, "float16"
        return header, b""
    last = t.shape[-1]
    k = min(outliers, last)
    if k and last > _MAX_INDEX:
        raise ProtocolError(f"outlier indices are 16-bit: a last dimension of {last} is too long")
    rows = t.float().reshape(-1, last)
    idx = rows.abs().topk(k, dim=-1).indices.sort(dim=-1).values
    values = rows.gather(-1, idx)
    rest = rows.scatter(-1, idx, 0.0)
    scales = _blocks(rest, block).abs().amax(dim=-1) / 127.0
    side = torch.float16 if _fits_float16(scales, values) else torch.float32
    scales = scales.to(side)
    header["block"], header["scale"] = block, _DTYPE_NAMES[side]
    if k:
        header["outliers"] = k
    codes = _codes(rest, scales.float(), block)  # with the scales as sent: no float16 rounding mismatch
    if k:
        codes = codes[_kept(idx, rows.shape)]
    parts = (scales, values.to(side), idx.to(torch.int16), codes)
    return header, b"".join(_raw_bytes(p) for p in parts)


def round_trip(tensor: torch.Tensor, codec: str) -> torch.Tensor:
    """``tensor`` as a receiver gets it back under ``codec`` (what a route's next hop computes on)."""
    if codec == DEFAULT_CODEC:
        return tensor
    header, payload = encode(tensor, codec)
    return decode(header, payload, tensor.device)


def _fits_float16(scales: torch.Tensor, values: torch.Tensor) -> bool:
    """Scales within float16's normal range and outlier values below its max: else float32 is sent."""
    nonzero = scales[scales > 0]
    if nonzero.numel() and (nonzero.min() < _FP16.tiny or nonzero.max() > _FP16.max):
        return False
    return not values.numel() or bool(values.abs().max() <= _FP16.max)


def _blocks(rows: torch.Tensor, block: int) -> torch.Tensor:
    """(rows, last) as (rows, blocks, block), the last dimension zero-padded to whole blocks."""
    pad = -rows.shape[-1] % block
    if pad:
        rows = torch.nn.functional.pad(rows, (0, pad))
    return rows.reshape(rows.shape[0], rows.shape[-1] // block, block)


def _kept(idx: torch.Tensor, shape: torch.Size | tuple[int, int]) -> torch.Tensor:
    """Mask of the positions sent as codes: all but each row's outliers."""
    return torch.ones(shape, dtype=torch.bool).scatter_(-1, idx, False)


def _codes(rows: torch.Tensor, scales: torch.Tensor, block: int) -> torch.Tensor:
    """Round-to-nearest codes; the clamp catches values pushed past 127 by a scale rounded down."""
    b = _blocks(rows, block)
    s = scales.unsqueeze(-1)
    codes = torch.round(b / torch.where(s > 0, s, 1.0)).clamp_(-127, 127).to(torch.int8)
    return codes.flatten(1)[:, : rows.shape[-1]]


# ---------------------------------------------------------------- decoding


def _parse(header: Any, max_elements: int) -> tuple[torch.dtype, list[int], str]:
    if not isinstance(header, dict):
        raise _fail("'tensor' must be an object")
    if not {"dtype", "shape"} <= set(header) <= _KEYS:
        raise _fail(f"fields must be dtype, shape and optionally {', '.join(sorted(_KEYS)[:4])}; got {sorted(header)}")
    name = header["dtype"]
    dtype = DTYPES.get(name) if isinstance(name, str) else None
    if dtype is None:
        raise _fail(f"dtype {name!r} not allowed (allowed: {', '.join(DTYPES)})")
    shape = header["shape"]
    if not isinstance(shape, list) or not 1 <= len(shape) <= MAX_RANK:
        raise _fail(f"rank must be 1-{MAX_RANK}")
    if not all(_is_int(d, 0, max_elements) for d in shape):
        raise _fail(f"shape must be integers in [0, {max_elements}]")
    if math.prod(max(d, 1) for d in shape) > max_elements:
        raise _fail(f"tensor exceeds the limit of {max_elements} elements")
    codec = header.get("codec", DEFAULT_CODEC)
    if not isinstance(codec, str) or codec not in CODECS:
        raise _fail(f"unknown codec {codec!r} (known: {', '.join(CODECS)})")
    if codec != "fp32" and not dtype.is_floating_point:
        raise _fail(f"codec {codec} applies to float tensors, not {name}")
    quantized = codec == "int8"
    if quantized != ("block" in header) or quantized != ("scale" in header) or (not quantized and "outliers" in header):
        raise _fail("'block', 'scale' and 'outliers' go with codec int8, and only with it")
    if quantized:
        if not _is_int(header["block"], MIN_BLOCK, MAX_BLOCK):
            raise _fail(f"block must be an integer in [{MIN_BLOCK}, {MAX_BLOCK}]")
        if header["scale"] not in _SIDE_DTYPES:
            raise _fail(f"scale dtype must be one of {', '.join(_SIDE_DTYPES)}")
        k = header.get("outliers", 0)
        if not _is_int(k, 0, min(MAX_OUTLIERS, shape[-1])) or (k and shape[-1] > _MAX_INDEX):
            raise _fail(f"outliers must be an integer in [0, {MAX_OUTLIERS}] and at most the last dimension")
    return dtype, list(shape), codec


def _is_int(v: Any, lo: int, hi: int) -> bool:
    return isinstance(v, int) and not isinstance(v, bool) and lo <= v <= hi


def _int8_layout(dims: list[int], header: dict[str, Any]) -> tuple[int, int, int, int]:
    """(rows, blocks per row, outliers per row, side itemsize) of a validated int8 header."""
    last = dims[-1]
    rows = math.prod(dims) // last if last else 0
    return rows, -(-last // header["block"]), header.get("outliers", 0), _SIDE_DTYPES[header["scale"]].itemsize


def _expected_size(dtype: torch.dtype, dims: list[int], codec: str, header: dict[str, Any]) -> int:
    numel = math.prod(dims)
    if codec == "fp32":
        return numel * dtype.itemsize
    if codec in _CAST:
        return numel * _CAST[codec].itemsize
    rows, blocks, k, side = _int8_layout(dims, header)
    return rows * (blocks * side + k * (side + 2 - 1)) + numel  # an outlier's code is not sent


def payload_size(header: dict[str, Any]) -> int:
    """Bytes the payload of ``header`` must have: what ``decode`` checks and the bench reports."""
    dtype, dims, codec = _parse(header, MAX_TENSOR_ELEMENTS)
    return _expected_size(dtype, dims, codec, header)


def decode(
    header: Any,
    payload: bytes | bytearray | memoryview,
    device: torch.device | str = "cpu",
    *,
    max_elements: int = MAX_TENSOR_ELEMENTS,
) -> torch.Tensor:
    """The tensor described by ``header`` from ``payload``, on ``device``; malformed input raises ``ProtocolError``."""
    dtype, dims, codec = _parse(header, max_elements)
    view = memoryview(payload).cast("B")
    want = _expected_size(dtype, dims, codec, header)
    if len(view) != want:
        raise _fail(f"payload has {len(view)} bytes, {codec} {dims} of {header['dtype']} needs {want}")
    if math.prod(dims) == 0:
        return torch.empty(dims, dtype=dtype, device=device)
    data = bytearray(view)  # one copy we own: frombuffer needs a writable buffer
    if codec == "int8":
        t = _dequantize(data, dims, header)
    else:
        t = torch.frombuffer(data, dtype=_CAST.get(codec, dtype)).reshape(dims)
    if t.is_floating_point() and not bool(torch.isfinite(t).all()):
        raise _fail("tensor holds NaN or infinite values")
    t = t.to(dtype)
    if t.is_floating_point() and not bool(torch.isfinite(t).all()):  # e.g. large int8 values into float16
        raise _fail(f"values overflow {header['dtype']}")
    return t.to(device)


def _dequantize(data: bytearray, dims: list[int], header: dict[str, Any]) -> torch.Tensor:
    rows, blocks, k, _ = _int8_layout(dims, header)
    side, block, last = _SIDE_DTYPES[header["scale"]], header["block"], dims[-1]
    offset = 0

    def take(dtype: torch.dtype, count: int) -> torch.Tensor:
        nonlocal offset
        t = torch.frombuffer(data, dtype=dtype, count=count, offset=offset) if count else torch.empty(0, dtype=dtype)
        offset += count * dtype.itemsize
        return t

    scales = take(side, rows * blocks).float().reshape(rows, blocks, 1)
    values = take(side, rows * k).float().reshape(rows, k)
    idx = take(torch.int16, rows * k).long().reshape(rows, k)
    codes = take(torch.int8, rows * (last - k))
    if not bool(torch.isfinite(scales).all()) or bool((scales < 0).any()) or bool((scales > _MAX_SCALE).any()):
        raise _fail("int8 scales must be finite, non-negative and bounded")
    if bool((codes == -128).any()):
        raise _fail("int8 code -128 is outside the symmetric range [-127, 127]")
    if k and (bool((idx < 0).any()) or bool((idx >= last).any()) or bool((idx.diff(dim=-1) <= 0).any())):
        raise _fail("outlier indices must be ascending, distinct and inside the row")
    if k:
        full = torch.zeros(rows, last)
        full[_kept(idx, (rows, last))] = codes.float()
    else:
        full = codes.reshape(rows, last).float()
    x = (_blocks(full, block) * scales).flatten(1)[:, :last]
    if k:
        x = x.scatter(-1, idx, values)
    return x.reshape(dims)
