"""Calibrating spot checks: how far honest routes drift from the reference, and how far perturbed ones do.

``emulate_route`` runs a route in this process the way nodes do: one step at a time with each
hop's KV cache, each boundary's hidden state through the wire codec, optionally with the nodes'
weights in another dtype (bf16 stands in for other hardware) and one hop perturbing what it sends
as a Byzantine node would (``--perturb`` of ``kluster node``). ``measure`` compares a run with the
reference the coordinator computes and returns every view's relative errors, which
``kluster bench verify`` prints beside the tolerance in force.
"""

from __future__ import annotations

import copy
from dataclasses import dataclass

import torch

from engine.audit.compare import assess
from engine.audit.reference import Tolerance, compute_reference
from engine.audit.sketch import RECEIVED, SENT, projection, sketch
from engine.models.llama import FragmentModel, attention_mask
from engine.models.sampling import SamplingParams, sample
from engine.protocol import codec as wire_codec


@dataclass(frozen=True)
class RouteRun:
    """What an emulated route's hops would have recorded: the first hop's tokens, the boundaries' states."""

    tokens: list[int]
    prompt: int
    sent: list[torch.Tensor]
    received: list[torch.Tensor]


def node_copy(model: FragmentModel, dtype: torch.dtype) -> FragmentModel:
    """The model as a node with other hardware would hold it (``dtype`` weights)."""
    return model if dtype == torch.float32 else copy.deepcopy(model).to(dtype)


def perturbation(x: torch.Tensor, scale: float, generator: torch.Generator | None = None) -> torch.Tensor:
    """The noise a Byzantine hop adds to hidden states ``x``: Gaussian, ``scale`` times each state's size.

    Shared by the emulated routes here and ``kluster node --perturb`` (the tests' Byzantine node).
    """
    noise = torch.randn(x.shape, generator=generator).to(device=x.device, dtype=x.dtype)
    return scale * noise * x.norm(dim=-1, keepdim=True) / (x.shape[-1] ** 0.5)


@torch.inference_mode()
def emulate_route(
    model: FragmentModel,
    prompt: list[int],
    hops: list[tuple[int, int]],
    new_tokens: int,
    *,
    codec: str = wire_codec.DEFAULT_CODEC,
    perturb: float = 0.0,
    perturb_hop: int = 0,
    seed: int = 0,
    sampling: SamplingParams | None = None,
    lie_at: int | None = None,
) -> RouteRun:
    """Decode ``new_tokens`` after ``prompt`` step by step through ``hops`` of ``model`` (greedy, or
    as ``sampling`` says); ``lie_at``: the last hop returns the reference's least likely token at
    that step instead (what a Byzantine last hop could do), and the route goes on from it."""
    if model.embed_tokens is None or model.norm is None or model.lm_head is None:
        raise ValueError("the emulated route needs the whole model")
    gen = torch.Generator().manual_seed(seed)
    dtype = model.layers[0].qkv.weight.dtype
    cache = model.new_cache(len(prompt) + new_tokens + 1)
    tokens = list(prompt)
    sent: list[list[torch.Tensor]] = [[] for _ in hops[:-1]]
    received: list[list[torch.Tensor]] = [[] for _ in hops[:-1]]
    pos, feed = 0, list(prompt)
    for _ in range(new_tokens):
        x = model.embed_tokens(torch.tensor([feed])).to(dtype)
        t = x.shape[1]
        cos, sin = model.rotary(pos, t, dtype, x.device)
        mask = attention_mask(pos, t, model.cfg.sliding_window, x.device)
        for index, (start, end) in enumerate(hops):
            for layer in range(start, end):
                x = model.layers[layer](x, cos, sin, cache, layer, pos, mask)
            if index < len(hops) - 1:
                if perturb and index == perturb_hop:
                    x = x + perturbation(x, perturb, gen)
                sent[index].append(x[0].float())
                x = wire_codec.round_trip(x.float(), codec).to(dtype)
                received[index].append(x[0].float())
        cache.length = pos + t
        logits = model.lm_head(model.norm(x[:, -1:])).float()
        pos += t
        nxt = sample(logits[0, -1], sampling or SamplingParams(), pos)
        if lie_at == len(tokens) - len(prompt):
            nxt = int(logits[0, -1].argmin())
        feed = [nxt]
        tokens.append(nxt)
    # the last sampled token is never fed: the trail (and so the check) ends before it
    return RouteRun(tokens[:-1], len(prompt), [torch.cat(s) for s in sent], [torch.cat(r) for r in received])


@dataclass(frozen=True)
class Measured:
    """One run against the reference: the worst relative error of any view, the worst token gap,
    and what the judge makes of it under ``tolerance``."""

    positions: int
    max_error: float
    errors: list[float]
    max_gap: float
    guilty: tuple[int, ...]
    disputes: tuple[tuple[int, int], ...]
    rewind_to: int | None


def measure(
    reference_model: FragmentModel,
    run: RouteRun,
    hops: list[tuple[int, int]],
    tolerance: Tolerance,
    *,
    codec: str = wire_codec.DEFAULT_CODEC,
    key: bytes = b"calibration",
    sampling: SamplingParams | None = None,
) -> Measured:
    """Compare ``run`` with the reference as the coordinator does (sketches under secret keys)."""
    ref = compute_reference(reference_model, run.tokens, hops, codec=codec, sampling=sampling, first_checked=run.prompt)
    hidden = reference_model.cfg.hidden_size
    keys = [key + bytes([b]) for b in range(len(hops))]
    sent = [sketch(run.sent[b], projection(keys[b], SENT, hidden)) for b in range(len(hops) - 1)]
    received = [sketch(run.received[b], projection(keys[b + 1], RECEIVED, hidden)) for b in range(len(hops) - 1)]
    a = assess(ref, sent, received, keys, run.tokens, given=run.prompt, check_tokens=True, tolerance=tolerance)
    found, worst = a.blame, max(a.errors, default=0.0)
    return Measured(len(run.tokens), worst, a.errors, a.max_gap, found.guilty, found.disputes, found.rewind_to)
