"""``kluster bench verify``: how far honest routes are from the spot checks' reference, and perturbed ones.

The default model runs as a 3-hop route in this process (``engine.audit.calibrate``): step by step
with KV caches, the wire codec at each boundary, the nodes' weights in fp32 or bf16 (bf16 stands
in for other hardware), greedy or sampled tokens, and optionally one hop perturbing what it sends
or the last hop returning a wrong token once. Each run is compared
with the coordinator's reference under the tolerance in force; one table shows the worst
relative error of any view and the worst logit gap of a fed token per variant, against the
tolerance (margin = tolerance / worst honest), and for perturbed variants who the judge blames.
"""

from __future__ import annotations

import argparse
import json
import sys
import time
from dataclasses import dataclass
from typing import Any

from engine.errors import ConfigError


@dataclass(frozen=True)
class Variant:
    label: str
    #: the nodes' weights
    dtype: str = "float32"
    codec: str = "fp32"
    #: noise on what ``hop`` sends (relative to the hidden state)
    perturb: float = 0.0
    hop: int = 0
    #: 0: greedy; else sampled at this temperature (seed per prompt)
    temperature: float = 0.0
    #: the last hop returns a wrong token at this generated step
    lie_at: int | None = None

    @property
    def byzantine(self) -> bool:
        return self.perturb > 0 or self.lie_at is not None


VARIANTS: tuple[Variant, ...] = (
    Variant("honest fp32"),
    Variant("honest bf16 nodes", dtype="bfloat16"),
    Variant("honest int8 wire", codec="int8"),
    Variant("honest bf16+int8", dtype="bfloat16", codec="int8"),
    Variant("honest bf16 sampled", dtype="bfloat16", temperature=0.8),
    Variant("byzantine 0.05 hop1", perturb=0.05, hop=1),
    Variant("byzantine 0.2 hop0", perturb=0.2, hop=0),
    Variant("byzantine 0.2 hop1", perturb=0.2, hop=1),
    Variant("byzantine 1.0 hop1", perturb=1.0, hop=1),
    Variant("wrong token, sampled", hop=2, temperature=0.8, lie_at=10),
)


def register(bsub: Any) -> None:
    from engine.transport.codec_eval import PROMPTS

    p = bsub.add_parser("verify", help="spot checks: honest vs perturbed routes against the reference")
    p.add_argument("--prompts", type=int, default=8, help=f"chat prompts per variant (max {len(PROMPTS)}, default 8)")
    p.add_argument("--tokens", type=int, default=48, help="generated tokens per prompt (default 48)")
    p.add_argument("--json", action="store_true", help="print one JSON object")
    p.set_defaults(handler=run)


def evaluate(prompts: int, tokens: int, say: Any) -> dict[str, Any]:
    import torch

    from engine.audit.calibrate import emulate_route, measure, node_copy
    from engine.audit.reference import Tolerance
    from engine.models.default_model import ensure_default_model
    from engine.models.loading import load_model
    from engine.models.sampling import SamplingParams
    from engine.models.tokenizer import ModelTokenizer
    from engine.transport.codec_eval import PROMPTS

    folder = ensure_default_model()
    tok = ModelTokenizer(folder)
    model = load_model(folder)
    layers = model.cfg.num_hidden_layers
    hops = [(0, layers // 3), (layers // 3, 2 * layers // 3), (2 * layers // 3, layers)]
    tol = Tolerance()
    rows = []
    for v in VARIANTS:
        started = time.perf_counter()
        nodes = node_copy(model, getattr(torch, v.dtype))
        worst, gap, positions, caught, blamed_right, disputes = 0.0, 0.0, 0, 0, 0, 0
        for i, prompt in enumerate(PROMPTS[:prompts]):
            ids = tok.encode(tok.render_chat([{"role": "user", "content": prompt}]))
            sampling = SamplingParams(v.temperature, 1.0, i)
            run = emulate_route(
                nodes, ids, hops, tokens, codec=v.codec, perturb=v.perturb, perturb_hop=v.hop, seed=i,
                sampling=sampling, lie_at=v.lie_at if v.lie_at is not None and v.lie_at < tokens - 1 else None,
            )  # fmt: skip
            m = measure(model, run, hops, tol, codec=v.codec, sampling=sampling)
            worst, gap, positions = max(worst, m.max_error), max(gap, m.max_gap), positions + m.positions
            failed = bool(m.guilty or m.disputes or m.rewind_to is not None)
            caught += failed
            blamed_right += m.guilty == (v.hop,)
            disputes += bool(m.disputes)
        rows.append(
            {
                "variant": v.label,
                "byzantine": v.byzantine,
                "perturb": v.perturb,
                "runs": prompts,
                "positions": positions,
                "max_error": round(worst, 6),
                "max_logit_gap": round(gap, 4),
                "flagged": caught,
                "guilty_is_perturbed_hop": blamed_right if v.byzantine else None,
                "disputes": disputes,
                "seconds": round(time.perf_counter() - started, 1),
            }
        )
        say(f"{v.label}: {rows[-1]}")
    honest = [r for r in rows if not r["byzantine"]]
    worst_honest = max(r["max_error"] for r in honest)
    worst_gap = max(r["max_logit_gap"] for r in honest)
    return {
        "hops": hops,
        "tokens": tokens,
        "tolerance": {"hidden": tol.hidden, "hidden_low": tol.hidden_low, "logit_gap": tol.logit_gap},
        "margin_hidden_low": round(tol.hidden_low / worst_honest, 2) if worst_honest else None,
        "margin_logit_gap": round(tol.logit_gap / worst_gap, 2) if worst_gap else None,
        "variants": rows,
    }


def _table(result: dict[str, Any]) -> list[str]:
    t = result["tolerance"]
    lines = [
        f"kluster bench verify: hops {result['hops']}, {result['tokens']} tokens per prompt; tolerance "
        f"hidden {t['hidden']} (honest noise below {t['hidden_low']}), logit gap {t['logit_gap']}",
        f"{'variant':<22}{'positions':>10}{'max rel err':>13}{'max gap':>9}{'flagged':>9}{'guilty ok':>11}"
        f"{'disputes':>10}{'s':>6}",
    ]
    for r in result["variants"]:
        ok = "-" if r["guilty_is_perturbed_hop"] is None else f"{r['guilty_is_perturbed_hop']}/{r['runs']}"
        lines.append(
            f"{r['variant']:<22}{r['positions']:>10}{r['max_error']:>13.5f}{r['max_logit_gap']:>9.3f}"
            f"{r['flagged']:>6}/{r['runs']:<2}{ok:>11}{r['disputes']:>10}{r['seconds']:>6.1f}"
        )
    lines.append(
        f"margins: honest noise threshold / worst honest error = {result['margin_hidden_low']}x, "
        f"logit gap tolerance / worst honest gap = {result['margin_logit_gap']}x"
    )
    return lines


def run(args: argparse.Namespace) -> int:
    from engine.transport.codec_eval import PROMPTS

    if not 1 <= args.prompts <= len(PROMPTS):
        raise ConfigError(f"--prompts must be between 1 and {len(PROMPTS)}")
    if not 1 <= args.tokens <= 1024:
        raise ConfigError("--tokens must be between 1 and 1024")
    say = (lambda _m: None) if args.json else (lambda m: print(m, file=sys.stderr, flush=True))
    result = evaluate(args.prompts, args.tokens, say)
    print(json.dumps(result) if args.json else "\n".join(_table(result)))
    return 0
