"""Next-token choice from logits: greedy, or seeded temperature/top-p sampling.

The random draw for position ``p`` depends only on ``(seed, p)``: no generator state travels
between steps, so the node that samples can change mid-generation (failover) or be the local
reference path, and the same seed still gives the same tokens.

Sampling is the exponential race (what ``torch.multinomial`` does for one draw without
replacement, spelled out so it is ours): the token is ``argmax(p_i / E_i)`` with ``E_i ~ Exp(1)``
drawn from the seeded generator. The noise ``E`` does not depend on the logits, so whoever knows
the seed can check a sampled token against other logits (``engine.audit.reference``), the way a
greedy token is checked against the argmax.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch

from engine.errors import ConfigError

_MIX = 0x9E3779B97F4A7C15
_MASK = (1 << 63) - 1


@dataclass(frozen=True)
class SamplingParams:
    """How to pick tokens: temperature 0 means greedy (argmax)."""

    temperature: float = 0.0
    top_p: float = 1.0
    seed: int = 0

    def __post_init__(self) -> None:
        if not 0.0 <= self.temperature <= 100.0:
            raise ConfigError(f"temperature must be between 0 and 100, got {self.temperature}")
        if not 0.0 < self.top_p <= 1.0:
            raise ConfigError(f"top_p must be in (0, 1], got {self.top_p}")


def _draw_seed(seed: int, position: int) -> int:
    return ((seed * _MIX) ^ (position * 0xBF58476D1CE4E5B9 + 0x94D049BB133111EB)) & _MASK


def sample(logits: torch.Tensor, params: SamplingParams, position: int) -> int:
    """Pick the token for ``position`` from a 1-D logits vector."""
    if params.temperature == 0.0:
        return int(torch.argmax(logits).item())
    # On the CPU: the seeded generator is a CPU one, and this keeps draws identical across devices.
    probs = torch.softmax(logits.float().cpu() / params.temperature, dim=-1)
    if params.top_p < 1.0:
        sorted_p, order = torch.sort(probs, descending=True)
        keep = torch.cumsum(sorted_p, 0) - sorted_p < params.top_p
        probs = torch.zeros_like(probs).scatter_(0, order[keep], sorted_p[keep])
    return int(torch.argmax(probs / sampling_noise(params.seed, position, probs.shape[-1])).item())


def sampling_noise(seed: int, position: int, vocab: int) -> torch.Tensor:
    """The ``Exp(1)`` draws (float32, one per token) that decide the sampled token at ``position``."""
    gen = torch.Generator().manual_seed(_draw_seed(seed, position))
    return torch.empty(vocab, dtype=torch.float32).exponential_(1.0, generator=gen)
