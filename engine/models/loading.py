"""Reading Hugging Face model folders and building (fragment) models from them.

Only the tensors a fragment needs are read (safetensors is memory-mapped), so a node holding
layers 10-19 of a large model never touches the rest of the file. MoE experts are always handed
out under their per-expert names, also from checkpoints that store them fused (see
``engine.models.moe_weights``); only the asked-for expert's slice of a fused tensor is read.
"""

from __future__ import annotations

import json
import logging
from collections.abc import Iterable
from pathlib import Path

import torch
from safetensors import safe_open

from engine.errors import ModelFormatError
from engine.models.config import ModelConfig, load_config
from engine.models.llama import FragmentModel, RotaryTable, hf_tensor_names
from engine.models.moe_weights import FusedSlice, fused_source

log = logging.getLogger(__name__)


def weight_files(folder: Path) -> dict[str, Path]:
    """Map each tensor name to the safetensors file holding it (single file or sharded index)."""
    index = folder / "model.safetensors.index.json"
    if index.is_file():
        try:
            weight_map = json.loads(index.read_text(encoding="utf-8"))["weight_map"]
        except (OSError, ValueError, KeyError) as exc:
            raise ModelFormatError(f"cannot read {index}: {exc}") from None
        return {name: folder / fname for name, fname in weight_map.items()}
    files = sorted(folder.glob("*.safetensors"))
    if not files:
        raise ModelFormatError(f"{folder} has no .safetensors weights")
    out: dict[str, Path] = {}
    for f in files:
        with safe_open(str(f), framework="pt") as sf:
            for name in sf.keys():  # noqa: SIM118 - safe_open is not a mapping
                out[name] = f
    return out


def read_tensors(folder: Path, names: Iterable[str] | None = None) -> dict[str, torch.Tensor]:
    """Read the named tensors (all when ``names`` is None); absent names are simply not returned.

    A named per-expert MoE tensor the folder lacks is cut from its fused form when that is there.
    """
    where = weight_files(folder)
    wanted = set(where) if names is None else {n for n in names if n in where}
    fused: dict[str, FusedSlice] = {}
    for name in () if names is None else names:
        src = None if name in where else fused_source(name)
        if src is not None and src.source in where:
            fused[name] = src
    by_file: dict[Path, list[str]] = {}
    for name in wanted:
        by_file.setdefault(where[name], []).append(name)
    for name, src in fused.items():
        by_file.setdefault(where[src.source], []).append(name)
    tensors: dict[str, torch.Tensor] = {}
    for path, file_names in by_file.items():
        try:
            with safe_open(str(path), framework="pt") as sf:
                for name in file_names:
                    src = fused.get(name)
                    if src is None:
                        tensors[name] = sf.get_tensor(name)
                    elif src.expert is None:
                        tensors[name] = sf.get_tensor(src.source)
                    else:
                        tensors[name] = src.take(sf.get_slice(src.source)[src.expert])
        except (OSError, RuntimeError, IndexError) as exc:
            raise ModelFormatError(f"cannot read weights from {path}: {exc}") from None
    if fused:
        log.debug("cut %d per-expert tensors out of fused expert weights in %s", len(fused), folder)
    return tensors


def build_fragment(
    cfg: ModelConfig,
    tensors: dict[str, torch.Tensor],
    start: int,
    end: int,
    *,
    embed: bool,
    head: bool,
    dtype: torch.dtype = torch.float32,
    device: torch.device | str = "cpu",
) -> FragmentModel:
    """Create a fragment on the meta device, then materialise it directly in the target dtype/device."""
    with torch.device("meta"):
        model = FragmentModel(cfg, start, end, embed=embed, head=head)
    model = model.to_empty(device=device).to(dtype)
    model.load_hf_tensors(tensors)
    model.rotary = RotaryTable(cfg)  # built outside the meta context: it holds real values
    return model.eval()


def load_model(
    folder: Path,
    start: int = 0,
    end: int | None = None,
    *,
    embed: bool | None = None,
    head: bool | None = None,
    dtype: torch.dtype = torch.float32,
    device: torch.device | str = "cpu",
) -> FragmentModel:
    """Load layers ``[start, end)`` of the HF model in ``folder`` (the whole model by default)."""
    cfg = load_config(folder)
    end = cfg.num_hidden_layers if end is None else end
    embed = start == 0 if embed is None else embed
    head = end == cfg.num_hidden_layers if head is None else head
    names = hf_tensor_names(cfg, start, end, embed=embed, head=head)
    if head:
        names.append("model.embed_tokens.weight")  # tied heads read the embeddings
    tensors = read_tensors(folder, names)
    log.debug("loaded %d tensors for layers %d-%d from %s", len(tensors), start, end, folder)
    return build_fragment(cfg, tensors, start, end, embed=embed, head=head, dtype=dtype, device=device)
