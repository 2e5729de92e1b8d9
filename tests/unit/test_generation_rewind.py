"""The generation loop's rewind after a failed spot check: the output ends as the honest run's.

A fake pipeline stands in for a route (the real one is exercised by
tests/integration/test_spot_check.py): it returns wrong tokens until it "finds out", then asks the
loop to regenerate from a position, as ``RemotePipeline`` does after a failed check.
"""

from __future__ import annotations

import asyncio
from dataclasses import replace
from pathlib import Path
from typing import Any

import pytest

from engine.client.generation import GenerationRequest, StepResult, generate_events
from engine.client.local import LocalPipeline
from engine.client.remote import _accepted
from engine.client.speculative import SpeculativePipeline
from engine.models.loading import load_model

PROMPT = list(range(10))


class Tok:
    """Token id n decodes to "<n>"."""

    def decode(self, ids: list[int]) -> str:
        return "".join(f"<{i}>" for i in ids)


def honest(position: int) -> int:
    return 1000 + position


class LyingRoute:
    """Wrong tokens for its first ``bad_steps`` steps; then a rewind to ``rewind_to`` is pending,
    found either before the next step or only after the last one (``late``)."""

    def __init__(self, bad_steps: int, rewind_to: int, *, late: bool = False) -> None:
        self.bad_steps, self.rewind_to, self.late = bad_steps, rewind_to, late
        self.steps = 0
        self.fed: list[tuple[int, list[int]]] = []
        self._pending: int | None = None

    async def step(self, session: str, pos: int, tokens: list[int], *_: Any, **__: Any) -> StepResult:
        self.fed.append((pos, list(tokens)))
        self.steps += 1
        position = pos + len(tokens)
        bad = self.steps <= self.bad_steps
        if self.steps == self.bad_steps and not self.late:
            self._pending = self.rewind_to
        return StepResult(5000 + position if bad else honest(position), (), 1.0)

    def pending_rewind(self, session: str) -> int | None:
        pending, self._pending = self._pending, None
        return pending

    async def settle(self, session: str) -> None:
        if self.late and self.steps >= self.bad_steps and self._pending is None and self.rewind_to >= 0:
            self._pending, self.rewind_to = self.rewind_to, -1

    async def close_session(self, session: str) -> None:
        return None


def _run(route: LyingRoute, new_tokens: int) -> list[dict[str, Any]]:
    async def go() -> list[dict[str, Any]]:
        request = GenerationRequest(PROMPT, new_tokens)
        return [ev async for ev in generate_events(route, Tok(), request)]  # type: ignore[arg-type]

    return asyncio.run(go())


@pytest.mark.parametrize(("bad_steps", "rewind_to"), [(4, 10), (4, 12), (6, 13)])
def test_rewind_before_the_next_step_regenerates_from_there(bad_steps: int, rewind_to: int) -> None:
    route = LyingRoute(bad_steps, rewind_to)
    events = _run(route, 8)
    done = events[-1]
    kept = max(rewind_to, len(PROMPT)) - len(PROMPT)
    # what came before the rewind position was the lying route's, and is kept as it was
    expected = [5000 + len(PROMPT) + i for i in range(kept)] + [honest(len(PROMPT) + i) for i in range(kept, 8)]
    assert done["token_ids"] == expected
    rewind = next(ev for ev in events if ev["event"] == "rewind")
    assert rewind["to_token"] == kept and rewind["text"] == Tok().decode(expected[:kept])
    assert done["text"] == Tok().decode(expected)
    # the step after the rewind feeds the last kept token at its own position
    after = route.fed[bad_steps]
    assert after == (len(PROMPT) + kept - 1, [(PROMPT + expected)[len(PROMPT) + kept - 1]])


def test_a_rewind_found_after_the_last_step_still_corrects_the_output() -> None:
    route = LyingRoute(8, 10, late=True)
    events = _run(route, 8)
    assert events[-1]["token_ids"] == [honest(len(PROMPT) + i) for i in range(8)]
    assert [ev["event"] for ev in events].count("rewind") == 1


# -- the same with self-speculative decoding (--verify) --------------------------------------------------


class LyingVerifier:
    """A verifying route (the whole tiny model, locally) whose last hop answers wrong greedy tokens for
    its first ``bad_rounds`` verify steps; then a spot check's rewind to ``rewind_to`` is pending."""

    def __init__(self, local: LocalPipeline, vocab: int, bad_rounds: int, rewind_to: int) -> None:
        self.local, self.vocab, self.bad_rounds, self.rewind_to = local, vocab, bad_rounds, rewind_to
        self.rounds = 0
        self._pending: int | None = None

    async def step(self, session: str, pos: int, tokens: list[int], *args: Any, **kwargs: Any) -> StepResult:
        result = await self.local.step(session, pos, tokens, *args, **kwargs)
        self.rounds += 1
        if self.rounds <= self.bad_rounds:
            lies = tuple((t + 1) % self.vocab for t in result.tokens)
            result = replace(result, token_id=lies[-1], tokens=lies)
        if self.rounds == self.bad_rounds:
            self._pending = self.rewind_to
        return result

    def pending_rewind(self, session: str) -> int | None:
        pending, self._pending = self._pending, None
        return pending

    async def close_session(self, session: str) -> None:
        await self.local.close_session(session)


def test_a_spot_check_rewind_under_speculative_decoding_ends_with_the_honest_output(tiny_model_dir: Path) -> None:
    model = load_model(tiny_model_dir)
    prompt = [3, 14, 15, 92, 65, 35]

    async def tokens(pipeline: Any) -> tuple[list[int], list[str]]:
        request = GenerationRequest(prompt, 12)
        events = [ev async for ev in generate_events(pipeline, Tok(), request)]  # type: ignore[arg-type]
        return events[-1]["token_ids"], [ev["event"] for ev in events]

    honest_ids, _ = asyncio.run(tokens(LocalPipeline(model)))
    route = LyingVerifier(LocalPipeline(model), model.cfg.vocab_size, bad_rounds=3, rewind_to=len(prompt))
    got, kinds = asyncio.run(tokens(SpeculativePipeline(route, model, frozenset({1}), draft_tokens=2)))
    assert kinds.count("rewind") == 1 and got == honest_ids


def test_only_drafts_the_route_agreed_with_are_settled() -> None:
    assert _accepted([7, 1, 2, 3], (1, 2, 9, 4)) == 2  # position 3's draft was rejected
    assert _accepted([7, 5, 2], (1, 2, 3)) == 0
    assert _accepted([7], (1,)) == 0
    assert _accepted([7, 1, 2], (1, 2, 3)) == 2
