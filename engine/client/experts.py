"""Mixture-of-Experts across peers: the trunk runs here, each layer's routed experts on expert nodes.

Where the trunk runs, and why here: a MoE layer cannot be chained node to node like dense
layers, because the weighted sum of a token's k expert outputs must be complete before the next
layer's attention. Every MoE layer is therefore a star: the holder of the residual stream sends
each expert node the rows routed to its experts and waits for all of them. Whoever holds the
trunk (embeddings, attention + KV cache, routers, shared experts, head) is the centre of that
star, so putting the trunk on a node instead of here would add a client <-> trunk hop per token
and change nothing else. The trunk is a small share of a MoE model (Mixtral 8x7B: ~1.6 of 47 B
parameters; the routed experts are the rest), so the client holds it like a private job would,
fetched from the coordinator and hash-checked; the expert fragments are what the grid serves.

Per MoE layer and forward pass, ``ExpertGrid.call`` (the ``ExpertCall`` of the trunk's
``RemoteMoeBlock``s, ``engine.models.moe_trunk``) groups the routed experts by the node holding
them and sends each node ONE ``ExpertForward`` with only the rows routed to its experts; a node
none of whose experts was chosen gets nothing. It waits for every ``ExpertResult`` (at most
``timeout_s``, then a one-line ``PeerError`` naming the node), and ``combine`` runs as in the
local model, so the logits are the local model's. ``ExpertTraffic`` counts what was sent, next
to what sending every row to every expert node would have cost.

The model's forward runs on the torch thread (``LocalPipeline`` -> ``FragmentExecutor``) and
blocks there while the event loop moves the rows; messages are encoded and decoded on the torch
thread too (the loop only peeks at headers to route replies), as on nodes.

Not yet here: failover (an expert node that dies fails the step; a replica listed by the
coordinator is not tried), batching several sessions' rows into one message, deduplicating a
token's rows when both of its experts live on one node.
"""

from __future__ import annotations

import asyncio
import contextlib
import itertools
import logging
import threading
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import aiohttp
import torch

from engine.client.local import LocalPipeline
from engine.errors import (
    ConfigError,
    CoordinatorError,
    KlusterError,
    NoRouteError,
    PeerError,
    ProtocolError,
    TransportError,
    error_for_code,
)
from engine.fragments import torch_thread
from engine.fragments.experts import load_trunk as load_trunk_fragments
from engine.fragments.manifest import parse_manifest
from engine.models.llama import FragmentModel
from engine.models.moe import Dispatch
from engine.node.fetch import fetch_fragment
from engine.protocol import messages as wire
from engine.protocol.codec import CODECS
from engine.transport.peer import PeerManager
from engine.transport.signaling import SignalingClient

log = logging.getLogger(__name__)

#: bytes per value of each activation codec (int8 leaves out its small per-block scales)
_VALUE_BYTES = {"fp32": 4, "fp16": 2, "bf16": 2, "int8": 1}


@dataclass
class ExpertTraffic:
    """What the trunk sent to expert nodes, counted by the sender (the nodes count what arrived)."""

    hidden_size: int
    value_bytes: int
    #: expert nodes in the grid (the M of "every row to every expert node")
    nodes: int
    #: peer -> layer -> ExpertForward messages sent
    messages: dict[str, dict[int, int]] = field(default_factory=dict)
    #: peer -> layer -> expert -> rows sent
    rows: dict[str, dict[int, dict[int, int]]] = field(default_factory=dict)
    #: MoE layer passes (one per layer per forward pass) and token rows through their routers
    exchanges: int = 0
    token_rows: int = 0
    #: whole messages on the wire, both ways, and per peer
    wire_bytes_sent: int = 0
    wire_bytes_received: int = 0
    bytes_to: dict[str, int] = field(default_factory=dict)

    def add(self, peer: str, layer: int, experts: tuple[int, ...], counts: tuple[int, ...], size: int) -> None:
        per_layer = self.messages.setdefault(peer, {})
        per_layer[layer] = per_layer.get(layer, 0) + 1
        rows = self.rows.setdefault(peer, {}).setdefault(layer, {})
        for e, n in zip(experts, counts, strict=True):
            rows[e] = rows.get(e, 0) + n
        self.wire_bytes_sent += size
        self.bytes_to[peer] = self.bytes_to.get(peer, 0) + size

    def rows_sent(self) -> int:
        return sum(n for layers in self.rows.values() for experts in layers.values() for n in experts.values())

    def summary(self) -> dict[str, Any]:
        """Rows and payload bytes sent, against sending every token row to every expert node."""
        row = self.hidden_size * self.value_bytes
        sent, broadcast = self.rows_sent(), self.token_rows * self.nodes
        return {
            "expert_nodes": self.nodes,
            "exchanges": self.exchanges,
            "messages": sum(n for layers in self.messages.values() for n in layers.values()),
            "token_rows": self.token_rows,
            "rows_sent": sent,
            "rows_if_broadcast": broadcast,
            "payload_bytes_sent": sent * row,
            "payload_bytes_if_broadcast": broadcast * row,
            "sent_fraction_of_broadcast": round(sent / broadcast, 6) if broadcast else None,
            "wire_bytes_sent": self.wire_bytes_sent,
            "wire_bytes_received": self.wire_bytes_received,
        }


@dataclass(frozen=True)
class _Send:
    peer: str
    request: int
    #: positions in ``plan.experts`` this message carries
    slots: tuple[int, ...]
    experts: tuple[int, ...]
    counts: tuple[int, ...]
    data: bytes


class ExpertGrid:
    """A client of the coordinator that knows which node holds which expert and exchanges rows with them."""

    def __init__(
        self,
        coordinator: str,
        model_id: str,
        *,
        timeout_s: float = 30.0,
        codec: str = "fp32",
        name: str = "moe-client",
    ) -> None:
        if codec not in CODECS:
            raise ConfigError(f"unknown activation codec {codec!r} (known: {', '.join(CODECS)})")
        self.model_id = model_id
        #: how long one layer's exchange may take before the step fails
        self.timeout_s = timeout_s
        self.codec = codec
        self.signaling = SignalingClient(coordinator, "client", name, on_control=self._on_control)
        self.peers: PeerManager | None = None
        #: (layer, expert) -> peer id of its node; peer id -> node name
        self.owners: dict[tuple[int, int], str] = {}
        self.names: dict[str, str] = {}
        self.traffic: ExpertTraffic | None = None
        self._info: dict[str, Any] = {}
        self._ids = itertools.count(1)
        self._pending: dict[tuple[str, int], asyncio.Future[bytes]] = {}
        self._loop: asyncio.AbstractEventLoop | None = None
        self._loop_thread: int | None = None
        self._runner: asyncio.Task[None] | None = None
        self._stopping = False

    async def start(self) -> None:
        """Connect to the coordinator (as a client) and open for peer links."""
        self._loop, self._loop_thread = asyncio.get_running_loop(), threading.get_ident()
        await self.signaling.connect()
        self.peers = self.signaling.open_peers(self._on_message, on_link_lost=self._on_link_lost)
        self._runner = asyncio.create_task(self.signaling.serve(lambda: self._stopping), name="signaling")

    async def wait_ready(self, timeout_s: float = 120.0) -> dict[tuple[int, int], str]:
        """Poll ``/v1/experts`` until every expert fragment has a ready node; returns who holds which expert."""
        deadline = time.monotonic() + timeout_s
        while True:
            info = await self.signaling.http_json("/v1/experts", {"model": self.model_id})
            owners, names, missing = self._owners(info)
            if not missing:
                break
            if time.monotonic() > deadline:
                raise NoRouteError(
                    f"no ready node holds {missing[0]} of {self.model_id} after {timeout_s:g} s "
                    f"({len(missing)} expert fragment(s) unserved)"
                )
            await asyncio.sleep(0.2)
        self._info, self.owners, self.names = info, owners, names
        return owners

    def _owners(self, info: Any) -> tuple[dict[tuple[int, int], str], dict[str, str], list[str]]:
        owners: dict[tuple[int, int], str] = {}
        names: dict[str, str] = {}
        missing = []
        try:
            for frag in info["experts"]:
                host = next((h for h in frag["hosts"] if h["ready"]), None)
                if host is None:
                    missing.append(str(frag["name"]))
                    continue
                peer = str(host["peer_id"])
                names[peer] = str(host["name"])
                for layer, expert in parse_manifest(frag["manifest"]).experts or ():
                    owners[(layer, expert)] = peer
        except (KeyError, TypeError, KlusterError) as exc:
            raise CoordinatorError(f"coordinator sent a malformed expert map: {exc!r}") from None
        return owners, names, missing

    async def load_trunk(self, cache_dir: Path) -> FragmentModel:
        """Fetch the trunk fragments (hash-checked, cached) and build the trunk, its experts going through ``call``."""
        if not self._info:
            await self.wait_ready()
        manifests = [parse_manifest(m) for m in self._info["trunk"]]
        base = f"{self.signaling.coordinator}{self._info['files_url']}"
        folders = []
        timeout = aiohttp.ClientTimeout(total=3600, sock_connect=10)
        async with aiohttp.ClientSession(timeout=timeout) as http:
            for m in manifests:
                folders.append(await fetch_fragment(http, f"{base}{m.name}/", m, cache_dir))
        _, model = await torch_thread.run(load_trunk_fragments, folders, self.call)
        self.traffic = ExpertTraffic(model.cfg.hidden_size, _VALUE_BYTES[self.codec], len(self._info["experts"]))
        return model

    # ------------------------------------------------------------------ the exchange (torch thread)

    def call(self, layer: int, plan: Dispatch, rows: torch.Tensor) -> list[torch.Tensor]:
        """``ExpertCall``: each routed expert's outputs, computed by its node; only routed rows travel."""
        if self._loop is None or self.traffic is None:
            raise ConfigError("the expert grid is not started (start, then load_trunk)")
        if threading.get_ident() == self._loop_thread:
            raise ConfigError("the trunk must run on the torch thread, not on the event loop it waits for")
        by_peer: dict[str, list[int]] = {}
        for slot, expert in enumerate(plan.experts):
            peer = self.owners.get((layer, expert))
            if peer is None:
                raise NoRouteError(f"no expert node holds expert {expert} of layer {layer} of {self.model_id}")
            by_peer.setdefault(peer, []).append(slot)
        sends = []
        for peer, slots in by_peer.items():
            experts = tuple(plan.experts[s] for s in slots)
            counts = tuple(len(plan.rows[s]) for s in slots)
            x = torch.cat([rows[plan.rows[s]] for s in slots], 0)
            request = next(self._ids)
            data = wire.encode(wire.ExpertForward(request, layer, experts, counts, x, self.codec))
            sends.append(_Send(peer, request, tuple(slots), experts, counts, data))
            self.traffic.add(peer, layer, experts, counts, len(data))
        self.traffic.exchanges += 1
        self.traffic.token_rows += rows.shape[0]
        replies = asyncio.run_coroutine_threadsafe(self._exchange(layer, sends), self._loop).result()
        outputs: list[torch.Tensor | None] = [None] * len(plan.experts)
        for send, data in zip(sends, replies, strict=True):
            self.traffic.wire_bytes_received += len(data)
            for slot, part in zip(send.slots, self._result(send, data, rows), strict=True):
                outputs[slot] = part
        return [o for o in outputs if o is not None]

    def _result(self, send: _Send, data: bytes, like: torch.Tensor) -> tuple[torch.Tensor, ...]:
        msg = wire.decode(data)
        name = self.names.get(send.peer, send.peer)
        if isinstance(msg, wire.ErrorReply):
            error = error_for_code(msg.code, f"expert node {name}: {msg.message}")
            error.peer_id = send.peer
            raise error
        if not isinstance(msg, wire.ExpertResult) or msg.tensor is None:
            raise ProtocolError(f"expert node {name} answered with a {type(msg).__name__}")
        if (msg.experts, msg.counts) != (send.experts, send.counts) or msg.tensor.shape[1] != like.shape[1]:
            raise ProtocolError(f"expert node {name} answered for other experts or rows than it was sent")
        return msg.tensor.to(like.dtype).split(send.counts)

    async def _exchange(self, layer: int, sends: list[_Send]) -> list[bytes]:
        """Send every message, then wait for all replies (raw: decoded on the torch thread)."""
        if self.peers is None:
            raise ConfigError("the expert grid is not started")
        loop = asyncio.get_running_loop()
        futures = []
        for s in sends:
            fut: asyncio.Future[bytes] = loop.create_future()
            self._pending[(s.peer, s.request)] = fut
            futures.append(fut)
        try:
            await asyncio.gather(*(self.peers.send(s.peer, s.data) for s in sends))
            _, late = await asyncio.wait(futures, timeout=self.timeout_s)
            if late:
                peer = next(s.peer for s, f in zip(sends, futures, strict=True) if f in late)
                error = PeerError(
                    f"expert node {self.names.get(peer, peer)} did not answer for layer {layer} "
                    f"within {self.timeout_s:g} s"
                )
                error.peer_id = peer
                raise error
            return [f.result() for f in futures]
        finally:
            for s, f in zip(sends, futures, strict=True):
                self._pending.pop((s.peer, s.request), None)
                if f.done() and not f.cancelled():
                    f.exception()  # retrieved: a second failure must not log "never retrieved"
                f.cancel()

    # ------------------------------------------------------------------ the event loop side

    async def _on_message(self, sender: str, data: bytes) -> None:
        """Hand a reply to the exchange waiting for it (looked up from its header only)."""
        try:
            header = wire.peek_header(data)
        except ProtocolError as exc:
            log.warning("malformed message from %s: %s", sender, exc)
            return
        kind = header.get("type")
        key = header.get("request") if kind == "expert_result" else header.get("step") if kind == "error" else None
        fut = self._pending.get((sender, key)) if isinstance(key, int) else None
        if fut is not None and not fut.done():
            fut.set_result(bytes(data))
        elif kind == "error":  # a reply to no exchange of ours: the node could not parse what we sent
            self._fail(sender, PeerError(f"expert node {self.names.get(sender, sender)}: {header.get('message')}"))
        else:
            log.debug("late or stray %s from %s", kind, sender)

    def _fail(self, peer: str, error: KlusterError) -> None:
        error.peer_id = peer
        for (p, _), fut in list(self._pending.items()):
            if p == peer and not fut.done():
                fut.set_exception(error)

    async def _on_link_lost(self, peer: str, reason: str) -> None:
        self._fail(peer, TransportError(f"lost the link to expert node {self.names.get(peer, peer)} ({reason})"))

    async def _on_control(self, data: dict[str, Any]) -> None:
        if data.get("type") == "node_gone":
            peer = str(data.get("peer_id"))
            self._fail(peer, PeerError(f"expert node {self.names.get(peer, peer)} left the grid"))

    async def shutdown(self) -> None:
        self._stopping = True
        if self.peers is not None:
            await self.peers.shutdown()
        await self.signaling.shutdown()
        if self._runner is not None:
            self._runner.cancel()
            with contextlib.suppress(asyncio.CancelledError, Exception):
                await self._runner


class ExpertGridPipeline(LocalPipeline):
    """A ``Pipeline``: the trunk in this process (``LocalPipeline``), the experts on the grid.

    Same executor, KV caches and sampling as the local reference, so outputs differ from it only
    by where the expert matmuls ran.
    """

    def __init__(self, trunk: FragmentModel, grid: ExpertGrid) -> None:
        super().__init__(trunk)
        self.grid = grid

    def summary(self) -> dict[str, Any]:
        traffic = self.grid.traffic
        return {**super().summary(), **({"experts": traffic.summary()} if traffic is not None else {})}
