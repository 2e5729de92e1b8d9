"""Chaos: kill -9 a node of the route mid-generation; the output must not change.

Four real node processes serve the model in two fragments, so every span has a replica. At token
5 a routed node is SIGKILLed; the client learns it from the coordinator, takes a route through
the replica, replays the session's exact step sequence there in one message, and goes on. The
tokens must equal a run without the fault (greedy and seeded sampling), and the stall must stay
under 3 s on loopback.
"""

from __future__ import annotations

import asyncio
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

import pytest

from engine.client.generation import GenerationRequest, generate_events
from engine.client.local import LocalPipeline
from engine.client.remote import RemotePipeline
from engine.fragments import torch_thread
from engine.launcher import LocalCluster
from engine.models.loading import load_model
from engine.models.sampling import SamplingParams
from engine.models.tokenizer import ModelTokenizer

pytestmark = pytest.mark.slow

PROMPT = "Tell me about the history of Rome."
KILL_AT = 5
TOKENS = 64


async def _collect(
    pipeline: Any, tok: ModelTokenizer, request: GenerationRequest, on_token: Callable[[int], None]
) -> tuple[list[dict[str, Any]], dict[int, float]]:
    events, arrivals = [], {}
    async for ev in generate_events(pipeline, tok, request):
        events.append(ev)
        if ev["event"] == "token":
            arrivals[ev["index"]] = time.monotonic()
            on_token(ev["index"])
    return events, arrivals


@pytest.mark.parametrize(
    ("victim_hop", "sampling"),
    [(0, SamplingParams()), (1, SamplingParams()), (1, SamplingParams(temperature=0.9, top_p=0.95, seed=7))],
    ids=["first-hop-greedy", "head-hop-greedy", "head-hop-sampled"],
)
def test_kill_routed_node_mid_generation_keeps_output(
    smollm2_pack2: Path,
    smollm2_dir: Path,
    tmp_path: Path,
    start_cluster_from: Callable[[Path, Path, int], LocalCluster],
    victim_hop: int,
    sampling: SamplingParams,
) -> None:
    tok = ModelTokenizer(smollm2_dir)
    prompt = tok.encode(tok.render_chat([{"role": "user", "content": PROMPT}]))
    request = GenerationRequest(prompt, TOKENS, sampling)  # no stop ids: all 64 tokens compared

    async def reference() -> list[int]:
        local = LocalPipeline(await torch_thread.run(load_model, smollm2_dir))
        events, _ = await _collect(local, tok, request, lambda _: None)
        return list(events[-1]["token_ids"])

    want = asyncio.run(reference())
    cluster = start_cluster_from(smollm2_pack2, tmp_path, 4)
    try:
        killed: dict[str, Any] = {}

        async def faulty() -> tuple[list[dict[str, Any]], dict[int, float], list[str]]:
            remote = RemotePipeline(cluster.url, "smollm2-135m", step_timeout_s=30)
            try:
                route = await remote.start()
                assert len(route) == 2
                victim = route[victim_hop].name

                def on_token(index: int) -> None:
                    if index == KILL_AT and not killed:
                        cluster.kill_node(victim)
                        killed.update(name=victim, at=time.monotonic())

                events, arrivals = await _collect(remote, tok, request, on_token)
                return events, arrivals, [h.name for h in remote.route]
            finally:
                await remote.shutdown()

        events, arrivals, final_route = asyncio.run(faulty())
    finally:
        cluster.stop()

    done = events[-1]
    assert done["token_ids"] == want, "output changed by the failover"
    failovers = [e for e in events if e["event"] == "failover"]
    assert len(failovers) == 1
    assert failovers[0]["failed_node"] == killed["name"]
    assert killed["name"] not in final_route
    stall = arrivals[KILL_AT + 1] - killed["at"]
    print(f"failover stall {stall:.3f} s, event {failovers[0]}")
    assert stall <= 3.0


def test_sigterm_drains_a_routed_node_without_failing_any_request(
    smollm2_pack2: Path,
    smollm2_dir: Path,
    tmp_path: Path,
    start_cluster_from: Callable[[Path, Path, int], LocalCluster],
) -> None:
    """A node asked to leave finishes its live session, takes no new one, then exits."""
    import signal

    tok = ModelTokenizer(smollm2_dir)
    request = GenerationRequest(tok.encode(tok.render_chat([{"role": "user", "content": PROMPT}])), 40)
    cluster = start_cluster_from(smollm2_pack2, tmp_path, 4)
    try:
        drained: dict[str, Any] = {}

        async def run() -> tuple[list[dict[str, Any]], list[dict[str, Any]], list[str]]:
            remote = RemotePipeline(cluster.url, "smollm2-135m", step_timeout_s=30)
            try:
                route = await remote.start()
                victim = route[0].name

                def on_token(index: int) -> None:
                    if index == KILL_AT and not drained:
                        cluster.kill_node(victim, signal.SIGTERM)
                        drained["name"] = victim

                during, _ = await _collect(remote, tok, request, on_token)
                # The live session finished on the draining node; it now exits by itself.
                await asyncio.to_thread(cluster.node_procs[victim].wait, 20)
                after, _ = await _collect(remote, tok, request, lambda _: None)
                return during, after, [h.name for h in remote.route]
            finally:
                await remote.shutdown()

        during, after, final_route = asyncio.run(run())
    finally:
        cluster.stop()
    assert not [e for e in during if e["event"] == "failover"], "the live session should finish where it was"
    assert during[-1]["token_ids"] == after[-1]["token_ids"]
    assert len(during[-1]["token_ids"]) == 40
    assert cluster.node_procs[drained["name"]].returncode == 0
    assert drained["name"] not in final_route
