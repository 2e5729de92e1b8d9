"""Nodes survive losing the coordinator: they reconnect, keep their fragments, and serve again."""

from __future__ import annotations

import asyncio
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

import aiohttp
import pytest

from engine.client.generation import GenerationRequest, generate_events
from engine.client.remote import RemotePipeline
from engine.launcher import LocalCluster
from engine.models.tokenizer import ModelTokenizer
from engine.transport.signaling import get_json

pytestmark = pytest.mark.slow


async def _tokens(url: str, tok: ModelTokenizer) -> list[int]:
    remote = RemotePipeline(url, "smollm2-135m", step_timeout_s=30)
    try:
        await remote.start()
        request = GenerationRequest(tok.encode("The three primary colours are"), 12)
        events = [ev async for ev in generate_events(remote, tok, request)]
        return list(events[-1]["token_ids"])
    finally:
        await remote.shutdown()


def test_coordinator_restart_nodes_come_back_with_their_fragments(
    cluster_factory: Callable[[int], LocalCluster], smollm2_dir: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setenv("KLUSTER_LOGLEVEL", "INFO")  # the check below reads the coordinator's log
    cluster = cluster_factory(3)
    tok = ModelTokenizer(smollm2_dir)
    before = asyncio.run(_tokens(cluster.url, tok))
    pids = {n: p.pid for n, p in cluster.node_procs.items()}

    cluster.restart_coordinator()
    started = time.monotonic()

    async def wait_and_generate() -> tuple[list[int], list[dict[str, Any]]]:
        route = await cluster.wait_for_route("smollm2-135m", timeout_s=60)
        async with aiohttp.ClientSession() as http:
            nodes = (await get_json(http, cluster.url + "/v1/nodes"))["nodes"]
        assert len(route["route"]) == 3  # type: ignore[arg-type]
        return await _tokens(cluster.url, tok), nodes

    after, nodes = asyncio.run(wait_and_generate())
    back_after = time.monotonic() - started
    assert after == before
    assert sorted(n["name"] for n in nodes) == ["node-1", "node-2", "node-3"]
    assert {n: p.pid for n, p in cluster.node_procs.items()} == pids  # same processes, no restart
    assert all(p.poll() is None for p in cluster.node_procs.values())
    assert back_after < 30, back_after
    # Nodes did not download or load again: each log says it still hosts its fragment.
    log = (cluster.log_dir / "coordinator.log").read_text().split("coordinator listening")[-1]  # the new one
    assert log.count("still hosts smollm2-135m fragment") == 3
    assert "assigning" not in log  # nobody was given a fragment to fetch and load again
