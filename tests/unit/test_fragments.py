"""Packing a tiny model into fragments, verifying them, and chaining them back into the whole model."""

from __future__ import annotations

import itertools
import json
import re
import shutil
from collections.abc import Callable
from pathlib import Path
from typing import Any

import pytest
import torch

from engine.cli import main
from engine.errors import ConfigError, FragmentError
from engine.fragments.manifest import (
    CONFIG,
    FORMAT_VERSION,
    MANIFEST,
    WEIGHTS,
    parse_manifest,
    read_manifest,
    sha256_file,
)
from engine.fragments.pack import PACK_INDEX, TOKENIZER_DIR, fragment_flops, pack_model, split_layers
from engine.fragments.store import load_fragment, read_pack
from engine.models.config import load_config
from engine.models.loading import load_model

MODEL_ID = "tiny-llama"


@pytest.fixture(scope="module")
def pack3(tiny_model_dir: Path, tmp_path_factory: pytest.TempPathFactory) -> Path:
    """The tiny model packed into 3 fragments; read-only (copy it before corrupting anything)."""
    out = tmp_path_factory.mktemp("pack3")
    pack_model(tiny_model_dir, out, 3, model_id=MODEL_ID, progress=False)
    return out


@pytest.fixture
def pack_copy(pack3: Path, tmp_path: Path) -> Path:
    dst = tmp_path / "pack"
    shutil.copytree(pack3, dst)
    return dst


def frag_dir(root: Path, index: int, count: int = 3) -> Path:
    return root / f"frag-{index:02d}-of-{count:02d}"


# ---------------------------------------------------------------- split_layers


@pytest.mark.parametrize(
    ("layers", "count", "expected"),
    [
        (6, 3, [(0, 2), (2, 4), (4, 6)]),
        (6, 1, [(0, 6)]),
        (6, 6, [(i, i + 1) for i in range(6)]),
        (7, 3, [(0, 3), (3, 5), (5, 7)]),
        (8, 3, [(0, 3), (3, 6), (6, 8)]),
        (30, 4, [(0, 8), (8, 16), (16, 23), (23, 30)]),
    ],
)
def test_split_layers(layers: int, count: int, expected: list[tuple[int, int]]) -> None:
    assert split_layers(layers, count) == expected


@pytest.mark.parametrize("layers", range(1, 25))
def test_split_layers_is_contiguous_and_even(layers: int) -> None:
    for count in range(1, layers + 1):
        ranges = split_layers(layers, count)
        assert len(ranges) == count
        assert ranges[0][0] == 0 and ranges[-1][1] == layers
        assert all(a[1] == b[0] for a, b in itertools.pairwise(ranges))
        sizes = [e - s for s, e in ranges]
        assert min(sizes) >= 1 and max(sizes) - min(sizes) <= 1
        assert sizes == sorted(sizes, reverse=True)  # earlier fragments take the remainder


@pytest.mark.parametrize(("layers", "count"), [(6, 0), (6, 7), (6, -1), (1, 2)])
def test_split_layers_refuses_impossible_counts(layers: int, count: int) -> None:
    with pytest.raises(ConfigError, match=f"{layers} layers"):
        split_layers(layers, count)


# ---------------------------------------------------------------- packing


def test_pack_manifests(pack3: Path, tiny_model_dir: Path) -> None:
    cfg = load_config(tiny_model_dir)
    manifests = [read_manifest(frag_dir(pack3, i)) for i in range(3)]
    assert [(m.start, m.end) for m in manifests] == [(0, 2), (2, 4), (4, 6)]
    assert [m.index for m in manifests] == [0, 1, 2]
    assert all(m.count == 3 and m.model_id == MODEL_ID and m.format == FORMAT_VERSION for m in manifests)
    assert [m.embed for m in manifests] == [True, False, False]
    assert [m.head for m in manifests] == [False, False, True]
    for i, m in enumerate(manifests):
        folder = frag_dir(pack3, i)
        assert m.name == folder.name
        assert set(m.files) == {WEIGHTS, CONFIG}
        for name, entry in m.files.items():
            assert entry.bytes == (folder / name).stat().st_size
            assert entry.sha256 == sha256_file(folder / name)
        assert m.bytes == sum(e.bytes for e in m.files.values())
        assert m.flops_per_token > 0
    layer = cfg.flops_per_token_layer()
    assert manifests[0].flops_per_token == manifests[1].flops_per_token == 2 * layer
    assert manifests[2].flops_per_token == 2 * layer + cfg.flops_per_token_head()
    assert cfg.flops_per_token_head() == 2 * cfg.hidden_size * cfg.vocab_size
    assert fragment_flops(cfg, 4, 6, True) == manifests[2].flops_per_token
    # No stray temporary directories are left next to the fragments.
    assert {p.name for p in pack3.iterdir()} == {
        PACK_INDEX,
        TOKENIZER_DIR,
        *(frag_dir(pack3, i).name for i in range(3)),
    }


def test_fragments_hold_only_their_own_tensors(pack3: Path) -> None:
    from safetensors import safe_open

    def names(i: int) -> set[str]:
        with safe_open(str(frag_dir(pack3, i) / WEIGHTS), framework="pt") as f:
            return set(f.keys())

    first, middle, last = names(0), names(1), names(2)
    assert "model.embed_tokens.weight" in first and "lm_head.weight" not in first
    assert not any(n.startswith("model.embed_tokens") or n.startswith("lm_head") for n in middle)
    assert {"lm_head.weight", "model.norm.weight"} <= last and "model.embed_tokens.weight" not in last
    layers = [{int(n.split(".")[2]) for n in s if n.startswith("model.layers.")} for s in (first, middle, last)]
    assert layers == [{0, 1}, {2, 3}, {4, 5}]


def test_read_pack(pack3: Path, tiny_model_dir: Path) -> None:
    pack = read_pack(pack3)
    assert pack.model_id == MODEL_ID and pack.num_layers == 6
    assert [m.name for m in pack.manifests] == [frag_dir(pack3, i).name for i in range(3)]
    assert pack.fragment_dir(1) == frag_dir(pack3, 1)
    assert pack.tokenizer_dir == pack3 / TOKENIZER_DIR
    assert "config.json" in pack.tokenizer_files
    for name, digest in pack.tokenizer_files.items():
        assert sha256_file(pack.tokenizer_dir / name) == digest
        assert (pack.tokenizer_dir / name).read_bytes() == (tiny_model_dir / name).read_bytes()


def test_chained_fragments_equal_the_whole_model(pack3: Path, tiny_model_dir: Path) -> None:
    ids = torch.randint(0, 101, (1, 12), generator=torch.Generator().manual_seed(5))
    x = ids
    for i in range(3):
        manifest, frag = load_fragment(frag_dir(pack3, i))
        assert (frag.start, frag.end, frag.has_embed, frag.has_head) == (
            manifest.start,
            manifest.end,
            manifest.embed,
            manifest.head,
        )
        x = frag(x, 0, all_logits=True)
    expected = load_model(tiny_model_dir)(ids, 0, all_logits=True)
    assert x.shape == (1, 12, 101)
    assert torch.equal(x, expected)


def test_pack_in_half_precision(tiny_model_dir: Path, tmp_path: Path) -> None:
    manifests = pack_model(tiny_model_dir, tmp_path, 2, model_id=MODEL_ID, dtype="bfloat16", progress=False)
    assert [m.dtype for m in manifests] == ["bfloat16", "bfloat16"]
    _, frag = load_fragment(tmp_path / manifests[1].name)
    assert next(frag.parameters()).dtype == torch.bfloat16


def test_pack_refuses_unknown_dtype(tiny_model_dir: Path, tmp_path: Path) -> None:
    with pytest.raises(ConfigError, match="float64"):
        pack_model(tiny_model_dir, tmp_path, 2, model_id=MODEL_ID, dtype="float64", progress=False)


# ---------------------------------------------------------------- corruption


def test_flipped_byte_fails_sha256(pack_copy: Path) -> None:
    weights = frag_dir(pack_copy, 1) / WEIGHTS
    data = bytearray(weights.read_bytes())
    data[len(data) // 2] ^= 0x01
    weights.write_bytes(bytes(data))
    with pytest.raises(FragmentError, match="sha256") as exc:
        load_fragment(frag_dir(pack_copy, 1))
    assert WEIGHTS in str(exc.value) and MODEL_ID in str(exc.value)


def test_truncated_weights_fail_size_check(pack_copy: Path) -> None:
    weights = frag_dir(pack_copy, 2) / WEIGHTS
    size = weights.stat().st_size
    weights.write_bytes(weights.read_bytes()[:-10])
    with pytest.raises(FragmentError, match="bytes") as exc:
        load_fragment(frag_dir(pack_copy, 2))
    assert str(size - 10) in str(exc.value) and str(size) in str(exc.value)


def test_missing_config_json(pack_copy: Path) -> None:
    (frag_dir(pack_copy, 0) / CONFIG).unlink()
    with pytest.raises(FragmentError, match=r"missing config\.json"):
        load_fragment(frag_dir(pack_copy, 0))


def test_missing_manifest(pack_copy: Path) -> None:
    (frag_dir(pack_copy, 0) / MANIFEST).unlink()
    with pytest.raises(FragmentError, match="not a fragment"):
        load_fragment(frag_dir(pack_copy, 0))


def _edit_manifest(folder: Path, edit: Callable[[dict[str, Any]], Any]) -> None:
    raw = json.loads((folder / MANIFEST).read_text())
    edit(raw)
    (folder / MANIFEST).write_text(json.dumps(raw))


def test_manifest_naming_a_file_outside_the_fragment(pack_copy: Path) -> None:
    folder = frag_dir(pack_copy, 1)
    outside = pack_copy / "evil.safetensors"
    shutil.copyfile(folder / WEIGHTS, outside)

    def edit(raw: dict[str, Any]) -> None:
        raw["files"][f"../{outside.name}"] = raw["files"].pop(WEIGHTS)

    _edit_manifest(folder, edit)
    with pytest.raises(FragmentError):
        load_fragment(folder)


def test_manifest_with_another_format_version(pack_copy: Path) -> None:
    folder = frag_dir(pack_copy, 1)
    _edit_manifest(folder, lambda raw: raw.update(format=FORMAT_VERSION + 1))
    with pytest.raises(FragmentError, match=f"format {FORMAT_VERSION + 1}"):
        load_fragment(folder)


@pytest.mark.parametrize(
    "edit",
    [
        lambda raw: raw.pop("start"),
        lambda raw: raw.update(index=3),
        lambda raw: raw.update(start=5, end=4),
        lambda raw: raw.update(end=7),  # beyond the model's 6 layers
        lambda raw: raw.update(files=[]),
        lambda raw: raw.update(count="three"),
        lambda raw: raw["files"].pop(CONFIG),
        lambda raw: raw["files"][WEIGHTS].pop("sha256"),
    ],
)
def test_inconsistent_manifests(pack_copy: Path, edit: Callable[[dict[str, Any]], Any]) -> None:
    folder = frag_dir(pack_copy, 1)
    _edit_manifest(folder, edit)
    with pytest.raises(FragmentError):
        load_fragment(folder)


def test_manifest_with_non_finite_numbers_is_a_fragment_error(pack_copy: Path) -> None:
    # json.loads accepts Infinity, and int(inf) raises OverflowError rather than ValueError.
    folder = frag_dir(pack_copy, 1)
    text = (folder / MANIFEST).read_text()
    (folder / MANIFEST).write_text(text.replace('"format": 1', '"format": Infinity'))
    with pytest.raises(FragmentError):
        read_manifest(folder)
    with pytest.raises(FragmentError):
        parse_manifest({**json.loads(text), "bytes": float("inf")})


def test_manifest_not_json(pack_copy: Path) -> None:
    folder = frag_dir(pack_copy, 1)
    (folder / MANIFEST).write_text("{not json")
    with pytest.raises(FragmentError, match="cannot read"):
        load_fragment(folder)
    (folder / MANIFEST).write_text("[]")
    with pytest.raises(FragmentError, match="not a JSON object"):
        load_fragment(folder)


def test_read_pack_refuses_a_gap(pack_copy: Path) -> None:
    index = json.loads((pack_copy / PACK_INDEX).read_text())
    index["fragments"].pop(1)
    (pack_copy / PACK_INDEX).write_text(json.dumps(index))
    with pytest.raises(FragmentError, match="continue"):
        read_pack(pack_copy)


def test_read_pack_without_index(tmp_path: Path) -> None:
    with pytest.raises(FragmentError, match=re.escape(PACK_INDEX)):
        read_pack(tmp_path)


# ---------------------------------------------------------------- kluster fragments verify


def _error_lines(err: str) -> list[str]:
    return [line for line in err.splitlines() if line.startswith("kluster: error:")]


def test_cli_verify_good_pack_and_fragment(pack3: Path, capsys: pytest.CaptureFixture[str]) -> None:
    assert main(["fragments", "verify", str(pack3)]) == 0
    out, err = capsys.readouterr()
    assert "3 fragments verified" in out and MODEL_ID in out
    assert _error_lines(err) == []
    assert main(["fragments", "verify", str(frag_dir(pack3, 2))]) == 0
    out, err = capsys.readouterr()
    assert "verified" in out and _error_lines(err) == []


@pytest.mark.parametrize("target", ["pack", "fragment"])
def test_cli_verify_corrupt(pack_copy: Path, capsys: pytest.CaptureFixture[str], target: str) -> None:
    weights = frag_dir(pack_copy, 2) / WEIGHTS
    data = bytearray(weights.read_bytes())
    data[100] ^= 0xFF
    weights.write_bytes(bytes(data))
    path = pack_copy if target == "pack" else frag_dir(pack_copy, 2)
    assert main(["fragments", "verify", str(path)]) == 2
    out, err = capsys.readouterr()
    lines = _error_lines(err)
    assert len(lines) == 1, err
    assert "sha256" in lines[0] and "frag-02-of-03" in lines[0]
    assert "Traceback" not in err and "verified" not in out


def test_cli_verify_not_a_fragment(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    assert main(["fragments", "verify", str(tmp_path)]) == 2
    _, err = capsys.readouterr()
    assert len(_error_lines(err)) == 1 and "not a fragment" in err
