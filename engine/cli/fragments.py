"""``kluster fragments pack``: re-package a model into Tensor Fragments."""

from __future__ import annotations

import argparse
import sys
from pathlib import Path
from typing import Any


def register(sub: Any) -> None:
    f = sub.add_parser("fragments", help="Tensor Fragment tools")
    fsub = f.add_subparsers(dest="fragments_command", required=True, metavar="ACTION")
    p = fsub.add_parser("pack", help="pack a model into N fragments of consecutive layers")
    p.add_argument("model", help="model id (smollm2-135m), local HF folder, or hub id")
    p.add_argument("--fragments", type=int, required=True, help="number of fragments")
    p.add_argument("--out", type=Path, required=True, help="output directory")
    p.add_argument("--dtype", default="float32", help="float32 (default), float16 or bfloat16")
    p.add_argument("--model-id", default=None, help="id to publish the model under (default: derived)")
    p.add_argument(
        "--calibration",
        type=Path,
        default=None,
        help="calibration.json whose layer importance the manifests carry (default: the model folder's, if any)",
    )
    p.set_defaults(handler=run_pack)

    v = fsub.add_parser("verify", help="check a fragment directory (or a whole pack) against its manifests")
    v.add_argument("path", type=Path)
    v.set_defaults(handler=run_verify)


def run_pack(args: argparse.Namespace) -> int:
    from engine.fragments.pack import pack_model
    from engine.models.resolve import resolve_model

    model_id, folder = resolve_model(args.model)
    manifests = pack_model(
        folder,
        args.out,
        args.fragments,
        model_id=args.model_id or model_id,
        dtype=args.dtype,
        calibration=args.calibration,
    )
    for m in manifests:
        parts = (" embeddings" if m.embed else "") + (" head" if m.head else "")
        print(
            f"{m.name}: layers {m.start}-{m.end - 1}{parts}, {m.bytes / 1e6:.1f} MB, "
            f"{m.flops_per_token / 1e6:.1f} MFLOP/token" + (", importance" if m.importance is not None else ""),
            file=sys.stdout,
        )
    return 0


def run_verify(args: argparse.Namespace) -> int:
    from engine.fragments.manifest import read_manifest, verify_files
    from engine.fragments.pack import PACK_INDEX
    from engine.fragments.store import read_pack

    if (args.path / PACK_INDEX).is_file():
        pack = read_pack(args.path)
        for i, m in enumerate(pack.manifests):
            verify_files(pack.fragment_dir(i), m)
        print(f"{pack.model_id}: {len(pack.manifests)} fragments verified")
    else:
        m = read_manifest(args.path)
        verify_files(args.path, m)
        print(f"{m.name} of {m.model_id}: verified")
    return 0
