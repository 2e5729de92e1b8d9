"""The measured budget curve behind ``kluster bench sparsity``.

Why in-process, like ``engine.transport.codec_eval``: what skipping costs in quality does not
depend on the network, only on which layers run, and every budget must be scored on the same
tokens by the same code for the figures to compare.

The text is split by characters: the model is calibrated on the first part and scored on the
second, so no figure is measured on text the importance scores saw. Each (mode, budget) becomes
a skip plan (``budget.plan_skips``); plans that coincide (a budget below what a mode can reach,
or two budgets that round to the same layers) are measured once.
"""

from __future__ import annotations

import hashlib
import logging
import math
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch

from engine.errors import ConfigError
from engine.models.llama import FragmentModel
from engine.sparsity import budget, runner
from engine.sparsity.budget import LayerCost, SkipPlan
from engine.sparsity.calibrate import calibrate_loaded, read_text
from engine.sparsity.importance import DEFAULT_LOSS_TOKENS, DEFAULT_WINDOW, Calibration
from engine.sparsity.perplexity import Score, score
from engine.transport.codec_eval import text_windows

log = logging.getLogger(__name__)

DEFAULT_BUDGETS = (1.0, 0.97, 0.93, 0.9, 0.87, 0.85, 0.8, 0.75, 0.6, 0.5)
#: the work item's targets: a budget worth defaulting to saves this much layer compute ...
TARGET_SAVED = 0.20
#: ... for at most this relative perplexity increase on unseen text
MAX_PPL_INCREASE = 0.10
#: fragment counts whose hops every row reports: today's 3-node default up to one layer per node
HOP_FRAGMENTS = (3, 6, 10, 15, 30)


@dataclass(frozen=True)
class SparsityConfig:
    text: Path
    calibration_fraction: float = 0.5
    calibration_tokens: int = 2048
    ppl_tokens: int = 2048
    window: int = DEFAULT_WINDOW
    budgets: tuple[float, ...] = DEFAULT_BUDGETS
    modes: tuple[str, ...] = budget.MODES
    #: how units are ordered: block influence and/or drop-one loss (ignored by ``neurons``)
    rankings: tuple[str, ...] = budget.RANKINGS
    #: calibration tokens the drop-one losses are measured on (needed by the ``loss`` ranking)
    loss_tokens: int = DEFAULT_LOSS_TOKENS
    #: the fragment count ``hops`` is reported for (``hops_by_fragments`` has the others)
    fragments: int = 15
    #: keys a decode token attends to, for the attention FLOPs in ``compute_saved``
    context: int = 512
    decode_tokens: int = 32
    decode_repeats: int = 3

    def validate(self) -> None:
        """Refuse bad options with one line, before any model is loaded (or converted)."""
        for mode in self.modes:
            if mode not in budget.MODES:
                raise ConfigError(f"unknown sparsity mode {mode!r} (choose from {', '.join(budget.MODES)})")
        if not self.modes:
            raise ConfigError("no sparsity mode given")
        for ranking in self.rankings:
            if ranking not in budget.RANKINGS:
                raise ConfigError(f"unknown ranking {ranking!r} (choose from {', '.join(budget.RANKINGS)})")
        if not self.rankings:
            raise ConfigError("no ranking given")
        if "loss" in self.rankings and self.loss_tokens < 2:
            raise ConfigError("the loss ranking needs --loss-tokens of at least 2")
        if not self.budgets or any(not 0.0 < b <= 1.0 for b in self.budgets):
            raise ConfigError("budgets must be activations in (0, 1], e.g. 1,0.9,0.75")
        if not 0.0 < self.calibration_fraction < 1.0:
            raise ConfigError(f"--calibration-fraction {self.calibration_fraction} must be strictly between 0 and 1")
        if self.ppl_tokens < 2 or self.calibration_tokens < 2 or self.window < 2:
            raise ConfigError("--ppl-tokens and --calibration-tokens must be at least 2")
        if self.decode_tokens < 1 or self.decode_repeats < 1 or self.fragments < 1 or self.context < 1:
            raise ConfigError("--decode-tokens and --fragments must be at least 1")


def split_text(text: str, fraction: float) -> tuple[str, str]:
    """(calibration part, evaluation part), cut by characters at ``fraction``."""
    if not 0.0 < fraction < 1.0:
        raise ConfigError(f"--calibration-fraction {fraction} must be strictly between 0 and 1")
    cut = round(len(text) * fraction)
    head, tail = text[:cut], text[cut:]
    if not head.strip() or not tail.strip():
        raise ConfigError("the text is too short to split into a calibration part and an evaluation part")
    return head, tail


def decode_rate(model: FragmentModel, ids: list[int], plan: SkipPlan, steps: int, repeats: int) -> float:
    """Decode tokens/s under ``plan``: a 16-token prefill, then ``steps`` one-token steps fed from ``ids``.

    Teacher-forced rather than greedy, so every plan does exactly the same number of steps on
    the same tokens; the best of ``repeats`` runs, since a shared machine only ever slows a run down.
    """
    prompt, rest = ids[:16], ids[16 : 16 + steps]
    best = math.inf
    for _ in range(repeats):
        cache = model.new_cache(len(prompt) + len(rest))
        runner.forward(model, torch.tensor([prompt]), 0, cache, plan)
        t0 = time.perf_counter()
        for pos, token in enumerate(rest, start=len(prompt)):
            runner.forward(model, torch.tensor([[token]]), pos, cache, plan)
        best = min(best, time.perf_counter() - t0)
    return len(rest) / max(best, 1e-9)


def choose_default(rows: Sequence[dict[str, Any]]) -> dict[str, Any]:
    """The row saving the most layer compute within ``MAX_PPL_INCREASE``; the dense model if none does."""
    ok = [r for r in rows if r["ppl_increase"] <= MAX_PPL_INCREASE and r["compute_saved"] > 0]
    if not ok:
        return {
            "mode": None,
            "ranking": None,
            "activation": 1.0,
            "compute_saved": 0.0,
            "ppl_increase": 0.0,
            "meets_target": False,
        }
    best = max(ok, key=lambda r: (r["compute_saved"], -r["ppl_increase"]))
    return {
        "mode": best["mode"],
        "ranking": best["ranking"],
        "activation": best["activation"],
        "compute_saved": best["compute_saved"],
        "ppl_increase": best["ppl_increase"],
        "meets_target": best["compute_saved"] >= TARGET_SAVED,
    }


def _row(
    mode: str,
    ranking: str | None,
    target: float,
    plan: SkipPlan,
    sc: Score,
    tok_s: float,
    dense: Score,
    cost: LayerCost,
    head_flops: int,
    num_layers: int,
    fragments: int,
) -> dict[str, Any]:
    run = budget.activation(plan, cost, num_layers)
    by_count = {str(n): budget.hops(plan, num_layers, n) for n in HOP_FRAGMENTS if n <= num_layers}
    return {
        "mode": mode,
        "ranking": ranking,
        "activation": target,
        "ppl": round(sc.ppl, 4),
        "ppl_increase": round(sc.ppl / dense.ppl - 1.0, 4),
        "bpc": round(sc.bpc, 4),
        "compute_saved": round(1.0 - run, 4),
        "flops_per_token": round(run * num_layers * cost.total + head_flops),
        "hops": budget.hops(plan, num_layers, fragments),
        "hops_by_fragments": by_count,
        "tok_s": round(tok_s, 2),
        "skipped": plan.describe(),
    }


def evaluate(
    folder: Path, model_id: str, cfg: SparsityConfig, progress: Callable[[str], None] = log.info
) -> dict[str, Any]:
    """Calibrate on one part of ``cfg.text``, score every (mode, budget) on the other; plain data out."""
    from engine.models.loading import load_model
    from engine.models.tokenizer import ModelTokenizer

    cfg.validate()
    cal_text, eval_text = split_text(read_text(cfg.text), cfg.calibration_fraction)
    tok = ModelTokenizer(folder)
    model = load_model(folder)
    num_layers = model.cfg.num_hidden_layers
    if not 1 <= cfg.fragments <= num_layers:
        raise ConfigError(f"--fragments must be between 1 and {num_layers}")
    calibration: Calibration = calibrate_loaded(
        model,
        tok,
        cal_text,
        model_id=model_id,
        config_sha256=hashlib.sha256((folder / "config.json").read_bytes()).hexdigest(),
        tokens=cfg.calibration_tokens,
        window=cfg.window,
        loss_tokens=cfg.loss_tokens if "loss" in cfg.rankings else 0,
        progress=progress,
    )
    importance = calibration.importance.layers
    eval_ids = tok.encode(eval_text[: cfg.ppl_tokens * 16], special=False)
    windows = text_windows(eval_ids, min(cfg.window, cfg.ppl_tokens + 1), cfg.ppl_tokens)
    chars = sum(len(tok.decode(w[1:])) for w in windows)
    decode_ids = eval_ids[: 16 + cfg.decode_tokens]
    cost = budget.layer_cost(model.cfg, cfg.context)
    head_flops = model.cfg.flops_per_token_head()

    def measure(plan: SkipPlan, label: str) -> tuple[Score, float]:
        if plan not in measured:
            progress(f"{label}: perplexity over {sum(len(w) - 1 for w in windows)} tokens, decode timing")
            rate = decode_rate(model, decode_ids, plan, cfg.decode_tokens, cfg.decode_repeats)
            measured[plan] = (score(model, windows, plan, chars), rate)
        return measured[plan]

    measured: dict[SkipPlan, tuple[Score, float]] = {}
    decode_rate(model, decode_ids, SkipPlan(), cfg.decode_tokens, 1)  # warm-up: the first steps run 3-5x slower
    dense_score, _ = measure(SkipPlan(), "dense")
    plans: list[tuple[str, str | None, float, SkipPlan]] = []
    for mode in dict.fromkeys(cfg.modes):
        for ranking in (None,) if mode == "neurons" else dict.fromkeys(cfg.rankings):
            for target in sorted(set(cfg.budgets), reverse=True):
                plan = budget.plan_skips(importance, target, mode, cost, ranking or "bi")
                plans.append((mode, ranking, target, plan))
                measure(plan, f"{mode} ({ranking or 'uniform'}) at activation {target}")
    # The dense model is timed again last and the faster run kept: one noisy phase of a shared
    # machine during the first timing would otherwise skew every speed-up read off the table.
    again = decode_rate(model, decode_ids, SkipPlan(), cfg.decode_tokens, cfg.decode_repeats)
    dense_rate = max(measured[SkipPlan()][1], again)
    measured[SkipPlan()] = (dense_score, dense_rate)
    rows = [
        _row(mode, ranking, target, plan, *measured[plan], dense_score, cost, head_flops, num_layers, cfg.fragments)
        for mode, ranking, target, plan in plans
    ]
    return {
        "model": model_id,
        "layers": num_layers,
        "text": str(cfg.text),
        "calibration": {
            "fraction": cfg.calibration_fraction,
            "tokens": calibration.importance.tokens,
            "loss_tokens": calibration.importance.loss_tokens,
            "text_sha256": calibration.importance.text_sha256,
            "importance": calibration.importance.to_json()["layers"],
        },
        "eval_tokens": dense_score.tokens,
        "eval_chars": dense_score.chars,
        "window": len(windows[0]),
        "context": cfg.context,
        "fragments": cfg.fragments,
        "layer_flops_per_token": num_layers * cost.total,
        "head_flops_per_token": head_flops,
        "dense": {"ppl": round(dense_score.ppl, 4), "bpc": round(dense_score.bpc, 4), "tok_s": round(dense_rate, 2)},
        "budgets": rows,
        "default": choose_default(rows),
        "targets": {"compute_saved": TARGET_SAVED, "max_ppl_increase": MAX_PPL_INCREASE},
        #: the lossless part (identical output for less compute) is measured by a later work item
        "lossless": None,
    }
