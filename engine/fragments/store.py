"""Reading packs and loading verified fragments.

``load_fragment`` is the only way a node turns files into a model, and it always checks sizes
and sha256 first: a corrupt, truncated or substituted fragment is refused with a clear error.
"""

from __future__ import annotations

import json
import logging
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
    manifest = read_manifest(folder)
    verify_files(folder, manifest)
    try:
        cfg = load_config(folder)
    except ModelFormatError as exc:
        raise FragmentError(f"fragment {manifest.name}: {exc}") from None
    if manifest.end > cfg.num_hidden_layers:
        raise FragmentError(f"fragment {manifest.name} names layers beyond the model's {cfg.num_hidden_layers}")
    tensors = read_tensors(folder, None) if (folder / WEIGHTS).is_file() else {}
    target = dtype or _TORCH_DTYPES.get(manifest.dtype, torch.float32)
    try:
        model = build_fragment(
            cfg,
            tensors,
            manifest.start,
            manifest.end,
            embed=manifest.embed,
            head=manifest.head,
            dtype=target,
            device=device,
        )
    except ModelFormatError as exc:
        raise FragmentError(f"fragment {manifest.name} of {manifest.model_id}: {exc}") from None
    log.info("loaded fragment %s of %s (layers %d-%d)", manifest.name, manifest.model_id, manifest.start, manifest.end)
    return manifest, model


__all__ = ["CONFIG", "Pack", "load_fragment", "read_pack"]
