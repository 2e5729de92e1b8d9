"""Spot checks on a real grid: a Byzantine node is caught, banned and unpaid, and the output stays honest.

A coordinator and two node processes serve the default model in two fragments; ``node-2`` runs
with ``--perturb 1.0`` (noise as large as the hidden state on everything it sends, or wrong
tokens as a last hop), so every route goes through it. A client generates with spot checks; once
the coordinator bans ``node-2``, an honest ``node-3`` joins and takes its fragment, the client fails
over, regenerates from where the output went wrong, and ends with exactly the tokens of a local
(honest) run. The same grid, now honest, then serves over 1,000 spot-checked steps without one
failed check. All processes, WebRTC links and the model are real.
"""

from __future__ import annotations

import asyncio
import json
import subprocess
import sys
from collections.abc import Callable
from pathlib import Path
from typing import Any

import aiohttp
import pytest

from engine.client.generation import GenerationRequest, generate_events
from engine.client.local import LocalPipeline
from engine.client.remote import RemotePipeline
from engine.launcher import LocalCluster
from engine.models.loading import load_model
from engine.models.sampling import SamplingParams
from engine.models.tokenizer import ModelTokenizer
from engine.transport.codec_eval import PROMPTS

pytestmark = pytest.mark.slow

MODEL = "smollm2-135m"
#: the Done-when figures of the verification work item
MAX_CHECKS_TO_DETECT = 20
HONEST_STEPS = 1000


async def _get(url: str, path: str, params: dict[str, str] | None = None) -> Any:
    async with aiohttp.ClientSession() as http, http.get(url + path, params=params) as resp:
        return await resp.json()


async def _events(
    pipeline: Any, tok: ModelTokenizer, prompt: str, tokens: int, *, stop: bool = True
) -> list[dict[str, Any]]:
    ids = tok.encode(tok.render_chat([{"role": "user", "content": prompt}]))
    request = GenerationRequest(ids, tokens, SamplingParams(), frozenset(tok.stop_ids) if stop else frozenset())
    return [ev async for ev in generate_events(pipeline, tok, request)]


@pytest.fixture(scope="module")
def grid(smollm2_pack2: Path, module_tmp: Callable[[str], Path]) -> Any:
    root = module_tmp("spot-check")
    byzantine = {"node-2": ["--perturb", "1.0"]}
    cluster = LocalCluster(smollm2_pack2, 2, cache_dir=root / "node-cache", log_dir=root / "logs", node_args=byzantine)
    cluster.start()
    try:
        asyncio.run(cluster.wait_for_route(MODEL, timeout_s=180))
        yield cluster
    finally:
        cluster.stop()


def test_byzantine_node_is_caught_banned_unpaid_and_the_output_is_the_honest_one(
    grid: LocalCluster, smollm2_dir: Path
) -> None:
    tok = ModelTokenizer(smollm2_dir)
    prompt = PROMPTS[0]

    async def honest() -> list[int]:
        local = LocalPipeline(load_model(smollm2_dir))
        try:
            return (await _events(local, tok, prompt, 32))[-1]["token_ids"]
        finally:
            await local.shutdown()

    async def run() -> tuple[list[dict[str, Any]], dict[str, Any], dict[str, Any]]:
        seen: dict[str, Any] = {}

        async def watch() -> None:  # once node-2 is banned, an honest node joins to take its fragment
            while True:
                health = await _get(grid.url, "/v1/health")
                if health["spot_checks"]["banned"]:
                    seen.update(health["spot_checks"])
                    grid.start_node("node-3")
                    return
                await asyncio.sleep(0.1)

        nodes = {n["name"]: n["peer_id"] for n in (await _get(grid.url, "/v1/nodes"))["nodes"]}
        pipeline = RemotePipeline(grid.url, MODEL, spot_check=0.5, route_wait_s=150)
        watcher = asyncio.create_task(watch())
        try:
            await pipeline.start()
            assert {h.name for h in pipeline.route} == {"node-1", "node-2"}  # the Byzantine node is routed
            events = await _events(pipeline, tok, prompt, 32)
        finally:
            await pipeline.shutdown()
            watcher.cancel()
        bad = await _get(grid.url, "/v1/earnings", {"account": nodes["node-2"]})
        good = await _get(grid.url, "/v1/earnings", {"account": nodes["node-1"]})
        return events, seen, {"bad": bad, "good": good, "nodes": nodes}

    expected = asyncio.run(honest())
    events, at_ban, ledger = asyncio.run(run())
    done = events[-1]
    assert done["event"] == "done"
    assert done["token_ids"] == expected  # the text equals the honest run
    kinds = [ev["event"] for ev in events]
    assert "spot_check" in kinds and "rewind" in kinds and "failover" in kinds
    spot = done["stats"]["spot_checks"]
    print(f"\nbyzantine node-2: coordinator at the ban {at_ban}; client {spot}")
    assert spot["guilty"] == ["node-2"] and spot["disputed"] == []
    # detected within the first checks: every audit the coordinator had made when it banned node-2
    # (one may pass first: as the last hop, node-2's output is tokens, and a check of the prefill
    # step covers no token of its yet)
    assert 1 <= at_ban["audits"] <= MAX_CHECKS_TO_DETECT and at_ban["failed"] >= 1
    # banned: its process was turned away with a one-line reason, and it earned nothing
    assert grid.node_procs["node-2"].wait(timeout=30) != 0
    assert "banned" in (grid.log_dir / "node-2.log").read_text()
    assert ledger["bad"]["total"]["amount"] == 0
    assert all(v["amount"] == 0 for v in ledger["bad"]["per_job"].values())
    assert ledger["good"]["total"]["amount"] > 0  # the honest node was paid for the same jobs


def test_honest_grid_passes_a_thousand_spot_checked_steps(grid: LocalCluster, smollm2_dir: Path) -> None:
    tok = ModelTokenizer(smollm2_dir)

    async def run() -> dict[str, Any]:
        for _ in range(900):  # (the banned node-2 is gone: LocalCluster.wait_for_route would say so)
            if "route" in await _get(grid.url, "/v1/route", {"model": MODEL}):
                break
            await asyncio.sleep(0.2)
        pipeline = RemotePipeline(grid.url, MODEL, spot_check=0.25, route_wait_s=60)
        try:
            await pipeline.start()
            assert "node-2" not in {h.name for h in pipeline.route}
            assert pipeline.spot is not None
            for i in range(30):
                await _events(pipeline, tok, PROMPTS[i % len(PROMPTS)], 160, stop=False)
                if pipeline.spot.stats.steps_verified >= HONEST_STEPS:
                    break
            return pipeline.spot.stats.to_dict()
        finally:
            await pipeline.shutdown()

    stats = asyncio.run(run())
    print(f"\nhonest grid, spot checks: {stats}")
    assert stats["steps_verified"] >= HONEST_STEPS, stats
    assert stats["failed"] == 0 and stats["guilty"] == [] and stats["disputed"] == [], stats
    assert stats["passed"] >= 10 and stats["errors"] == 0, stats


def test_cli_spot_checks_a_job_and_refuses_what_it_cannot_check(grid: LocalCluster) -> None:
    def kluster(*args: str) -> subprocess.CompletedProcess[str]:
        cmd = [sys.executable, "-m", "engine.cli", "generate", "--prompt", "hi", *args]
        return subprocess.run(cmd, capture_output=True, text=True, timeout=180)

    remote = ("--coordinator", grid.url)
    for args, message in (
        ((*remote, "--spot-check", "2"), "--spot-check must be a fraction"),
        (("--local", "--spot-check", "0.1"), "needs a grid"),
    ):
        res = kluster(*args)
        assert res.returncode != 0 and message in res.stderr and "Traceback" not in res.stderr, res.stderr
    res = kluster(*remote, "--spot-check", "1", "--json", "--max-new-tokens", "6")
    assert res.returncode == 0, res.stderr
    done = json.loads(res.stdout.strip().splitlines()[-1])
    spot = done["stats"]["spot_checks"]
    assert spot["requested"] >= 5 and spot["passed"] >= 1 and spot["failed"] == 0, spot
    assert spot["tokens_checked"] == spot["passed"], spot
    # sampled tokens are checked too (against the seeded race), honest ones pass
    sampled = ("--temperature", "0.9", "--seed", "7")
    res = kluster(*remote, "--spot-check", "1", "--json", "--max-new-tokens", "8", *sampled)
    assert res.returncode == 0, res.stderr
    spot = json.loads(res.stdout.strip().splitlines()[-1])["stats"]["spot_checks"]
    assert spot["passed"] >= 1 and spot["failed"] == 0 and spot["tokens_checked"] == spot["passed"], spot
    # self-speculative jobs: checks cover the drafts the route accepted, and the output stays the whole model's
    greedy = json.loads(kluster(*remote, "--json", "--max-new-tokens", "12").stdout.strip().splitlines()[-1])
    res = kluster(*remote, "--spot-check", "1", "--json", "--max-new-tokens", "12", "--activation", "0.8", "--verify")
    assert res.returncode == 0, res.stderr
    done = json.loads(res.stdout.strip().splitlines()[-1])
    spot = done["stats"]["spot_checks"]
    assert spot["passed"] >= 1 and spot["failed"] == 0 and spot["tokens_checked"] == spot["passed"], spot
    assert done["token_ids"] == greedy["token_ids"]
