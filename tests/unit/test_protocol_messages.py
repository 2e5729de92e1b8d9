"""Wire messages: exact round trips, and nothing but ProtocolError for anything malformed."""

from __future__ import annotations

import json
import struct
from typing import Any

import pytest
import torch
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from engine.errors import ProtocolError
from engine.protocol.messages import (
    MAGIC,
    MAX_HEADER_BYTES,
    VERSION,
    Close,
    ErrorReply,
    Forward,
    Hop,
    HopTiming,
    Sampling,
    Token,
    decode,
    encode,
)

_PREFIX = struct.Struct("!2sBI")
FUZZ = settings(max_examples=300, deadline=None, derandomize=True, suppress_health_check=[HealthCheck.too_slow])

ROUTE = (Hop("peer-a", 0, 2), Hop("peer-b", 2, 4), Hop("peer-c", 4, 6))
TIMINGS = (HopTiming("peer-a", 0.25, 3.5), HopTiming("peer-b", 0.0, 12.0))


def forward(tensor: torch.Tensor | None = None, **kw: Any) -> Forward:
    args: dict[str, Any] = dict(
        session="sess-1",
        step=3,
        pos=17,
        route=ROUTE,
        hop=1,
        reply_to="client-9",
        sampling=Sampling(temperature=0.7, top_p=0.9, seed=42),
        max_tokens=128,
        timings=TIMINGS,
        tensor=torch.arange(6, dtype=torch.int64) if tensor is None else tensor,
    )
    args.update(kw)
    return Forward(**args)


def frame(
    header: dict[str, Any] | bytes, payload: bytes = b"", *, version: int = VERSION, magic: bytes = MAGIC
) -> bytes:
    head = header if isinstance(header, bytes) else json.dumps(header).encode()
    return _PREFIX.pack(magic, version, len(head)) + head + payload


def split(data: bytes) -> tuple[dict[str, Any], bytes]:
    """The JSON header and the payload of an encoded message."""
    _, _, n = _PREFIX.unpack_from(data)
    return json.loads(data[_PREFIX.size : _PREFIX.size + n]), data[_PREFIX.size + n :]


def forward_parts(**tensor_kw: Any) -> tuple[dict[str, Any], bytes]:
    return split(encode(forward(**tensor_kw)))


def rejects(data: bytes, *fragments: str) -> str:
    with pytest.raises(ProtocolError) as exc:
        decode(data)
    text = str(exc.value)
    assert text and "\n" not in text
    for f in fragments:
        assert f in text, f"{f!r} not in {text!r}"
    return text


# ---------------------------------------------------------------- round trips


@pytest.mark.parametrize(
    "tensor",
    [
        torch.randn(2, 3, 64, generator=torch.Generator().manual_seed(0)),
        torch.randn(5, 64, generator=torch.Generator().manual_seed(1)).to(torch.float16),
        torch.randn(1, 2, 3, 4, generator=torch.Generator().manual_seed(2)).to(torch.bfloat16),
        torch.tensor([0, 1, 2**40, -5, 100], dtype=torch.int64),
        torch.empty(0, 64, dtype=torch.float32),
    ],
    ids=["float32", "float16", "bfloat16", "int64", "empty-float32"],
)
def test_forward_round_trip_per_dtype(tensor: torch.Tensor) -> None:
    msg = forward(tensor)
    out = decode(encode(msg))
    assert isinstance(out, Forward)
    assert out == msg  # every field except the tensor
    assert out.tensor is not None
    assert out.tensor.dtype == tensor.dtype and out.tensor.shape == tensor.shape
    assert torch.equal(out.tensor, tensor)


def test_forward_round_trip_of_non_contiguous_tensor() -> None:
    t = torch.arange(12, dtype=torch.float32).reshape(3, 4).t()
    out = decode(encode(forward(t)))
    assert torch.equal(out.tensor, t)


@pytest.mark.parametrize(
    "msg",
    [
        Token("s", 0, 5, 42),
        Token("s", 7, 9, 2**31, TIMINGS),
        Close("s", ROUTE, 0),
        Close("s", ROUTE[:1], 0),
        ErrorReply("node_full", "node is full", "peer-b"),
        ErrorReply("bad_session", "unknown session", "peer-c", session="s", step=4),
    ],
    ids=repr,
)
def test_round_trip_other_messages(msg: Any) -> None:
    out = decode(encode(msg))
    assert type(out) is type(msg)
    assert out == msg


def test_empty_timings_round_trip_and_may_be_omitted() -> None:
    msg = forward(timings=())
    header, payload = split(encode(msg))
    assert "timings" not in header  # fields at their default are left out of the header
    assert decode(encode(msg)).timings == ()
    header["timings"] = []
    assert decode(frame(header, payload)).timings == ()
    token_header, _ = split(encode(Token("s", 1, 2, 3)))
    assert "timings" not in token_header
    token_header["timings"] = []
    assert decode(frame(token_header)) == Token("s", 1, 2, 3)


def test_decode_accepts_bytearray_and_memoryview() -> None:
    data = encode(Token("s", 1, 2, 3))
    assert decode(bytearray(data)) == decode(memoryview(data)) == Token("s", 1, 2, 3)


def test_decoded_tensor_does_not_alias_the_buffer() -> None:
    buf = bytearray(encode(forward(torch.zeros(4, dtype=torch.float32))))
    out = decode(buf)
    buf[-4:] = b"\xff\xff\xff\xff"
    assert torch.equal(out.tensor, torch.zeros(4))


def test_encode_refuses_a_disallowed_dtype() -> None:
    with pytest.raises(ProtocolError, match="float64"):
        encode(forward(torch.zeros(3, dtype=torch.float64)))


# ---------------------------------------------------------------- framing


def test_bad_magic() -> None:
    rejects(frame({"type": "close"}, magic=b"XX"), "magic")


@pytest.mark.parametrize("version", [0, 2, 255])
def test_wrong_version_is_named(version: int) -> None:
    data = bytearray(encode(Token("s", 0, 0, 1)))
    data[2] = version
    rejects(bytes(data), f"version {version}")


@pytest.mark.parametrize("cut", [0, 1, 6])
def test_shorter_than_prefix(cut: int) -> None:
    rejects(encode(Token("s", 0, 0, 1))[:cut])


def test_header_length_beyond_buffer() -> None:
    data = encode(Token("s", 0, 0, 1))
    _, _, n = _PREFIX.unpack_from(data)
    rejects(_PREFIX.pack(MAGIC, VERSION, n + 1) + data[_PREFIX.size :], "header length")
    rejects(_PREFIX.pack(MAGIC, VERSION, 2**32 - 1) + data[_PREFIX.size :], "header length")


def test_header_over_the_size_limit() -> None:
    header = {"type": "error", "code": "x", "message": "m", "peer": "p", "pad": " " * MAX_HEADER_BYTES}
    rejects(frame(header), "header length")


@pytest.mark.parametrize("head", [b"", b"{", b"not json", b"\xff\xfe\x00", b'{"type": "token",}'])
def test_header_not_json(head: bytes) -> None:
    rejects(frame(head), "JSON")


@pytest.mark.parametrize("head", [b"[]", b"1", b'"forward"', b"null", b"true"])
def test_header_not_an_object(head: bytes) -> None:
    rejects(frame(head), "object")


def test_deeply_nested_header_is_a_protocol_error() -> None:
    # 60 000 nested arrays fit under MAX_HEADER_BYTES; json.loads recurses once per level.
    rejects(frame(b"[" * 60_000))
    rejects(frame(b'{"a":' * 10_000))


# ---------------------------------------------------------------- header strictness


@pytest.mark.parametrize("kind", [None, "", "forwards", "Token", 1, ["token"], {"t": 1}])
def test_unknown_or_missing_type(kind: Any) -> None:
    header, _ = split(encode(Token("s", 0, 0, 1)))
    if kind is None:
        del header["type"]
    else:
        header["type"] = kind
    rejects(frame(header), "unknown message type")


@pytest.mark.parametrize(
    "msg",
    [forward(), Token("s", 0, 0, 1), Close("s", ROUTE, 0), ErrorReply("c", "m", "p")],
    ids=lambda m: type(m).__name__,
)
def test_unknown_field(msg: Any) -> None:
    header, payload = split(encode(msg))
    header["extra"] = 1
    rejects(frame(header, payload), "unknown fields", "extra")


@pytest.mark.parametrize(
    ("msg", "name"),
    [
        (forward(), "session"),
        (forward(), "step"),
        (forward(), "pos"),
        (forward(), "route"),
        (forward(), "hop"),
        (forward(), "reply_to"),
        (forward(), "sampling"),
        (forward(), "max_tokens"),
        (Token("s", 0, 0, 1), "token_id"),
        (Token("s", 0, 0, 1), "pos"),
        (Close("s", ROUTE, 0), "route"),
        (Close("s", ROUTE, 0), "hop"),
        (ErrorReply("c", "m", "p"), "code"),
        (ErrorReply("c", "m", "p"), "peer"),
    ],
)
def test_missing_field(msg: Any, name: str) -> None:
    header, payload = split(encode(msg))
    del header[name]
    rejects(frame(header, payload), "missing field", name)


def test_forward_without_tensor() -> None:
    header, _ = forward_parts()
    del header["tensor"]
    rejects(frame(header), "without a tensor")


@pytest.mark.parametrize(
    ("field", "value"),
    [
        ("session", 5),
        ("session", None),
        ("session", "x" * 257),
        ("reply_to", ["c"]),
        ("step", -1),
        ("step", 1.0),
        ("step", "3"),
        ("step", True),
        ("pos", False),
        ("pos", 10_000_001),
        ("hop", True),
        ("max_tokens", 0),
        ("max_tokens", True),
        ("route", []),
        ("route", {"peer": "a", "start": 0, "end": 1}),
        ("route", [{"peer": "a", "start": 0}]),
        ("route", [{"peer": "a", "start": 0, "end": 1, "x": 2}]),
        ("route", [{"peer": "a", "start": True, "end": 1}]),
        ("route", [{"peer": "a", "start": -1, "end": 1}]),
        ("route", [{"peer": 1, "start": 0, "end": 1}]),
        ("route", [{"peer": "a", "start": 0, "end": 1}] * 257),
        ("sampling", None),
        ("sampling", {"temperature": 0.0, "top_p": 1.0}),
        ("sampling", {"temperature": True, "top_p": 1.0, "seed": 0}),
        ("sampling", {"temperature": "0", "top_p": 1.0, "seed": 0}),
        ("sampling", {"temperature": -0.1, "top_p": 1.0, "seed": 0}),
        ("sampling", {"temperature": 0.0, "top_p": 0.0, "seed": 0}),
        ("sampling", {"temperature": 0.0, "top_p": 1.5, "seed": 0}),
        ("sampling", {"temperature": 0.0, "top_p": 1.0, "seed": -1}),
        ("sampling", {"temperature": 0.0, "top_p": 1.0, "seed": 2**63}),
        ("sampling", {"temperature": 0.0, "top_p": 1.0, "seed": False}),
        ("timings", None),
        ("timings", [{"peer": "a", "queue_ms": 1.0}]),
        ("timings", [{"peer": "a", "queue_ms": True, "compute_ms": 1.0}]),
        ("timings", [{"peer": "a", "queue_ms": "1", "compute_ms": 1.0}]),
        ("timings", [{"peer": "a", "queue_ms": 0.0, "compute_ms": 0.0}] * 257),
    ],
)
def test_wrong_field_types_and_ranges(field: str, value: Any) -> None:
    header, payload = forward_parts()
    header[field] = value
    rejects(frame(header, payload), "malformed")


@pytest.mark.parametrize("token_id", [True, -1, 2**31 + 1, 1.5, "7"])
def test_token_id_strictness(token_id: Any) -> None:
    header, _ = split(encode(Token("s", 0, 0, 1)))
    header["token_id"] = token_id
    rejects(frame(header), "token_id")


@pytest.mark.parametrize("field", ["session", "step"])
def test_error_reply_optional_fields_are_type_checked(field: str) -> None:
    header, _ = split(encode(ErrorReply("c", "m", "p")))
    header[field] = True if field == "step" else 7
    rejects(frame(header), field)


@pytest.mark.parametrize("value", ["NaN", "Infinity", "-Infinity", "1e999"])
def test_non_finite_json_numbers_refused(value: str) -> None:
    header, payload = forward_parts()
    text = json.dumps(header).replace('"temperature": 0.7', f'"temperature": {value}')
    assert value in text
    rejects(frame(text.encode(), payload), "finite")


@pytest.mark.parametrize("msg_kind", ["forward", "close"])
@pytest.mark.parametrize("hop", [-1, 3, 100])
def test_hop_index_out_of_route(msg_kind: str, hop: int) -> None:
    msg = forward() if msg_kind == "forward" else Close("s", ROUTE, 0)
    header, payload = split(encode(msg))
    header["hop"] = hop
    rejects(frame(header, payload), "'hop'")


def test_last_hop_index_is_accepted() -> None:
    header, payload = forward_parts()
    header["hop"] = len(ROUTE) - 1
    assert decode(frame(header, payload)).hop == len(ROUTE) - 1


def test_hop_end_before_start() -> None:
    header, payload = forward_parts()
    header["route"][1] = {"peer": "b", "start": 4, "end": 3}
    rejects(frame(header, payload), "end before start")
    header["route"][1] = {"peer": "b", "start": 4, "end": 4}  # an empty range is allowed
    assert decode(frame(header, payload)).route[1] == Hop("b", 4, 4)


# ---------------------------------------------------------------- tensor strictness


@pytest.mark.parametrize("dtype", ["float64", "uint8", "int32", "bool", "Float32", "", 5, None, ["float32"]])
def test_disallowed_dtype(dtype: Any) -> None:
    header, payload = forward_parts()
    header["tensor"]["dtype"] = dtype
    rejects(frame(header, payload), "not allowed")


@pytest.mark.parametrize(
    "shape",
    [[-1], [6, -1], [2**40], [2**26 + 1], [1.5], ["6"], [True], None, 6, {"0": 6}],
    ids=repr,
)
def test_bad_shape_values(shape: Any) -> None:
    header, payload = forward_parts()
    header["tensor"]["shape"] = shape
    rejects(frame(header, payload), "malformed")


@pytest.mark.parametrize("shape", [[], [1, 1, 1, 1, 6]])
def test_rank_outside_1_to_4(shape: list[int]) -> None:
    header, payload = forward_parts()
    header["tensor"]["shape"] = shape
    rejects(frame(header, payload), "rank")


def test_rank_four_is_accepted() -> None:
    header, payload = forward_parts()
    header["tensor"]["shape"] = [1, 2, 1, 3]
    assert decode(frame(header, payload)).tensor.shape == (1, 2, 1, 3)


def test_element_limit() -> None:
    data = encode(forward(torch.zeros(100, dtype=torch.int64)))
    assert decode(data, max_elements=100).tensor.numel() == 100
    with pytest.raises(ProtocolError, match=r"\[0, 99\]"):  # the dimension alone is over the limit
        decode(data, max_elements=99)
    header, _ = forward_parts()
    header["tensor"]["shape"] = [2**20, 2**20]  # each dim within the limit, the product not
    rejects(frame(header), "exceeds the limit")


def test_zero_element_tensor_with_huge_dims_is_refused_cleanly() -> None:
    # Every dimension is within the limit and the product is 0, but the strides overflow int64.
    header, _ = forward_parts()
    header["tensor"]["shape"] = [0, 2**26, 2**26, 2**26]
    with pytest.raises(ProtocolError):
        decode(frame(header))


@pytest.mark.parametrize("shape", [[5], [7], [3, 2, 2]])
def test_shape_payload_mismatch(shape: list[int]) -> None:
    header, payload = forward_parts()  # 6 int64 = 48 bytes
    header["tensor"]["shape"] = shape
    rejects(frame(header, payload), "payload has 48 bytes")


def test_truncated_and_extended_payload() -> None:
    data = encode(forward())
    rejects(data[:-1], "payload has 47 bytes")
    rejects(data[:-8], "payload has 40 bytes")
    rejects(data + b"\x00", "payload has 49 bytes")


@pytest.mark.parametrize(
    "msg", [Token("s", 0, 0, 1), Close("s", ROUTE, 0), ErrorReply("c", "m", "p")], ids=lambda m: type(m).__name__
)
def test_payload_or_tensor_on_non_tensor_messages(msg: Any) -> None:
    data = encode(msg)
    rejects(data + b"\x00", "unexpected tensor payload")
    header, _ = split(data)
    header["tensor"] = {"dtype": "int64", "shape": [1]}
    rejects(frame(header, b"\x00" * 8), "unexpected tensor payload")


@pytest.mark.parametrize("dtype", [torch.float32, torch.float16, torch.bfloat16])
@pytest.mark.parametrize("bad", [float("nan"), float("inf"), float("-inf")])
def test_non_finite_tensor_values(dtype: torch.dtype, bad: float) -> None:
    t = torch.ones(2, 8, dtype=dtype)
    t[1, 5] = bad
    data = encode(forward(t))  # encode does not check values; the receiver must
    rejects(data, "NaN or infinite")


# ---------------------------------------------------------------- fuzzing


def decode_or_protocol_error(data: bytes) -> Any:
    try:
        return decode(data)
    except ProtocolError as exc:
        assert str(exc) and "\n" not in str(exc)
        return None


@FUZZ
@given(st.binary(max_size=256))
def test_fuzz_arbitrary_bytes(data: bytes) -> None:
    decode_or_protocol_error(data)


@FUZZ
@given(st.binary(max_size=200), st.integers(0, 300))
def test_fuzz_arbitrary_bytes_after_a_valid_prefix(body: bytes, head_len: int) -> None:
    decode_or_protocol_error(_PREFIX.pack(MAGIC, VERSION, head_len) + body)


_VALID_FORWARD = encode(forward(torch.randn(3, 8, generator=torch.Generator().manual_seed(3))))
_PAYLOAD_AT = len(_VALID_FORWARD) - 3 * 8 * 4

_mutation = st.one_of(
    st.tuples(st.just("set"), st.integers(0, len(_VALID_FORWARD) - 1), st.integers(0, 255)),
    st.tuples(st.just("set"), st.integers(_PAYLOAD_AT, len(_VALID_FORWARD) - 1), st.integers(0, 255)),
    st.tuples(st.just("truncate"), st.integers(0, len(_VALID_FORWARD)), st.just(0)),
    st.tuples(st.just("insert"), st.integers(0, len(_VALID_FORWARD)), st.integers(0, 255)),
    st.tuples(st.just("delete"), st.integers(0, len(_VALID_FORWARD) - 1), st.just(0)),
)


@FUZZ
@given(st.lists(_mutation, min_size=1, max_size=6), st.one_of(st.just(b""), st.binary(min_size=1, max_size=64)))
def test_fuzz_mutated_forward(mutations: list[tuple[str, int, int]], tail: bytes) -> None:
    data = bytearray(_VALID_FORWARD)
    for op, pos, value in mutations:
        pos = min(pos, len(data))
        if op == "set" and pos < len(data):
            data[pos] = value
        elif op == "truncate":
            del data[pos:]
        elif op == "insert":
            data.insert(pos, value)
        elif op == "delete" and pos < len(data):
            del data[pos]
    data += tail
    out = decode_or_protocol_error(bytes(data))
    if out is not None:
        assert isinstance(out, Forward | Token | Close | ErrorReply)
        # Whatever was accepted must survive its own round trip.
        assert decode(encode(out)) == out


_json = st.recursive(
    st.none()
    | st.booleans()
    | st.integers(-(2**70), 2**70)
    | st.floats(allow_nan=False, allow_infinity=False)
    | st.text(max_size=20),
    lambda children: st.lists(children, max_size=5) | st.dictionaries(st.text(max_size=10), children, max_size=5),
    max_leaves=20,
)
_VALID = {
    "forward": split(encode(forward(torch.randn(2, 4, generator=torch.Generator().manual_seed(4))))),
    "token": split(encode(Token("s", 1, 2, 3, TIMINGS))),
    "close": split(encode(Close("s", ROUTE, 1))),
    "error": split(encode(ErrorReply("c", "m", "p", "s", 2))),
}


@FUZZ
@given(_json, st.binary(max_size=64))
def test_fuzz_random_json_header(header: Any, payload: bytes) -> None:
    decode_or_protocol_error(frame(json.dumps(header).encode(), payload))


@st.composite
def near_valid(draw: st.DrawFn) -> tuple[dict[str, Any], bytes]:
    """A valid header of some type with a few fields replaced by random JSON, dropped or added."""
    kind = draw(st.sampled_from(sorted(_VALID)))
    header, payload = _VALID[kind]
    header = json.loads(json.dumps(header))
    keys = st.sampled_from([*sorted(header), "extra"])
    for key in draw(st.lists(keys, max_size=3)):
        header[key] = draw(_json)
    for key in draw(st.lists(keys, max_size=2)):
        header.pop(key, None)
    return header, draw(st.sampled_from([payload, b"", payload[:-1]]))


@FUZZ
@given(near_valid())
def test_fuzz_near_valid_json_header(case: tuple[dict[str, Any], bytes]) -> None:
    header, payload = case
    out = decode_or_protocol_error(frame(json.dumps(header).encode(), payload))
    if out is not None:
        assert decode(encode(out)) == out


def test_forward_carries_its_codec_and_compresses_hidden_states_but_not_token_ids() -> None:
    from dataclasses import replace

    hidden = torch.randn(1, 576, generator=torch.Generator().manual_seed(5))
    plain = encode(forward(hidden))
    packed = encode(replace(forward(hidden), codec="int8"))
    out = decode(packed)
    assert isinstance(out, Forward) and out.codec == "int8" and out.tensor is not None
    assert len(split(plain)[1]) / len(split(packed)[1]) > 3.5  # tensor payload: 2304 bytes -> 642
    assert out.tensor.dtype == torch.float32 and (out.tensor - hidden).abs().max() < 0.05
    ids = torch.tensor([1, 2, 3], dtype=torch.int64)
    assert torch.equal(decode(encode(replace(forward(ids), codec="int8"))).tensor, ids)  # ids stay exact
    header, _ = split(plain)
    assert "codec" not in header  # the default is implied
    bad = packed.replace(b'"codec":"int8"', b'"codec":"int9"', 1)
    rejects(bad, "codec")
