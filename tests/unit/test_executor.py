"""The fragment executor: session isolation, ordering, KV budget, input checks, compute off the loop."""

from __future__ import annotations

import asyncio
import threading
from collections.abc import AsyncIterator
from pathlib import Path
from typing import Any

import pytest
import torch

from engine.errors import CapacityError, ProtocolError, SessionError
from engine.fragments.executor import ExecutorConfig, FragmentExecutor
from engine.models.kv_cache import KVCache
from engine.models.llama import FragmentModel
from engine.models.loading import load_model
from engine.models.sampling import SamplingParams

VOCAB, HIDDEN = 101, 64


@pytest.fixture(scope="module")
def whole(tiny_model_dir: Path) -> FragmentModel:
    """The whole tiny model as one fragment (embeddings and head): each step yields a token."""
    return load_model(tiny_model_dir)


@pytest.fixture(scope="module")
def middle(tiny_model_dir: Path) -> FragmentModel:
    return load_model(tiny_model_dir, 2, 4)


@pytest.fixture
async def executor(whole: FragmentModel) -> AsyncIterator[FragmentExecutor]:
    ex = FragmentExecutor(whole)
    yield ex
    await ex.shutdown()


def ids(*tokens: int) -> torch.Tensor:
    return torch.tensor(tokens, dtype=torch.int64)


def bytes_per_session(model: FragmentModel, max_tokens: int) -> int:
    cfg = model.cfg
    return KVCache.bytes_for(model.num_layers, cfg.num_key_value_heads, cfg.head_dim, max_tokens, torch.float32)


async def generate(ex: FragmentExecutor, session: str, prompt: list[int], n: int, max_tokens: int = 32) -> list[int]:
    out = await ex.step(session, 0, ids(*prompt), max_tokens)
    tokens = [out.token_id]
    pos = len(prompt)
    for _ in range(n - 1):
        out = await ex.step(session, pos, ids(tokens[-1]), max_tokens)
        tokens.append(out.token_id)
        pos += 1
    return tokens


def reference_greedy(model: FragmentModel, prompt: list[int], n: int) -> list[int]:
    seq = list(prompt)
    for _ in range(n):
        logits = model(torch.tensor([seq]), 0)
        seq.append(int(logits[0, -1].argmax()))
    return seq[len(prompt) :]


PROMPT_A = [5, 17, 42, 8, 99, 3]
PROMPT_B = [60, 1, 2, 77]


async def test_greedy_steps_match_full_recompute(executor: FragmentExecutor, whole: FragmentModel) -> None:
    tokens = await generate(executor, "a", PROMPT_A, 8)
    assert tokens == reference_greedy(whole, PROMPT_A, 8)
    assert all(0 <= t < VOCAB for t in tokens)


async def test_interleaved_sessions_are_isolated(whole: FragmentModel) -> None:
    alone = FragmentExecutor(whole)
    try:
        ref_a = await generate(alone, "a", PROMPT_A, 6)
        ref_b = await generate(alone, "b", PROMPT_B, 6)
    finally:
        await alone.shutdown()
    assert ref_a != ref_b  # otherwise the isolation check below proves little

    ex = FragmentExecutor(whole)
    try:
        out_a = await ex.step("a", 0, ids(*PROMPT_A), 32)
        out_b = await ex.step("b", 0, ids(*PROMPT_B), 32)
        toks_a, toks_b = [out_a.token_id], [out_b.token_id]
        pos_a, pos_b = len(PROMPT_A), len(PROMPT_B)
        for _ in range(5):
            out_b = await ex.step("b", pos_b, ids(toks_b[-1]), 32)
            out_a = await ex.step("a", pos_a, ids(toks_a[-1]), 32)
            toks_a.append(out_a.token_id)
            toks_b.append(out_b.token_id)
            pos_a, pos_b = pos_a + 1, pos_b + 1
        assert ex.sessions == 2
    finally:
        await ex.shutdown()
    assert (toks_a, toks_b) == (ref_a, ref_b)


async def test_concurrent_sessions_are_isolated(whole: FragmentModel) -> None:
    alone = FragmentExecutor(whole)
    try:
        ref = [await generate(alone, f"s{i}", p, 5) for i, p in enumerate((PROMPT_A, PROMPT_B, [9, 9]))]
    finally:
        await alone.shutdown()
    ex = FragmentExecutor(whole)
    try:
        got = await asyncio.gather(*(generate(ex, f"s{i}", p, 5) for i, p in enumerate((PROMPT_A, PROMPT_B, [9, 9]))))
    finally:
        await ex.shutdown()
    assert list(got) == ref


async def test_seeded_sampling_is_reproducible(whole: FragmentModel) -> None:
    params = SamplingParams(temperature=1.5, top_p=0.95, seed=1234)

    async def run() -> list[int]:
        ex = FragmentExecutor(whole)
        try:
            out = await ex.step("s", 0, ids(*PROMPT_A), 32, params)
            tokens = [out.token_id]
            for i in range(7):
                out = await ex.step("s", len(PROMPT_A) + i, ids(tokens[-1]), 32, params)
                tokens.append(out.token_id)
            return tokens
        finally:
            await ex.shutdown()

    assert await run() == await run()


async def test_middle_fragment_returns_hidden_states(tiny_model_dir: Path, middle: FragmentModel) -> None:
    ex = FragmentExecutor(middle)
    try:
        x = torch.randn(5, HIDDEN, generator=torch.Generator().manual_seed(0))
        out = await ex.step("s", 0, x, 16)
        assert out.token_id is None and out.hidden is not None
        assert out.hidden.shape == (5, HIDDEN)
        assert torch.equal(out.hidden, middle(x.unsqueeze(0), 0)[0])
        assert out.compute_ms >= 0 and out.queue_ms >= 0
    finally:
        await ex.shutdown()


# ---------------------------------------------------------------- session order


async def test_wrong_position_is_refused(executor: FragmentExecutor) -> None:
    await executor.step("s", 0, ids(*PROMPT_A), 32)
    for pos in (0, len(PROMPT_A) - 1, len(PROMPT_A) + 1):
        with pytest.raises(SessionError, match=f"got position {pos}, expected {len(PROMPT_A)}"):
            await executor.step("s", pos, ids(1), 32)
    # The refused steps changed nothing: the right position still works.
    out = await executor.step("s", len(PROMPT_A), ids(1), 32)
    assert out.token_id is not None


async def test_unknown_session_not_at_zero(executor: FragmentExecutor) -> None:
    with pytest.raises(SessionError, match="unknown session ghost"):
        await executor.step("ghost", 3, ids(1), 32)
    assert executor.sessions == 0


async def test_closed_session_is_unknown(executor: FragmentExecutor) -> None:
    await executor.step("s", 0, ids(*PROMPT_A), 32)
    assert executor.close_session("s") is True
    assert executor.close_session("s") is False
    with pytest.raises(SessionError, match="unknown session"):
        await executor.step("s", len(PROMPT_A), ids(1), 32)


async def test_exceeding_max_tokens(executor: FragmentExecutor) -> None:
    await executor.step("s", 0, ids(1, 2, 3), 5)
    await executor.step("s", 3, ids(4), 5)
    with pytest.raises(SessionError, match="exceeds its declared 5 tokens"):
        await executor.step("s", 4, ids(5, 6), 5)
    await executor.step("s", 4, ids(5), 5)  # exactly at the limit is fine
    with pytest.raises(SessionError, match="5 tokens"):
        await executor.step("s", 5, ids(6), 5)


async def test_first_step_longer_than_max_tokens_does_not_keep_a_reservation(whole: FragmentModel) -> None:
    ex = FragmentExecutor(whole, ExecutorConfig(kv_budget_bytes=bytes_per_session(whole, 8)))
    try:
        with pytest.raises(SessionError, match="exceeds"):
            await ex.step("s", 0, ids(*range(10)), 8)
        # A refused request must not hold a share of the KV budget.
        assert ex.sessions == 0 and ex.reserved_bytes == 0
        out = await ex.step("t", 0, ids(1, 2), 8)
        assert out.token_id is not None
    finally:
        await ex.shutdown()


async def test_context_above_node_limit(whole: FragmentModel) -> None:
    ex = FragmentExecutor(whole, ExecutorConfig(max_context=64))
    try:
        with pytest.raises(SessionError, match="limit of 64"):
            await ex.step("s", 0, ids(1), 65)
        assert ex.sessions == 0
        await ex.step("s", 0, ids(1), 64)
    finally:
        await ex.shutdown()


# ---------------------------------------------------------------- KV budget


async def test_kv_budget_admits_one_session_then_frees_on_close(whole: FragmentModel) -> None:
    need = bytes_per_session(whole, 16)
    ex = FragmentExecutor(whole, ExecutorConfig(kv_budget_bytes=need + need // 2))
    try:
        await ex.step("a", 0, ids(*PROMPT_A), 16)
        assert ex.reserved_bytes == need
        with pytest.raises(CapacityError, match="full"):
            await ex.step("b", 0, ids(*PROMPT_B), 16)
        assert ex.sessions == 1
        # A smaller session still fits in what is left.
        await ex.step("small", 0, ids(1), 4)
        assert ex.close_session("small") and ex.close_session("a")
        assert ex.reserved_bytes == 0
        out = await ex.step("b", 0, ids(*PROMPT_B), 16)
        assert out.token_id is not None and ex.sessions == 1
    finally:
        await ex.shutdown()


async def test_kv_budget_exact_fit(whole: FragmentModel) -> None:
    need = bytes_per_session(whole, 16)
    ex = FragmentExecutor(whole, ExecutorConfig(kv_budget_bytes=need))
    try:
        await ex.step("a", 0, ids(1), 16)
        with pytest.raises(CapacityError, match="full"):
            await ex.step("b", 0, ids(1), 1)
    finally:
        await ex.shutdown()


async def test_idle_sessions_are_expired_to_make_room(whole: FragmentModel) -> None:
    need = bytes_per_session(whole, 16)
    ex = FragmentExecutor(whole, ExecutorConfig(kv_budget_bytes=need, session_idle_s=0.0))
    try:
        await ex.step("a", 0, ids(1), 16)
        await asyncio.sleep(0.01)
        await ex.step("b", 0, ids(1), 16)
        assert ex.sessions == 1
        with pytest.raises(SessionError, match="unknown session"):
            await ex.step("a", 1, ids(2), 16)
    finally:
        await ex.shutdown()


# ---------------------------------------------------------------- input checks


@pytest.mark.parametrize(
    "tensor",
    [
        torch.tensor([1.0, 2.0]),
        torch.tensor([1, 2], dtype=torch.int32),
        torch.tensor([[1, 2]]),
        torch.tensor(3),
        torch.tensor([], dtype=torch.int64),
        torch.tensor([1, VOCAB]),
        torch.tensor([1, -1]),
    ],
    ids=["float", "int32", "2d", "scalar", "empty", "id=vocab", "negative"],
)
def test_check_input_first_fragment(whole: FragmentModel, tensor: torch.Tensor) -> None:
    with pytest.raises(ProtocolError):
        FragmentExecutor(whole).check_input(tensor)


def test_check_input_accepts_good_ids(whole: FragmentModel) -> None:
    x = FragmentExecutor(whole).check_input(torch.tensor([0, VOCAB - 1]))
    assert x.shape == (1, 2) and x.dtype == torch.int64


@pytest.mark.parametrize(
    "tensor",
    [
        torch.zeros(3, HIDDEN + 1),
        torch.zeros(3, HIDDEN - 1),
        torch.zeros(HIDDEN),
        torch.zeros(1, 3, HIDDEN),
        torch.zeros(0, HIDDEN),
        torch.zeros(3, HIDDEN, dtype=torch.int64),
    ],
    ids=["wide", "narrow", "1d", "3d", "empty", "int"],
)
def test_check_input_middle_fragment(middle: FragmentModel, tensor: torch.Tensor) -> None:
    with pytest.raises(ProtocolError):
        FragmentExecutor(middle).check_input(tensor)


async def test_bad_input_opens_no_session(executor: FragmentExecutor) -> None:
    with pytest.raises(ProtocolError):
        await executor.step("s", 0, torch.tensor([1.0]), 32)
    assert executor.sessions == 0


# ---------------------------------------------------------------- off the loop


async def test_steps_compute_off_the_event_loop(whole: FragmentModel, monkeypatch: pytest.MonkeyPatch) -> None:
    loop_thread = threading.get_ident()
    started, released = threading.Event(), threading.Event()
    threads: list[int] = []
    waited: list[bool] = []
    forward = whole.forward

    def blocking_forward(*args: Any, **kwargs: Any) -> torch.Tensor:
        # Waits for a task on the loop: if the step ran on the loop's thread, this would time out.
        threads.append(threading.get_ident())
        started.set()
        waited.append(released.wait(timeout=5))
        return forward(*args, **kwargs)

    monkeypatch.setattr(whole, "forward", blocking_forward)
    ex = FragmentExecutor(whole)
    try:
        step = asyncio.create_task(ex.step("s", 0, ids(*PROMPT_A), 32))
        while not started.is_set() and not step.done():
            await asyncio.sleep(0.001)
        released.set()
        out = await step
    finally:
        await ex.shutdown()
    assert len(threads) == 1 and threads[0] != loop_thread
    assert waited == [True]
    assert out.token_id is not None


async def test_chunked_replay_rebuilds_the_exact_session_state(whole: FragmentModel, middle: FragmentModel) -> None:
    """A failover replays a session's steps in one message; the result must be bit-identical."""
    prompt, n = [5, 17, 3, 99, 42], 6
    ex = FragmentExecutor(whole)
    stepwise = await generate(ex, "live", prompt, n)
    fed = prompt + stepwise[:-1]
    chunks = (len(prompt),) + (1,) * (n - 1)
    replayed = await ex.step("replay", 0, ids(*fed), 32, None, chunks)
    assert replayed.token_id == stepwise[-1]
    # The caches now agree exactly: the next step gives bit-identical logits on both sessions.
    nxt = await ex.step("live", len(fed), ids(stepwise[-1]), 32)
    again = await ex.step("replay", len(fed), ids(stepwise[-1]), 32)
    assert nxt.token_id == again.token_id
    live, replay = ex._sessions["live"].cache, ex._sessions["replay"].cache
    assert live.length == replay.length == len(fed) + 1
    for layer in range(whole.num_layers):
        assert torch.equal(live._keys[layer][:, :, : live.length], replay._keys[layer][:, :, : replay.length])
        assert torch.equal(live._values[layer][:, :, : live.length], replay._values[layer][:, :, : replay.length])

    # A middle fragment returns the hidden states of every replayed position, as step by step.
    mid = FragmentExecutor(middle)
    x = torch.randn(len(fed), HIDDEN, generator=torch.Generator().manual_seed(0))
    parts, pos = [], 0
    for size in chunks:
        parts.append((await mid.step("a", pos, x[pos : pos + size], 32)).hidden)
        pos += size
    whole_replay = (await mid.step("b", 0, x, 32, None, chunks)).hidden
    assert torch.equal(torch.cat(parts, 0), whole_replay)
    with pytest.raises(ProtocolError, match="do not add up"):
        await mid.step("c", 0, x, 32, None, (1, 2))


async def test_warm_up_leaves_no_session_behind(whole: FragmentModel, middle: FragmentModel) -> None:
    for model in (whole, middle):
        ex = FragmentExecutor(model)
        ex.warm_up()
        assert ex.sessions == 0
        assert ex.reserved_bytes == 0


async def test_lost_session_is_its_own_error(executor: FragmentExecutor) -> None:
    """Only a session the node no longer holds is replayable elsewhere; a context overrun is not."""
    from engine.errors import SessionLostError, error_for_code

    with pytest.raises(SessionLostError):
        await executor.step("never-opened", 3, ids(1), 32)
    with pytest.raises(SessionError) as overrun:
        await executor.step("long", 0, ids(*range(10)), 8)
    assert not isinstance(overrun.value, SessionLostError)
    assert isinstance(error_for_code("session_lost", "x"), SessionLostError)


async def test_verify_step_returns_every_positions_greedy_token_and_rewinds(
    executor: FragmentExecutor, whole: FragmentModel
) -> None:
    """A verify step: the greedy token after each position; a later one may restart before the cache's end."""
    want = reference_greedy(whole, PROMPT_A, 4)
    out = await executor.step("v", 0, ids(*PROMPT_A), 32, verify=True)
    assert out.tokens[-1] == want[0] and len(out.tokens) == len(PROMPT_A)
    wrong = (want[1] + 1) % VOCAB
    out = await executor.step("v", len(PROMPT_A), ids(want[0], wrong, 7), 32, verify=True)
    assert out.tokens[0] == want[1]  # after want[0]: the drafted `wrong` is rejected
    # rewind over the rejected draft and the token after it: the cache forgets them
    out = await executor.step("v", len(PROMPT_A) + 1, ids(want[1], want[2]), 32, verify=True)
    assert list(out.tokens) == want[2:4]
    with pytest.raises(SessionError, match="expected"):  # a plain step may not rewind
        await executor.step("v", len(PROMPT_A), ids(want[0]), 32)


async def test_skipped_layers_are_fixed_per_session(whole: FragmentModel) -> None:
    ex = FragmentExecutor(whole)
    try:
        skipped = await ex.step("s", 0, ids(*PROMPT_A), 32, skip=frozenset({1}))
        dense = await ex.step("d", 0, ids(*PROMPT_A), 32)
        logits = whole(torch.tensor([PROMPT_A]), 0, skip=frozenset({1}))
        assert skipped.token_id == int(logits[0, -1].argmax())
        assert dense.token_id == reference_greedy(whole, PROMPT_A, 1)[0]
        with pytest.raises(ProtocolError, match="skipped layers"):
            await ex.step("s", len(PROMPT_A), ids(3), 32)
    finally:
        await ex.shutdown()
