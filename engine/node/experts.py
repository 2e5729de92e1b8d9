"""The expert side of a node: hold one expert fragment and run the rows trunks send to it.

A node the coordinator gives an expert fragment (``assign_experts``) fetches and verifies it like
any fragment, loads its routed experts (``engine.fragments.experts``) and answers every
``ExpertForward`` with an ``ExpertResult``: the pure ``expert_forward`` of each named expert on
its rows. Experts keep no state between messages (no KV cache, no session), so there is nothing
to open, close, expire or replay here.

It counts what it receives, per layer: messages, and rows per expert. That is the evidence that
a token's hidden state reached only the nodes of its top-k experts, so it is measured where the
rows arrive, not where they are sent, and reported to the coordinator (``expert_stats``, shown
in ``GET /v1/nodes`` and ``GET /v1/experts``) about once a second while it changes.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import threading
import time
from pathlib import Path
from typing import Any

import aiohttp
import torch

from engine.errors import KlusterError, ProtocolError
from engine.fragments import torch_thread
from engine.fragments.experts import load_expert_fragment
from engine.fragments.manifest import Manifest, parse_manifest
from engine.models.moe_trunk import ExpertWeights
from engine.node.fetch import fetch_fragment
from engine.protocol import messages as wire
from engine.transport.signaling import SignalingClient

log = logging.getLogger(__name__)

#: how often changed counters go to the coordinator
REPORT_S = 1.0


class ExpertCounters:
    """What an expert node received: per layer, messages and rows per expert; plus bytes in total.

    Updated on the torch thread, read for reports on the event loop: hence the lock.
    """

    def __init__(self) -> None:
        self._lock = threading.Lock()
        self._layers: dict[int, dict[str, Any]] = {}
        self._bytes = 0
        self.version = 0

    def add(self, msg: wire.ExpertForward, size: int) -> None:
        with self._lock:
            entry = self._layers.setdefault(msg.layer, {"messages": 0, "rows": {}})
            entry["messages"] += 1
            for expert, n in zip(msg.experts, msg.counts, strict=True):
                entry["rows"][expert] = entry["rows"].get(expert, 0) + n
            self._bytes += size
            self.version += 1

    def snapshot(self) -> dict[str, Any]:
        """JSON-ready: ``{"bytes": b, "layers": {"L": {"messages": m, "rows": {"E": n}}}}``."""
        with self._lock:
            layers = {
                str(layer): {"messages": e["messages"], "rows": {str(x): n for x, n in sorted(e["rows"].items())}}
                for layer, e in sorted(self._layers.items())
            }
            return {"bytes": self._bytes, "layers": layers}


class ExpertHost:
    """Loads the expert fragment a node is assigned and serves ``ExpertForward`` messages for it."""

    def __init__(
        self,
        signaling: SignalingClient,
        cache_dir: Path,
        device: str = "cpu",
        middlewares: tuple[Any, ...] = (),
    ) -> None:
        self.signaling = signaling
        #: aiohttp client middlewares for fragment downloads (the node's session auth, if any)
        self.middlewares = middlewares
        self.cache_dir = cache_dir
        self.device = device
        self.manifest: Manifest | None = None
        self.weights: ExpertWeights | None = None
        self.counters = ExpertCounters()
        self._wanted: dict[str, Any] | None = None
        self._load_task: asyncio.Task[None] | None = None
        self._report_task: asyncio.Task[None] | None = None

    def assign(self, data: dict[str, Any]) -> None:
        """An ``assign_experts`` control message; loading runs in a task (a newer one supersedes it)."""
        self._wanted = data
        if self._load_task is None or self._load_task.done():
            self._load_task = asyncio.create_task(self._load_wanted(), name="load-experts")

    async def _load_wanted(self) -> None:
        while self._wanted is not None:
            data, self._wanted = self._wanted, None
            await self._load(data)

    async def _load(self, data: dict[str, Any]) -> None:
        try:
            manifest = parse_manifest(data.get("manifest"))
            if not manifest.expert_only or manifest.model_id != data.get("model_id"):
                raise ProtocolError("expert assignment without an expert fragment of its model")
            if self.manifest is not None and self.manifest.to_json() == manifest.to_json():
                await self._send_ready(manifest)
                return
            base = f"{self.signaling.coordinator}{data.get('files_url', '')}".rstrip("/") + f"/{manifest.name}/"
            timeout = aiohttp.ClientTimeout(total=3600, sock_connect=10)
            async with aiohttp.ClientSession(timeout=timeout, middlewares=self.middlewares) as http:
                folder = await fetch_fragment(http, base, manifest, self.cache_dir)
            # Reading and copying weights on the torch thread: a node has nothing else to run meanwhile.
            _, weights = await torch_thread.run(load_expert_fragment, folder, device=self.device)
            self.manifest, self.weights = manifest, weights
            await self._send_ready(manifest)
            log.info("serving %d experts of %s (%s)", len(weights.weights), manifest.model_id, manifest.name)
            if self._report_task is None or self._report_task.done():
                self._report_task = asyncio.create_task(self._report_forever(), name="expert-stats")
        except (KlusterError, OSError) as exc:
            log.error("cannot host the assigned experts: %s", exc)
            with contextlib.suppress(KlusterError):
                await self.signaling.send({"type": "experts_failed", "message": str(exc)[:500]})

    async def _send_ready(self, manifest: Manifest) -> None:
        await self.signaling.send({"type": "experts_ready", "model_id": manifest.model_id, "fragment": manifest.name})

    async def _report_forever(self) -> None:
        sent = -1
        while True:
            await asyncio.sleep(REPORT_S)
            if self.counters.version == sent or self.manifest is None:
                continue
            sent = self.counters.version
            stats = {"type": "expert_stats", "fragment": self.manifest.name, **self.counters.snapshot()}
            with contextlib.suppress(KlusterError):  # offline: the next report after reconnecting
                await self.signaling.send(stats)

    def handle(self, sender: str, self_id: str, msg: wire.ExpertForward, size: int) -> bytes:
        """Run one ``ExpertForward`` (on the torch thread); the encoded result or error for ``sender``."""
        self.counters.add(msg, size)
        t0 = time.perf_counter()
        try:
            if self.weights is None or msg.tensor is None:
                raise ProtocolError("this node holds no experts yet")
            with torch.inference_mode():
                out = self.weights.run(msg.layer, msg.experts, msg.counts, msg.tensor)
            ms = (time.perf_counter() - t0) * 1000
            result = wire.ExpertResult(msg.request, msg.layer, msg.experts, msg.counts, round(ms, 3), out, msg.codec)
            return wire.encode(result)
        except KlusterError as exc:
            log.warning("expert request %d (layer %d) from %s failed: %s", msg.request, msg.layer, sender, exc)
            return wire.encode(wire.ErrorReply(exc.code, str(exc), self_id, step=msg.request))

    async def shutdown(self) -> None:
        for task in (self._load_task, self._report_task):
            if task is not None and not task.done():
                task.cancel()
                with contextlib.suppress(asyncio.CancelledError, Exception):
                    await task
