"""Next-token perplexity of text windows under a skip plan: shared by calibration and evaluation."""

from __future__ import annotations

import math
from collections.abc import Sequence
from dataclasses import dataclass

import torch
import torch.nn.functional as F

from engine.models.llama import FragmentModel
from engine.sparsity import runner
from engine.sparsity.budget import SkipPlan


@dataclass(frozen=True)
class Score:
    """Summed negative log-likelihood (nats) of ``tokens`` predicted tokens spanning ``chars`` characters."""

    nll: float
    tokens: int
    chars: int

    @property
    def ppl(self) -> float:
        return math.exp(self.nll / self.tokens)

    @property
    def bpc(self) -> float:
        """Bits per character: comparable across tokenizers, unlike perplexity."""
        return self.nll / math.log(2) / max(self.chars, 1)


def score(model: FragmentModel, windows: Sequence[Sequence[int]], plan: SkipPlan, chars: int = 0) -> Score:
    """NLL of ``windows`` under ``plan``; each window's first token is context only (the whole model)."""
    nll, count = 0.0, 0
    for ids in windows:
        logits = runner.forward(model, torch.tensor([list(ids)]), 0, None, plan, all_logits=True)
        nll += float(F.cross_entropy(logits[0, :-1], torch.tensor(list(ids[1:])), reduction="sum"))
        count += len(ids) - 1
    return Score(nll, count, chars)
