"""What each activation codec costs in output quality and saves in bytes, on the real model.

Why in-process: the codec's effect on tokens does not depend on WebRTC, only on the hidden state
crossing each fragment boundary. The model is loaded as fragments cut like a 3-node deployment
and every hidden state crossing a boundary goes through ``encode`` -> ``decode``, in the prefill
and in each decode step, exactly as a node would send it.

Greedy generation runs all codecs in lockstep on the fp32 trajectory: each step every codec's
chain gets the token fp32 chose. A codec's free-running greedy output is identical to fp32's
exactly when, at every step, its own argmax equals fp32's token (by induction on the prefix), so
one lockstep run gives both the identical-output verdict and logit differences measured on the
same inputs. The first fragment sees only tokens, so its output is computed once and shared;
the codec chains then run as one batch, the fp32 reference alone as a real route would.
"""

from __future__ import annotations

import itertools
import logging
import math
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch
import torch.nn.functional as F

from engine.errors import ConfigError
from engine.models.kv_cache import KVCache
from engine.models.llama import FragmentModel
from engine.models.sampling import SamplingParams, sample
from engine.protocol import codec as wire
from engine.protocol import frames
from engine.protocol import messages as wire_msg

log = logging.getLogger(__name__)

#: Varied chat prompts: facts, reasoning, code, lists, creative writing, other languages.
PROMPTS: tuple[str, ...] = (
    "Tell me about the history of Rome.",
    "What is the capital of Australia?",
    "Explain photosynthesis to a ten-year-old.",
    "Write a haiku about autumn leaves.",
    "How do I reverse a list in Python?",
    "What are three tips for better sleep?",
    "Summarise the plot of Romeo and Juliet.",
    "Why is the sky blue?",
    "Give me a recipe for pancakes.",
    "What is the difference between weather and climate?",
    "Write a short story about a robot who learns to paint.",
    "How does a bicycle stay upright?",
    "List five animals that live in the ocean.",
    "What is 17 multiplied by 23?",
    "Translate 'good morning, how are you?' into French.",
    "Explain what a black hole is.",
    "Write a polite email declining a meeting invitation.",
    "What causes earthquakes?",
    "Describe the water cycle.",
    "How do vaccines work?",
    "Write a JavaScript function that checks whether a number is prime.",
    "What should I pack for a weekend camping trip?",
    "Who was Marie Curie?",
    "Explain the rules of chess briefly.",
    "What is machine learning?",
    "Give me a motivational quote and explain it.",
    "How do I make a good cup of coffee?",
    "What are the planets of the solar system?",
    "Compose a limerick about a cat.",
    "Why do leaves change colour in the fall?",
)


def split_layers(num_layers: int, parts: int) -> list[tuple[int, int]]:
    """Contiguous, near-equal layer spans, like the default pack's fragments."""
    if not 1 <= parts <= num_layers:
        raise ConfigError(f"cannot split {num_layers} layers into {parts} fragments")
    cuts = [round(i * num_layers / parts) for i in range(parts + 1)]
    return list(itertools.pairwise(cuts))


@dataclass
class CodecStats:
    """What one codec accumulated over a run."""

    codec: str
    identical: int = 0
    prompts: int = 0
    max_abs_logit: float = 0.0
    sum_abs_logit: float = 0.0
    logit_count: int = 0
    #: relative L2 error of the hidden state at each boundary, summed over crossings
    sum_rel_err: float = 0.0
    crossings: int = 0
    roundtrip_s: float = 0.0
    #: largest tensor payload of a one-token (decode step) crossing
    decode_bytes: int = 0
    nll_sum: float = 0.0
    nll_count: int = 0
    first_divergence: list[int] = field(default_factory=list)


@dataclass(frozen=True)
class Variant:
    """One codec with its int8 parameters, named as on the command line: ``int8:b32:o4``."""

    label: str
    codec: str
    block: int = wire.DEFAULT_BLOCK
    outliers: int = wire.DEFAULT_OUTLIERS

    def encode(self, x: torch.Tensor) -> tuple[dict[str, Any], bytes]:
        return wire.encode(x, self.codec, block=self.block, outliers=self.outliers)


def parse_variant(spec: str) -> Variant:
    """``fp16``, ``bf16``, ``int8`` or ``int8`` with ``:b<block>`` / ``:o<outliers>`` suffixes."""
    codec, *opts = spec.split(":")
    if codec not in wire.CODECS or codec == "fp32" or (opts and codec != "int8"):
        raise ConfigError(f"bad codec {spec!r}: use fp16, bf16, int8 or e.g. int8:b32:o4")
    params = {"b": wire.DEFAULT_BLOCK, "o": wire.DEFAULT_OUTLIERS}
    for opt in opts:
        if opt[:1] not in params or not opt[1:].isdigit():
            raise ConfigError(f"bad int8 option {opt!r} in {spec!r}: b<block> or o<outliers>")
        params[opt[0]] = int(opt[1:])
    if not wire.MIN_BLOCK <= params["b"] <= wire.MAX_BLOCK or params["o"] > wire.MAX_OUTLIERS:
        raise ConfigError(f"{spec!r}: block in [{wire.MIN_BLOCK}, {wire.MAX_BLOCK}], outliers <= {wire.MAX_OUTLIERS}")
    return Variant(spec, codec, params["b"], params["o"])


def roundtrip(x: torch.Tensor, variant: Variant, stats: CodecStats) -> torch.Tensor:
    """``x`` as the next node receives it under ``variant``; accumulates its error and time."""
    t0 = time.perf_counter()
    header, payload = variant.encode(x)
    y = wire.decode(header, payload, x.device)
    stats.roundtrip_s += time.perf_counter() - t0
    if x.dim() == 3 and x.shape[1] == 1:  # a decode step: what one token costs on the wire
        stats.decode_bytes = max(stats.decode_bytes, len(payload))
    stats.sum_rel_err += float((y - x).norm() / x.norm().clamp_min(1e-30))
    stats.crossings += 1
    return y


def wire_bytes_per_token(hidden_size: int, variant: Variant) -> int:
    """Tensor payload bytes of one decode step's hidden state (one token) under ``variant``."""
    return len(variant.encode(torch.ones(1, 1, hidden_size))[1])


def frame_overhead(hidden_size: int) -> int:
    """Header bytes of a decode step's frame on the wire (``engine.protocol.frames``), whatever the codec.

    Measured on a representative step: the middle hop of a 3-node route with coordinator-style
    peer ids, past position 127 (two-byte varints), carrying the first hop's timing.
    """
    route = tuple(wire_msg.Hop(f"n-{i:012x}", 10 * i, 10 * i + 10) for i in range(3))
    msg = wire_msg.Forward(
        "0" * 32,
        300,
        340,
        route,
        1,
        "c-000000000000",
        wire_msg.Sampling(),
        2048,
        (wire_msg.HopTiming(route[0].peer, 0.05, 20.0),),
        torch.zeros(1, 1, hidden_size),
        40,
    )
    writer = frames.FrameWriter()
    writer.frame("link", frames.prepare(msg))  # the first step announces the context
    return len(writer.frame("link", frames.prepare(msg))) - 4 * hidden_size


def run_tail(
    fragments: Sequence[FragmentModel],
    hidden: torch.Tensor,
    pos: int,
    caches: Sequence[KVCache | None],
    send: Callable[[torch.Tensor], torch.Tensor],
    *,
    all_logits: bool = False,
) -> torch.Tensor:
    """Fragments after the first: each boundary's hidden state goes through ``send`` first."""
    x = hidden
    for frag, cache in zip(fragments, caches, strict=True):
        x = frag(send(x), pos, cache, all_logits=all_logits)
    return x


def send_rows(x: torch.Tensor, variants: Sequence[Variant], stats: dict[str, CodecStats]) -> torch.Tensor:
    """Row ``i`` of the batch as the next node receives it under ``variants[i]`` (a 1-row ``x`` is shared)."""
    rows = x.expand(len(variants), *x.shape[1:]) if x.shape[0] == 1 else x
    return torch.cat([roundtrip(rows[i : i + 1], v, stats[v.label]) for i, v in enumerate(variants)])


def greedy_lockstep(
    fragments: Sequence[FragmentModel],
    prompt: list[int],
    tokens: int,
    stop_ids: frozenset[int],
    variants: Sequence[Variant],
    stats: dict[str, CodecStats],
) -> list[int]:
    """Greedy fp32 generation with every codec's chain fed the same tokens; returns fp32's tokens.

    The codec chains run as one batch (row ``i``: ``variants[i]``), which costs about what one
    chain does on a CPU; the fp32 reference runs alone, as a real route would.
    """
    head, tail = fragments[0], fragments[1:]
    length = len(prompt) + tokens
    head_cache = head.new_cache(length)
    ref_caches = [f.new_cache(length) for f in tail]
    batch_caches = [f.new_cache(length, batch=len(variants)) for f in tail]
    greedy = SamplingParams()
    matching = {v.label: True for v in variants}
    out: list[int] = []
    step_ids, pos = prompt, 0
    for index in range(tokens):
        hidden = head(torch.tensor([step_ids]), pos, head_cache)
        ref = run_tail(tail, hidden, pos, ref_caches, lambda x: x)[0, -1]
        token = sample(ref, greedy, pos + len(step_ids))
        logits = run_tail(tail, hidden, pos, batch_caches, lambda x: send_rows(x, variants, stats))[:, -1]
        for v, row in zip(variants, logits, strict=True):
            st = stats[v.label]
            if matching[v.label] and sample(row, greedy, pos + len(step_ids)) != token:
                matching[v.label] = False
                st.first_divergence.append(index)
            diff = (row - ref).abs()
            st.max_abs_logit = max(st.max_abs_logit, float(diff.max()))
            st.sum_abs_logit += float(diff.sum())
            st.logit_count += diff.numel()
        out.append(token)
        pos += len(step_ids)
        step_ids = [token]
        if token in stop_ids:
            break
    for c, same in matching.items():
        stats[c].prompts += 1
        stats[c].identical += same
    return out


def text_windows(ids: list[int], window: int, total: int) -> list[list[int]]:
    """Consecutive windows of ``window`` tokens covering about ``total`` tokens of ``ids``."""
    if len(ids) < 2:
        raise ConfigError("the perplexity text is too short")
    count = max(1, min(len(ids) // window, math.ceil(total / window)))
    return [ids[i * window : (i + 1) * window] for i in range(count)]


def window_nll(
    fragments: Sequence[FragmentModel], ids: list[int], send: Callable[[torch.Tensor], torch.Tensor]
) -> tuple[float, int]:
    """Summed next-token negative log-likelihood of a window (its first token is context only)."""
    hidden = fragments[0](torch.tensor([ids]), 0, None)
    logits = run_tail(fragments[1:], hidden, 0, [None] * (len(fragments) - 1), send, all_logits=True)
    nll = F.cross_entropy(logits[0, :-1].float(), torch.tensor(ids[1:]), reduction="sum")
    return float(nll), len(ids) - 1


def summarise(
    stats: dict[str, CodecStats], bytes_per_token: dict[str, int], with_ppl: bool, overhead: int = 0
) -> list[dict[str, Any]]:
    """One row per codec, fp32 first, with ratios and changes against fp32 (``overhead``: frame header bytes)."""
    base_bytes = bytes_per_token["fp32"]
    base_ppl = math.exp(stats["fp32"].nll_sum / stats["fp32"].nll_count) if with_ppl else None
    rows = []
    for name, st in stats.items():
        ppl = math.exp(st.nll_sum / st.nll_count) if with_ppl and st.nll_count else None
        rows.append(
            {
                "codec": name,
                "bytes_per_token": bytes_per_token[name],
                "ratio_vs_fp32": round(base_bytes / bytes_per_token[name], 3),
                "frame_bytes_per_token": bytes_per_token[name] + overhead,
                "frame_ratio_vs_fp32": round((base_bytes + overhead) / (bytes_per_token[name] + overhead), 3),
                "identical": st.identical,
                "prompts": st.prompts,
                "identical_fraction": round(st.identical / st.prompts, 4) if st.prompts else None,
                "first_divergence": st.first_divergence,
                "max_abs_logit_diff": round(st.max_abs_logit, 4),
                "mean_abs_logit_diff": round(st.sum_abs_logit / st.logit_count, 5) if st.logit_count else 0.0,
                "boundary_rel_err": round(st.sum_rel_err / st.crossings, 6) if st.crossings else 0.0,
                "roundtrip_us": round(st.roundtrip_s / st.crossings * 1e6, 1) if st.crossings else 0.0,
                "perplexity": round(ppl, 4) if ppl is not None else None,
                "perplexity_change": round(ppl - base_ppl, 4) if ppl is not None and base_ppl is not None else None,
            }
        )
    return rows


@dataclass(frozen=True)
class EvalConfig:
    prompts: tuple[str, ...] = PROMPTS
    tokens: int = 48
    #: compared with fp32; plain block absmax (o0) is kept to show what the outliers buy
    codecs: tuple[str, ...] = ("fp16", "bf16", "int8:o0", "int8")
    parts: int = 3
    text: Path | None = None
    ppl_tokens: int = 2048
    ppl_window: int = 512


def evaluate(folder: Path, cfg: EvalConfig, progress: Callable[[str], None] = log.info) -> dict[str, Any]:
    """Run the whole evaluation on the model in ``folder``; returns the result as plain data."""
    from engine.models.config import load_config
    from engine.models.loading import load_model
    from engine.models.tokenizer import ModelTokenizer

    variants = [parse_variant(c) for c in dict.fromkeys(cfg.codecs)]
    if cfg.tokens < 1 or not cfg.prompts:
        raise ConfigError("need at least one prompt and one token")
    text_ids: list[int] = []
    tok = ModelTokenizer(folder)
    if cfg.text is not None:
        try:
            text = cfg.text.read_text(encoding="utf-8", errors="replace")[: cfg.ppl_tokens * 16]
        except OSError as exc:
            raise ConfigError(f"cannot read {cfg.text}: {exc}") from None
        text_ids = tok.encode(text, special=False)
    spans = split_layers(load_config(folder).num_hidden_layers, cfg.parts)
    fragments = [load_model(folder, a, b) for a, b in spans]
    hidden_size = fragments[0].cfg.hidden_size
    stats = {c: CodecStats(c) for c in ("fp32", *(v.label for v in variants))}
    t0 = time.perf_counter()
    for i, prompt in enumerate(cfg.prompts):
        progress(f"prompt {i + 1}/{len(cfg.prompts)}: greedy {cfg.tokens} tokens, {len(stats)} codecs in lockstep")
        ids = tok.encode(tok.render_chat([{"role": "user", "content": prompt}]))
        greedy_lockstep(fragments, ids, cfg.tokens, tok.stop_ids, variants, stats)
    stats["fp32"].identical = stats["fp32"].prompts = len(cfg.prompts)
    gen_s = time.perf_counter() - t0
    window = min(cfg.ppl_window, cfg.ppl_tokens + 1)
    windows = text_windows(text_ids, window, cfg.ppl_tokens) if cfg.text is not None else []
    t0 = time.perf_counter()
    for v in (Variant("fp32", "fp32"), *variants) if windows else ():
        st = stats[v.label]
        progress(f"perplexity under {v.label}: {len(windows)} windows of {window} tokens")
        scratch = CodecStats(v.label)  # error and time figures stay those of decode steps
        send = (lambda x: x) if v.codec == "fp32" else (lambda x, v=v, s=scratch: roundtrip(x, v, s))
        for w in windows:
            nll, count = window_nll(fragments, w, send)
            st.nll_sum += nll
            st.nll_count += count
    ppl_s = time.perf_counter() - t0
    # Observed on the real decode steps (int8 scales fall back to float32 when out of float16's range).
    bytes_per_token = {
        v.label: stats[v.label].decode_bytes or wire_bytes_per_token(hidden_size, v)
        for v in (Variant("fp32", "fp32"), *variants)
    }
    return {
        "model_layers": spans,
        "hidden_size": hidden_size,
        "boundaries": len(spans) - 1,
        "prompts": len(cfg.prompts),
        "tokens": cfg.tokens,
        "text": str(cfg.text) if cfg.text is not None else None,
        "perplexity_tokens": sum(len(w) - 1 for w in windows),
        "generation_s": round(gen_s, 1),
        "perplexity_s": round(ppl_s, 1),
        "frame_overhead_bytes": frame_overhead(hidden_size),
        "codecs": summarise(stats, bytes_per_token, bool(windows), frame_overhead(hidden_size)),
    }
