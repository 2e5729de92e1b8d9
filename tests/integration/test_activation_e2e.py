"""Selective Activation through real node processes: budgets skip layers, empty hops leave the route,
and self-speculative verification keeps the whole model's greedy output.

The pack carries a made-up calibration whose least important layers are exactly node 2's span
(10-19), so a budget of 2/3 must leave that node out of the route; the output is then compared
with the same skip set run locally. Quality is not the point here (10 skipped layers ruin it;
``kluster bench sparsity`` measures quality), the mechanism is.
"""

from __future__ import annotations

import asyncio
import hashlib
import json
import sys
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import pytest

from engine.client.generation import GenerationRequest, generate_events
from engine.client.local import LocalPipeline
from engine.client.remote import RemotePipeline
from engine.client.speculative import SpeculativePipeline
from engine.launcher import LocalCluster
from engine.models.loading import load_model
from engine.models.sampling import SamplingParams
from engine.models.tokenizer import ModelTokenizer
from engine.sparsity.importance import Calibration, Importance, LayerImportance, write_calibration

pytestmark = pytest.mark.slow

NODE2 = frozenset(range(10, 20))


@pytest.fixture(scope="module")
def calibrated_pack(smollm2_dir: Path, module_tmp: Callable[[str], Path]) -> Path:
    from engine.fragments.pack import pack_model

    root = module_tmp("calibrated")
    layers = tuple(
        LayerImportance(i, bi, bi / 2, bi / 2)
        for i, bi in ((i, 0.01 if i in NODE2 else 0.5 + i / 100) for i in range(30))
    )
    sha = hashlib.sha256((smollm2_dir / "config.json").read_bytes()).hexdigest()
    cal = Calibration("smollm2-135m", 30, sha, 512, Importance("block_influence", "0" * 64, 512, layers))
    write_calibration(root / "calibration.json", cal)
    pack_model(
        smollm2_dir, root / "pack", 3, model_id="smollm2-135m", progress=False, calibration=root / "calibration.json"
    )
    return root / "pack"


@pytest.fixture(scope="module")
def cluster(calibrated_pack: Path, module_tmp: Callable[[str], Path]) -> Iterator[LocalCluster]:
    root = module_tmp("activation")
    c = LocalCluster(calibrated_pack, 3, cache_dir=root / "node-cache", log_dir=root / "logs")
    c.start()
    try:
        asyncio.run(c.wait_for_route("smollm2-135m", timeout_s=180))
        yield c
    finally:
        c.stop()


def _request(tok: ModelTokenizer, prompt: str, n: int = 24) -> GenerationRequest:
    return GenerationRequest(tok.encode(tok.render_chat([{"role": "user", "content": prompt}])), n, SamplingParams())


async def _done(pipeline: Any, tok: ModelTokenizer, request: GenerationRequest) -> dict[str, Any]:
    done: dict[str, Any] = {}
    async for ev in generate_events(pipeline, tok, request):
        if ev["event"] == "done":
            done = ev
    return done


def test_a_budget_skips_layers_and_an_empty_hop_leaves_the_route(cluster: LocalCluster, smollm2_dir: Path) -> None:
    tok = ModelTokenizer(smollm2_dir)
    model = load_model(smollm2_dir)
    request = _request(tok, "What is the capital of France?")

    async def run() -> tuple[list[tuple[int, int]], dict[str, Any], dict[str, Any]]:
        remote = RemotePipeline(cluster.url, "smollm2-135m", activation=0.67)
        try:
            route = [(h.start, h.end) for h in await remote.start()]
            got = await _done(remote, tok, request)
        finally:
            await remote.shutdown()
        local = LocalPipeline(model, skip=NODE2)
        try:
            want = await _done(local, tok, request)
        finally:
            await local.shutdown()
        return route, got, want

    route, got, want = asyncio.run(run())
    assert route == [(0, 10), (20, 30)]  # node 2's layers are all skipped: two hops, not three
    assert got["token_ids"] == want["token_ids"]
    budget = got["stats"]["activation"]
    assert budget["skip"] == sorted(NODE2) and budget["layers_run"] == 20 and budget["hops"] == 2
    assert budget["requested"] == 0.67 and abs(budget["activation"] - 2 / 3) < 1e-3


def test_verified_drafts_keep_the_whole_models_output(cluster: LocalCluster, smollm2_dir: Path) -> None:
    """Even with a bad draft (a third of the layers gone) the output is the whole model's: drafts are only proposals."""
    tok = ModelTokenizer(smollm2_dir)
    model = load_model(smollm2_dir)
    request = _request(tok, "Write a short poem about the sea.")

    async def run() -> tuple[dict[str, Any], dict[str, Any], list[tuple[int, int]]]:
        remote = RemotePipeline(cluster.url, "smollm2-135m")
        try:
            await remote.start()
            budget = await remote.budget_for(0.67)
            draft = await remote.fetch_model(cluster.cache_dir / "client")
            spec = SpeculativePipeline(remote, draft, frozenset(budget["skip"]), 3, budget=budget)
            got = await _done(spec, tok, request)
            route = [(h.start, h.end) for h in remote.route]
        finally:
            await remote.shutdown()
        local = LocalPipeline(model)
        try:
            want = await _done(local, tok, request)
        finally:
            await local.shutdown()
        return got, want, route

    got, want, route = asyncio.run(run())
    assert route == [(0, 10), (10, 20), (20, 30)]  # verification runs the whole model
    assert got["token_ids"] == want["token_ids"]
    figures = got["stats"]["speculative"]
    assert figures["rounds"] >= 1 and figures["draft_budget"]["skip"] == sorted(NODE2)
    assert figures["passes_per_token"] <= 1.0


def test_cli_refuses_impossible_budgets(cluster: LocalCluster) -> None:
    import subprocess

    def kluster(*args: str) -> subprocess.CompletedProcess[str]:
        cmd = [sys.executable, "-m", "engine.cli", "generate", "--coordinator", cluster.url, "--prompt", "hi", *args]
        return subprocess.run(cmd, capture_output=True, text=True, timeout=120)

    for args, message in (
        (["--activation", "0"], "--activation must be in (0, 1]"),
        (["--verify"], "give --activation below 1"),
        (["--activation", "0.8", "--verify", "--temperature", "0.7"], "greedy decoding only"),
    ):
        res = kluster(*args)
        assert res.returncode != 0 and message in res.stderr and "Traceback" not in res.stderr, res.stderr
    res = kluster("--activation", "0.67", "--json", "--max-new-tokens", "4")
    assert res.returncode == 0, res.stderr
    done = json.loads(res.stdout.strip().splitlines()[-1])
    assert done["stats"]["activation"]["hops"] == 2
