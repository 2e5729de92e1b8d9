"""The distributed pipeline: a route of nodes, activations chained node to node over WebRTC.

The client sends each step's tokens to the first hop only; every hop forwards its output to the
next; the last hop samples and sends the token straight back here. One token therefore costs one
trip around the ring (client -> A -> B -> C -> client), never a star through the client.
"""

from __future__ import annotations

import asyncio
import contextlib
import hashlib
import logging
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch

from engine.client.generation import StepResult
from engine.errors import CoordinatorError, KlusterError, PeerError, error_for_code
from engine.models.sampling import SamplingParams
from engine.protocol import messages as wire
from engine.transport.peer import PeerManager
from engine.transport.signaling import SignalingClient

log = logging.getLogger(__name__)


@dataclass(frozen=True)
class RouteHop:
    peer_id: str
    name: str
    start: int
    end: int


class RemotePipeline:
    """A ``Pipeline`` whose steps run on a route of nodes found through the coordinator."""

    def __init__(self, coordinator: str, model_id: str, *, step_timeout_s: float = 60.0, name: str = "client") -> None:
        self.model_id = model_id
        self.step_timeout_s = step_timeout_s
        self.signaling = SignalingClient(coordinator, "client", name)
        self.peers: PeerManager | None = None
        self.route: list[RouteHop] = []
        self._pending: dict[tuple[str, int], asyncio.Future[wire.Token]] = {}
        self._steps: dict[str, int] = {}
        self._runner: asyncio.Task[None] | None = None

    async def start(self) -> list[RouteHop]:
        """Connect to the coordinator and get a route for the model."""
        await self.signaling.connect()
        self.peers = PeerManager(
            self.signaling.peer_id, self.signaling.send_signal, self._on_message, ice_servers=self.signaling.ice_servers
        )
        self.signaling.peers = self.peers
        self._runner = asyncio.create_task(self.signaling.run(), name="signaling")
        body = await self.signaling.http_json("/v1/route", {"model": self.model_id})
        try:
            self.route = [
                RouteHop(str(h["peer_id"]), str(h["name"]), int(h["start"]), int(h["end"])) for h in body["route"]
            ]
        except (KeyError, TypeError, ValueError):
            raise CoordinatorError("coordinator sent a malformed route") from None
        return self.route

    def route_event(self) -> dict[str, Any]:
        return {
            "event": "route",
            "model": self.model_id,
            "nodes": [{"name": h.name, "peer_id": h.peer_id, "layers": [h.start, h.end]} for h in self.route],
        }

    def name_of(self, peer_id: str) -> str:
        return next((h.name for h in self.route if h.peer_id == peer_id), peer_id)

    async def fetch_tokenizer(self, cache_dir: Path) -> Path:
        """Download the model's tokenizer files from the coordinator into a cache folder."""
        models = await self.signaling.http_json("/v1/models")
        entry = next((m for m in models.get("models", []) if m.get("model_id") == self.model_id), None)
        if entry is None:
            raise CoordinatorError(f"coordinator does not list model '{self.model_id}'")
        folder = cache_dir / "tokenizers" / self.model_id
        folder.mkdir(parents=True, exist_ok=True)
        for name, sha in dict(entry.get("tokenizer", {})).items():
            target = folder / name
            if target.is_file() and hashlib.sha256(target.read_bytes()).hexdigest() == sha:
                continue
            data = await self.signaling.http_bytes(f"/v1/models/{self.model_id}/tokenizer/{name}")
            if hashlib.sha256(data).hexdigest() != sha:
                raise CoordinatorError(f"tokenizer file {name} from the coordinator fails its sha256 check")
            target.write_bytes(data)
        return folder

    def _hops(self) -> tuple[wire.Hop, ...]:
        return tuple(wire.Hop(h.peer_id, h.start, h.end) for h in self.route)

    async def _on_message(self, sender: str, data: bytes) -> None:
        try:
            msg = wire.decode(data)
        except KlusterError as exc:
            log.warning("malformed message from %s: %s", sender, exc)
            return
        if isinstance(msg, wire.Token):
            fut = self._pending.get((msg.session, msg.step))
            if fut is not None and not fut.done():
                fut.set_result(msg)
        elif isinstance(msg, wire.ErrorReply):
            error = error_for_code(msg.code, f"node {self.name_of(msg.peer)}: {msg.message}")
            targets = [
                f
                for (s, st), f in self._pending.items()
                if msg.session is None or (s == msg.session and st == msg.step)
            ]
            for fut in targets:
                if not fut.done():
                    fut.set_exception(error)

    async def step(
        self, session: str, pos: int, tokens: list[int], max_tokens: int, sampling: SamplingParams
    ) -> StepResult:
        if self.peers is None or not self.route:
            raise CoordinatorError("pipeline not started")
        step = self._steps.get(session, 0)
        self._steps[session] = step + 1
        fut: asyncio.Future[wire.Token] = asyncio.get_running_loop().create_future()
        self._pending[(session, step)] = fut
        msg = wire.Forward(
            session,
            step,
            pos,
            self._hops(),
            0,
            self.peers.self_id,
            wire.Sampling(sampling.temperature, sampling.top_p, sampling.seed),
            max_tokens,
            (),
            torch.tensor(tokens, dtype=torch.int64),
        )
        t0 = time.perf_counter()
        try:
            await self.peers.send(self.route[0].peer_id, wire.encode(msg))
            token = await asyncio.wait_for(fut, self.step_timeout_s)
        except TimeoutError:
            raise PeerError(
                f"no token from the route within {self.step_timeout_s:.0f} s (a node stalled or died)"
            ) from None
        finally:
            self._pending.pop((session, step), None)
        return StepResult(token.token_id, token.timings, (time.perf_counter() - t0) * 1000)

    async def close_session(self, session: str) -> None:
        self._steps.pop(session, None)
        if self.peers is None or not self.route:
            return
        with contextlib.suppress(KlusterError):
            await self.peers.send(self.route[0].peer_id, wire.encode(wire.Close(session, self._hops(), 0)))

    async def shutdown(self) -> None:
        if self.peers is not None:
            await self.peers.shutdown()
        await self.signaling.shutdown()
        if self._runner is not None:
            self._runner.cancel()
            with contextlib.suppress(asyncio.CancelledError, Exception):
                await self._runner
