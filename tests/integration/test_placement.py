"""Placement by measured throughput and memory, with real node processes of three speeds.

The default model is packed into 30 one-layer fragments (layer-level placement). Three nodes run
the same hardware but ``--throttle`` 1, 3 and 9 (they really sleep, in the benchmark and in
serving) and offer three memory sizes; the slowest claims a speed far above the fastest. The
coordinator must place spans by what the nodes MEASURED: the plan is the span planner's on the
measured figures (claims left out), faster nodes get more fragments, none more than its memory
holds, and the liar is left alone with no more layers than its measured share. Generation
through the resulting route must equal the local model token for token, and again after the middle node
is killed and the coordinator re-places the model on the two left.
"""

from __future__ import annotations

import asyncio
import math
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

import aiohttp
import pytest

from engine.client.generation import GenerationRequest, generate_events
from engine.client.local import LocalPipeline
from engine.client.remote import RemotePipeline
from engine.fragments import torch_thread
from engine.fragments.pack import pack_model
from engine.fragments.store import read_pack
from engine.launcher import LocalCluster
from engine.models.config import load_config
from engine.models.loading import load_model
from engine.models.tokenizer import ModelTokenizer
from engine.scheduler.capacity import NodeCapacity
from engine.scheduler.placement import memory_for_units, node_capacity, pack_layout, place
from engine.transport.signaling import get_json

pytestmark = pytest.mark.slow

MODEL = "smollm2-135m"
CLAIM = 100_000.0  # layers/s: far above what any node here measures
#: name -> (throttle, fragments its memory holds)
NODES = {"fast": (1.0, 26), "mid": (3.0, 14), "slow": (9.0, 8)}


@pytest.fixture(scope="module")
def pack30(smollm2_dir: Path, module_tmp: Callable[[str], Path]) -> Path:
    out = module_tmp("pack30")
    pack_model(smollm2_dir, out, 30, model_id=MODEL, progress=False)
    return out


async def _nodes(url: str) -> list[dict[str, Any]]:
    async with aiohttp.ClientSession() as http:
        return list((await get_json(http, url + "/v1/nodes"))["nodes"])


async def _settled(url: str, count: int, timeout_s: float = 120.0) -> list[dict[str, Any]]:
    """The ``count`` nodes once every one serves what it was assigned and every fragment is served."""
    deadline = time.monotonic() + timeout_s
    while True:
        nodes = await _nodes(url)
        covered = {u for n in nodes if n["fragments"] for u in range(*n["fragments"])}
        placed = all(n["ready"] and n["fragments"] == n["assigned_fragments"] for n in nodes)
        if len(nodes) == count and placed and covered == set(range(30)):
            return nodes
        if time.monotonic() > deadline:
            raise AssertionError(f"placement did not settle: {nodes}")
        await asyncio.sleep(0.5)


def _hosts(plan: dict[str, tuple[int, int]], unit: int) -> list[str]:
    return sorted(peer for peer, (a, b) in plan.items() if a <= unit < b)


async def _tokens(pipeline: Any, tok: ModelTokenizer, request: GenerationRequest) -> list[int]:
    events = [ev async for ev in generate_events(pipeline, tok, request)]
    return list(events[-1]["token_ids"])


def test_spans_follow_measured_throughput_and_memory_not_claims(
    pack30: Path, smollm2_dir: Path, tmp_path: Path
) -> None:
    pack = read_pack(pack30)
    layout = pack_layout(MODEL, pack.manifests, load_config(pack.fragment_dir(0)))
    memory_mb = {name: math.ceil(memory_for_units(layout, units) / 2**20) for name, (_, units) in NODES.items()}
    args = {
        name: ["--throttle", str(throttle), "--memory-mb", str(memory_mb[name])]
        for name, (throttle, _) in NODES.items()
    }
    args["slow"] += ["--claim-layers-per-s", str(CLAIM)]
    # The coordinator waits for every node's measurement (8 s of quiet), so one plan places all three.
    cluster = LocalCluster(
        pack30,
        0,
        cache_dir=tmp_path / "cache",
        log_dir=tmp_path / "logs",
        node_threads=1,
        benchmark_s=2.0,
        node_args=args,
        coordinator_args=("--placement-settle", "8"),
    )
    tok = ModelTokenizer(smollm2_dir)
    request = GenerationRequest(tok.encode(tok.render_chat([{"role": "user", "content": "Name a colour."}])), 12)

    async def generate() -> list[int]:
        remote = RemotePipeline(cluster.url, MODEL, step_timeout_s=60)
        try:
            await remote.start()
            return await _tokens(remote, tok, request)
        finally:
            await remote.shutdown()

    async def run() -> tuple[list[dict[str, Any]], list[list[int]], list[int], list[Any], list[dict[str, Any]]]:
        route = (await cluster.wait_for_route(MODEL, timeout_s=240))["route"]
        assert isinstance(route, list)
        nodes = await _settled(cluster.url, len(NODES))
        got = [await generate()]
        local = LocalPipeline(await torch_thread.run(load_model, smollm2_dir))
        try:
            want = await _tokens(local, tok, request)
        finally:
            await local.shutdown()
        # A node leaves: the two left re-place the model between them (their memory holds 34 fragments).
        cluster.kill_node("mid")
        await asyncio.to_thread(cluster.node_procs["mid"].wait, 10)
        after = await _settled(cluster.url, 2)
        got.append(await generate())
        async with aiohttp.ClientSession() as http:
            hops = (await get_json(http, cluster.url + "/v1/route", {"model": MODEL}))["route"]
        print("route after mid left:", [(h["name"], h["start"], h["end"]) for h in hops])
        return nodes, got, want, route, after

    cluster.start_coordinator()
    try:
        for name in NODES:
            cluster.start_node(name)
        nodes, got, want, route, after = asyncio.run(run())
    finally:
        cluster.stop()

    by_name = {n["name"]: n for n in nodes}
    length = {name: n["fragments"][1] - n["fragments"][0] for name, n in by_name.items()}
    speed = {name: n["measured_layers_per_s"] for name, n in by_name.items()}
    print(
        "placement: "
        + ", ".join(
            f"{name} fragments {n['fragments'][0]}-{n['fragments'][1] - 1} ({length[name]}) at "
            f"{speed[name]:.0f} layers/s measured, memory for {NODES[name][1]}"
            for name, n in sorted(by_name.items(), key=lambda kv: kv[1]["fragments"])
        )
    )
    print("route:", [(h["name"], h["start"], h["end"]) for h in route])

    # The claim is recorded, and never used: the plan is the planner's on the measured figures alone.
    assert by_name["slow"]["claimed_layers_per_s"] == CLAIM
    assert 10 * speed["slow"] <= CLAIM

    def capacities(claimed: bool) -> list[NodeCapacity]:
        return [
            node_capacity(
                n["peer_id"],
                layout,
                layers_per_s=CLAIM if claimed and n["name"] == "slow" else n["measured_layers_per_s"],
                offered_bytes=n["memory_offered_bytes"],
            )
            for n in nodes
        ]

    plan = {n["peer_id"]: tuple(n["fragments"]) for n in nodes}
    assert plan == place(layout, capacities(False), {})

    # Faster measured nodes hold more fragments, none more than its memory holds.
    assert speed["fast"] > speed["mid"] > speed["slow"]
    assert length["fast"] > length["mid"]
    assert length["fast"] > length["slow"]
    for name, (_, units) in NODES.items():
        assert length[name] <= units
    # Every fragment is served; the liar alone serves no more of them than its measured share,
    # far fewer than believing its claim would have given it.
    slow_id = by_name["slow"]["peer_id"]
    assert all(_hosts(plan, u) for u in range(30))
    alone = sum(1 for u in range(30) if _hosts(plan, u) == [slow_id])
    assert alone <= math.ceil(30 * speed["slow"] / sum(speed.values()))
    believed = place(layout, capacities(True), {})
    assert sum(1 for u in range(30) if _hosts(believed, u) == [slow_id]) > alone

    assert got[0] == want, "output through the placed route differs from the local model"
    print("after mid left:", sorted((n["name"], *n["fragments"]) for n in after))
    assert sorted(n["name"] for n in after) == ["fast", "slow"]
    covered = [u for n in after for u in range(*n["fragments"])]
    assert set(covered) == set(range(30))
    assert got[1] == want, "output after the re-placement differs from the local model"
