"""Reading packs and loading verified fragments.

``load_span`` (``load_fragment`` for one) is the only way a node turns files into a model, and it
always checks sizes and sha256 first: a corrupt, truncated or substituted fragment is refused with a clear error.
"""

from __future__ import annotations

import itertools
import json
import logging
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path

import torch

from engine.errors import FragmentError, ModelFormatError
from engine.fragments.manifest import CONFIG, WEIGHTS, Manifest, read_manifest, verify_files
from engine.fragments.pack import PACK_INDEX, TOKENIZER_DIR
from engine.models.config import load_config
from engine.models.llama import FragmentModel
from engine.models.loading import build_fragment, read_tensors

log = logging.getLogger(__name__)


@dataclass(frozen=True)
class Pack:
    """A packed model on disk: its fragments in layer order and its tokenizer files."""

    root: Path
    model_id: str
    num_layers: int
    manifests: tuple[Manifest, ...]
    tokenizer_files: dict[str, str]

    def fragment_dir(self, index: int) -> Path:
        return self.root / self.manifests[index].name

    @property
    def tokenizer_dir(self) -> Path:
        return self.root / TOKENIZER_DIR


def read_pack(root: Path) -> Pack:
    """Read ``pack.json`` and every fragment manifest; check they describe one contiguous model."""
    path = root / PACK_INDEX
    try:
        raw = json.loads(path.read_text(encoding="utf-8"))
        model_id, num_layers, names = str(raw["model_id"]), int(raw["num_layers"]), list(raw["fragments"])
        tokenizer = {str(k): str(v) for k, v in dict(raw.get("tokenizer", {})).items()}
    except FileNotFoundError:
        raise FragmentError(f"{root} is not a fragment pack: no {PACK_INDEX} (run 'kluster fragments pack')") from None
    except (OSError, ValueError, KeyError, TypeError) as exc:
        raise FragmentError(f"cannot read {path}: {exc!r}") from None
    manifests = tuple(read_manifest(root / str(n)) for n in names)
    expected = 0
    for i, m in enumerate(manifests):
        if m.model_id != model_id or m.index != i or m.count != len(manifests) or m.start != expected:
            raise FragmentError(f"{root}: fragment {i} does not continue the model at layer {expected}")
        expected = m.end
    if expected != num_layers or not manifests[0].embed or not manifests[-1].head:
        raise FragmentError(f"{root}: fragments do not cover all {num_layers} layers with embeddings and head")
    return Pack(root, model_id, num_layers, manifests, tokenizer)


_TORCH_DTYPES = {"float32": torch.float32, "float16": torch.float16, "bfloat16": torch.bfloat16}


def load_fragment(
    folder: Path, *, dtype: torch.dtype | None = None, device: torch.device | str = "cpu"
) -> tuple[Manifest, FragmentModel]:
    """Verify the fragment in ``folder`` against its manifest, then build its model."""
    manifests, model = load_span([folder], dtype=dtype, device=device)
    return manifests[0], model


def _check_contiguous(manifests: Sequence[Manifest]) -> None:
    """A span is consecutive fragments of one pack: same model, same dtype, each starting where the last ended."""
    for prev, m in itertools.pairwise(manifests):
        if (m.model_id, m.count, m.dtype) != (prev.model_id, prev.count, prev.dtype):
            raise FragmentError(f"fragments {prev.name} and {m.name} do not belong to the same pack")
        if m.index != prev.index + 1 or m.start != prev.end:
            raise FragmentError(f"fragment {m.name} does not continue {prev.name} (layer {m.start} after {prev.end})")


def load_span(
    folders: Sequence[Path], *, dtype: torch.dtype | None = None, device: torch.device | str = "cpu"
) -> tuple[tuple[Manifest, ...], FragmentModel]:
    """Verify consecutive fragments (one folder each, in layer order), then build ONE model of all their layers.

    A node hosts a span of several fragments; one model over the whole span runs it as a single
    fragment would (one KV cache per session, no per-fragment overhead), and the embeddings and
    head come with the first and last fragment when they hold them.
    """
    if not folders:
        raise FragmentError("a span needs at least one fragment")
    manifests = tuple(read_manifest(f) for f in folders)
    _check_contiguous(manifests)
    for folder, manifest in zip(folders, manifests, strict=True):
        verify_files(folder, manifest)
    first, last = manifests[0], manifests[-1]
    try:
        cfg = load_config(folders[0])
    except ModelFormatError as exc:
        raise FragmentError(f"fragment {first.name}: {exc}") from None
    if last.end > cfg.num_hidden_layers:
        raise FragmentError(f"fragment {last.name} names layers beyond the model's {cfg.num_hidden_layers}")
    tensors: dict[str, torch.Tensor] = {}
    for folder in folders:
        if (folder / WEIGHTS).is_file():
            tensors.update(read_tensors(folder, None))
    target = dtype or _TORCH_DTYPES.get(first.dtype, torch.float32)
    names = first.name if len(manifests) == 1 else f"{first.name}..{last.name}"
    try:
        model = build_fragment(
            cfg, tensors, first.start, last.end, embed=first.embed, head=last.head, dtype=target, device=device
        )
    except ModelFormatError as exc:
        raise FragmentError(f"fragments {names} of {first.model_id}: {exc}") from None
    log.info("loaded fragments %s of %s (layers %d-%d)", names, first.model_id, first.start, last.end)
    return manifests, model


__all__ = ["CONFIG", "Pack", "load_fragment", "load_span", "read_pack"]
