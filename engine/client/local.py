"""The local reference path: the whole model as one fragment in this process.

It goes through the same ``FragmentExecutor`` and sampling as a node does, so it differs from
the distributed route only by the network.
"""

from __future__ import annotations

import time
from typing import Any

import torch

from engine.client.generation import StepResult
from engine.fragments.executor import ExecutorConfig, FragmentExecutor
from engine.models.llama import FragmentModel
from engine.models.sampling import SamplingParams
from engine.protocol.messages import HopTiming


class LocalPipeline:
    """A ``Pipeline`` over an in-process model."""

    def __init__(
        self,
        model: FragmentModel,
        config: ExecutorConfig | None = None,
        *,
        skip: frozenset[int] = frozenset(),
        budget: dict[str, Any] | None = None,
    ) -> None:
        if not (model.has_embed and model.has_head):
            raise ValueError("the local pipeline needs the whole model")
        self.model = model
        self.executor = FragmentExecutor(model, config)
        #: layers an activation budget leaves out (Selective Activation), and the plan they came from
        self.skip = skip
        self.budget = budget

    def summary(self) -> dict[str, Any]:
        return {"activation": self.budget} if self.budget else {}

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
    ) -> StepResult:
        t0 = time.perf_counter()
        ids = torch.tensor(tokens, dtype=torch.int64)
        out = await self.executor.step(session, pos, ids, max_tokens, sampling, skip=self.skip, verify=verify)
        if out.token_id is None:
            raise RuntimeError("whole-model step returned no token")
        timing = HopTiming("local", out.queue_ms, out.compute_ms)
        return StepResult(out.token_id, (timing,), (time.perf_counter() - t0) * 1000, tokens=out.tokens)

    async def close_session(self, session: str) -> None:
        self.executor.close_session(session)

    async def shutdown(self) -> None:
        await self.executor.shutdown()
