"""Packing a model folder into Tensor Fragments (``kluster fragments pack``).

Layout written under ``out``::

    pack.json                  model id, fragment names, tokenizer file hashes
    tokenizer/                 tokenizer.json, tokenizer_config.json, generation_config.json, config.json
    frag-00-of-03/             manifest.json, config.json, weights.safetensors (layers 0-9 + embeddings)
    ...

When the model folder holds a ``calibration.json`` (``kluster calibrate``), or one is passed, each
manifest also carries the importance of the layers its fragment holds.

Each fragment is written to a temporary directory and renamed into place, so an interrupted pack
never leaves a fragment that looks complete.
"""

from __future__ import annotations

import hashlib
import json
import logging
import shutil
import tempfile
from collections.abc import Callable, Iterable
from pathlib import Path
from typing import Any

import torch
from safetensors.torch import save_file
from tqdm import tqdm

from engine.errors import ConfigError, FragmentError
from engine.fragments.manifest import (
    CONFIG,
    FORMAT_VERSION,
    MANIFEST,
    WEIGHTS,
    FileEntry,
    Manifest,
    sha256_file,
)
from engine.models.config import ModelConfig, load_config
from engine.models.llama import hf_tensor_names
from engine.models.loading import read_tensors
from engine.sparsity.importance import CALIBRATION_FILE, Importance, read_calibration

log = logging.getLogger(__name__)

PACK_INDEX = "pack.json"
TOKENIZER_DIR = "tokenizer"
TOKENIZER_FILES = ("tokenizer.json", "tokenizer_config.json", "generation_config.json", "config.json")
_DTYPES = {"float32": torch.float32, "float16": torch.float16, "bfloat16": torch.bfloat16}


def split_layers(num_layers: int, count: int) -> list[tuple[int, int]]:
    """Contiguous, as-even-as-possible layer ranges; earlier fragments take the remainder."""
    if not 1 <= count <= num_layers:
        raise ConfigError(f"cannot split {num_layers} layers into {count} fragments (1-{num_layers})")
    base, extra = divmod(num_layers, count)
    ranges, start = [], 0
    for i in range(count):
        end = start + base + (1 if i < extra else 0)
        ranges.append((start, end))
        start = end
    return ranges


def fragment_flops(cfg: ModelConfig, start: int, end: int, head: bool) -> int:
    # Summed per layer: in a MoE model dense and sparse layers cost differently.
    return cfg.flops_per_token_layers(start, end) + (cfg.flops_per_token_head() if head else 0)


def fragment_tensors(
    model_dir: Path, cfg: ModelConfig, names: list[str], *, head: bool, dtype: str
) -> dict[str, torch.Tensor]:
    """The named tensors of ``model_dir`` in ``dtype``, each its own copy (a tied head gets the embeddings)."""
    tensors = read_tensors(model_dir, [*names, "model.embed_tokens.weight"])
    if head and "lm_head.weight" not in tensors:
        if not cfg.tie_word_embeddings:
            raise FragmentError(f"{model_dir} has no lm_head.weight and does not tie embeddings")
        tensors["lm_head.weight"] = tensors["model.embed_tokens.weight"]
    missing = [n for n in names if n not in tensors]
    if missing:
        raise FragmentError(f"{model_dir} is missing tensor '{missing[0]}'")
    target = _DTYPES[dtype]
    return {n: tensors[n].to(target).contiguous().clone() for n in names}


def write_fragment(
    model_dir: Path,
    out: Path,
    tensors: dict[str, torch.Tensor],
    model_id: str,
    make_manifest: Callable[[dict[str, FileEntry]], Manifest],
) -> Manifest:
    """Write one fragment directory (weights, config, manifest) under ``out``, named after its manifest.

    ``make_manifest`` gets the written files' sizes and hashes. The fragment is written to a
    temporary directory and renamed into place, so an interrupted pack leaves nothing half-done.
    """
    tmp = Path(tempfile.mkdtemp(prefix="fragment.", dir=out))
    try:
        save_file(tensors, str(tmp / WEIGHTS), metadata={"format": "pt", "model_id": model_id})
        shutil.copyfile(model_dir / "config.json", tmp / CONFIG)
        files = {n: FileEntry((tmp / n).stat().st_size, sha256_file(tmp / n)) for n in (WEIGHTS, CONFIG)}
        manifest = make_manifest(files)
        (tmp / MANIFEST).write_text(json.dumps(manifest.to_json(), indent=2), encoding="utf-8")
        final = out / manifest.name
        if final.exists():
            shutil.rmtree(final)
        tmp.rename(final)
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise
    return manifest


def _write_fragment(
    model_dir: Path,
    out: Path,
    cfg: ModelConfig,
    model_id: str,
    index: int,
    count: int,
    layers: tuple[int, int],
    dtype: str,
    importance: Importance | None = None,
) -> Manifest:
    start, end = layers
    embed, head = index == 0, index == count - 1
    names = hf_tensor_names(cfg, start, end, embed=embed, head=head)
    own = fragment_tensors(model_dir, cfg, names, head=head, dtype=dtype)
    return write_fragment(
        model_dir,
        out,
        own,
        model_id,
        lambda files: Manifest(
            format=FORMAT_VERSION,
            model_id=model_id,
            index=index,
            count=count,
            start=start,
            end=end,
            embed=embed,
            head=head,
            dtype=dtype,
            bytes=sum(e.bytes for e in files.values()),
            flops_per_token=fragment_flops(cfg, start, end, head),
            files=files,
            importance=importance.span(start, end) if importance is not None else None,
        ),
    )


def model_importance(model_dir: Path, cfg: ModelConfig, calibration: Path | None = None) -> Importance | None:
    """The calibration of the model in ``model_dir``: ``calibration`` if given, else its ``calibration.json`` if any.

    A calibration made for another architecture (layer count or config.json differ) is refused
    rather than silently attached to the wrong layers.
    """
    path = calibration if calibration is not None else model_dir / CALIBRATION_FILE
    if calibration is None and not path.is_file():
        return None
    cal = read_calibration(path)
    config_sha = hashlib.sha256((model_dir / "config.json").read_bytes()).hexdigest()
    if cal.num_layers != cfg.num_hidden_layers or cal.config_sha256 != config_sha:
        raise ConfigError(
            f"calibration {path} was made for another model ({cal.model_id}, {cal.num_layers} layers); "
            "run 'kluster calibrate' again"
        )
    return cal.importance


def pack_model(
    model_dir: Path,
    out: Path,
    count: int,
    *,
    model_id: str,
    dtype: str = "float32",
    progress: bool = True,
    calibration: Path | None = None,
) -> list[Manifest]:
    """Write ``count`` fragments of the model in ``model_dir`` under ``out``; return their manifests.

    ``calibration``: a ``calibration.json`` to take layer importance from (default: the model
    folder's own, when it has one).
    """
    if dtype not in _DTYPES:
        raise ConfigError(f"unknown dtype {dtype!r} (choose from {', '.join(_DTYPES)})")
    cfg = load_config(model_dir)
    importance = model_importance(model_dir, cfg, calibration)
    ranges = split_layers(cfg.num_hidden_layers, count)
    out.mkdir(parents=True, exist_ok=True)
    tok_files = copy_tokenizer(model_dir, out)
    manifests = []
    bar: Iterable[int] = range(count)
    if progress:
        bar = tqdm(bar, desc=f"packing {model_id}", unit="fragment")
    for i in bar:
        manifests.append(_write_fragment(model_dir, out, cfg, model_id, i, count, ranges[i], dtype, importance))
    write_pack_index(out, model_id, cfg.num_hidden_layers, manifests, tok_files)
    log.info("packed %s into %d fragments under %s", model_id, count, out)
    return manifests


def copy_tokenizer(model_dir: Path, out: Path) -> dict[str, str]:
    """Copy the model's tokenizer files into ``out/tokenizer``; returns their sha256 by name."""
    tok_dir = out / TOKENIZER_DIR
    tok_dir.mkdir(parents=True, exist_ok=True)
    tok_files = {}
    for name in TOKENIZER_FILES:
        if (model_dir / name).is_file():
            shutil.copyfile(model_dir / name, tok_dir / name)
            tok_files[name] = sha256_file(tok_dir / name)
    return tok_files


def write_pack_index(
    out: Path, model_id: str, num_layers: int, manifests: list[Manifest], tokenizer: dict[str, str], **extra: Any
) -> None:
    """Write ``pack.json``; ``extra`` adds keys (readers ignore keys they do not know)."""
    index = {
        "format": FORMAT_VERSION,
        "model_id": model_id,
        "num_layers": num_layers,
        "fragments": [m.name for m in manifests],
        "tokenizer": tokenizer,
        **extra,
    }
    (out / PACK_INDEX).write_text(json.dumps(index, indent=2), encoding="utf-8")
