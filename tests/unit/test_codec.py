"""Activation codecs: error bounds, exact sizes, hostile headers, and the evaluation on the real model."""

from __future__ import annotations

import json
import math
from pathlib import Path

import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st

from engine.errors import ProtocolError
from engine.protocol import codec
from engine.transport.codec_eval import split_layers, text_windows

HIDDEN = 576  # SmolLM2-135M


def hidden_states(tokens: int = 5, outlier: float = 24_000.0, seed: int = 0) -> torch.Tensor:
    """Llama-like hidden states: mostly O(1), one massive channel (SmolLM2 has one near 25,000 at layer 20)."""
    g = torch.Generator().manual_seed(seed)
    x = torch.randn(1, tokens, HIDDEN, generator=g) * 3
    x[..., 507] = outlier
    x[..., 247] = -outlier / 20
    return x


def roundtrip(x: torch.Tensor, name: str, **kw: int) -> tuple[torch.Tensor, dict, bytes]:
    header, payload = codec.encode(x, name, **kw)
    return codec.decode(json.loads(json.dumps(header)), payload), header, payload


# ---------------------------------------------------------------- roundtrip bounds


def test_fp32_is_exact_and_keeps_todays_header() -> None:
    x = hidden_states()
    y, header, payload = roundtrip(x, "fp32")
    assert torch.equal(y, x)
    assert header == {"dtype": "float32", "shape": [1, 5, HIDDEN]}  # the tensor object messages.py sends today
    assert payload == x.numpy().tobytes()


@pytest.mark.parametrize(("name", "rel"), [("fp16", 2.0**-11), ("bf16", 2.0**-8)])
def test_half_codecs_round_each_value_to_nearest(name: str, rel: float) -> None:
    x = hidden_states()
    y, header, _ = roundtrip(x, name)
    assert header["codec"] == name and y.dtype == torch.float32
    assert bool(((y - x).abs() <= x.abs() * rel + 1e-7).all())


def _blockwise(t: torch.Tensor, block: int) -> torch.Tensor:
    rows = t.reshape(-1, t.shape[-1])
    return torch.nn.functional.pad(rows, (0, -rows.shape[-1] % block)).reshape(rows.shape[0], -1, block)


@pytest.mark.parametrize("block", [64, 32, 100])
@pytest.mark.parametrize("outliers", [0, 8])
def test_int8_error_is_half_a_step_of_its_own_block(block: int, outliers: int) -> None:
    x = hidden_states(tokens=7)
    y, header, _ = roundtrip(x, "int8", block=block, outliers=outliers)
    expected = {"dtype": "float32", "shape": [1, 7, HIDDEN], "codec": "int8", "block": block, "scale": "float16"}
    assert header == ({**expected, "outliers": outliers} if outliers else expected)
    rest = x.clone()
    if outliers:  # the largest values travel apart: the blocks are quantised without them
        rest.scatter_(-1, x.abs().topk(outliers, dim=-1).indices, 0.0)
    step = _blockwise(rest, block).abs().amax(-1, keepdim=True) / 127
    err = _blockwise(y - x, block).abs()
    assert bool((err <= step * 0.5 * (1 + 2**-10) + 1e-6).all())  # float16 scale rounding adds at most 2^-11


def test_int8_outliers_travel_apart_and_spare_their_neighbours() -> None:
    x = hidden_states(tokens=3)
    y, _, _ = roundtrip(x, "int8", outliers=2)
    assert torch.equal(y[..., [247, 507]], x[..., [247, 507]].half().float())  # exact up to float16
    for b in range(HIDDEN // 64):
        sl = slice(b * 64, (b + 1) * 64)
        assert float((y[..., sl] - x[..., sl]).norm() / x[..., sl].norm()) < 0.01


def test_plain_absmax_outlier_channels_only_coarsen_their_own_block() -> None:
    """Without outliers apart, the massive channel costs its 63 neighbours their precision, nobody else."""
    x = hidden_states(tokens=3)
    y, _, _ = roundtrip(x, "int8", outliers=0)
    outlier_blocks = {507 // 64, 247 // 64}
    for b in set(range(HIDDEN // 64)) - outlier_blocks:
        sl = slice(b * 64, (b + 1) * 64)
        rel = float((y[..., sl] - x[..., sl]).norm() / x[..., sl].norm())
        assert rel < 0.01, f"block {b} lost precision to an outlier elsewhere: {rel}"
    assert abs(float(y[0, 0, 507]) - 24_000.0) <= 24_000.0 / 254 * 1.01
    # the outlier's neighbours are quantised with a step of ~189: they come back as 0
    neighbours = [c for c in range(448, 512) if c != 507]
    assert bool((y[..., neighbours] == 0).all())


def test_zero_and_empty_tensors() -> None:
    y, header, payload = roundtrip(torch.zeros(2, 64), "int8")
    assert torch.equal(y, torch.zeros(2, 64)) and header["scale"] == "float16"
    assert len(payload) == 2 * (64 + 2 + 16 * 3)
    for name in codec.CODECS:
        for shape in ((0, HIDDEN), (2, 0)):
            y, _, payload = roundtrip(torch.zeros(shape), name)
            assert y.shape == shape and payload == b""


def test_other_dtypes_round_trip_to_their_own_dtype() -> None:
    x = hidden_states(outlier=100.0).to(torch.bfloat16)
    for name in ("fp32", "fp16", "int8"):
        y, header, _ = roundtrip(x, name)
        assert y.dtype == torch.bfloat16 and header["dtype"] == "bfloat16"
        assert float((y.float() - x.float()).norm() / x.float().norm()) < 0.01


def test_token_ids_always_travel_raw() -> None:
    ids = torch.tensor([[1, 2, 49_151]])
    for name in codec.CODECS:
        y, header, payload = roundtrip(ids, name)
        assert torch.equal(y, ids) and header == {"dtype": "int64", "shape": [1, 3]} and len(payload) == 24


# ---------------------------------------------------------------- sizes


@pytest.mark.parametrize(
    ("name", "shape", "size"),
    [
        ("fp32", (1, 1, HIDDEN), 4 * HIDDEN),
        ("fp16", (1, 1, HIDDEN), 2 * HIDDEN),
        ("bf16", (1, 1, HIDDEN), 2 * HIDDEN),
        ("int8:o0", (1, 1, HIDDEN), HIDDEN + 9 * 2),  # 594 bytes: 3.88x fewer than fp32
        # 16 outliers: value and index instead of a code, 3 bytes more each: 642 bytes, 3.59x
        ("int8", (1, 1, HIDDEN), HIDDEN + 9 * 2 + 16 * (2 + 2 - 1)),
        ("int8", (1, 10, HIDDEN), 10 * (HIDDEN + 9 * 2 + 16 * 3)),
        ("int8:o0", (3, 100), 3 * (100 + 2 * 2)),  # a partial last block still has its scale
        ("int8", (2, 5), 2 * (5 + 2 + 5 * 3)),  # never more outliers than values
    ],
)
def test_exact_payload_sizes(name: str, shape: tuple[int, ...], size: int) -> None:
    header, payload = codec.encode(torch.randn(shape), name[:4], outliers=0 if name.endswith("o0") else 16)
    assert len(payload) == size == codec.payload_size(header)


@pytest.mark.parametrize("magnitude", [1e7, 1e-7])
def test_int8_scales_fall_back_to_float32_outside_float16_range(magnitude: float) -> None:
    x = torch.randn(1, 2, HIDDEN) * magnitude
    y, header, payload = roundtrip(x, "int8")
    assert header["scale"] == "float32" and len(payload) == 2 * (HIDDEN + 9 * 4 + 16 * (4 + 2 - 1))
    assert float((y - x).norm() / x.norm()) < 0.01


def test_int8_meets_the_compression_target() -> None:
    fp32 = len(codec.encode(torch.randn(1, 1, HIDDEN), "fp32")[1])
    int8 = len(codec.encode(hidden_states(tokens=1), "int8")[1])
    assert fp32 / int8 >= 3.5


# ---------------------------------------------------------------- overflow and bad input at the sender


def test_fp16_saturates_instead_of_sending_infinities() -> None:
    x = torch.tensor([[1e6, -1e6, 3.0]])
    y, _, _ = roundtrip(x, "fp16")
    assert y.tolist() == [[65504.0, -65504.0, 3.0]]
    y, _, _ = roundtrip(x, "bf16")  # bf16 has float32's range: no saturation, 8 bits of mantissa
    assert abs(float(y[0, 0]) - 1e6) <= 1e6 * 2**-8


@pytest.mark.parametrize("bad", [math.nan, math.inf])
@pytest.mark.parametrize("name", ["fp16", "bf16", "int8"])
def test_non_finite_input_is_refused_at_the_sender(name: str, bad: float) -> None:
    with pytest.raises(ProtocolError):
        codec.encode(torch.tensor([[1.0, bad]]), name)


def test_sender_refuses_unknown_codec_and_block() -> None:
    with pytest.raises(ProtocolError, match="unknown codec"):
        codec.encode(torch.ones(4), "int4")
    with pytest.raises(ProtocolError, match="block"):
        codec.encode(torch.ones(4), "int8", block=3)
    with pytest.raises(ProtocolError, match="outliers"):
        codec.encode(torch.ones(4), "int8", outliers=-1)
    with pytest.raises(ProtocolError, match="16-bit"):
        codec.encode(torch.ones(1, 40_000), "int8", outliers=1)
    assert codec.encode(torch.ones(1, 40_000), "int8", outliers=0)[0]["codec"] == "int8"
    with pytest.raises(ProtocolError):
        codec.encode(torch.tensor(1.0), "int8")  # rank 0: no receiver would take it


# ---------------------------------------------------------------- hostile headers and payloads


def _int8(
    scale: float, code: int = 5, dtype: str = "float32", outliers: tuple[tuple[int, float], ...] = ()
) -> tuple[dict, bytes]:
    """A hand-built int8 tensor of one 64-value block (float32 scale) with the given outliers."""
    header = {"dtype": dtype, "shape": [1, 64], "codec": "int8", "block": 64, "scale": "float32"}
    if outliers:
        header["outliers"] = len(outliers)
    raw = lambda v, dt: torch.tensor(v, dtype=dt).view(torch.uint8).numpy().tobytes()  # noqa: E731
    side = raw([scale] + [v for _, v in outliers], torch.float32) + raw([i for i, _ in outliers], torch.int16)
    return header, side + bytes([code % 256]) * (64 - len(outliers))


def test_hand_built_int8_decodes() -> None:
    header, payload = _int8(0.5, code=-3, outliers=((2, 1e4), (60, -7.0)))
    y = codec.decode(header, payload)
    expected = torch.full((1, 64), -1.5)
    expected[0, 2], expected[0, 60] = 1e4, -7.0
    assert torch.equal(y, expected)


@pytest.mark.parametrize(
    ("header", "payload"),
    [
        ("not a dict", b""),
        ({"dtype": "float32"}, b""),
        ({"dtype": "float64", "shape": [1]}, b"\0" * 8),
        ({"dtype": "float32", "shape": []}, b""),
        ({"dtype": "float32", "shape": [1, 2, 3, 4, 5]}, b""),
        ({"dtype": "float32", "shape": [True]}, b"\0" * 4),
        ({"dtype": "float32", "shape": [-1]}, b""),
        ({"dtype": "float32", "shape": [2**20, 2**20]}, b""),  # refused before any allocation
        ({"dtype": "float32", "shape": [2], "extra": 1}, b"\0" * 8),
        ({"dtype": "float32", "shape": [2]}, b"\0" * 7),
        ({"dtype": "float32", "shape": [2], "codec": "int4"}, b"\0" * 8),
        ({"dtype": "float32", "shape": [2], "codec": 16}, b"\0" * 8),
        ({"dtype": "int64", "shape": [2], "codec": "fp16"}, b"\0" * 4),
        ({"dtype": "float32", "shape": [2], "codec": "fp16", "block": 64}, b"\0" * 4),
        ({"dtype": "float32", "shape": [2], "codec": "fp16"}, b"\0" * 8),
        ({"dtype": "float32", "shape": [1], "codec": "fp16"}, b"\x00\x7c"),  # +inf in float16
        ({"dtype": "float32", "shape": [1], "codec": "bf16"}, b"\xc0\x7f"),  # NaN in bfloat16
        ({"dtype": "float32", "shape": [64], "codec": "int8"}, b"\0" * 66),
        ({"dtype": "float32", "shape": [64], "codec": "int8", "block": 64, "scale": "int8"}, b"\0" * 65),
        ({"dtype": "float32", "shape": [64], "codec": "int8", "block": 7, "scale": "float16"}, b"\0" * 82),
        ({"dtype": "float32", "shape": [64], "codec": "int8", "block": 2**20, "scale": "float16"}, b"\0" * 66),
        ({"dtype": "float32", "shape": [64], "codec": "int8", "block": 64, "scale": "float16"}, b"\0" * 65),
        _int8(math.nan),
        _int8(math.inf),
        _int8(-1.0),
        _int8(3e38),
        _int8(1.0, code=-128),
        _int8(1000.0, code=127, dtype="float16"),  # finite scale, but 127 * 1000 overflows float16
        _int8(1e5, dtype="float16"),
        _int8(1.0, outliers=((64, 1.0),)),
        _int8(1.0, outliers=((-1, 1.0),)),
        _int8(1.0, outliers=((3, 1.0), (3, 2.0))),
        _int8(1.0, outliers=((5, 1.0), (3, 2.0))),
        _int8(1.0, outliers=((5, math.nan),)),
        _int8(1.0, outliers=((5, 1e5),), dtype="float16"),
        ({"dtype": "float32", "shape": [64], "codec": "int8", "block": 64, "scale": "float16", "outliers": 65}, b""),
        ({"dtype": "float32", "shape": [64], "codec": "int8", "block": 64, "scale": "float16", "outliers": -1}, b""),
        ({"dtype": "float32", "shape": [64], "codec": "int8", "block": 64, "scale": "float16", "outliers": True}, b""),
        ({"dtype": "float32", "shape": [2], "codec": "fp16", "outliers": 1}, b"\0" * 4),
        ({"dtype": "float32", "shape": [40_000], "codec": "int8", "block": 64, "scale": "float16", "outliers": 1}, b""),
    ],
)
def test_malformed_tensors_raise_protocol_error(header: object, payload: bytes) -> None:
    with pytest.raises(ProtocolError):
        codec.decode(header, payload)


def test_limits_are_the_callers() -> None:
    header, payload = codec.encode(torch.ones(1, 10, HIDDEN), "int8")
    with pytest.raises(ProtocolError, match="limit"):
        codec.decode(header, payload, max_elements=HIDDEN)


_JSONISH = st.recursive(
    st.none() | st.booleans() | st.integers(-(2**40), 2**40) | st.floats() | st.text(max_size=8),
    lambda inner: st.lists(inner, max_size=5) | st.dictionaries(st.text(max_size=8), inner, max_size=5),
    max_leaves=12,
)


@settings(max_examples=300, deadline=None)
@given(
    dtype=st.sampled_from(["float32", "float16", "bfloat16", "int64", "x"]),
    shape=st.lists(st.integers(-1, 130), min_size=0, max_size=5) | _JSONISH,
    extra=st.dictionaries(
        st.sampled_from(["codec", "block", "scale", "outliers", "zzz"]),
        _JSONISH | st.sampled_from(["int8", "fp16", "bf16", "fp32", "float16", "float32", 1, 8, 64, 128]),
        max_size=4,
    ),
    payload=st.binary(max_size=2000),
)
def test_fuzzed_headers_never_crash(dtype: str, shape: object, extra: dict, payload: bytes) -> None:
    header = {"dtype": dtype, "shape": shape, **extra}
    try:
        t = codec.decode(header, payload, max_elements=100_000)
    except ProtocolError:
        return
    assert list(t.shape) == shape
    assert not t.is_floating_point() or bool(torch.isfinite(t).all())


@settings(max_examples=200, deadline=None)
@given(data=st.data(), name=st.sampled_from(["fp16", "bf16", "int8"]), outliers=st.sampled_from([0, 8]))
def test_corrupted_payloads_decode_finite_or_raise(data: st.DataObject, name: str, outliers: int) -> None:
    header, payload = codec.encode(hidden_states(tokens=2, outlier=300.0), name, outliers=outliers)
    buf = bytearray(payload)
    for _ in range(data.draw(st.integers(1, 8))):
        buf[data.draw(st.integers(0, len(buf) - 1))] = data.draw(st.integers(0, 255))
    try:
        t = codec.decode(header, bytes(buf))
    except ProtocolError:
        return
    assert t.shape == (1, 2, HIDDEN) and bool(torch.isfinite(t).all())


# ---------------------------------------------------------------- evaluation helpers and the real-model run


def test_split_layers_like_a_three_node_pack() -> None:
    assert split_layers(30, 3) == [(0, 10), (10, 20), (20, 30)]
    assert split_layers(7, 2) == [(0, 4), (4, 7)]


def test_text_windows_cover_what_was_asked() -> None:
    assert text_windows(list(range(1000)), 100, 250) == [
        list(range(0, 100)),
        list(range(100, 200)),
        list(range(200, 300)),
    ]
    assert text_windows(list(range(50)), 100, 250) == [list(range(50))]


@pytest.mark.slow  # the real model: ~10 s on an idle 2-core machine, 45 s on a busy one
def test_bench_codec_on_the_real_model(smollm2_dir: Path, tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    """2 prompts x 8 tokens and a short text: the command runs and its figures are sane."""
    from engine.cli import main

    text = tmp_path / "text.txt"
    text.write_text(
        "It is a truth universally acknowledged, that a single man in possession of a good fortune, "
        "must be in want of a wife. " * 8,
        encoding="utf-8",
    )
    assert (
        main(["bench", "codec", "--prompts", "2", "--tokens", "8", "--text", str(text), "--ppl-tokens", "64", "--json"])
        == 0
    )
    result = json.loads(capsys.readouterr().out)
    assert result["model_layers"] == [[0, 10], [10, 20], [20, 30]] and result["perplexity_tokens"] == 64
    rows = {r["codec"]: r for r in result["codecs"]}
    assert list(rows) == ["fp32", "fp16", "bf16", "int8:o0", "int8"]
    assert [rows[c]["bytes_per_token"] for c in rows] == [2304, 1152, 1152, 594, 642]
    assert rows["int8"]["ratio_vs_fp32"] >= 3.5
    # whole step frames, header included (the per-session header goes once per link)
    assert 0 < result["frame_overhead_bytes"] <= 24
    assert rows["int8"]["frame_bytes_per_token"] == 642 + result["frame_overhead_bytes"]
    assert rows["int8"]["frame_ratio_vs_fp32"] >= 3.5
    assert rows["fp32"]["max_abs_logit_diff"] == 0 and rows["fp32"]["perplexity_change"] == 0
    assert all(r["prompts"] == 2 and 0 <= r["identical"] <= 2 for r in rows.values())
    assert rows["fp16"]["identical"] == 2  # fp16 keeps ~3 decimal digits: greedy tokens do not move
    # error grows fp16 < bf16 < int8 < plain absmax int8, whose outlier blocks lose their other values
    for metric in ("max_abs_logit_diff", "mean_abs_logit_diff", "boundary_rel_err"):
        figures = [rows[c][metric] for c in ("fp16", "bf16", "int8", "int8:o0")]
        assert figures[0] > 0 and figures == sorted(figures), (metric, figures)
    assert rows["int8:o0"]["max_abs_logit_diff"] < 10 and rows["int8:o0"]["boundary_rel_err"] < 0.05
    for r in rows.values():
        assert 1 < r["perplexity"] < 1000 and abs(r["perplexity_change"]) < 0.1 * rows["fp32"]["perplexity"]
