"""The reference a spot check compares with: the route's computation redone in one pass, hop by hop.

Given the token history the first hop saw, the whole model runs it as one prefill with the route's
hop boundaries, skipped layers and activation codec (a hop's output is encoded and decoded exactly
as it would be on the wire before the next hop's layers run), and keeps the hidden state at every
boundary plus, at every position, the reference's greedy token and how far each fed token's
logit falls below it (for a sampled session: how far it falls behind the token the seeded
exponential race of ``engine.models.sampling`` would pick from the reference's logits, in logit
units, so the same tolerance covers both). One prefill instead of the route's step-by-step decode changes float
rounding only: the tolerance (``Tolerance``) covers that and honest cross-hardware differences.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch

from engine.models.llama import FragmentModel, attention_mask
from engine.models.sampling import SamplingParams, sampling_noise
from engine.protocol import codec as wire_codec


@dataclass(frozen=True)
class Tolerance:
    """How far an honest hop may be from the reference. Calibrated by ``kluster bench verify``."""

    #: relative error of a position's hidden state (estimated from sketches) that makes a view wrong ...
    hidden: float = 0.3
    #: ... and the most honest hardware differs by: bf16 weights against the fp32 reference reach
    #: 0.084 at SmolLM2's middle boundary (``kluster bench verify``); an input off by more than this
    #: excuses the hop's own output (it may amplify what it got)
    hidden_low: float = 0.15
    #: logits a fed token may fall below the reference's choice (a near tie; bf16 nodes: 0.30)
    logit_gap: float = 1.5


@dataclass(frozen=True)
class Reference:
    #: per boundary between hops: the hidden state the sender should send (positions, hidden) ...
    sent: tuple[torch.Tensor, ...]
    #: ... and what the receiver should get after the codec's round trip
    received: tuple[torch.Tensor, ...]
    #: per position p: the reference's greedy next token after p, and the gap between its logit and
    #: the logit of the token actually fed at p+1 (0 where it is the same; the last position: 0;
    #: sampled sessions: the gap in the seeded race, see ``sampled_gaps``)
    greedy: torch.Tensor
    gaps: torch.Tensor


@torch.inference_mode()
def compute_reference(
    model: FragmentModel,
    tokens: list[int],
    hops: list[tuple[int, int]],
    *,
    skip: frozenset[int] = frozenset(),
    codec: str = wire_codec.DEFAULT_CODEC,
    sampling: SamplingParams | None = None,
    first_checked: int = 1,
) -> Reference:
    """Run ``tokens`` through ``model`` (all layers, embeddings and head) split at the ``hops`` boundaries.

    ``sampling`` with a temperature: token gaps are measured in the seeded race (top-p must be 1),
    for the tokens from position ``first_checked`` on (those before were fed, not generated).
    """
    if model.embed_tokens is None or model.norm is None or model.lm_head is None or model.start != 0:
        raise ValueError("the reference needs the whole model")
    bounds = [0, *(b for hop in hops for b in hop), model.end]
    gaps_ok = all(set(range(a, b)) <= skip for a, b in zip(bounds[::2], bounds[1::2], strict=True))
    if not hops or not gaps_ok or any(a >= b for a, b in hops):
        raise ValueError(f"hops {hops} do not cover layers 0-{model.end} (with skipped layers {sorted(skip)})")
    ids = torch.tensor([tokens], dtype=torch.int64)
    x = model.embed_tokens(ids)
    p = model.layers[0].qkv.weight if len(model.layers) else x
    x = x.to(p.dtype)
    t = x.shape[1]
    cos, sin = model.rotary(0, t, x.dtype, x.device)
    mask = attention_mask(0, t, model.cfg.sliding_window, x.device)
    sent, received = [], []
    for index, (start, end) in enumerate(hops):
        for layer in range(start, end):
            if layer not in skip:
                x = model.layers[layer](x, cos, sin, None, layer, 0, mask)
        if index < len(hops) - 1:
            sent.append(x[0].float().clone())
            x = wire_codec.round_trip(x, codec).to(p.dtype)
            received.append(x[0].float().clone())
    logits = model.lm_head(model.norm(x))[0].float()
    top, greedy = logits.max(dim=-1)
    fed = torch.tensor([*tokens[1:], 0], dtype=torch.int64)
    if sampling is not None and sampling.temperature > 0:
        gaps = sampled_gaps(logits, fed, sampling, max(first_checked, 1) - 1)
    else:
        gaps = top - logits.gather(-1, fed.unsqueeze(-1)).squeeze(-1)
    gaps[-1] = 0.0
    return Reference(tuple(sent), tuple(received), greedy, gaps)


def sampled_gaps(logits: torch.Tensor, fed: torch.Tensor, sampling: SamplingParams, start: int) -> torch.Tensor:
    """Per position p >= ``start``: how far token ``fed[p]`` falls behind the race's winner, in logits.

    The sampler picks ``argmax(l_i / T - log E_i)`` with the noise ``E`` of position p+1; an honest
    node's logits differ from ``logits`` by at most e per token, which moves any token's score by
    at most e / T, so ``T`` times the reference's score gap is at most 2e for the token it picked:
    the same bound, in logit units, as a greedy token's gap. Top-p cuts the race at a boundary that
    such noise can move; those sessions are not checked (the caller's choice).
    """
    if sampling.top_p < 1.0:
        raise ValueError("sampled tokens are checkable with top_p = 1 only")
    gaps = torch.zeros(logits.shape[0], dtype=torch.float32)
    t = sampling.temperature
    for p in range(start, logits.shape[0] - 1):
        scores = logits[p].double() / t - sampling_noise(sampling.seed, p + 1, logits.shape[-1]).double().log()
        gaps[p] = float(t * (scores.max() - scores[fed[p]]))
    return gaps
