"""Measuring each layer's importance over a calibration text (``kluster calibrate``).

Block influence: the model runs once over consecutive windows of the text; for every token and
every layer the residual stream is compared before the layer, between its attention and MLP,
and after it. Scores are means over all tokens, so a window's first tokens count like the others.

Drop-one loss (optional, ``loss_tokens > 0``): the perplexity of the first ``loss_tokens``
calibration tokens with each layer, attention and MLP skipped alone, relative to the dense
model's: three passes per layer, so it is measured on fewer tokens than block influence.
"""

from __future__ import annotations

import hashlib
import logging
from collections.abc import Callable, Sequence
from pathlib import Path

import torch
import torch.nn.functional as F

from engine.errors import ConfigError
from engine.models.llama import FragmentModel
from engine.models.tokenizer import ModelTokenizer
from engine.sparsity import runner
from engine.sparsity.budget import SkipPlan
from engine.sparsity.importance import (
    DEFAULT_LOSS_TOKENS,
    DEFAULT_TOKENS,
    DEFAULT_WINDOW,
    METRIC,
    Calibration,
    Importance,
    LayerImportance,
)
from engine.sparsity.perplexity import score
from engine.transport.codec_eval import text_windows

log = logging.getLogger(__name__)


def influence(before: torch.Tensor, after: torch.Tensor) -> torch.Tensor:
    """Per-token ``1 - cos(before, after)`` over the hidden dimension (float64, shape ``before.shape[:-1]``)."""
    return 1.0 - F.cosine_similarity(before.double(), after.double(), dim=-1)


class InfluenceSums:
    """Running sums of per-token influence for each layer and sub-block (an ``Observer``)."""

    def __init__(self, num_layers: int) -> None:
        self.sums = torch.zeros(num_layers, 3, dtype=torch.float64)
        self.tokens = torch.zeros(num_layers, dtype=torch.int64)

    def __call__(self, layer: int, before: torch.Tensor, middle: torch.Tensor, after: torch.Tensor) -> None:
        self.sums[layer, 0] += influence(before, after).sum()
        self.sums[layer, 1] += influence(before, middle).sum()
        self.sums[layer, 2] += influence(middle, after).sum()
        self.tokens[layer] += before.shape[0] * before.shape[1]

    def scores(self) -> tuple[LayerImportance, ...]:
        if bool((self.tokens == 0).any()):
            raise ConfigError("calibration saw no tokens for some layer")
        means = (self.sums / self.tokens.unsqueeze(1)).tolist()
        return tuple(LayerImportance(i, *(round(v, 6) for v in m)) for i, m in enumerate(means))


def layer_importance(model: FragmentModel, windows: Sequence[Sequence[int]]) -> tuple[LayerImportance, ...]:
    """Block influence of every layer of ``model`` (the whole model: embeddings to head) over ``windows``."""
    if not model.has_embed or model.start != 0 or model.end != model.cfg.num_hidden_layers:
        raise ConfigError("calibration needs the whole model, from the embeddings through every layer")
    sums = InfluenceSums(model.cfg.num_hidden_layers)
    for ids in windows:
        runner.forward(model, torch.tensor([list(ids)]), 0, None, observe=sums)
    return sums.scores()


def drop_one_losses(
    model: FragmentModel,
    windows: Sequence[Sequence[int]],
    layers: Sequence[LayerImportance],
    progress: Callable[[str], None] = log.info,
) -> tuple[LayerImportance, ...]:
    """``layers`` with ``loss``, ``attn_loss`` and ``mlp_loss`` measured on ``windows`` (see the module docstring)."""
    dense = score(model, windows, SkipPlan()).ppl
    out = []
    for li in layers:
        if li.layer % 10 == 0:
            progress(f"drop-one losses: layer {li.layer} of {len(layers)}")
        one = frozenset({li.layer})
        losses = (
            round(score(model, windows, plan).ppl / dense - 1.0, 6)
            for plan in (SkipPlan(layers=one), SkipPlan(attention=one), SkipPlan(mlp=one))
        )
        out.append(LayerImportance(li.layer, li.bi, li.attn_bi, li.mlp_bi, *losses))
    return tuple(out)


def text_sha256(text: str) -> str:
    return hashlib.sha256(text.encode("utf-8")).hexdigest()


def read_text(path: Path) -> str:
    """The UTF-8 text of ``path``; a missing, unreadable or blank file is a one-line ``ConfigError``."""
    try:
        text = path.read_text(encoding="utf-8", errors="replace")
    except FileNotFoundError:
        raise ConfigError(f"--text {path} does not exist") from None
    except IsADirectoryError:
        raise ConfigError(f"--text {path} is a directory, not a text file") from None
    except OSError as exc:
        raise ConfigError(f"cannot read --text {path}: {exc}") from None
    if not text.strip():
        raise ConfigError(f"--text {path} is empty")
    return text


def calibrate(
    folder: Path,
    text: str,
    *,
    model_id: str,
    tokens: int = DEFAULT_TOKENS,
    window: int = DEFAULT_WINDOW,
    loss_tokens: int = DEFAULT_LOSS_TOKENS,
    progress: Callable[[str], None] = log.info,
) -> Calibration:
    """Calibrate the model in ``folder`` on the first ``tokens`` tokens of ``text``."""
    from engine.models.loading import load_model

    return calibrate_loaded(
        load_model(folder),
        ModelTokenizer(folder),
        text,
        model_id=model_id,
        config_sha256=hashlib.sha256((folder / "config.json").read_bytes()).hexdigest(),
        tokens=tokens,
        window=window,
        loss_tokens=loss_tokens,
        progress=progress,
    )


def calibrate_loaded(
    model: FragmentModel,
    tokenizer: ModelTokenizer,
    text: str,
    *,
    model_id: str,
    config_sha256: str,
    tokens: int = DEFAULT_TOKENS,
    window: int = DEFAULT_WINDOW,
    loss_tokens: int = DEFAULT_LOSS_TOKENS,
    progress: Callable[[str], None] = log.info,
) -> Calibration:
    """``calibrate`` with the whole model already loaded (the bench reuses one model for everything)."""
    if tokens < 2 or window < 2 or loss_tokens < 0:
        raise ConfigError("calibration needs at least 2 tokens, a window of at least 2 and loss tokens >= 0")
    text = text[: tokens * 16]  # far more characters than ``tokens`` tokens need: tokenise no more
    ids = tokenizer.encode(text, special=False)
    if len(ids) < 2:
        raise ConfigError("the calibration text is too short (fewer than 2 tokens)")
    windows = text_windows(ids, min(window, tokens), tokens)
    used = sum(len(w) for w in windows)
    progress(f"calibrating {model_id}: {used} tokens in {len(windows)} windows of {len(windows[0])}")
    layers = layer_importance(model, windows)
    loss_used = 0
    if loss_tokens >= 2:
        loss_windows = text_windows(ids[:used], min(window, loss_tokens), loss_tokens)
        loss_used = sum(len(w) for w in loss_windows)
        progress(f"drop-one losses: {3 * len(layers)} passes over {loss_used} tokens")
        layers = drop_one_losses(model, loss_windows, layers, progress)
    return Calibration(
        model_id=model_id,
        num_layers=model.cfg.num_hidden_layers,
        config_sha256=config_sha256,
        window=len(windows[0]),
        importance=Importance(METRIC, text_sha256(text), used, layers, loss_used),
    )
