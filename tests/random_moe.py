"""Weights for the tiny random MoE models the tests build with transformers (shared by unit and integration tests).

transformers' default init gives near-uniform routing and vanishing activations in a 64-wide model;
N(0, 1/fan_in) matrices with perturbed norms and biases give O(1) activations and decisive
routing, so an expert mix-up or a misrouted row changes the output visibly.
"""

from __future__ import annotations

import math

import torch


def randomise(model: torch.nn.Module) -> None:
    """Overwrite every parameter in place, deterministically (its own seeded generator)."""
    gen = torch.Generator().manual_seed(0)
    with torch.no_grad():
        for name, p in model.named_parameters():
            if "norm" in name:
                p.copy_(1.0 + 0.1 * torch.randn(p.shape, generator=gen))
            elif name.endswith("bias"):
                p.copy_(0.1 * torch.randn(p.shape, generator=gen))
            elif "embed_tokens" in name:
                p.copy_(torch.randn(p.shape, generator=gen))
            else:
                p.copy_(torch.randn(p.shape, generator=gen) / math.sqrt(p.shape[-1]))
