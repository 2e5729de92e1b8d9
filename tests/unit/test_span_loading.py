"""A node's span: several fragments loaded as one model, entered part-way by a route (tiny real model)."""

from __future__ import annotations

import asyncio
from pathlib import Path

import pytest
import torch

from engine.errors import FragmentError, ProtocolError
from engine.fragments.executor import FragmentExecutor
from engine.fragments.pack import pack_model
from engine.fragments.store import load_fragment, load_span
from engine.models.llama import FragmentModel
from engine.models.loading import load_model

MODEL_ID = "tiny-llama"


@pytest.fixture(scope="module")
def pack6(tiny_model_dir: Path, tmp_path_factory: pytest.TempPathFactory) -> Path:
    """The tiny 6-layer model in 6 one-layer fragments (layer-level placement units)."""
    out = tmp_path_factory.mktemp("pack6")
    pack_model(tiny_model_dir, out, 6, model_id=MODEL_ID, progress=False)
    return out


def frags(root: Path, a: int, b: int) -> list[Path]:
    return [root / f"frag-{i:02d}-of-06" for i in range(a, b)]


def test_span_of_fragments_equals_the_same_layers_loaded_whole(pack6: Path, tiny_model_dir: Path) -> None:
    manifests, span = load_span(frags(pack6, 0, 4))
    assert [m.index for m in manifests] == [0, 1, 2, 3]
    assert (span.start, span.end, span.has_embed, span.has_head) == (0, 4, True, False)
    _, tail = load_span(frags(pack6, 4, 6))
    assert (tail.start, tail.end, tail.has_embed, tail.has_head) == (4, 6, False, True)
    ids = torch.randint(0, 101, (1, 9), generator=torch.Generator().manual_seed(3))
    got = tail(span(ids, 0), 0, all_logits=True)
    assert torch.equal(got, load_model(tiny_model_dir)(ids, 0, all_logits=True))


def test_single_fragment_loads_as_before(pack6: Path) -> None:
    manifest, model = load_fragment(frags(pack6, 2, 3)[0])
    assert (manifest.index, model.start, model.end) == (2, 2, 3)


def test_span_must_be_consecutive_fragments(pack6: Path) -> None:
    with pytest.raises(FragmentError, match="does not continue"):
        load_span([*frags(pack6, 0, 2), *frags(pack6, 3, 4)])
    with pytest.raises(FragmentError, match="at least one"):
        load_span([])


def test_span_refuses_a_corrupt_fragment(pack6: Path, tmp_path: Path) -> None:
    import shutil

    copy = tmp_path / "pack"
    shutil.copytree(pack6, copy)
    weights = frags(copy, 1, 2)[0] / "weights.safetensors"
    data = bytearray(weights.read_bytes())
    data[-1] ^= 0xFF
    weights.write_bytes(bytes(data))
    with pytest.raises(FragmentError, match="sha256"):
        load_span(frags(copy, 0, 3))


@pytest.fixture(scope="module")
def whole(tiny_model_dir: Path) -> FragmentModel:
    return load_model(tiny_model_dir)


def test_model_entered_part_way_skips_embeddings_and_earlier_layers(whole: FragmentModel, tiny_model_dir: Path) -> None:
    ids = torch.randint(0, 101, (1, 7), generator=torch.Generator().manual_seed(1))
    hidden = load_model(tiny_model_dir, 0, 2)(ids, 0)
    assert torch.equal(whole(hidden, 0, all_logits=True, first=2), whole(ids, 0, all_logits=True))


def test_executor_runs_a_session_from_a_later_layer(whole: FragmentModel, tiny_model_dir: Path) -> None:
    """A route entering the node's span at layer 3 gives the same tokens as the whole model from layer 0."""
    head_start = load_model(tiny_model_dir, 0, 3)

    async def run() -> tuple[list[int], list[int]]:
        ex = FragmentExecutor(whole)
        try:
            want, got = [], []
            prompt = torch.tensor([5, 17, 42, 8], dtype=torch.int64)
            cache = head_start.new_cache(16)
            out = await ex.step("from-0", 0, prompt, 16)
            want.append(out.token_id)
            out = await ex.step("from-3", 0, head_start(prompt.unsqueeze(0), 0, cache)[0], 16, first=3)
            got.append(out.token_id)
            pos = 4
            for _ in range(5):
                out = await ex.step("from-0", pos, torch.tensor([want[-1]]), 16)
                want.append(out.token_id)
                hidden = head_start(torch.tensor([[got[-1]]]), pos, cache)[0]
                out = await ex.step("from-3", pos, hidden, 16, first=3)
                got.append(out.token_id)
                pos += 1
            return want, got
        finally:
            await ex.shutdown()

    want, got = asyncio.run(run())
    assert got == want


def test_executor_refuses_a_session_changing_its_entry_layer(whole: FragmentModel) -> None:
    ex = FragmentExecutor(whole)
    hidden = torch.zeros(2, whole.cfg.hidden_size)
    ex.step_sync("s", 0, hidden, 16, first=2)
    with pytest.raises(ProtocolError, match="entered at layer 2"):
        ex.step_sync("s", 2, hidden[:1], 16, first=3)
    with pytest.raises(ProtocolError, match="outside this node's layers"):
        ex.step_sync("t", 0, hidden, 16, first=6)
    with pytest.raises(ProtocolError, match="hidden states"):
        ex.step_sync("u", 0, torch.tensor([1, 2]), 16, first=1)  # token ids where hidden states belong
