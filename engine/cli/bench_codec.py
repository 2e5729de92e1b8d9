"""``kluster bench codec``: what fp16/bf16/int8 activations on the wire cost in output and save in bytes.

The default model runs cut into 3 fragments in this process; each boundary's hidden state goes
through the codec's encode and decode (prefill and every decode step). One table: payload bytes
per token per boundary and the saving against fp32, how many greedy generations stay
token-identical to fp32, logit differences, and perplexity on ``--text`` (any UTF-8 file, e.g.
a public-domain novel; none is shipped).
"""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path
from typing import Any

from engine.errors import ConfigError

#: The done-criteria of the codec work item, printed beside the figures.
TARGET_INT8_RATIO = 3.5
TARGET_IDENTICAL = 0.9


def register(bsub: Any) -> None:
    from engine.transport.codec_eval import PROMPTS, EvalConfig

    p = bsub.add_parser("codec", help="activation codecs on the wire: bytes/token vs output and perplexity change")
    p.add_argument("--prompts", type=int, default=len(PROMPTS), help=f"chat prompts to run (default {len(PROMPTS)})")
    p.add_argument("--tokens", type=int, default=48, help="greedy tokens per prompt (default 48)")
    p.add_argument("--text", type=Path, default=None, help="UTF-8 text for the perplexity comparison")
    p.add_argument("--ppl-tokens", type=int, default=2048, help="text tokens scored per codec (default 2048)")
    p.add_argument(
        "--codecs",
        default=",".join(EvalConfig.codecs),
        help="comma-separated codecs compared with fp32; int8 takes :b<block> and :o<outliers per token>, "
        f"e.g. int8:b32:o4 (default {','.join(EvalConfig.codecs)}; int8 alone = b64:o8)",
    )
    p.add_argument("--json", action="store_true", help="print one JSON object")
    p.set_defaults(handler=run)


def _table(result: dict[str, Any]) -> list[str]:
    with_ppl = result["perplexity_tokens"] > 0
    lines = [
        f"kluster bench codec: layers {result['model_layers']}, {result['boundaries']} boundaries, "
        f"{result['prompts']} prompts x {result['tokens']} greedy tokens"
        + (f", perplexity over {result['perplexity_tokens']} tokens of {result['text']}" if with_ppl else ""),
        f"{'codec':<13}{'B/token':>9}{'vs fp32':>9}{'frame B':>9}{'vs fp32':>9}{'identical':>12}"
        f"{'max|dlogit|':>13}{'mean|dlogit|':>14}"
        f"{'rel err':>10}{'us/hop':>8}" + (f"{'ppl':>10}{'dppl':>9}" if with_ppl else ""),
    ]
    for r in result["codecs"]:
        ident = f"{r['identical']}/{r['prompts']}"
        line = (
            f"{r['codec']:<13}{r['bytes_per_token']:>9}{r['ratio_vs_fp32']:>8.2f}x"
            f"{r['frame_bytes_per_token']:>9}{r['frame_ratio_vs_fp32']:>8.2f}x{ident:>12}"
            f"{r['max_abs_logit_diff']:>13.4f}{r['mean_abs_logit_diff']:>14.5f}{r['boundary_rel_err']:>10.5f}"
            f"{r['roundtrip_us']:>8.0f}"
        )
        if with_ppl:
            line += f"{r['perplexity']:>10.4f}{r['perplexity_change']:>+9.4f}"
        lines.append(line)
    lines.append(
        f"targets: int8 >= {TARGET_INT8_RATIO}x fewer bytes than fp32; >= {TARGET_IDENTICAL:.0%} of prompts identical. "
        "B/token: tensor payload of one decode step per boundary; frame B: the whole step frame on the wire "
        f"(+{result['frame_overhead_bytes']} header bytes); rel err: |decoded - sent| / |sent|."
    )
    return lines


def run(args: argparse.Namespace) -> int:
    from engine.models.default_model import ensure_default_model
    from engine.transport.codec_eval import PROMPTS, EvalConfig, evaluate

    if not 1 <= args.prompts <= len(PROMPTS):
        raise ConfigError(f"--prompts must be between 1 and {len(PROMPTS)}")
    if not 1 <= args.tokens <= 4096 or args.ppl_tokens < 2:
        raise ConfigError("--tokens must be in [1, 4096] and --ppl-tokens at least 2")
    if args.text is not None and not args.text.is_file():
        raise ConfigError(f"--text {args.text} is not a file")
    say = (lambda _m: None) if args.json else (lambda m: print(m, file=sys.stderr, flush=True))
    cfg = EvalConfig(
        prompts=PROMPTS[: args.prompts],
        tokens=args.tokens,
        codecs=tuple(c.strip() for c in args.codecs.split(",") if c.strip()),
        text=args.text,
        ppl_tokens=args.ppl_tokens,
    )
    result = evaluate(ensure_default_model(), cfg, say)
    if args.json:
        print(json.dumps(result))
    else:
        print("\n".join(_table(result)))
    return 0
