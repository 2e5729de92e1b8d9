"""The distributed pipeline: a route of nodes, activations chained node to node over WebRTC.

The client sends the prompt to the first hop only; every hop forwards its output to the next;
the last hop samples, sends the token here and (ring mode, the default) also feeds it straight
back to the first hop for the next step, until the token budget or a stop token ends the ring.
One token therefore costs the sum of one-way hop delays around A -> B -> C -> A plus compute:
the client is not in the per-token loop, and no activation ever makes a star through it.
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


@dataclass
class _SessionState:
    """Where a session stands: the next step, and how far the ring will run without being asked."""

    next_step: int = 0
    next_pos: int = 0
    last_token: int = -1
    last_arrival: float = 0.0
    #: steps the route will still compute by itself (0: the next step must be sent)
    ring_left: int = 0


class RemotePipeline:
    """A ``Pipeline`` whose steps run on a route of nodes found through the coordinator."""

    def __init__(
        self, coordinator: str, model_id: str, *, step_timeout_s: float = 60.0, name: str = "client", ring: bool = True
    ) -> None:
        self.model_id = model_id
        #: let the route feed each sampled token back to its first hop by itself (one hop fewer per token)
        self.ring = ring
        self.step_timeout_s = step_timeout_s
        self.signaling = SignalingClient(coordinator, "client", name)
        self.peers: PeerManager | None = None
        self.route: list[RouteHop] = []
        self._pending: dict[tuple[str, int], asyncio.Future[wire.Token]] = {}
        self._arrived: dict[tuple[str, int], tuple[wire.Token | KlusterError, float]] = {}
        self._sessions: dict[str, _SessionState] = {}
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

    def _deliver(self, key: tuple[str, int], outcome: wire.Token | KlusterError) -> None:
        """Hand a step's outcome to its waiter, or keep it until ``step`` asks (the ring runs ahead)."""
        fut = self._pending.get(key)
        if fut is not None and not fut.done():
            if isinstance(outcome, KlusterError):
                fut.set_exception(outcome)
            else:
                fut.set_result(outcome)
        elif key[0] in self._sessions:
            self._arrived[key] = (outcome, time.perf_counter())

    async def _on_message(self, sender: str, data: bytes) -> None:
        try:
            msg = wire.decode(data)
        except KlusterError as exc:
            log.warning("malformed message from %s: %s", sender, exc)
            return
        if isinstance(msg, wire.Token):
            self._deliver((msg.session, msg.step), msg)
        elif isinstance(msg, wire.ErrorReply):
            error = error_for_code(msg.code, f"node {self.name_of(msg.peer)}: {msg.message}")
            if msg.session is not None and msg.step is not None:
                self._deliver((msg.session, msg.step), error)
            else:
                for key in list(self._pending):
                    self._deliver(key, error)

    async def step(
        self,
        session: str,
        pos: int,
        tokens: list[int],
        max_tokens: int,
        sampling: SamplingParams,
        stop_ids: frozenset[int] = frozenset(),
    ) -> StepResult:
        """Next token for ``session``; in ring mode most steps only wait for what the route already computes."""
        if self.peers is None or not self.route:
            raise CoordinatorError("pipeline not started")
        state = self._sessions.setdefault(session, _SessionState())
        continuing = state.ring_left > 0 and state.next_pos == pos and tokens == [state.last_token]
        step = state.next_step
        key = (session, step)
        t0 = state.last_arrival if continuing else time.perf_counter()
        if not continuing:
            ring = max(0, max_tokens - (pos + len(tokens)) - 1) if self.ring else 0
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
                ring,
                tuple(sorted(stop_ids)),
            )
            state.ring_left = ring + 1
        arrived = self._arrived.pop(key, None)
        try:
            if arrived is None:
                fut: asyncio.Future[wire.Token] = asyncio.get_running_loop().create_future()
                self._pending[key] = fut
                if not continuing:
                    await self.peers.send(self.route[0].peer_id, wire.encode(msg))
                token = await asyncio.wait_for(fut, self.step_timeout_s)
                arrival = time.perf_counter()
            else:
                outcome, arrival = arrived
                if isinstance(outcome, KlusterError):
                    raise outcome
                token = outcome
        except TimeoutError:
            state.ring_left = 0
            raise PeerError(
                f"no token from the route within {self.step_timeout_s:.0f} s (a node stalled or died)"
            ) from None
        except BaseException:
            state.ring_left = 0
            raise
        finally:
            self._pending.pop(key, None)
        state.next_step = step + 1
        state.next_pos = pos + len(tokens)
        state.last_token = token.token_id
        state.last_arrival = arrival
        state.ring_left = 0 if token.token_id in stop_ids else state.ring_left - 1
        return StepResult(token.token_id, token.timings, (arrival - t0) * 1000)

    async def close_session(self, session: str) -> None:
        self._sessions.pop(session, None)
        for key in [k for k in self._arrived if k[0] == session]:
            del self._arrived[key]
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
