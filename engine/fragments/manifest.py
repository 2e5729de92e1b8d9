"""Fragment manifests: what a fragment holds and how to check its files are the ones packed.

A fragment directory holds ``manifest.json``, ``config.json`` (the whole model's architecture)
and ``weights.safetensors`` (only this fragment's tensors). The manifest records each file's size
and sha256, so a node can refuse a corrupt or substituted fragment before loading a byte of it.

``importance`` (optional, written when the model was calibrated with ``kluster calibrate``) is the
block influence of each layer the fragment holds, so a planner can choose layers to skip from
manifests alone. Manifests without it, from before calibration existed, load unchanged; the
field is left out of the JSON when absent, so those manifests also round-trip byte for byte.

``experts`` (optional, Mixture-of-Experts packs with expert fragments, ``engine.fragments.experts``)
says which routed experts the fragment holds, as ``(layer, expert)`` pairs. Absent: every routed
expert of its layers (all manifests before it existed). Empty: a *trunk* fragment, whose MoE
layers keep attention, router and shared expert but whose routed experts live in expert
fragments. Non-empty: an *expert fragment*, holding those experts and nothing else (no attention,
embeddings or head; ``start..end`` is the span of the layers they belong to). It is left out of
the JSON when absent, like ``importance``.
"""

from __future__ import annotations

import hashlib
import json
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any

from engine.errors import FragmentError
from engine.sparsity.importance import Importance, parse_importance

FORMAT_VERSION = 1
MANIFEST = "manifest.json"
WEIGHTS = "weights.safetensors"
CONFIG = "config.json"


@dataclass(frozen=True)
class FileEntry:
    bytes: int
    sha256: str


@dataclass(frozen=True)
class Manifest:
    """Everything the scheduler and a node need to know about one fragment without loading it."""

    format: int
    model_id: str
    index: int
    count: int
    start: int
    end: int
    embed: bool
    head: bool
    dtype: str
    #: total size of the fragment's files in bytes (what a node must download and hold)
    bytes: int
    #: forward FLOPs per token for this fragment's layers (and head, when held)
    flops_per_token: int
    files: dict[str, FileEntry]
    #: per-layer importance of layers ``start..end`` (``kluster calibrate``); None when not calibrated
    importance: Importance | None = None
    #: routed experts held, as (layer, expert) pairs: None all of its layers', () none (a trunk
    #: fragment), else an expert fragment holding only these (see the module docstring)
    experts: tuple[tuple[int, int], ...] | None = None

    @property
    def expert_only(self) -> bool:
        """An expert fragment: routed experts only, served to trunks by ``ExpertForward`` messages."""
        return bool(self.experts)

    @property
    def name(self) -> str:
        kind = "experts" if self.expert_only else "frag"
        return f"{kind}-{self.index:02d}-of-{self.count:02d}"

    def to_json(self) -> dict[str, Any]:
        out = asdict(self)
        out.pop("importance")
        out.pop("experts")
        if self.importance is not None:
            out["importance"] = self.importance.to_json()
        if self.experts is not None:
            out["experts"] = [list(pair) for pair in self.experts]
        return out


def sha256_file(path: Path, chunk: int = 1 << 20) -> str:
    h = hashlib.sha256()
    with path.open("rb") as f:
        while block := f.read(chunk):
            h.update(block)
    return h.hexdigest()


def _flag(value: Any) -> bool:
    if not isinstance(value, bool):
        raise TypeError(f"expected true or false, got {value!r}")
    return value


def _expert_pairs(raw: Any) -> tuple[tuple[int, int], ...]:
    """``[[layer, expert], ...]``: integer pairs, ascending and distinct."""
    if not isinstance(raw, list):
        raise TypeError("experts must be a list of [layer, expert] pairs")
    pairs = []
    for pair in raw:
        if not isinstance(pair, list) or len(pair) != 2 or not all(type(v) is int and v >= 0 for v in pair):
            raise TypeError(f"expert entry {pair!r} is not a [layer, expert] pair")
        pairs.append((pair[0], pair[1]))
    if pairs != sorted(set(pairs)):
        raise ValueError("expert pairs must be ascending and distinct")
    return tuple(pairs)


def parse_manifest(raw: Any) -> Manifest:
    """Strictly validate a manifest dictionary (also what the coordinator sends to nodes)."""
    if not isinstance(raw, dict):
        raise FragmentError("manifest is not a JSON object")
    try:
        files = {str(name): FileEntry(int(e["bytes"]), str(e["sha256"])) for name, e in dict(raw["files"]).items()}
        start, end = int(raw["start"]), int(raw["end"])
        importance = raw.get("importance")
        m = Manifest(
            format=int(raw["format"]),
            model_id=str(raw["model_id"]),
            index=int(raw["index"]),
            count=int(raw["count"]),
            start=start,
            end=end,
            embed=_flag(raw["embed"]),
            head=_flag(raw["head"]),
            dtype=str(raw["dtype"]),
            bytes=int(raw["bytes"]),
            flops_per_token=int(raw["flops_per_token"]),
            files=files,
            importance=None if importance is None else parse_importance(importance, start, end),
            experts=None if raw.get("experts") is None else _expert_pairs(raw["experts"]),
        )
    except (KeyError, TypeError, ValueError, OverflowError) as exc:
        raise FragmentError(f"manifest is malformed: {exc!r}") from None
    if m.format != FORMAT_VERSION:
        raise FragmentError(f"fragment format {m.format} not supported (expected {FORMAT_VERSION})")
    if not (0 <= m.index < m.count and 0 <= m.start <= m.end) or set(files) != {WEIGHTS, CONFIG}:
        raise FragmentError("manifest is inconsistent (index, layer range or file list)")
    if any(Path(n).name != n for n in files):
        raise FragmentError("manifest names a file outside the fragment directory")
    if m.expert_only and (m.embed or m.head or not all(m.start <= layer < m.end for layer, _ in m.experts or ())):
        raise FragmentError("expert fragment manifest holds embeddings, a head, or experts outside its layers")
    return m


def read_manifest(folder: Path) -> Manifest:
    path = folder / MANIFEST
    try:
        raw = json.loads(path.read_text(encoding="utf-8"))
    except FileNotFoundError:
        raise FragmentError(f"{folder} is not a fragment: no {MANIFEST}") from None
    except (OSError, ValueError) as exc:
        raise FragmentError(f"cannot read {path}: {exc}") from None
    return parse_manifest(raw)


def verify_files(folder: Path, manifest: Manifest) -> None:
    """Check every file's size and sha256 against the manifest; name the first mismatch."""
    for name, entry in manifest.files.items():
        path = folder / name
        if not path.is_file():
            raise FragmentError(f"fragment {manifest.name} of {manifest.model_id} is missing {name}")
        size = path.stat().st_size
        if size != entry.bytes:
            raise FragmentError(
                f"fragment {manifest.name} of {manifest.model_id}: {name} has {size} bytes, manifest says {entry.bytes}"
            )
        if sha256_file(path) != entry.sha256:
            raise FragmentError(f"fragment {manifest.name} of {manifest.model_id}: {name} fails its sha256 check")
