"""Fixtures that start real coordinator and node processes on loopback."""

from __future__ import annotations

import asyncio
from collections.abc import Callable, Iterator
from pathlib import Path

import pytest

from engine.launcher import LocalCluster


def start_cluster(pack: Path, root: Path, nodes: int) -> LocalCluster:
    cluster = LocalCluster(pack, nodes, cache_dir=root / "node-cache", log_dir=root / "logs")
    cluster.start()
    try:
        asyncio.run(cluster.wait_for_route("smollm2-135m", timeout_s=180))
    except BaseException:
        cluster.stop()
        raise
    return cluster


@pytest.fixture(scope="module")
def cluster3(smollm2_pack3: Path, module_tmp: Callable[[str], Path]) -> Iterator[LocalCluster]:
    """A coordinator and 3 node processes serving the default model, shared by a test module."""
    cluster = start_cluster(smollm2_pack3, module_tmp("cluster3"), 3)
    try:
        yield cluster
    finally:
        cluster.stop()


@pytest.fixture
def cluster_factory(smollm2_pack3: Path, tmp_path: Path) -> Iterator[Callable[[int], LocalCluster]]:
    """Start private clusters (for tests that kill nodes); all are stopped at teardown."""
    started: list[LocalCluster] = []

    def make(nodes: int = 3) -> LocalCluster:
        cluster = start_cluster(smollm2_pack3, tmp_path / f"cluster{len(started)}", nodes)
        started.append(cluster)
        return cluster

    try:
        yield make
    finally:
        for cluster in started:
            cluster.stop()


@pytest.fixture
def start_cluster_from() -> Callable[[Path, Path, int], LocalCluster]:
    """``start_cluster`` for tests that need another pack (the caller stops the cluster)."""
    return start_cluster
