"""Bad input gets a clear one-line error and crashes nothing (real coordinator and nodes)."""

from __future__ import annotations

import asyncio
import json
import struct
from collections.abc import Callable
from pathlib import Path

import pytest
import torch

from engine.cli import main
from engine.client.remote import RemotePipeline
from engine.errors import KlusterError, NoRouteError
from engine.launcher import LocalCluster
from engine.protocol import messages as wire
from engine.transport.peer import PeerManager
from engine.transport.signaling import SignalingClient

pytestmark = pytest.mark.slow


def _one_error_line(capsys: pytest.CaptureFixture[str]) -> str:
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1, err
    assert err[0].startswith("kluster: error: ")
    return err[0]


def test_unreachable_coordinator_is_one_line(capsys: pytest.CaptureFixture[str]) -> None:
    code = main(["generate", "--coordinator", "http://127.0.0.1:9", "--prompt", "hi"])
    assert code == 2
    assert "cannot reach the coordinator at http://127.0.0.1:9" in _one_error_line(capsys)


def test_bad_coordinator_url_is_one_line(capsys: pytest.CaptureFixture[str]) -> None:
    assert main(["generate", "--coordinator", "ftp://x", "--prompt", "hi"]) == 2
    assert "must start with http://" in _one_error_line(capsys)


def test_unknown_local_model_is_one_line(capsys: pytest.CaptureFixture[str], tmp_path: Path) -> None:
    assert main(["generate", "--local", "--model", "no-such-model", "--prompt", "x"]) == 2
    assert "unknown model 'no-such-model'" in _one_error_line(capsys)
    assert main(["generate", "--local", "--model", str(tmp_path), "--prompt", "x"]) == 2
    assert "not a Hugging Face model folder" in _one_error_line(capsys)


def test_unknown_model_on_the_grid_is_one_line(cluster3: LocalCluster, capsys: pytest.CaptureFixture[str]) -> None:
    assert main(["generate", "--coordinator", cluster3.url, "--model", "llama-9000", "--prompt", "x"]) == 2
    line = _one_error_line(capsys)
    assert "model 'llama-9000' is not served here" in line
    assert "smollm2-135m" in line


class _RawClient:
    """A client that sends hand-made bytes to a node and collects what comes back."""

    def __init__(self, url: str) -> None:
        self.signaling = SignalingClient(url, "client", "fuzzer")
        self.inbox: asyncio.Queue[wire.Message] = asyncio.Queue()
        self.peers: PeerManager | None = None
        self._task: asyncio.Task[None] | None = None

    async def start(self) -> None:
        await self.signaling.connect()
        self.peers = PeerManager(
            self.signaling.peer_id, self.signaling.send_signal, self._on_message, identity=self.signaling.identity
        )
        self.signaling.peers = self.peers
        self._task = asyncio.create_task(self.signaling.run())

    async def _on_message(self, _: str, data: bytes) -> None:
        await self.inbox.put(wire.decode(data))

    async def exchange(self, peer: str, data: bytes) -> wire.Message:
        assert self.peers is not None
        await self.peers.send(peer, data)
        return await asyncio.wait_for(self.inbox.get(), 20)

    async def close(self) -> None:
        if self.peers is not None:
            await self.peers.shutdown()
        await self.signaling.shutdown()
        if self._task is not None:
            await asyncio.gather(self._task, return_exceptions=True)


def _patch_header(data: bytes, **changes: object) -> bytes:
    """Rewrite fields of an encoded message's JSON header, keeping its payload."""
    prefix = struct.Struct("!2sBI")
    magic, version, n = prefix.unpack_from(data)
    header = json.loads(data[prefix.size : prefix.size + n])
    for key, value in changes.items():
        target = header
        *path, last = key.split("__")
        for p in path:
            target = target[p]
        target[last] = value
    head = json.dumps(header).encode()
    return prefix.pack(magic, version, len(head)) + head + data[prefix.size + n :]


def test_malformed_frames_get_typed_errors_and_the_node_keeps_serving(
    cluster3: LocalCluster, smollm2_dir: Path
) -> None:
    async def run() -> None:
        remote = RemotePipeline(cluster3.url, "smollm2-135m")
        raw = _RawClient(cluster3.url)
        try:
            route = await remote.start()
            await raw.start()
            assert raw.peers is not None
            first, second = route[0].peer_id, route[1].peer_id
            hops = tuple(wire.Hop(h.peer_id, h.start, h.end) for h in route)
            me = raw.peers.self_id

            def forward(hop: int, tensor: torch.Tensor, **kw: object) -> bytes:
                msg = wire.Forward("s-bad", 0, 0, hops, hop, me, wire.Sampling(), 64, (), tensor)
                return _patch_header(wire.encode(msg), **kw) if kw else wire.encode(msg)

            hidden = torch.zeros(2, 576)
            cases = {
                "garbage": (first, b"\x00\x01not a kluster message at all"),
                "wrong dtype": (second, forward(1, hidden, tensor__dtype="float64")),
                "huge shape": (second, forward(1, hidden, tensor__shape=[2**40, 576])),
                "negative shape": (second, forward(1, hidden, tensor__shape=[-2, 576])),
                "truncated payload": (second, forward(1, hidden)[:-100]),
                "NaN": (second, forward(1, torch.full((2, 576), float("nan")))),
                "wrong hidden size": (second, forward(1, torch.zeros(2, 100))),
                "token id out of vocab": (first, forward(0, torch.tensor([1, 10**9]))),
                "wrong layers for node": (
                    second,
                    forward(1, hidden, route=[{"peer": h.peer, "start": 0, "end": 1} for h in hops]),
                ),
                "unknown session mid-stream": (second, forward(1, hidden, pos=5)),
            }
            for name, (peer, data) in cases.items():
                reply = await raw.exchange(peer, data)
                assert isinstance(reply, wire.ErrorReply), name
                assert reply.code in ("bad_message", "bad_session", "session_lost"), (name, reply)
                assert reply.message and "\n" not in reply.message, name

            # Every node still serves a normal request.
            from engine.client.generation import GenerationRequest, generate_events
            from engine.models.tokenizer import ModelTokenizer

            tok = ModelTokenizer(smollm2_dir)
            req = GenerationRequest(tok.encode("The capital of France is"), 4)
            events = [ev async for ev in generate_events(remote, tok, req)]
            assert len(events[-1]["token_ids"]) == 4
        finally:
            await raw.close()
            await remote.shutdown()

    asyncio.run(run())
    for name, proc in cluster3.node_procs.items():
        assert proc.poll() is None, f"{name} died"


def test_node_gone_before_the_route_is_used(cluster_factory: Callable[[int], LocalCluster], smollm2_dir: Path) -> None:
    cluster = cluster_factory(3)

    async def run() -> str:
        from engine.client.generation import GenerationRequest, generate_events
        from engine.models.tokenizer import ModelTokenizer

        remote = RemotePipeline(cluster.url, "smollm2-135m", step_timeout_s=20, route_wait_s=3)
        try:
            route = await remote.start()
            victim = next(n for n, p in cluster.node_procs.items() if route[1].name == n)
            cluster.kill_node(victim)
            cluster.node_procs[victim].wait(10)
            tok = ModelTokenizer(smollm2_dir)
            loop = asyncio.get_running_loop()
            t0 = loop.time()
            with pytest.raises(KlusterError) as err:
                async for _ in generate_events(remote, tok, GenerationRequest(tok.encode("Hello"), 4)):
                    pass
            assert loop.time() - t0 < 15
            assert "\n" not in str(err.value)
            assert "left the grid" in str(err.value) and "layers 10-19" in str(err.value)
            # The coordinator no longer offers a route through the dead node.
            with pytest.raises(NoRouteError, match="layers 10-19"):
                await remote.signaling.http_json("/v1/route", {"model": "smollm2-135m"})
            return victim
        finally:
            await remote.shutdown()

    victim = asyncio.run(run())
    for name, proc in cluster.node_procs.items():
        assert name == victim or proc.poll() is None, f"{name} died with {victim}"
