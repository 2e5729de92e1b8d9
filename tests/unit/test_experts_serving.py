"""Serving experts without a network: the node's handler, the trunk's exchange, the coordinator's board.

The real thing (4 node processes, WebRTC) is tests/integration/test_moe_grid.py; these pin the
edges it cannot reach cheaply: errors, timeouts, and the assignment policy.
"""

from __future__ import annotations

import asyncio
import math
import threading
from pathlib import Path
from typing import Any

import pytest
import torch

from engine.client.experts import ExpertGrid, ExpertTraffic
from engine.coordinator.experts import ExpertBoard, clean_stats
from engine.errors import ConfigError, PeerError, ProtocolError
from engine.fragments.experts import pack_moe_model
from engine.models.config import parse_config
from engine.models.moe import dispatch, route
from engine.models.moe_trunk import ExpertWeights
from engine.node.experts import ExpertHost
from engine.protocol import messages as wire
from engine.transport.signaling import SignalingClient

H, WIDTH, E = 16, 8, 8
CFG = parse_config(
    dict(
        model_type="mixtral",
        vocab_size=50,
        hidden_size=H,
        intermediate_size=WIDTH,
        num_hidden_layers=2,
        num_attention_heads=2,
        num_key_value_heads=1,
        num_local_experts=E,
        num_experts_per_tok=2,
    )
)


def _weights(pairs: list[tuple[int, int]]) -> ExpertWeights:
    gen = torch.Generator().manual_seed(0)
    return ExpertWeights(
        CFG,
        {p: (torch.randn(2 * WIDTH, H, generator=gen) / 4, torch.randn(H, WIDTH, generator=gen) / 3) for p in pairs},
    )


ALL = _weights([(layer, e) for layer in range(2) for e in range(E)])


# ------------------------------------------------------------------ the node's handler


def test_node_handler_answers_and_counts_what_arrived() -> None:
    host = ExpertHost(SignalingClient("http://127.0.0.1:1", "node", "n"), Path("/nonexistent"))
    host.weights = ExpertWeights(CFG, {p: w for p, w in ALL.weights.items() if p[1] in (2, 3)})
    rows = torch.randn(5, H)
    msg = wire.ExpertForward(4, 1, (2, 3), (3, 2), rows)
    reply = wire.decode(host.handle("c-1", "n-me", msg, 999))
    assert isinstance(reply, wire.ExpertResult) and reply.request == 4 and reply.tensor is not None
    assert torch.equal(reply.tensor, ALL.run(1, (2, 3), (3, 2), rows))
    bad = wire.decode(host.handle("c-1", "n-me", wire.ExpertForward(5, 1, (0,), (5,), rows), 10))
    assert isinstance(bad, wire.ErrorReply) and bad.step == 5 and bad.code == "bad_message"
    assert "does not hold expert 0 of layer 1" in bad.message and bad.peer == "n-me"
    # Counted on arrival, refused or not: the evidence is what reached the node.
    assert host.counters.snapshot() == {
        "bytes": 1009,
        "layers": {"1": {"messages": 2, "rows": {"0": 5, "2": 3, "3": 2}}},
    }


# ------------------------------------------------------------------ the trunk's exchange


class StubPeers:
    """Stands in for PeerManager: each send is answered (or not) at once by ``answer``."""

    def __init__(self, grid: ExpertGrid, answer: Any) -> None:
        self.grid, self.answer, self.sent = grid, answer, []

    async def send(self, peer: str, data: bytes) -> None:
        msg = wire.decode(data)
        self.sent.append((peer, msg))
        reply = self.answer(peer, msg)
        if reply is not None:
            await self.grid._on_message(peer, reply)


def _grid(answer: Any, timeout_s: float = 5.0) -> tuple[ExpertGrid, StubPeers]:
    grid = ExpertGrid("http://127.0.0.1:1", "tiny", timeout_s=timeout_s)
    grid._loop, grid._loop_thread = asyncio.get_running_loop(), threading.get_ident()
    peers = StubPeers(grid, answer)
    grid.peers = peers  # type: ignore[assignment]
    grid.owners = {(layer, e): "n-a" if e < 4 else "n-b" for layer in range(2) for e in range(E)}
    grid.names = {"n-a": "node-a", "n-b": "node-b"}
    grid.traffic = ExpertTraffic(H, 4, nodes=2)
    return grid, peers


def _compute(peer: str, msg: wire.ExpertForward) -> bytes:
    assert msg.tensor is not None
    out = ALL.run(msg.layer, msg.experts, msg.counts, msg.tensor)
    return wire.encode(wire.ExpertResult(msg.request, msg.layer, msg.experts, msg.counts, 0.1, out))


def _plan(rows: torch.Tensor, router: torch.Tensor) -> Any:
    indices, _ = route(router, rows, 2, renormalize=True, weights_fp32=True)
    return dispatch(indices, E)


async def test_exchange_sends_only_routed_rows_and_equals_local() -> None:
    grid, peers = _grid(_compute)
    rows = torch.randn(3, H, generator=torch.Generator().manual_seed(1))
    router = torch.zeros(E, H)
    router[1], router[2] = rows.sum(0), rows.sum(0) * 0.9  # every token picks experts 1 and 2: node-a only
    plan = _plan(rows, router)
    assert plan.experts == [1, 2]
    got = await asyncio.to_thread(grid.call, 0, plan, rows)
    want = ALL(0, plan, rows)
    assert all(torch.equal(a, b) for a, b in zip(got, want, strict=True))
    assert [(p, m.experts, m.counts) for p, m in peers.sent] == [("n-a", (1, 2), (3, 3))]  # node-b: nothing
    plan = _plan(rows, torch.randn(E, H, generator=torch.Generator().manual_seed(2)))
    got = await asyncio.to_thread(grid.call, 1, plan, rows)
    assert all(torch.equal(a, b) for a, b in zip(got, ALL(1, plan, rows), strict=True))
    assert grid.traffic is not None
    assert grid.traffic.rows_sent() == 12 and grid.traffic.token_rows == 6
    assert grid.traffic.summary()["sent_fraction_of_broadcast"] == 1.0  # k == M here: 2 of 2 nodes' worth


async def test_exchange_times_out_naming_the_node() -> None:
    grid, _ = _grid(lambda peer, msg: None if peer == "n-b" else _compute(peer, msg), timeout_s=0.2)
    rows = torch.randn(4, H)
    plan = _plan(rows, torch.randn(E, H, generator=torch.Generator().manual_seed(3)))
    assert any(e >= 4 for e in plan.experts)
    with pytest.raises(PeerError, match=r"expert node node-b did not answer for layer 0 within 0.2 s") as exc:
        await asyncio.to_thread(grid.call, 0, plan, rows)
    assert exc.value.peer_id == "n-b" and not grid._pending


async def test_exchange_raises_the_nodes_error() -> None:
    def refuse(peer: str, msg: wire.ExpertForward) -> bytes:
        return wire.encode(wire.ErrorReply("bad_message", "this node holds no experts yet", peer, step=msg.request))

    grid, _ = _grid(refuse)
    rows = torch.randn(2, H)
    plan = _plan(rows, torch.randn(E, H))
    with pytest.raises(ProtocolError, match=r"expert node node-[ab]: this node holds no experts yet"):
        await asyncio.to_thread(grid.call, 0, plan, rows)
    with pytest.raises(ConfigError, match="torch thread"):
        grid.call(0, plan, rows)  # on the event loop it would wait for itself


# ------------------------------------------------------------------ the coordinator's board


class FakeSocket:
    def __init__(self) -> None:
        self.sent: list[dict[str, Any]] = []

    async def send_json(self, data: dict[str, Any]) -> None:
        self.sent.append(data)


@pytest.fixture(scope="module")
def pack_dir(tmp_path_factory: pytest.TempPathFactory) -> Path:
    transformers = pytest.importorskip("transformers")
    root = tmp_path_factory.mktemp("board")
    config = transformers.MixtralConfig(
        vocab_size=50,
        hidden_size=16,
        intermediate_size=8,
        num_hidden_layers=2,
        num_attention_heads=2,
        num_key_value_heads=1,
        num_local_experts=6,
        num_experts_per_tok=2,
    )
    model = transformers.MixtralForCausalLM(config)
    with torch.no_grad():
        for p in model.parameters():
            p.copy_(torch.randn(p.shape) / math.sqrt(p.shape[-1]))
    model.save_pretrained(root / "model")
    pack_moe_model(root / "model", root / "pack", 3, model_id="tiny")
    return root / "pack"


async def test_board_fills_every_fragment_before_copies(pack_dir: Path) -> None:
    board = ExpertBoard()
    assert board.add_if_expert_pack(pack_dir) and not board.add_if_expert_pack(pack_dir / "missing")
    sockets = [FakeSocket() for _ in range(5)]
    got = [await board.node_joined(f"n-{i}", f"node-{i}", s, spare=False) for i, s in enumerate(sockets)]  # type: ignore[arg-type]
    assert got == [True, True, True, False, False]
    assert [s.sent[0]["manifest"]["index"] for s in sockets[:3]] == [0, 1, 2]
    assert sockets[0].sent[0]["files_url"] == "/v1/experts/tiny/files/"
    board.left("n-1")
    assert await board.node_joined("n-3", "node-3", sockets[3], spare=False)  # type: ignore[arg-type]
    assert sockets[3].sent[0]["manifest"]["index"] == 1
    assert await board.node_joined("n-4", "node-4", sockets[4], spare=True)  # type: ignore[arg-type]
    assert sockets[4].sent[0]["manifest"]["index"] == 0  # a second copy of the least-held one

    board.on_message("n-0", {"type": "experts_ready", "model_id": "tiny", "fragment": "experts-02-of-03"})
    assert board.describe_node("n-0") == {
        "model_id": "tiny",
        "fragment": "experts-00-of-03",
        "ready": False,  # ready for another fragment than assigned: ignored
        "received": {},
    }
    board.on_message("n-0", {"type": "experts_ready", "model_id": "tiny", "fragment": "experts-00-of-03"})
    board.on_message("n-0", {"type": "expert_stats", "fragment": "experts-00-of-03", "bytes": 7, "layers": {}})
    node = board.describe_node("n-0")
    assert node is not None and node["ready"] and node["received"] == {"bytes": 7, "layers": {}}
    board.on_message("n-2", {"type": "experts_failed", "message": "disk full"})
    assert board.describe_node("n-2") is None and board.describe_node("n-9") is None


def test_clean_stats_keeps_only_counters() -> None:
    raw = {
        "bytes": 10,
        "layers": {
            "0": {"messages": 2, "rows": {"1": 3, "x": 4, "2": -1, "3": True}},
            "y": {"messages": 1},
            "1": "junk",
        },
        "extra": 5,
    }
    assert clean_stats(raw) == {"bytes": 10, "layers": {"0": {"messages": 2, "rows": {"1": 3}}}}
    assert clean_stats({"layers": [], "bytes": "many"}) == {"bytes": 0, "layers": {}}
