"""The local reference path: the whole model as one fragment in this process.

It goes through the same ``FragmentExecutor`` and sampling as a node does, so it differs from
the distributed route only by the network.
"""

from __future__ import annotations

import time

import torch

from engine.client.generation import StepResult
from engine.fragments.executor import ExecutorConfig, FragmentExecutor
from engine.models.llama import FragmentModel
from engine.models.sampling import SamplingParams
from engine.protocol.messages import HopTiming


class LocalPipeline:
    """A ``Pipeline`` over an in-process model."""

    def __init__(self, model: FragmentModel, config: ExecutorConfig | None = None) -> None:
        if not (model.has_embed and model.has_head):
            raise ValueError("the local pipeline needs the whole model")
        self.executor = FragmentExecutor(model, config)

    async def step(
        self,
        session: str,
        pos: int,
        tokens: list[int],
        max_tokens: int,
        sampling: SamplingParams,
        stop_ids: frozenset[int] = frozenset(),
    ) -> StepResult:
        t0 = time.perf_counter()
        out = await self.executor.step(session, pos, torch.tensor(tokens, dtype=torch.int64), max_tokens, sampling)
        if out.token_id is None:
            raise RuntimeError("whole-model step returned no token")
        timing = HopTiming("local", out.queue_ms, out.compute_ms)
        return StepResult(out.token_id, (timing,), (time.perf_counter() - t0) * 1000)

    async def close_session(self, session: str) -> None:
        self.executor.close_session(session)

    async def shutdown(self) -> None:
        await self.executor.shutdown()
