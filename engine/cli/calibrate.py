"""``kluster calibrate MODEL --text FILE``: measure each layer's importance and store it beside the model.

Where it goes: ``calibration.json`` in the model's own folder by default, because that is what
``kluster fragments pack MODEL`` reads, so calibrating then packing needs no extra flag and each
fragment's manifest gets the importance of the layers it holds. ``--out DIR`` writes
``DIR/calibration.json`` instead (for a read-only model folder); pass that file to
``fragments pack --calibration``.
"""

from __future__ import annotations

import argparse
import sys
from pathlib import Path
from typing import Any


def register(sub: Any) -> None:
    from engine.sparsity.importance import DEFAULT_LOSS_TOKENS, DEFAULT_TOKENS, DEFAULT_WINDOW

    p = sub.add_parser("calibrate", help="measure each layer's importance (block influence) over a text")
    p.add_argument("model", help="model id (smollm2-135m), local HF folder, or hub id")
    p.add_argument("--text", type=Path, required=True, help="UTF-8 calibration text (e.g. a public-domain novel)")
    p.add_argument("--out", type=Path, default=None, help="folder for calibration.json (default: the model folder)")
    p.add_argument(
        "--tokens", type=int, default=DEFAULT_TOKENS, help=f"tokens to calibrate on (default {DEFAULT_TOKENS})"
    )
    p.add_argument(
        "--window", type=int, default=DEFAULT_WINDOW, help=f"tokens per forward pass (default {DEFAULT_WINDOW})"
    )
    p.add_argument(
        "--loss-tokens",
        type=int,
        default=DEFAULT_LOSS_TOKENS,
        help="tokens to measure each layer's drop-one loss on, 3 passes per layer; 0 skips it "
        f"(default {DEFAULT_LOSS_TOKENS})",
    )
    p.set_defaults(handler=run)


def run(args: argparse.Namespace) -> int:
    from engine.errors import ConfigError
    from engine.models.resolve import resolve_model
    from engine.sparsity.calibrate import calibrate, read_text
    from engine.sparsity.importance import CALIBRATION_FILE, write_calibration

    text = read_text(args.text)  # a bad path fails before the model is fetched or converted
    if args.out is not None and args.out.exists() and not args.out.is_dir():
        raise ConfigError(f"--out {args.out} is not a folder")
    model_id, folder = resolve_model(args.model)
    say = lambda m: print(m, file=sys.stderr, flush=True)  # noqa: E731
    cal = calibrate(
        folder,
        text,
        model_id=model_id,
        tokens=args.tokens,
        window=args.window,
        loss_tokens=args.loss_tokens,
        progress=say,
    )
    out_dir = args.out if args.out is not None else folder
    out_dir.mkdir(parents=True, exist_ok=True)
    path = out_dir / CALIBRATION_FILE
    write_calibration(path, cal)
    layers = cal.importance.layers
    imp = cal.importance
    loss_note = f", drop-one losses over {imp.loss_tokens}" if imp.has_loss else ""
    print(f"{model_id}: block influence of {len(layers)} layers over {imp.tokens} tokens{loss_note} -> {path}")
    print(
        f"{'layer':>5}{'bi':>9}{'attn_bi':>9}{'mlp_bi':>9}"
        + (f"{'loss':>9}{'attn':>9}{'mlp':>9}" if imp.has_loss else "")
    )
    for li in layers:
        line = f"{li.layer:>5}{li.bi:>9.4f}{li.attn_bi:>9.4f}{li.mlp_bi:>9.4f}"
        if li.loss is not None:
            line += f"{li.loss:>+9.1%}{li.attn_loss:>+9.1%}{li.mlp_loss:>+9.1%}"
        print(line)
    middle = layers[1:-1]
    print(
        "least important middle layers by bi: "
        + ", ".join(str(li.layer) for li in sorted(middle, key=lambda li: li.bi)[:6])
    )
    if imp.has_loss:
        by_loss = sorted(middle, key=lambda li: li.loss or 0.0)[:6]
        print("least important middle layers by drop-one loss: " + ", ".join(str(li.layer) for li in by_loss))
    return 0
