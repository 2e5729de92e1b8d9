"""Lossless Selective Activation: a reduced model here drafts, the full route verifies (self-speculative).

Why: skipping layers saves compute but changes the output (SmolLM2 loses ~8% perplexity per
skipped layer). Drafting with the reduced model and checking its guesses with the whole model
keeps the output of the whole model (Draft & Verify, LayerSkip) while the whole route runs once
per *several* tokens. Over a WAN that is where the time goes: a full-route pass costs every hop's
latency, so each drafted token must cost no WAN hop. The draft therefore runs in this process,
on a copy of the model with the budget's layers skipped, and only the verification crosses the
route (one step carrying the last token plus ``k`` drafts).

Greedy only: the route answers with the whole model's greedy token after every position
(``Forward.verify``); the longest prefix of drafts that matches is accepted, plus the route's own
token after it (the correction, or a bonus when every draft matched). Each round thus yields
1..k+1 tokens, all exactly what greedy decoding with the whole model produces, up to float
differences between a batched and a one-token pass (the same as any batched verifier).
Sampling would need the speculative sampling rule with the draft's distributions; it is refused
with a clear error rather than silently changing the output distribution.

This is a ``Pipeline`` like any other: ``generate_events`` asks it for one token at a time and
it hands out a round's tokens one by one, so the event stream and its ``done`` totals are unchanged;
``summary()`` adds the acceptance figures.
"""

from __future__ import annotations

import time
from dataclasses import dataclass, field
from typing import Any, Protocol

import torch

from engine.client.generation import StepResult
from engine.errors import ConfigError
from engine.fragments.executor import FragmentExecutor
from engine.models.llama import FragmentModel
from engine.models.sampling import SamplingParams

#: drafted tokens per round: under the WAN harness 2 beat 4 (1.08-1.10x vs 0.91x over dense; SmolLM2, 3 layers
#: skipped); 1.24x once the client's draft model stopped starting a second OpenMP team (torch_thread)
DEFAULT_DRAFT_TOKENS = 2


class VerifyingPipeline(Protocol):
    """A pipeline that can check drafts: ``verify=True`` steps may rewind and return every position's token."""

    async def step(
        self,
        session: str,
        pos: int,
        tokens: list[int],
        max_tokens: int,
        sampling: SamplingParams,
        stop_ids: frozenset[int] = frozenset(),
        *,
        verify: bool = False,
    ) -> StepResult: ...

    async def close_session(self, session: str) -> None: ...


@dataclass
class _Session:
    #: every token fed so far, by position (the prompt, then accepted tokens)
    seq: list[int] = field(default_factory=list)
    #: positions the draft model's cache holds (rejected drafts included until rewound)
    draft_len: int = 0
    #: a round's remaining tokens, handed out one per ``step`` call
    buffer: list[int] = field(default_factory=list)


@dataclass
class SpecStats:
    rounds: int = 0
    drafted: int = 0
    accepted: int = 0
    emitted: int = 0
    draft_ms: float = 0.0
    verify_ms: float = 0.0


def accepted_prefix(drafts: list[int], verified: list[int]) -> list[int]:
    """Tokens a round yields: the drafts the whole model agrees with, then its own next token.

    ``verified[i]`` is the whole model's greedy token after the position that fed ``drafts[i - 1]``
    (``verified[0]``: after the last already-accepted token); ``len(verified) == len(drafts) + 1``.
    """
    if len(verified) != len(drafts) + 1:
        raise ValueError("need one verified token per draft plus one")
    m = 0
    while m < len(drafts) and drafts[m] == verified[m]:
        m += 1
    return verified[: m + 1]


class SpeculativePipeline:
    """Greedy self-speculative decoding over ``target`` with a local draft (``model`` minus ``skip``)."""

    def __init__(
        self,
        target: VerifyingPipeline,
        model: FragmentModel,
        skip: frozenset[int],
        draft_tokens: int = DEFAULT_DRAFT_TOKENS,
        *,
        budget: dict[str, Any] | None = None,
    ) -> None:
        if not (model.has_embed and model.has_head):
            raise ConfigError("the draft model must hold the whole model (embeddings to head)")
        if not 1 <= draft_tokens <= 32:
            raise ConfigError(f"draft tokens per round must be in [1, 32], got {draft_tokens}")
        self.target = target
        self.draft = FragmentExecutor(model)
        self.skip = skip
        self.k = draft_tokens
        #: how the draft's layers were chosen (the coordinator's or the local calibration's plan)
        self.budget = budget
        self.stats = SpecStats()
        self._sessions: dict[str, _Session] = {}

    async def step(
        self,
        session: str,
        pos: int,
        tokens: list[int],
        max_tokens: int,
        sampling: SamplingParams,
        stop_ids: frozenset[int] = frozenset(),
    ) -> StepResult:
        if sampling.temperature > 0:
            raise ConfigError("--verify supports greedy decoding only (temperature 0) for now")
        st = self._sessions.setdefault(session, _Session())
        st.seq[pos:] = tokens
        if st.buffer:
            return StepResult(st.buffer.pop(0), (), 0.0)
        t0 = time.perf_counter()
        drafts = await self._draft(session, st, pos + len(tokens), max_tokens, stop_ids)
        t1 = time.perf_counter()
        result = await self.target.step(session, pos, tokens + drafts, max_tokens, sampling, stop_ids, verify=True)
        t2 = time.perf_counter()
        verified = list(result.tokens[len(tokens) - 1 :])
        out = accepted_prefix(drafts, verified)
        stop = next((i for i, t in enumerate(out) if t in stop_ids), None)
        out = out if stop is None else out[: stop + 1]
        s = self.stats
        s.rounds += 1
        s.drafted += len(drafts)
        s.accepted += len(out) - 1
        s.emitted += len(out)
        s.draft_ms += (t1 - t0) * 1000
        s.verify_ms += (t2 - t1) * 1000
        st.buffer = out[1:]
        return StepResult(out[0], result.timings, (t2 - t0) * 1000, result.events)

    async def _draft(
        self, session: str, st: _Session, known: int, max_tokens: int, stop_ids: frozenset[int]
    ) -> list[int]:
        """Up to ``k`` greedy tokens from the reduced model after the first ``known`` positions."""
        count = min(self.k, max_tokens - known)
        if count <= 0:
            return []
        greedy = SamplingParams()
        start = min(st.draft_len, known - 1)  # rewinds past rejected drafts; catches up on accepted ones
        feed = st.seq[start:known]
        drafts: list[int] = []
        while True:
            out = await self.draft.step(
                session, start, torch.tensor(feed, dtype=torch.int64), max_tokens, greedy, skip=self.skip, verify=True
            )
            start += len(feed)
            drafts.append(out.tokens[-1])
            if len(drafts) == count or drafts[-1] in stop_ids:
                break
            feed = [drafts[-1]]
        st.draft_len = start
        return drafts

    def summary(self) -> dict[str, Any]:
        """For the ``done`` event: the target's own figures (e.g. spot checks), and what the draft bought."""
        target = getattr(self.target, "summary", None)
        own = {**self._figures(self.stats), "draft_budget": self.budget}
        return {**(target() if callable(target) else {}), "speculative": own}

    def _figures(self, s: SpecStats) -> dict[str, Any]:
        return {
            "draft_tokens": self.k,
            "skipped_layers": sorted(self.skip),
            "rounds": s.rounds,
            "acceptance_rate": round(s.accepted / s.drafted, 4) if s.drafted else None,
            "passes_per_token": round(s.rounds / s.emitted, 4) if s.emitted else None,
            "draft_ms": round(s.draft_ms, 1),
            "verify_ms": round(s.verify_ms, 1),
        }

    def pending_rewind(self, session: str) -> int | None:
        """A failed spot check's position to regenerate from (the target's); this round's tokens not
        yet handed out go with it."""
        pending = getattr(self.target, "pending_rewind", None)
        rewind = pending(session) if pending is not None else None
        if rewind is not None and session in self._sessions:
            self._sessions[session].buffer.clear()
        return rewind

    async def settle(self, session: str) -> None:
        """Wait for the target's spot checks still running (see ``RemotePipeline.settle``)."""
        settle = getattr(self.target, "settle", None)
        if settle is not None:
            await settle(session)

    async def close_session(self, session: str) -> None:
        self._sessions.pop(session, None)
        self.draft.close_session(session)
        await self.target.close_session(session)

    async def shutdown(self) -> None:
        await self.draft.shutdown()
