"""The coordinator's HTTP API as tools (TUI, tray app) read it, against real node processes."""

from __future__ import annotations

import asyncio
from typing import Any

import aiohttp
import pytest

from engine.launcher import LocalCluster
from engine.transport.signaling import get_json

pytestmark = pytest.mark.slow


def _get(url: str, params: dict[str, str] | None = None) -> Any:
    async def run() -> Any:
        async with aiohttp.ClientSession() as http:
            return await get_json(http, url, params)

    return asyncio.run(run())


def test_nodes_report_measured_capability(cluster3: LocalCluster) -> None:
    nodes = _get(cluster3.url + "/v1/nodes")["nodes"]
    assert sorted(n["name"] for n in nodes) == ["node-1", "node-2", "node-3"]
    for n in nodes:
        cap = n["capability"]
        assert cap["gpu"]["kind"] == "cpu"  # no NVIDIA driver on this machine
        assert "No NVIDIA GPU found" in cap["gpu"]["note"]
        assert cap["throughput"]["layers_per_s"] > 0  # measured at start, never claimed
        assert n["ready"] == 1 and n["online"] == 1


def test_models_list_fragments_hosts_and_tokenizer(cluster3: LocalCluster) -> None:
    models = _get(cluster3.url + "/v1/models")["models"]
    assert [m["model_id"] for m in models] == ["smollm2-135m"]
    frags = models[0]["fragments"]
    assert [(f["start"], f["end"]) for f in frags] == [(0, 10), (10, 20), (20, 30)]
    assert all(f["ready"] == 1 and len(f["hosts"]) == 1 for f in frags)
    assert set(models[0]["tokenizer"]) >= {"tokenizer.json", "tokenizer_config.json"}


def test_route_excludes_named_nodes(cluster3: LocalCluster) -> None:
    from engine.errors import NoRouteError

    route = _get(cluster3.url + "/v1/route", {"model": "smollm2-135m"})["route"]
    with pytest.raises(NoRouteError, match="no live node serves layers"):
        _get(cluster3.url + "/v1/route", {"model": "smollm2-135m", "exclude": route[1]["peer_id"]})


def test_private_route_keeps_embeddings_and_head_on_allowed_nodes(cluster3: LocalCluster) -> None:
    from engine.errors import ConfigError, NoRouteError

    url, model = cluster3.url + "/v1/route", {"model": "smollm2-135m"}
    route = _get(url, model)["route"]
    first, middle, last = route[0], route[1], route[2]
    # names or peer ids; the middle node (hidden states only) need not be allowed
    private = _get(url, {**model, "allow": f"{first['name']},{last['peer_id']}"})["route"]
    assert [h["peer_id"] for h in private] == [h["peer_id"] for h in route]
    with pytest.raises(NoRouteError, match="allowed nodes"):
        _get(url, {**model, "allow": f"{first['name']},{middle['name']}"})
    with pytest.raises(ConfigError, match="names no node"):
        _get(url, {**model, "allow": ""})


def test_generate_private_nodes_through_the_route(cluster3: LocalCluster, capsys: pytest.CaptureFixture[str]) -> None:
    import json

    from engine.cli import main

    route = _get(cluster3.url + "/v1/route", {"model": "smollm2-135m"})["route"]
    allowed = f"{route[0]['name']},{route[-1]['name']}"
    args = ["generate", "--coordinator", cluster3.url, "--prompt", "Hi", "--max-new-tokens", "4", "--json"]
    assert main([*args, "--private-nodes", allowed]) == 0
    done = [json.loads(line) for line in capsys.readouterr().out.splitlines() if line.strip()][-1]
    assert done["event"] == "done" and len(done["token_ids"]) == 4
    # a private job whose allowed nodes cannot hold both ends is refused with one line, not a traceback
    assert main([*args, "--private-nodes", route[0]["name"], "--route-wait", "1"]) == 2
    assert "allowed nodes" in capsys.readouterr().err
