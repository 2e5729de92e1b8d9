"""``kluster bench sparsity``: what running fewer layers (or sub-blocks, or FFN neurons) costs in perplexity.

The model is calibrated on the first part of ``--text`` and scored on the rest (any UTF-8 file,
e.g. a public-domain novel; none is shipped). One table: for each sparsity mode and budget,
perplexity and bits per character on the unseen part, the layer compute saved, FLOPs per token,
hops of a packed route and local decode tokens/s (engine.sparsity.evaluate).
"""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path
from typing import Any

from engine.errors import ConfigError


def register(bsub: Any) -> None:
    from engine.sparsity.budget import MODES, RANKINGS
    from engine.sparsity.evaluate import DEFAULT_BUDGETS, SparsityConfig

    d = SparsityConfig(text=Path())
    p = bsub.add_parser("sparsity", help="layer/sub-block/neuron skipping: perplexity vs compute saved")
    p.add_argument("--text", type=Path, required=True, help="UTF-8 text: calibrate on one part, score on the rest")
    p.add_argument("--model", default="smollm2-135m", help="model id, local HF folder or hub id (default smollm2-135m)")
    p.add_argument(
        "--calibration-fraction",
        type=float,
        default=d.calibration_fraction,
        help=f"share of the text (by characters) calibrated on; the rest is scored (default {d.calibration_fraction})",
    )
    p.add_argument("--calibration-tokens", type=int, default=d.calibration_tokens, help="tokens calibrated on")
    p.add_argument("--ppl-tokens", type=int, default=d.ppl_tokens, help=f"tokens scored (default {d.ppl_tokens})")
    p.add_argument(
        "--budgets",
        default=",".join(str(b) for b in DEFAULT_BUDGETS),
        help="comma-separated activations: the fraction of layer compute that still runs",
    )
    p.add_argument("--modes", default=",".join(MODES), help=f"comma-separated, from {', '.join(MODES)}")
    p.add_argument(
        "--rankings",
        default=",".join(RANKINGS),
        help="what orders layers/sub-blocks: bi (block influence), loss (measured drop-one loss); default both",
    )
    p.add_argument(
        "--loss-tokens",
        type=int,
        default=d.loss_tokens,
        help=f"calibration tokens for the drop-one losses, 3 passes per layer (default {d.loss_tokens})",
    )
    p.add_argument(
        "--fragments", type=int, default=d.fragments, help=f"pack size the hops column is for (default {d.fragments})"
    )
    p.add_argument(
        "--decode-tokens", type=int, default=d.decode_tokens, help="decode steps timed per plan (default 32)"
    )
    p.add_argument(
        "--lossless",
        choices=("auto", "loopback", "wan", "none"),
        default="auto",
        help="where to measure verified drafts against dense decoding on 3 real nodes: auto = loopback, "
        "plus the WAN harness when it can run (root) (default auto)",
    )
    p.add_argument("--verify-activation", type=float, default=0.9, help="the draft's activation (default 0.9)")
    p.add_argument("--draft-tokens", type=int, default=2, help="tokens drafted per verify pass (default 2)")
    p.add_argument("--delay-ms", type=float, default=40.0, help="WAN harness: one-way delay per hop (default 40)")
    p.add_argument("--json", action="store_true", help="print one JSON object")
    p.set_defaults(handler=run)


def _floats(spec: str) -> tuple[float, ...]:
    try:
        return tuple(float(x) for x in spec.split(",") if x.strip())
    except ValueError:
        raise ConfigError(f"--budgets {spec!r}: expected comma-separated numbers like 1,0.9,0.75") from None


def _increase(x: float) -> str:
    """A relative increase that stays readable when skipping wrecks the model (+1390% reads as x15)."""
    return f"{x:+.1%}" if x < 9.995 else f"x{x + 1:.0f}" if x < 1e5 else f"x{x + 1:.0e}"


def table(result: dict[str, Any]) -> list[str]:
    dense = result["dense"]
    lines = [
        f"kluster bench sparsity: {result['model']}, {result['layers']} layers; calibrated on "
        f"{result['calibration']['tokens']} tokens, scored on {result['eval_tokens']} unseen tokens "
        f"of {result['text']}",
        f"dense: ppl {dense['ppl']:.3f}, {dense['bpc']:.4f} bits/char, {dense['tok_s']:.1f} tok/s; "
        f"FLOPs at a {result['context']}-token context",
        f"{'mode':<10}{'rank':<5}{'activ.':>7}{'ppl':>10}{'dppl':>8}{'bpc':>8}{'saved':>7}{'MFLOP/t':>9}"
        f"{'hops@3':>7}{'hops@' + str(result['fragments']):>8}{'tok/s':>8}  skipped",
    ]
    for i, r in enumerate(result["budgets"]):
        if i and r["activation"] == 1.0:
            continue  # every mode's full budget is the dense model: shown once
        s = r["skipped"]
        what = (
            f"keep {s['neuron_keep']:.1%} of FFN neurons in {s['neuron_layers']} layers"
            if "neuron_keep" in s
            else " ".join(
                f"{k} {','.join(map(str, v))}"
                for k, v in (("L", s["layers"]), ("A", s["attention"]), ("M", s["mlp"]))
                if v
            )
        )
        lines.append(
            f"{r['mode']:<10}{r['ranking'] or '-':<5}{r['activation']:>7.2f}{r['ppl']:>10.4g}"
            f"{_increase(r['ppl_increase']):>8}{r['bpc']:>8.4f}"
            f"{r['compute_saved']:>7.1%}{r['flops_per_token'] / 1e6:>9.1f}{r['hops_by_fragments'].get('3', '-'):>7}"
            f"{r['hops']:>8}{r['tok_s']:>8.1f}  {what or '-'}"
        )
    d, t = result["default"], result["targets"]
    verdict = "meets" if d["meets_target"] else "does NOT meet"
    lines += [
        f"default budget: {d['mode'] or 'dense'} ({d['ranking'] or 'uniform'}) at activation {d['activation']} "
        f"(saves {d['compute_saved']:.1%} of layer compute for {d['ppl_increase']:+.1%} perplexity): "
        f"{verdict} the target of >= {t['compute_saved']:.0%} saved for <= {t['max_ppl_increase']:.0%} perplexity.",
        "activ.: budget (fraction of layer FLOPs to run); saved: layer FLOPs actually saved; MFLOP/t includes the "
        "LM head; rank: bi = block influence, loss = drop-one loss; L/A/M: layers / attention / MLP sub-blocks "
        "skipped.",
    ]
    return lines + lossless_lines(result.get("lossless"))


def lossless_lines(lossless: dict[str, Any] | None) -> list[str]:
    if not lossless:
        return ["lossless: not measured (--lossless none, or a model other than the default)"]
    lines = [
        f"lossless (--activation {lossless['activation']:g} --verify --draft-tokens {lossless['draft_tokens']}, "
        f"draft skips layers {lossless['skipped_layers']}; {lossless['tokens']} greedy tokens per prompt):",
        f"{'where':<34}{'identical':>10}{'passes/token':>14}{'acceptance':>12}{'dense s':>9}{'verified s':>12}"
        f"{'speed-up':>10}",
    ]
    for where, r in (("loopback, 3 nodes", lossless.get("loopback")), ("WAN harness, 3 nodes", lossless.get("wan"))):
        if r is None:
            continue
        name = where if where.startswith("loopback") else f"{where}, {lossless['delay_ms']:g} ms/hop"
        lines.append(
            f"{name:<34}{r['identical']:>7}/{r['prompts']:<2}{r['passes_per_token']:>14.3f}{r['acceptance_rate']:>12.3f}"
            f"{r['dense_s']:>9.1f}{r['verified_s']:>12.1f}{r['speedup']:>9.3f}x"
        )
    lines.append(
        "targets: identical output, <= 0.5 full-route passes per token, >= 1.2x wall time under the WAN harness; "
        f"verified round: {_round_split(lossless)}"
    )
    return lines


def _round_split(lossless: dict[str, Any]) -> str:
    r = lossless.get("wan") or lossless.get("loopback") or {}
    return f"draft {r.get('draft_ms_per_round')} ms + verify {r.get('verify_ms_per_round')} ms"


def measure_lossless(args: argparse.Namespace, say: Any) -> dict[str, Any] | None:
    """Verified drafts vs dense decoding on 3 real nodes (``engine.sparsity.lossless``)."""
    from engine.cli.servers import default_pack
    from engine.models.default_model import DEFAULT_MODEL_ID
    from engine.sparsity import lossless
    from engine.wanemu import unavailable_reason

    if args.lossless == "none" or args.model != DEFAULT_MODEL_ID:
        return None
    verify = ("--activation", f"{args.verify_activation:g}", "--verify", "--draft-tokens", str(args.draft_tokens))
    pack = default_pack(3)
    tokens = 48
    out: dict[str, Any] = {
        "activation": args.verify_activation,
        "draft_tokens": args.draft_tokens,
        "tokens": tokens,
        "delay_ms": args.delay_ms,
        "loopback": None,
        "wan": None,
    }
    if args.lossless in ("auto", "loopback"):
        say("lossless on loopback: 3 node processes, dense and verified for each prompt ...")
        out["loopback"] = lossless.loopback(pack, verify, tokens, lossless.PROMPTS, say)
    reason = unavailable_reason()
    if args.lossless == "wan" and reason is not None:
        raise ConfigError(f"--lossless wan emulates a network in namespaces and needs root: {reason}")
    if args.lossless in ("auto", "wan") and reason is None:
        out["wan"] = lossless.wan(pack, verify, tokens, lossless.PROMPTS, args.delay_ms, say)
    best = out["wan"] or out["loopback"]
    out.update({k: best[k] for k in ("identical", "passes_per_token", "acceptance_rate", "speedup", "skipped_layers")})
    return out


def run(args: argparse.Namespace) -> int:
    from engine.models.resolve import resolve_model
    from engine.sparsity.evaluate import SparsityConfig, evaluate

    if not args.text.is_file():
        raise ConfigError(f"--text {args.text} is not a file")
    cfg = SparsityConfig(
        text=args.text,
        calibration_fraction=args.calibration_fraction,
        calibration_tokens=args.calibration_tokens,
        ppl_tokens=args.ppl_tokens,
        budgets=_floats(args.budgets),
        modes=tuple(m.strip() for m in args.modes.split(",") if m.strip()),
        rankings=tuple(r.strip() for r in args.rankings.split(",") if r.strip()),
        loss_tokens=args.loss_tokens,
        fragments=args.fragments,
        decode_tokens=args.decode_tokens,
    )
    cfg.validate()  # before the model is resolved: a typo must not cost a model conversion
    if not 0.0 < args.verify_activation < 1.0 or not 1 <= args.draft_tokens <= 32:
        raise ConfigError("--verify-activation must be in (0, 1) and --draft-tokens in [1, 32]")
    if not 0 <= args.delay_ms <= 1000:
        raise ConfigError(f"--delay-ms must be 0-1000, got {args.delay_ms:g}")
    say = (lambda _m: None) if args.json else (lambda m: print(m, file=sys.stderr, flush=True))
    model_id, folder = resolve_model(args.model, progress=not args.json)
    result = evaluate(folder, model_id, cfg, say)
    result["lossless"] = measure_lossless(args, say)
    if args.json:
        print(json.dumps(result))
    else:
        print("\n".join(table(result)))
    return 0
