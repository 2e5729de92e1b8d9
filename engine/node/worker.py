"""The node: hosts one fragment and serves it to clients and to the previous hop of routes.

Life cycle: connect to the coordinator, receive an assignment, fetch and verify the fragment,
load it, say ``ready``, then serve ``Forward`` messages arriving over WebRTC until shut down.
A malformed or unserviceable message gets a typed ``ErrorReply`` to the requesting client (or to
the sender when the message is too broken to name one); the node keeps serving everyone else.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import time
from dataclasses import dataclass, replace
from pathlib import Path
from typing import Any

import aiohttp
import torch

from engine.errors import FragmentError, KlusterError, PeerError, ProtocolError
from engine.fragments import torch_thread
from engine.fragments.executor import ExecutorConfig, FragmentExecutor
from engine.fragments.manifest import Manifest, parse_manifest
from engine.fragments.store import load_fragment
from engine.models.sampling import SamplingParams
from engine.node.capability import capability_report_async
from engine.node.fetch import fetch_fragment
from engine.protocol import messages as wire
from engine.transport.peer import PeerManager
from engine.transport.signaling import SignalingClient

log = logging.getLogger(__name__)

#: How often a node reports its links' measured round trips to the coordinator.
RTT_REPORT_S = 5.0


@dataclass(frozen=True)
class NodeConfig:
    coordinator: str
    name: str
    #: where fetched fragments are cached (shared safely by nodes on one machine)
    cache_dir: Path
    #: memory reserved for all sessions' KV caches
    kv_budget_mb: int = 1024
    #: torch threads for this node's compute (None: torch's default)
    threads: int | None = None
    device: str = "cpu"
    connect_timeout_s: float = 10.0
    #: seconds of the start-up throughput benchmark reported to the coordinator
    benchmark_s: float = 1.0


@dataclass(frozen=True)
class _Outgoing:
    """A message to send; ``reply_to`` is told (with an ErrorReply) if it cannot be delivered."""

    to: str
    payload: bytes
    reply_to: str | None = None
    session: str | None = None
    step: int | None = None


class Node:
    """One supplier worker process."""

    def __init__(self, config: NodeConfig) -> None:
        self.config = config
        self.signaling = SignalingClient(config.coordinator, "node", config.name, on_control=self._on_control)
        self.peers: PeerManager | None = None
        self.executor: FragmentExecutor | None = None
        self.manifest: Manifest | None = None
        self._load_task: asyncio.Task[None] | None = None
        self._stopping = False

    @property
    def peer_id(self) -> str:
        return self.signaling.peer_id

    async def run(self) -> None:
        """Serve until ``shutdown``; reconnect to the coordinator (with backoff) when its socket drops.

        The first connection must succeed (a wrong URL is a user error, reported at once); later
        drops are network blips or coordinator restarts, so the node keeps its fragment and its
        WebRTC links, asks to keep its peer id, and goes on serving.
        """
        if self.config.threads:
            await torch_thread.run(torch.set_num_threads, self.config.threads)
        await self.signaling.connect()
        self._start_peers()
        log.info("node %s registered as %s", self.config.name, self.peer_id)
        reporter = asyncio.create_task(self._report_rtts(), name="rtt-report")
        try:
            while not self._stopping:
                await self.signaling.run()
                if self._stopping:
                    break
                log.warning("lost the coordinator; reconnecting")
                await self._reconnect()
        finally:
            reporter.cancel()
            await self.shutdown()

    async def _report_rtts(self) -> None:
        """Every RTT_REPORT_S, tell the coordinator the measured round trip to each linked peer."""
        while not self._stopping:
            await asyncio.sleep(RTT_REPORT_S)
            if self.peers is None:
                continue
            rtts = {i.peer_id: i.rtt_ms for i in self.peers.links() if i.sending and i.rtt_ms is not None}
            if rtts:
                with contextlib.suppress(KlusterError):  # offline: the next report after reconnecting
                    await self.signaling.send({"type": "rtt", "peers": rtts})

    def _start_peers(self) -> None:
        self.peers = PeerManager(
            self.peer_id,
            self.signaling.send_signal,
            self._on_message,
            ice_servers=self.signaling.ice_servers,
            connect_timeout=self.config.connect_timeout_s,
        )
        self.signaling.peers = self.peers

    def _hello_extra(self) -> dict[str, Any] | None:
        """What a reconnecting node tells the coordinator: the fragment it still holds, if any."""
        m = self.manifest
        return {"hosting": {"model_id": m.model_id, "fragment": m.index}} if m is not None else None

    async def _reconnect(self) -> None:
        old_id = self.peer_id
        await self.signaling.reconnect(self._hello_extra)
        if self.peer_id != old_id:  # the coordinator gave us a new identity: old links are useless
            log.info("reconnected as %s (was %s)", self.peer_id, old_id)
            if self.peers is not None:
                await self.peers.shutdown()
            self._start_peers()
        else:
            self.signaling.peers = self.peers

    async def _on_control(self, data: dict[str, Any]) -> None:
        if data.get("type") == "assign":
            if self._load_task is not None:
                # Already loading or serving a fragment (e.g. reassigned after a reconnect during
                # the load): keep it; our ``ready`` tells the coordinator what we really hold.
                log.info("keeping the fragment already assigned; ignoring a new assignment")
                if self._load_task.done() and self.manifest is not None:
                    await self.signaling.send(
                        {"type": "ready", "model_id": self.manifest.model_id, "fragment": self.manifest.index}
                    )
                return
            self._load_task = asyncio.create_task(self._load(data), name="load-fragment")

    async def _load(self, data: dict[str, Any]) -> None:
        try:
            manifest = parse_manifest(data.get("manifest"))
            base = self.signaling.coordinator + str(data.get("files_url", ""))
            async with aiohttp.ClientSession(timeout=aiohttp.ClientTimeout(total=3600, sock_connect=10)) as http:
                folder = await fetch_fragment(http, base, manifest, self.config.cache_dir)
            _, model = await torch_thread.run(load_fragment, folder, device=self.config.device)
            # Measured, never claimed: the scheduler places spans by this figure.
            capability = await capability_report_async(
                model.cfg, device=self.config.device, seconds=self.config.benchmark_s
            )
            executor = FragmentExecutor(model, ExecutorConfig(kv_budget_bytes=self.config.kv_budget_mb << 20))
            await torch_thread.run(executor.warm_up)
            self.executor = executor
            self.manifest = manifest
            await self.signaling.send(
                {"type": "ready", "model_id": manifest.model_id, "fragment": manifest.index, "capability": capability}
            )
            log.info("serving %s layers %d-%d", manifest.model_id, manifest.start, manifest.end)
        except (KlusterError, OSError) as exc:
            log.error("cannot host the assigned fragment: %s", exc)
            with contextlib.suppress(KlusterError):
                await self.signaling.send({"type": "failed", "message": str(exc)})

    # ------------------------------------------------------------------ serving

    def _error_to(self, to: str, exc: KlusterError, session: str | None, step: int | None) -> _Outgoing:
        reply = wire.ErrorReply(exc.code, str(exc), self.peer_id, session, step, exc.peer_id)
        return _Outgoing(to, wire.encode(reply))

    async def _on_message(self, sender: str, data: bytes) -> None:
        """Handle one message on the torch thread, then send whatever it produced."""
        outgoing = await torch_thread.run(self._handle, sender, data, time.perf_counter())
        for item in outgoing:
            await self._send(item)

    async def _send(self, item: _Outgoing) -> None:
        if self.peers is None:
            return
        try:
            await self.peers.send(item.to, item.payload)
        except KlusterError as exc:
            log.warning("could not send to %s: %s", item.to, exc)
            if item.reply_to is not None and item.reply_to != item.to:
                err = PeerError(f"node {self.config.name} cannot reach the next hop {item.to}: {exc}")
                err.peer_id = item.to
                await self._send(self._error_to(item.reply_to, err, item.session, item.step))

    def _handle(self, sender: str, data: bytes, queued: float) -> list[_Outgoing]:
        """Decode, run and encode in one go on the torch thread (see ``torch_thread`` for why)."""
        try:
            msg = wire.decode(data)
        except ProtocolError as exc:
            log.warning("malformed message from %s: %s", sender, exc)
            return [self._error_to(sender, exc, None, None)]
        if isinstance(msg, wire.Forward):
            try:
                return self._forward(msg, queued)
            except KlusterError as exc:
                log.warning("step %s of session %s failed: %s", msg.step, msg.session, exc)
                return [self._error_to(msg.reply_to, exc, msg.session, msg.step)]
        if isinstance(msg, wire.Close):
            if self.executor is not None:
                self.executor.close_session(msg.session)
            if msg.hop + 1 < len(msg.route):
                nxt = wire.Close(msg.session, msg.route, msg.hop + 1)
                return [_Outgoing(msg.route[msg.hop + 1].peer, wire.encode(nxt))]
            return []
        log.debug("ignoring %s from %s", type(msg).__name__, sender)
        return []

    def _forward(self, msg: wire.Forward, queued: float) -> list[_Outgoing]:
        if self.executor is None or self.manifest is None:
            raise FragmentError(f"node {self.config.name} is still loading its fragment")
        hop = msg.route[msg.hop]
        m = self.manifest
        if hop.peer != self.peer_id or (hop.start, hop.end) != (m.start, m.end):
            raise ProtocolError(
                f"route asks node {self.config.name} for layers {hop.start}-{hop.end}, it hosts {m.start}-{m.end}"
            )
        if msg.tensor is None:
            raise ProtocolError("forward without a tensor")
        if (msg.hop == len(msg.route) - 1) != m.head:
            raise ProtocolError("route does not end at the fragment holding the LM head")
        sampling = SamplingParams(msg.sampling.temperature, msg.sampling.top_p, msg.sampling.seed)
        out = self.executor.step_sync(msg.session, msg.pos, msg.tensor, msg.max_tokens, sampling, queued, msg.chunks)
        timings = (*msg.timings, wire.HopTiming(self.peer_id, round(out.queue_ms, 3), round(out.compute_ms, 3)))
        if out.token_id is None:
            nxt = replace(msg, hop=msg.hop + 1, timings=timings, tensor=out.hidden)
            return [_Outgoing(msg.route[msg.hop + 1].peer, wire.encode(nxt), msg.reply_to, msg.session, msg.step)]
        pos = msg.pos + msg.tensor.shape[0]
        reply = _Outgoing(msg.reply_to, wire.encode(wire.Token(msg.session, msg.step, pos, out.token_id, timings)))
        if msg.ring <= 0 or out.token_id in msg.stop_ids or pos + 1 > msg.max_tokens:
            return [reply]
        # Ring mode: feed the token straight back to the first hop, then tell the client.
        again = replace(
            msg,
            step=msg.step + 1,
            pos=pos,
            hop=0,
            timings=(),
            ring=msg.ring - 1,
            chunks=(),
            tensor=torch.tensor([out.token_id], dtype=torch.int64),
        )
        return [_Outgoing(msg.route[0].peer, wire.encode(again), msg.reply_to, msg.session, msg.step + 1), reply]

    async def drain(self, timeout_s: float = 60.0) -> None:
        """Leave gracefully: no new sessions, live ones finish (up to ``timeout_s``), then shut down.

        The coordinator stops routing to the node at once; a client that still starts a session
        here gets ``session_lost`` and fails over, so no request fails.
        """
        log.info("draining: finishing live sessions (at most %.0f s)", timeout_s)
        if self.executor is not None:
            self.executor.draining = True
        with contextlib.suppress(KlusterError):
            await self.signaling.send({"type": "draining"})
        deadline = time.monotonic() + timeout_s
        while self.executor is not None and self.executor.active_sessions() and time.monotonic() < deadline:
            await asyncio.sleep(0.1)
        await self.shutdown()

    async def shutdown(self) -> None:
        if self._stopping:
            return
        self._stopping = True
        if self._load_task is not None and not self._load_task.done():
            self._load_task.cancel()
            with contextlib.suppress(asyncio.CancelledError, Exception):
                await self._load_task
        if self.peers is not None:
            await self.peers.shutdown()
        if self.executor is not None:
            await self.executor.shutdown()
        await self.signaling.shutdown()
