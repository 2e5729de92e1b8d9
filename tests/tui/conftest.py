"""A real grid for the TUI's functional tests: a coordinator and 4 node processes on loopback.

The default model in 2 fragments on 4 nodes gives every fragment two ready copies, so a routed
node can be killed mid-job and the job still completes (as in tests/integration/test_failover.py).
One grid serves the whole module: starting nodes is what costs time on a 2-core machine.
"""

from __future__ import annotations

import asyncio
import time
from collections.abc import Callable, Iterator
from pathlib import Path

import aiohttp
import pytest

from engine.launcher import LocalCluster

MODEL = "smollm2-135m"


async def _wait_for_replicas(url: str, copies: int, timeout_s: float) -> None:
    """Until every fragment has ``copies`` ready hosts (placement and loading take a few seconds)."""
    deadline = time.monotonic() + timeout_s
    async with aiohttp.ClientSession(timeout=aiohttp.ClientTimeout(total=10)) as http:
        while True:
            async with http.get(url + "/v1/models") as resp:
                body = await resp.json()
            frags = [f for m in body["models"] for f in m["fragments"]]
            if frags and all(f["ready"] >= copies for f in frags):
                return
            if time.monotonic() > deadline:
                raise TimeoutError(f"fragments never reached {copies} ready copies: {frags}")
            await asyncio.sleep(0.2)


@pytest.fixture(scope="module")
def tui_cluster(smollm2_pack2: Path, module_tmp: Callable[[str], Path]) -> Iterator[LocalCluster]:
    root = module_tmp("tui-cluster")
    cluster = LocalCluster(smollm2_pack2, 4, cache_dir=root / "node-cache", log_dir=root / "logs")
    try:
        cluster.start()
        asyncio.run(cluster.wait_for_route(MODEL, timeout_s=180))
        asyncio.run(_wait_for_replicas(cluster.url, 2, timeout_s=120))
        yield cluster
    finally:
        cluster.stop()
