"""Self-speculative decoding: a reduced model drafts, the whole model verifies; greedy output unchanged."""

from __future__ import annotations

import asyncio
from pathlib import Path
from typing import Any

import pytest

from engine.client.generation import GenerationRequest, generate_events
from engine.client.local import LocalPipeline
from engine.client.speculative import SpeculativePipeline, accepted_prefix
from engine.errors import ConfigError
from engine.models.loading import load_model
from engine.models.sampling import SamplingParams
from engine.models.tokenizer import ModelTokenizer


def test_accepted_prefix() -> None:
    assert accepted_prefix([5, 6, 7], [5, 6, 7, 8]) == [5, 6, 7, 8]  # all accepted, plus a bonus token
    assert accepted_prefix([5, 6, 7], [5, 9, 7, 8]) == [5, 9]  # the first mismatch is corrected
    assert accepted_prefix([5, 6, 7], [1, 6, 7, 8]) == [1]
    assert accepted_prefix([], [4]) == [4]
    with pytest.raises(ValueError):
        accepted_prefix([5], [5])


async def _done(pipeline: Any, tok: ModelTokenizer, request: GenerationRequest) -> dict[str, Any]:
    done: dict[str, Any] = {}
    async for ev in generate_events(pipeline, tok, request):
        if ev["event"] == "done":
            done = ev
    return done


PROMPTS = ["What is the capital of France?", "Write a short poem about the sea.", "How do I reverse a list in Python?"]
#: SmolLM2 layers of low block influence (kluster calibrate on Pride and Prejudice): activation 0.9
DRAFT_SKIP = frozenset({14, 17, 25})


def test_greedy_output_is_the_whole_models_with_fewer_full_passes(smollm2_dir: Path) -> None:
    tok = ModelTokenizer(smollm2_dir)
    model = load_model(smollm2_dir)

    async def run() -> list[tuple[dict[str, Any], dict[str, Any]]]:
        out = []
        for p in PROMPTS:
            request = GenerationRequest(
                tok.encode(tok.render_chat([{"role": "user", "content": p}])), 32, SamplingParams(), tok.stop_ids
            )
            dense = await _done(LocalPipeline(model), tok, request)
            spec = SpeculativePipeline(LocalPipeline(model), model, DRAFT_SKIP, 4)
            out.append((dense, await _done(spec, tok, request)))
        return out

    rounds = emitted = 0
    for dense, spec in asyncio.run(run()):
        assert spec["token_ids"] == dense["token_ids"]
        figures = spec["stats"]["speculative"]
        assert figures["skipped_layers"] == sorted(DRAFT_SKIP) and 0 < figures["acceptance_rate"] <= 1
        rounds += figures["rounds"]
        emitted += len(spec["token_ids"])
    # measured: ~0.40 full passes per token with 3 layers skipped and 4 drafts (1.0 without drafting)
    assert rounds / emitted <= 0.6, (rounds, emitted)


def test_sampling_is_refused_not_silently_changed(smollm2_dir: Path) -> None:
    model = load_model(smollm2_dir)
    spec = SpeculativePipeline(LocalPipeline(model), model, DRAFT_SKIP)
    with pytest.raises(ConfigError, match="greedy"):
        asyncio.run(spec.step("s", 0, [1, 2], 16, SamplingParams(temperature=0.7)))


def test_lossless_figures_from_done_events() -> None:
    from engine.cli.bench_sparsity import lossless_lines
    from engine.sparsity.lossless import compare

    def done(ids: list[int], total_s: float, rounds: int = 0) -> dict[str, Any]:
        spec = {"rounds": rounds, "acceptance_rate": 0.5, "skipped_layers": [4], "draft_ms": 10.0, "verify_ms": 30.0}
        return {"token_ids": ids, "stats": {"total_s": total_s, "speculative": spec}}

    dense = [done([1, 2, 3, 4], 2.0), done([5, 6], 1.0)]
    verified = [done([1, 2, 3, 4], 1.0, rounds=2), done([5, 7], 1.5, rounds=1)]
    r = compare(dense, verified)
    assert r["identical"] == 1 and r["prompts"] == 2
    assert r["passes_per_token"] == 0.5 and r["speedup"] == round(3.0 / 2.5, 3)
    assert r["draft_ms_per_round"] == round(20 / 3, 1) and r["dense_ms_per_token"] == 500.0
    lines = lossless_lines(
        {**r, "activation": 0.9, "draft_tokens": 2, "tokens": 48, "delay_ms": 40.0, "loopback": r, "wan": None}
    )
    assert "1/2" in lines[2] and "1.200x" in lines[2]
