"""The same fragment code on CUDA in bf16/fp16 (skipped without CUDA: CI and dev boxes have none)."""

from __future__ import annotations

import asyncio
from pathlib import Path

import pytest
import torch

from engine.fragments.executor import FragmentExecutor
from engine.fragments.pack import pack_model
from engine.fragments.store import load_fragment
from engine.models.loading import load_model
from engine.models.sampling import SamplingParams

pytestmark = [
    pytest.mark.gpu,
    pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA GPU"),
]


@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16])
def test_cuda_logits_close_to_cpu_fp32(smollm2_dir: Path, dtype: torch.dtype) -> None:
    ids = torch.tensor([[1, 504, 3458, 282, 4649, 314, 253, 1345, 30]])
    ref = load_model(smollm2_dir)(ids, 0, all_logits=True)
    gpu = load_model(smollm2_dir, dtype=dtype, device="cuda")(ids.cuda(), 0, all_logits=True).cpu()
    assert torch.equal(gpu.argmax(-1), ref.argmax(-1))
    assert (gpu - ref).abs().max().item() < 0.5


def test_cuda_fragment_chain_matches_whole_model(smollm2_dir: Path, tmp_path: Path) -> None:
    pack_model(smollm2_dir, tmp_path, 3, model_id="smollm2-135m", progress=False)
    frags = [load_fragment(d, dtype=torch.bfloat16, device="cuda")[1] for d in sorted(tmp_path.glob("frag-*"))]
    whole = load_model(smollm2_dir, dtype=torch.bfloat16, device="cuda")
    ids = torch.tensor([[1, 504, 3458, 282, 4649]], device="cuda")
    x: torch.Tensor = ids
    for f in frags:
        x = f(x, 0, all_logits=True)
    assert torch.equal(x, whole(ids, 0, all_logits=True))


def test_cuda_executor_decodes(smollm2_dir: Path) -> None:
    ex = FragmentExecutor(load_model(smollm2_dir, dtype=torch.bfloat16, device="cuda"))

    async def run() -> list[int]:
        out, pos, feed = [], 0, torch.tensor([1, 504, 3458, 282])
        for _ in range(8):
            step = await ex.step("s", pos, feed.cuda(), 64, SamplingParams())
            pos += feed.numel()
            assert step.token_id is not None
            out.append(step.token_id)
            feed = torch.tensor([step.token_id])
        return out

    assert len(asyncio.run(run())) == 8
