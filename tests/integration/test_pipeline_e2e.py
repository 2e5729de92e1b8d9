"""End to end: the real default model split over 3 real node processes, WebRTC between them.

Greedy (and seeded sampled) generation through the route must be token-identical to the local
reference path, which runs the same model code in this process.
"""

from __future__ import annotations

import asyncio
from pathlib import Path

import aiohttp
import pytest

from engine.client.generation import GenerationRequest, generate_events
from engine.client.local import LocalPipeline
from engine.client.remote import RemotePipeline
from engine.launcher import LocalCluster
from engine.models.loading import load_model
from engine.models.sampling import SamplingParams
from engine.models.tokenizer import ModelTokenizer

pytestmark = pytest.mark.slow

PROMPTS = [
    "What is the capital of France?",
    "Write a short poem about the sea.",
    "Explain what a GPU is in one paragraph.",
    "List three fruits and their colours.",
    "How do I reverse a list in Python?",
]


async def _tokens(pipeline: object, request: GenerationRequest, tokenizer: ModelTokenizer) -> list[int]:
    done: dict[str, object] = {}
    async for ev in generate_events(pipeline, tokenizer, request):  # type: ignore[arg-type]
        if ev["event"] == "done":
            done = ev
    return list(done["token_ids"])  # type: ignore[arg-type]


def _requests(tokenizer: ModelTokenizer, sampling: SamplingParams, n: int = 48) -> list[GenerationRequest]:
    # No stop ids: every prompt runs the full 48 tokens, so the comparison covers all of them.
    return [
        GenerationRequest(tokenizer.encode(tokenizer.render_chat([{"role": "user", "content": p}])), n, sampling)
        for p in PROMPTS
    ]


def _compare(cluster: LocalCluster, model_dir: Path, sampling: SamplingParams, prompts: int) -> None:
    tokenizer = ModelTokenizer(model_dir)
    requests = _requests(tokenizer, sampling)[:prompts]

    async def run() -> tuple[list[list[int]], list[list[int]]]:
        local = LocalPipeline(await asyncio.to_thread(load_model, model_dir))
        remote = RemotePipeline(cluster.url, "smollm2-135m")
        try:
            await remote.start()
            assert [(h.start, h.end) for h in remote.route] == [(0, 10), (10, 20), (20, 30)]
            assert len({h.peer_id for h in remote.route}) == 3
            want = [await _tokens(local, r, tokenizer) for r in requests]
            got = [await _tokens(remote, r, tokenizer) for r in requests]
            return want, got
        finally:
            await remote.shutdown()
            await local.shutdown()

    want, got = asyncio.run(run())
    for prompt, w, g in zip(PROMPTS, want, got, strict=False):
        assert len(w) == 48
        assert g == w, f"distributed output differs from local for {prompt!r}"


def test_three_nodes_greedy_token_identical_to_local(cluster3: LocalCluster, smollm2_dir: Path) -> None:
    _compare(cluster3, smollm2_dir, SamplingParams(), prompts=5)


def test_three_nodes_seeded_sampling_identical_to_local(cluster3: LocalCluster, smollm2_dir: Path) -> None:
    _compare(cluster3, smollm2_dir, SamplingParams(temperature=0.8, top_p=0.95, seed=1234), prompts=2)


def test_sessions_on_one_route_do_not_interfere(cluster3: LocalCluster, smollm2_dir: Path) -> None:
    """Two generations interleaved on the same nodes give the same tokens as each alone."""
    tokenizer = ModelTokenizer(smollm2_dir)
    a, b = _requests(tokenizer, SamplingParams(), n=16)[:2]

    async def run() -> tuple[list[int], list[int], list[int], list[int]]:
        remote = RemotePipeline(cluster3.url, "smollm2-135m")
        try:
            await remote.start()
            alone_a = await _tokens(remote, a, tokenizer)
            alone_b = await _tokens(remote, b, tokenizer)
            both = await asyncio.gather(_tokens(remote, a, tokenizer), _tokens(remote, b, tokenizer))
            return alone_a, alone_b, both[0], both[1]
        finally:
            await remote.shutdown()

    alone_a, alone_b, both_a, both_b = asyncio.run(run())
    assert both_a == alone_a
    assert both_b == alone_b
    assert alone_a != alone_b


def test_chat_answer_through_route_mentions_paris(cluster3: LocalCluster, smollm2_dir: Path) -> None:
    tokenizer = ModelTokenizer(smollm2_dir)
    prompt = tokenizer.render_chat([{"role": "user", "content": "What is the capital of France?"}])
    request = GenerationRequest(tokenizer.encode(prompt), 24, SamplingParams(), tokenizer.stop_ids)

    async def run() -> list[int]:
        remote = RemotePipeline(cluster3.url, "smollm2-135m")
        try:
            await remote.start()
            return await _tokens(remote, request, tokenizer)
        finally:
            await remote.shutdown()

    ids = asyncio.run(run())
    assert "Paris" in tokenizer.decode(ids)
    assert ids[-1] in tokenizer.stop_ids


def _local_with_codec(
    folder: Path, spans: list[tuple[int, int]], prompt: list[int], n: int, name: str, sampling: SamplingParams
) -> list[int]:
    """What the route computes, in this process: the same executors, the codec at each boundary."""
    import torch

    from engine.fragments import torch_thread
    from engine.fragments.executor import FragmentExecutor
    from engine.protocol import codec

    def run() -> list[int]:
        executors = [FragmentExecutor(load_model(folder, a, b)) for a, b in spans]
        feed, pos, out = torch.tensor(prompt, dtype=torch.int64), 0, []
        for _ in range(n):
            x = feed
            for ex in executors:
                res = ex.step_sync("s", pos, x, len(prompt) + n + 1, sampling)
                if res.token_id is None:
                    x = codec.decode(*codec.encode(res.hidden, name))
            out.append(int(res.token_id))
            pos += feed.shape[0]
            feed = torch.tensor([res.token_id], dtype=torch.int64)
        return out

    return torch_thread.call(run)


def test_int8_activations_through_the_route_match_int8_locally(cluster3: LocalCluster, smollm2_dir: Path) -> None:
    """Per-job codec: every hop decodes, computes and re-encodes; the route equals its local replica.

    Seeded sampling on a prompt where int8 changes the output (checked below), so the test would
    fail if the route ignored the codec and sent fp32.
    """
    tokenizer = ModelTokenizer(smollm2_dir)
    sampling = SamplingParams(temperature=1.0, top_p=1.0, seed=3)
    request = _requests(tokenizer, sampling, n=24)[2]

    async def run() -> tuple[list[int], list[tuple[int, int]]]:
        remote = RemotePipeline(cluster3.url, "smollm2-135m", codec="int8")
        try:
            await remote.start()
            spans = [(h.start, h.end) for h in remote.route]
            return await _tokens(remote, request, tokenizer), spans
        finally:
            await remote.shutdown()

    ids, spans = asyncio.run(run())
    assert len(spans) == 3
    local_int8 = _local_with_codec(smollm2_dir, spans, request.prompt_ids, len(ids), "int8", sampling)
    local_fp32 = _local_with_codec(smollm2_dir, spans, request.prompt_ids, len(ids), "fp32", sampling)
    assert local_int8 != local_fp32  # the codec matters for this prompt and seed
    assert ids == local_int8


def test_decode_steps_travel_as_small_step_frames(cluster3: LocalCluster, smollm2_dir: Path) -> None:
    """After the first step, each hop's per-session header is not resent: int8 steps cost ~658 bytes.

    The nodes report what they framed (every 5 s) and the coordinator shows it in /v1/nodes; the
    counters are cumulative, so the check is on the change over one 24-token int8 generation.
    """
    tokenizer = ModelTokenizer(smollm2_dir)
    request = _requests(tokenizer, SamplingParams(), n=24)[0]

    async def frames_sent() -> dict[str, dict[str, int]]:
        async with aiohttp.ClientSession() as http, http.get(f"{cluster.url}/v1/nodes") as resp:
            return {n["peer_id"]: n["frames_sent"] for n in (await resp.json())["nodes"]}

    cluster = cluster3

    async def run() -> tuple[list[str], dict[str, dict[str, int]], dict[str, dict[str, int]]]:
        remote = RemotePipeline(cluster.url, "smollm2-135m", codec="int8")
        try:
            route = [h.peer_id for h in await remote.start()]
            await asyncio.sleep(6)  # one report interval: counters from earlier tests have arrived
            before = await frames_sent()
            assert len(await _tokens(remote, request, tokenizer)) == 24
            for _ in range(60):
                await asyncio.sleep(0.5)
                after = await frames_sent()
                if all(after[p].get("step", 0) - before[p].get("step", 0) >= 22 for p in route):
                    break
            return route, before, after
        finally:
            await remote.shutdown()

    route, before, after = asyncio.run(run())
    for peer in route[:2]:  # hops that send hidden states: 23 decode steps after the prefill
        steps = after[peer]["step"] - before[peer]["step"]
        full = after[peer]["full"] - before[peer]["full"]
        per_step = (after[peer]["step_bytes"] - before[peer]["step_bytes"]) / steps
        assert steps >= 22 and full <= 2, (peer, steps, full)
        assert 642 < per_step <= 642 + 24, per_step  # int8 payload (576 codes + side data) + a small header
    last = route[2]  # the ring: sampled token ids back to the first hop
    assert after[last]["step"] - before[last]["step"] >= 22


def test_one_node_route_runs_its_ring_through_itself(
    smollm2_dir: Path, session_root: Path, start_cluster_from: object
) -> None:
    """A lone node holding the whole model: ring mode hands each next step back to itself."""
    from engine.fragments.pack import pack_model

    pack = session_root / "pack1"
    if not pack.exists():
        pack_model(smollm2_dir, pack, 1, model_id="smollm2-135m", progress=False)
    cluster = start_cluster_from(pack, session_root / "one-node", 1)  # type: ignore[operator]
    try:
        tokenizer = ModelTokenizer(smollm2_dir)
        request = _requests(tokenizer, SamplingParams(), n=24)[0]

        async def run() -> tuple[list[int], list[int]]:
            local = LocalPipeline(await asyncio.to_thread(load_model, smollm2_dir))
            remote = RemotePipeline(cluster.url, "smollm2-135m")
            try:
                await remote.start()
                assert [(h.start, h.end) for h in remote.route] == [(0, 30)]
                kinds: list[str] = []
                got: list[int] = []
                async for ev in generate_events(remote, tokenizer, request):
                    kinds.append(ev["event"])
                    if ev["event"] == "done":
                        got = list(ev["token_ids"])
                # without the loopback the ring's second step stalls until a failover replays it
                assert "failover" not in kinds
                return await _tokens(local, request, tokenizer), got
            finally:
                await remote.shutdown()
                await local.shutdown()

        want, got = asyncio.run(run())
        assert len(want) == 24
        assert got == want
    finally:
        cluster.stop()
