"""The node: hosts a span of fragments and serves it to clients and to the previous hop of routes.

Life cycle: connect to the coordinator, measure its own speed on the model's architecture when
asked (placement trusts only that measurement), receive an assignment (a span of fragments),
fetch and verify each fragment, load them as one model, say ``ready``, then serve ``Forward``
messages arriving over WebRTC until shut down. A new assignment (a rebalance) is loaded while the
old span keeps serving; then new sessions go to the new span, and the old one lives on until its
live sessions finish, so a rebalance fails no request.
A malformed or unserviceable message gets a typed ``ErrorReply`` to the requesting client (or to
the sender when the message is too broken to name one); the node keeps serving everyone else.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import time
from dataclasses import dataclass, field, replace
from pathlib import Path
from typing import Any

import aiohttp
import torch

from engine.audit.calibrate import perturbation
from engine.audit.trail import AuditTrail
from engine.coordinator.auth import SessionAuth
from engine.errors import FragmentError, KlusterError, PeerError, ProtocolError, SessionLostError
from engine.fragments import torch_thread
from engine.fragments.executor import ExecutorConfig, FragmentExecutor, StepOutput
from engine.fragments.manifest import Manifest, parse_manifest
from engine.fragments.store import load_span
from engine.ledger.receipts import SignedReceipt
from engine.models.config import parse_config
from engine.models.sampling import SamplingParams
from engine.node.capability import capability_report_async, default_memory_bytes, throttle_pause
from engine.node.events import EventSink
from engine.node.experts import ExpertHost
from engine.node.fetch import fetch_fragment
from engine.node.receipts import ReceiptKeeper, tensor_bytes
from engine.protocol import frames
from engine.protocol import messages as wire
from engine.transport.identity import Identity, default_node_identity_path
from engine.transport.peer import PeerManager
from engine.transport.signaling import SignalingClient

log = logging.getLogger(__name__)

#: How often a node reports its links' measured round trips and its live sessions to the coordinator.
RTT_REPORT_S = 5.0
#: After a swap the old span serves its sessions until they are closed, or none has run a step for
#: this long (counted from the swap at the earliest: loading the new span may have held them up) ...
RETIRE_IDLE_S = 10.0
#: ... and at most this long (then its sessions fail over).
RETIRE_TIMEOUT_S = 120.0
_DTYPES = {"float32": torch.float32, "float16": torch.float16, "bfloat16": torch.bfloat16}


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
    #: seconds of the throughput benchmark reported to the coordinator
    benchmark_s: float = 1.0
    #: memory offered to the grid for weights and KV caches (None: 90% of free VRAM / half the free RAM)
    memory_mb: int | None = None
    #: test/demo knob: the node sleeps so that it is this many times slower, in its benchmark and
    #: in serving alike
    throttle: float = 1.0
    #: test knob: a speed the node claims in its hello; the coordinator shows it and ignores it
    claimed_layers_per_s: float | None = None
    #: test knob, a Byzantine node: noise of this size relative to each hidden state it sends is
    #: added to it (a last hop returns a wrong token instead); spot checks must catch it
    perturb: float = 0.0
    #: the node's long-term identity key (created if missing); None: one per node name in the
    #: user data dir. The node's peer id is derived from it and its links are signed with it.
    identity_path: Path | None = None
    #: the supplier account token (``kluster coordinator add-user``), exchanged for session tokens;
    #: None for a coordinator with auth off
    account_token: str | None = field(default=None, repr=False)


@dataclass(frozen=True)
class _Outgoing:
    """A message to send; ``reply_to`` is told (with an ErrorReply) if it cannot be delivered."""

    to: str
    payload: bytes | frames.Prepared
    reply_to: str | None = None
    session: str | None = None
    step: int | None = None


@dataclass(frozen=True)
class ServedSpan:
    """Fragments a..b-1 of a model, loaded as one model, and the executor running its sessions."""

    model_id: str
    units: tuple[int, int]
    manifests: tuple[Manifest, ...]
    executor: FragmentExecutor

    @property
    def start(self) -> int:
        return self.manifests[0].start

    @property
    def end(self) -> int:
        return self.manifests[-1].end

    @property
    def head(self) -> bool:
        return self.manifests[-1].head

    def fits(self, hop: wire.Hop) -> bool:
        """A hop may enter the span part-way but always runs to its end (routes never stop a node early)."""
        return self.start <= hop.start < hop.end == self.end


def _parse_assignment(data: dict[str, Any]) -> tuple[str, tuple[int, int], tuple[Manifest, ...]]:
    """(model_id, units, manifests) of an ``assign`` message, checked to describe fragments a..b-1."""
    model_id = str(data.get("model_id"))
    units, raw = data.get("units"), data.get("manifests")
    if not isinstance(units, list) or len(units) != 2 or not all(isinstance(u, int) for u in units):
        raise ProtocolError("assignment without a fragment span")
    if not isinstance(raw, list) or len(raw) != units[1] - units[0] or not raw:
        raise ProtocolError("assignment's manifests do not match its fragment span")
    manifests = tuple(parse_manifest(m) for m in raw)
    if [m.index for m in manifests] != list(range(units[0], units[1])) or any(
        m.model_id != model_id for m in manifests
    ):
        raise ProtocolError(f"assignment's manifests are not fragments {units[0]}-{units[1] - 1} of {model_id}")
    return model_id, (units[0], units[1]), manifests


class Node:
    """One supplier worker process."""

    def __init__(self, config: NodeConfig) -> None:
        self.config = config
        identity = Identity.load_or_create(config.identity_path or default_node_identity_path(config.name))
        self.signaling = SignalingClient(
            config.coordinator, "node", config.name, on_control=self._on_control, identity=identity
        )
        self.auth = SessionAuth(config.coordinator, config.account_token) if config.account_token else None
        self.peers: PeerManager | None = None
        #: MoE expert serving (engine.node.experts): used only when assigned an expert fragment
        self.experts = ExpertHost(
            self.signaling,
            config.cache_dir,
            config.device,
            (self.auth.middleware,) if self.auth is not None else (),
        )
        #: step frames: contexts we announced to next hops, and those announced to us
        self._frames_out = frames.FrameWriter()
        self._frames_in = frames.FrameReader()
        #: the span new sessions use
        self.serving: ServedSpan | None = None
        #: the span replaced by the last assignment, kept until its live sessions finish
        self._retiring: ServedSpan | None = None
        self._retired_at = 0.0
        #: the latest assignment not yet loaded
        self._wanted: dict[str, Any] | None = None
        self._load_task: asyncio.Task[None] | None = None
        self._measure_task: asyncio.Task[None] | None = None
        self._retire_task: asyncio.Task[None] | None = None
        #: model_id -> this node's last capability report for it (measured once, resent on reconnect)
        self._capability: dict[str, dict[str, Any]] = {}
        self._draining = False
        self._stopping = False
        #: state changes as JSON lines for a local supervisor (``--events-jsonl``); silent by default
        self.events = EventSink()
        #: steps a one-node route's ring hands back to this node (kept referenced until done)
        self._loopback: set[asyncio.Task[None]] = set()
        #: work receipts (engine.node.receipts): signed on the torch thread, sent from the loop
        self.receipts = ReceiptKeeper(identity, identity.peer_id("n"))
        self._unsent_receipts: list[SignedReceipt] = []
        #: sketches of what every session received and sent, for spot checks (torch thread)
        self.audit = AuditTrail()

    @property
    def peer_id(self) -> str:
        return self.signaling.peer_id

    @property
    def executor(self) -> FragmentExecutor | None:
        return None if self.serving is None else self.serving.executor

    async def run(self) -> None:
        """Serve until ``shutdown``; reconnect to the coordinator (with backoff) when its socket drops.

        The first connection must succeed (a wrong URL is a user error, reported at once); later
        drops are network blips or coordinator restarts, so the node keeps its fragments and its
        WebRTC links, asks to keep its peer id, and goes on serving.
        """
        if self.config.threads:
            await torch_thread.run(torch.set_num_threads, self.config.threads)
        if self.auth is not None:
            await self.auth.refresh()  # a bad token is a one-line error now
        await self.signaling.connect(self._hello_extra())
        self._start_peers()
        log.info("node %s registered as %s", self.config.name, self.peer_id)
        self.events.emit("registered", name=self.config.name, peer_id=self.peer_id)
        reporter = asyncio.create_task(self._report_rtts(), name="rtt-report")
        try:
            await self.signaling.serve(
                lambda: self._stopping, extra=self._hello_extra, on_new_identity=self._new_identity
            )
        finally:
            reporter.cancel()
            await self.shutdown()

    async def _report_rtts(self) -> None:
        """Every RTT_REPORT_S, tell the coordinator the round trip to each linked peer and our live sessions."""
        while not self._stopping:
            await asyncio.sleep(RTT_REPORT_S)
            self.events.sweep()
            if self.peers is None:
                continue
            rtts = {i.peer_id: i.rtt_ms for i in self.peers.links() if i.sending and i.rtt_ms is not None}
            sessions = sum(s.executor.active_sessions() for s in (self.serving, self._retiring) if s is not None)
            with contextlib.suppress(KlusterError):  # offline: the next report after reconnecting
                await self.signaling.send(
                    {"type": "rtt", "peers": rtts, "sessions": sessions, "frames": self._frames_out.counts()}
                )

    def _start_peers(self) -> None:
        self.peers = self.signaling.open_peers(self._on_message, connect_timeout=self.config.connect_timeout_s)

    def _hello_extra(self) -> dict[str, Any]:
        """What the hello says besides our name: the span we still hold, if any, and a claimed speed (test knob)."""
        extra: dict[str, Any] = self.auth.hello() if self.auth is not None else {}
        s = self.serving
        if s is not None:
            extra["hosting"] = {"model_id": s.model_id, "units": list(s.units)}
        if self.config.claimed_layers_per_s is not None:
            extra["claimed_layers_per_s"] = self.config.claimed_layers_per_s
        return extra

    async def _new_identity(self, old_id: str) -> None:
        """The coordinator gave us a new peer id: links made under the old one are useless."""
        if self.peers is not None:
            await self.peers.shutdown()
        self._start_peers()

    async def _on_control(self, data: dict[str, Any]) -> None:
        kind = data.get("type")
        if kind == "measure":
            model_id = str(data.get("model_id"))
            known = self._capability.get(model_id)
            if known is not None:  # measured before a reconnect: the same hardware, no need to re-run
                await self.signaling.send({"type": "capability", "model_id": model_id, "capability": known})
            elif self._measure_task is None or self._measure_task.done():
                self._measure_task = asyncio.create_task(self._measure(data), name="measure")
        elif kind == "audit_key" and isinstance(data.get("key"), str):
            with contextlib.suppress(ValueError):
                await torch_thread.run(self.audit.set_key, bytes.fromhex(data["key"]))
        elif kind == "audit_query":
            positions = data.get("positions")
            if type(positions) is int:
                body = await torch_thread.run(self.audit.report, str(data.get("session")), positions)
                with contextlib.suppress(KlusterError):
                    await self.signaling.send({"type": "audit_reply", "id": data.get("id"), **body})
        elif kind == "assign_experts" and not self._draining:
            self.experts.assign(data)
        elif kind == "assign" and not self._draining:
            self._wanted = data
            self.events.emit("assigned", model_id=data.get("model_id"), units=data.get("units"))
            if self._load_task is None or self._load_task.done():
                self._load_task = asyncio.create_task(self._load_wanted(), name="load-span")

    async def _measure(self, data: dict[str, Any]) -> None:
        """Benchmark the model's architecture and report it with the memory offered (placement's inputs)."""
        model_id = str(data.get("model_id"))
        try:
            raw = data.get("config")
            if not isinstance(raw, dict):
                raise ProtocolError("measure request without a model config")
            cfg = parse_config(raw)
            dtype = _DTYPES.get(str(data.get("dtype")), torch.float32)
            # Measured, never claimed: the scheduler places spans by this figure.
            capability = await capability_report_async(
                cfg,
                device=self.config.device,
                dtype=dtype,
                seconds=self.config.benchmark_s,
                throttle=self.config.throttle,
            )
            if self.config.memory_mb is not None:
                offered, source = self.config.memory_mb << 20, "--memory-mb"
            else:
                offered, source = await torch_thread.run(default_memory_bytes, self.config.device), "default"
            capability["memory"] = {"offered_bytes": offered, "source": source}
            self._capability[model_id] = capability
            await self.signaling.send({"type": "capability", "model_id": model_id, "capability": capability})
        except KlusterError as exc:
            log.error("cannot measure this node for %s: %s", model_id, exc)
            self.events.emit("error", message=f"benchmark failed: {exc}")
            with contextlib.suppress(KlusterError):
                await self.signaling.send({"type": "failed", "message": f"benchmark failed: {exc}"})

    async def _load_wanted(self) -> None:
        """Load assignments one at a time; one that arrives meanwhile supersedes any not yet loaded."""
        while self._wanted is not None and not self._stopping:
            data, self._wanted = self._wanted, None
            await self._load(data)

    async def _load(self, data: dict[str, Any]) -> None:
        try:
            model_id, units, manifests = _parse_assignment(data)
            s = self.serving
            if s is not None and (s.model_id, s.units) == (model_id, units):
                await self.signaling.send({"type": "ready", "model_id": model_id, "units": list(units)})
                return
            base = self.signaling.coordinator + str(data.get("files_url", ""))
            folders = []
            timeout = aiohttp.ClientTimeout(total=3600, sock_connect=10)
            middlewares = (self.auth.middleware,) if self.auth is not None else ()  # a fresh session per file
            async with aiohttp.ClientSession(timeout=timeout, middlewares=middlewares) as http:
                for m in manifests:
                    folders.append(
                        await fetch_fragment(http, f"{base.rstrip('/')}/{m.name}/", m, self.config.cache_dir)
                    )
                    if self._wanted is not None:
                        log.info("assignment superseded while fetching; loading the newer one")
                        return
            # Loading is mostly reading and copying weights: done beside the torch thread, so the
            # span already served keeps serving meanwhile (a rebalance stalls no session).
            _, model = await torch_thread.run_loader(load_span, folders, device=self.config.device)
            executor = FragmentExecutor(model, ExecutorConfig(kv_budget_bytes=self.config.kv_budget_mb << 20))
            await torch_thread.run(executor.warm_up)
            self._swap(ServedSpan(model_id, units, manifests, executor))
            await self.signaling.send({"type": "ready", "model_id": model_id, "units": list(units)})
            log.info("serving %s layers %d-%d", model_id, manifests[0].start, manifests[-1].end)
            self.events.emit("ready", model_id=model_id, layers=[manifests[0].start, manifests[-1].end])
        except (KlusterError, OSError) as exc:
            log.error("cannot host the assigned fragments: %s", exc)
            self.events.emit("error", message=f"cannot host the assigned fragments: {exc}")
            with contextlib.suppress(KlusterError):
                await self.signaling.send({"type": "failed", "message": str(exc)})

    def _swap(self, new: ServedSpan) -> None:
        """New sessions go to ``new`` from now on; the old span finishes its live sessions first."""
        old, self.serving = self.serving, new
        new.executor.draining = self._draining
        if self._retiring is not None:  # a second swap before the first old span drained: its sessions fail over
            self._retiring.executor.draining = True
        self._retiring = old if old is not None and old.executor.sessions else None
        self._retired_at = time.monotonic()
        if self._retiring is not None:
            self._retiring.executor.draining = True  # takes no new session
            if self._retire_task is None or self._retire_task.done():
                self._retire_task = asyncio.create_task(self._retire(), name="retire-span")

    async def _retire(self) -> None:
        """Drop the old span once its sessions are done (see RETIRE_IDLE_S and RETIRE_TIMEOUT_S)."""
        while self._retiring is not None and not self._stopping:
            ex, since = self._retiring.executor, time.monotonic() - self._retired_at
            idle = since > RETIRE_IDLE_S and not ex.active_sessions(RETIRE_IDLE_S)
            if not ex.sessions or idle or since > RETIRE_TIMEOUT_S:
                old, self._retiring = self._retiring, None
                log.info("dropped the old span %d-%d", old.start, old.end)
                await old.executor.shutdown()
                continue
            await asyncio.sleep(0.5)

    # ------------------------------------------------------------------ serving

    def _error_to(self, to: str, exc: KlusterError, session: str | None, step: int | None) -> _Outgoing:
        reply = wire.ErrorReply(exc.code, str(exc), self.peer_id, session, step, exc.peer_id)
        return _Outgoing(to, wire.encode(reply))

    async def _on_message(self, sender: str, data: bytes) -> None:
        """Handle one message on the torch thread, then send whatever it produced."""
        outgoing = await torch_thread.run(self._handle, sender, data, time.perf_counter())
        for item in outgoing:
            await self._send(item)
        await self._send_receipts()

    async def _send_receipts(self) -> None:
        """Hand signed work receipts to the coordinator (offline: dropped, the next one's cumulative covers it)."""
        while self._unsent_receipts:
            signed = self._unsent_receipts.pop(0)
            with contextlib.suppress(KlusterError):
                await self.signaling.send({"type": "receipt", "receipt": signed.to_json()})

    async def _send(self, item: _Outgoing) -> None:
        if self.peers is None:
            return
        if item.to == self.peer_id:  # a one-node route's ring: the next step is ours (no link to ourselves)
            p = item.payload
            data = p if isinstance(p, bytes) else wire.pack(p.header, p.payload)
            task = asyncio.create_task(self._on_message(self.peer_id, data), name="loopback-step")
            self._loopback.add(task)
            task.add_done_callback(self._loopback.discard)
            return
        try:
            await self.peers.send(item.to, self._frames_out.builder(item.payload))
        except KlusterError as exc:
            log.warning("could not send to %s: %s", item.to, exc)
            if item.reply_to is not None and item.reply_to != item.to:
                err = PeerError(f"node {self.config.name} cannot reach the next hop {item.to}: {exc}")
                err.peer_id = item.to
                await self._send(self._error_to(item.reply_to, err, item.session, item.step))

    def _handle(self, sender: str, data: bytes, queued: float) -> list[_Outgoing]:
        """Decode, run and encode in one go on the torch thread (see ``torch_thread`` for why)."""
        try:
            msg = self._frames_in.read(sender, data)
        except ProtocolError as exc:
            log.warning("malformed message from %s: %s", sender, exc)
            return [self._error_to(sender, exc, None, None)]
        if isinstance(msg, wire.ExpertForward):  # MoE: stateless expert rows (engine.node.experts)
            return [_Outgoing(sender, self.experts.handle(sender, self.peer_id, msg, len(data)))]
        if isinstance(msg, wire.Forward):
            try:
                return self._forward(msg, queued)
            except KlusterError as exc:
                log.warning("step %s of session %s failed: %s", msg.step, msg.session, exc)
                return [self._error_to(msg.reply_to, exc, msg.session, msg.step)]
        if isinstance(msg, wire.Close):
            self.events.session_closed(msg.session)
            self._frames_in.forget_session(msg.session)
            self._frames_out.forget_session(msg.session)
            self._keep_receipt(self.receipts.session_closed(msg.session))
            for span in (self.serving, self._retiring):
                if span is not None:
                    span.executor.close_session(msg.session)
            if msg.hop + 1 < len(msg.route):
                nxt = wire.Close(msg.session, msg.route, msg.hop + 1)
                return [_Outgoing(msg.route[msg.hop + 1].peer, wire.encode(nxt))]
            return []
        log.debug("ignoring %s from %s", type(msg).__name__, sender)
        return []

    def _span_for(self, msg: wire.Forward) -> ServedSpan:
        """The loaded span this step runs on: the old one for sessions it still holds, else the current one.

        A route that fits neither was planned before a rebalance moved this node: the client gets
        ``session_lost`` and asks the coordinator for a fresh route.
        """
        hop = msg.route[msg.hop]
        if hop.peer != self.peer_id:
            raise ProtocolError(f"route hop {msg.hop} names {hop.peer}, not this node")
        old, current = self._retiring, self.serving
        if old is not None and old.executor.has_session(msg.session) and old.fits(hop):
            return old
        if current is None:
            raise FragmentError(f"node {self.config.name} is still loading its fragments")
        if not current.fits(hop):
            raise SessionLostError(
                f"route asks node {self.config.name} for layers {hop.start}-{hop.end}, "
                f"it hosts {current.start}-{current.end}"
            )
        return current

    def _forward(self, msg: wire.Forward, queued: float) -> list[_Outgoing]:
        span = self._span_for(msg)
        hop = msg.route[msg.hop]
        if msg.tensor is None:
            raise ProtocolError("forward without a tensor")
        if (msg.hop == len(msg.route) - 1) != span.head:
            raise ProtocolError("route does not end at the fragment holding the LM head")
        sampling = SamplingParams(msg.sampling.temperature, msg.sampling.top_p, msg.sampling.seed)
        out = span.executor.step_sync(
            msg.session,
            msg.pos,
            msg.tensor,
            msg.max_tokens,
            sampling,
            queued,
            msg.chunks,
            hop.start,
            frozenset(msg.skip),
            msg.verify,
        )
        if self.config.perturb > 0:
            out = _perturbed(out, self.config.perturb, span.executor.model.cfg.vocab_size)
        last = out.token_id is not None
        hidden = None if last else out.hidden
        self.audit.record(msg.session, msg.pos, msg.tensor, hidden, msg.codec, sampling if last else None)
        self.events.step(msg.session, int(msg.tensor.shape[0]), span.model_id, (hop.start, hop.end))
        if msg.job:
            sampled = torch.tensor(out.tokens or [out.token_id or 0], dtype=torch.int64)
            self._receipt_for(msg, span, out.hidden if out.hidden is not None and out.token_id is None else sampled)
        if self.config.throttle > 1.0:
            throttle_pause(out.compute_ms / 1000, self.config.throttle)
            out = replace(out, compute_ms=out.compute_ms * self.config.throttle)
        timings = (*msg.timings, wire.HopTiming(self.peer_id, round(out.queue_ms, 3), round(out.compute_ms, 3)))
        if out.token_id is None:
            nxt = replace(msg, hop=msg.hop + 1, timings=timings, tensor=out.hidden)
            return [_Outgoing(msg.route[msg.hop + 1].peer, frames.prepare(nxt), msg.reply_to, msg.session, msg.step)]
        pos = msg.pos + msg.tensor.shape[0]
        token = wire.Token(msg.session, msg.step, pos, out.token_id, timings, out.tokens)
        reply = _Outgoing(msg.reply_to, wire.encode(token))
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
        return [_Outgoing(msg.route[0].peer, frames.prepare(again), msg.reply_to, msg.session, msg.step + 1), reply]

    def _receipt_for(self, msg: wire.Forward, span: ServedSpan, output: torch.Tensor) -> None:
        """Count this step's work for the job's receipts (torch thread; a due receipt is sent from the loop)."""
        hop = msg.route[msg.hop]
        fragment = next((m for m in span.manifests if m.start <= hop.start < m.end), span.manifests[0])
        tensor = msg.tensor if msg.tensor is not None else torch.empty(0)
        self._keep_receipt(
            self.receipts.record(
                msg.job,
                msg.session,
                model=span.model_id,
                fragment_id=fragment.name,
                layers=(hop.start, hop.end),
                tokens=int(tensor.shape[0]),
                input_bytes=tensor_bytes(tensor),
                output_bytes=tensor_bytes(output),
            )
        )

    def _keep_receipt(self, signed: SignedReceipt | None) -> None:
        if signed is not None:
            self._unsent_receipts.append(signed)

    def _spans(self) -> list[ServedSpan]:
        return [s for s in (self.serving, self._retiring) if s is not None]

    async def drain(self, timeout_s: float = 60.0) -> None:
        """Leave gracefully: no new sessions, live ones finish (up to ``timeout_s``), then shut down.

        The coordinator stops routing to the node at once; a client that still starts a session
        here gets ``session_lost`` and fails over, so no request fails.
        """
        log.info("draining: finishing live sessions (at most %.0f s)", timeout_s)
        self.events.emit("draining", sessions=self.events.live_sessions())
        self._draining = True
        for span in self._spans():
            span.executor.draining = True
        with contextlib.suppress(KlusterError):
            await self.signaling.send({"type": "draining"})
        deadline = time.monotonic() + timeout_s
        while any(s.executor.active_sessions() for s in self._spans()) and time.monotonic() < deadline:
            await asyncio.sleep(0.1)
        self.events.emit("drained", sessions_left=sum(s.executor.active_sessions() for s in self._spans()))
        await self.shutdown()

    async def shutdown(self) -> None:
        if self._stopping:
            return
        self._stopping = True
        for task in (self._load_task, self._measure_task, self._retire_task):
            if task is not None and not task.done():
                task.cancel()
                with contextlib.suppress(asyncio.CancelledError, Exception):
                    await task
        if self.peers is not None:
            await self.peers.shutdown()
        for span in self._spans():
            await span.executor.shutdown()
        await self.experts.shutdown()
        await self.signaling.shutdown()
        if self.auth is not None:
            await self.auth.close()


def _perturbed(out: StepOutput, scale: float, vocab: int) -> StepOutput:
    """What a Byzantine node returns (the ``perturb`` test knob): noisy hidden states, or a wrong token."""
    if out.token_id is None and out.hidden is not None:
        return replace(out, hidden=out.hidden + perturbation(out.hidden, scale))
    if out.token_id is not None:
        return replace(out, token_id=(out.token_id * 31 + 7) % vocab, tokens=())
    return out
