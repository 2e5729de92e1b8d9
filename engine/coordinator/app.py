"""The coordinator: the control plane the maintainers run (``kluster coordinator``).

It never carries activations. It registers nodes over a WebSocket, has each measure itself, tells
each which span of fragments to host (placement by measured throughput and memory, see
``engine.scheduler.placement``), serves fragment files and tokenizers over HTTP, relays WebRTC
offers/answers between peers, and answers "which nodes should my request go through" with the
fastest route over measured round trips, speeds and loads.

WebSocket ``/v1/ws`` messages (JSON objects with a ``type``):
  coord -> peer   challenge {nonce}           first message: a fresh nonce the hello must sign
  peer -> coord   hello {role: node|client, name, key, sig, session?, hosting?: {model_id, units: [a, b]},
                         claimed_layers_per_s?}
                  within ``hello_timeout_s``; ``key`` is the peer's ed25519 public key (base64) and
                  ``sig`` its signature over the nonce (``engine.transport.identity.hello_proof``):
                  the peer id is ``<n|c>-<key id>``, derived from the key, so it is the same on every
                  reconnect (and after a coordinator restart) and nobody without the key can take
                  it; a hello without a valid proof is closed with code 4000 and the reason. A new
                  socket proving a key whose older socket is still open replaces it (code 4001:
                  a restarted process, or two sharing one key file). ``hosting`` keeps a node's
                  loaded fragments a..b-1; a claimed speed is shown but never used for placement.
                  With auth on, ``session`` is a session token (``engine.coordinator.auth``) of a
                  supplier account for a node, a developer account for a client; without one the
                  socket is closed with code 4003 and the reason
  coord -> peer   welcome {peer_id, ice_servers}
                  ice_servers: STUN/TURN servers, TURN with a credential minted for this peer
                  (``engine.coordinator.turn``)
  coord -> peer   ice_servers {ice_servers}   fresh TURN credentials, every ttl/2
  coord -> client node_gone {peer_id, name}  a node's socket closed: routes through it are broken
  coord -> client node_ready {peer_id}        a node (new or back after a blip) can be routed through
  both ways       ping                        every ``heartbeat_s``; 3 silent intervals drop the socket

Limits: messages above ``max_ws_message`` (256 KiB; SDPs are a few KB) close the socket with 1009;
the WebSocket protocol heartbeat (``heartbeat=heartbeat_s``) pings when a peer has sent nothing
for one interval and closes the socket if no pong comes within half of one, so a dead TCP peer is
dropped within 1.5 intervals of its last frame; HTTP bodies are capped at ``max_body`` (64 KiB).
  coord -> node   measure {model_id, config, dtype}   benchmark this architecture before placement
  node -> coord   capability {model_id, capability}   hardware, measured throughput, memory offered
  coord -> node   assign {model_id, units: [a, b], manifests: [...], files_url}
                  fetch, verify and load fragments a..b-1 (files under files_url + name + "/"),
                  keep serving the old span until then
  node -> coord   ready {model_id, units: [a, b]} | failed {message} | draining {}
  node -> coord   rtt {peers: {peer_id: ms}, sessions?}  measured heartbeat round trips to linked
                  peers, and the node's live sessions (routing load)
  peer -> coord   signal {to, data}           relayed as signal {from, data}
  coord -> peer   signal_error {to, message}  the target is not connected
"""

from __future__ import annotations

import asyncio
import contextlib
import json
import logging
import secrets
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from aiohttp import web

from engine import __version__
from engine.audit.reference import Tolerance
from engine.audit.sketch import node_key
from engine.coordinator import events
from engine.coordinator.accounts import ADMIN, AccountStore
from engine.coordinator.auth import (
    ACCOUNT,
    CLOSE_UNAUTHORIZED,
    DEFAULT_TTL_S,
    SESSION_PATH,
    AuthGate,
    ForbiddenError,
    RateLimitedError,
    refusal,
)
from engine.coordinator.billing import DEFAULT_PRICE_PER_MTOK, Billing, Hop, new_job_id
from engine.coordinator.events import EventHub
from engine.coordinator.experts import NODE_MESSAGES as EXPERT_MESSAGES
from engine.coordinator.experts import ExpertBoard
from engine.coordinator.jobs_api import JobService, add_job_routes
from engine.coordinator.placer import Measurement, Placer
from engine.coordinator.ratelimit import RateLimits
from engine.coordinator.registry import NodeRow, Registry
from engine.coordinator.turn import TurnConfig
from engine.coordinator.verifier import AuditHop, RouteRecord, Verifier, claimed_sampling
from engine.errors import ConfigError, CoordinatorError, FragmentError, IdentityError, KlusterError, NoRouteError
from engine.fragments.manifest import CONFIG, WEIGHTS
from engine.fragments.pack import TOKENIZER_FILES
from engine.fragments.store import Pack, read_pack
from engine.ledger.chain import Kind
from engine.ledger.pricing import Pricing
from engine.ledger.store import Ledger, LedgerError
from engine.models.config import ModelConfig, parse_config
from engine.protocol import frames
from engine.scheduler import activation as activation_plan
from engine.scheduler.placement import HostView, PackLayout, Span, measured_layers_per_s, pack_layout, route_layers
from engine.transport.identity import check_hello, peer_id_for
from engine.transport.signaling import (
    CLOSE_BAD_HELLO,
    CLOSE_BANNED,
    CLOSE_REPLACED,
    CLOSE_S,
    HEARTBEAT_MISSES,
    HEARTBEAT_S,
    ICE_SERVERS,
    ping_forever,
    receive_json,
)

log = logging.getLogger(__name__)


@dataclass(frozen=True)
class CoordinatorConfig:
    host: str = "127.0.0.1"
    port: int = 8765
    #: SQLite file for the registry; ":memory:" keeps nothing after exit
    db_path: str = ":memory:"
    #: fragment packs (from ``kluster fragments pack``) this coordinator serves
    packs: tuple[Path, ...] = ()
    #: ping interval on every peer's WebSocket; a peer silent for HEARTBEAT_MISSES intervals is
    #: dropped, so a dead or partitioned node is noticed within ~3x this and its clients fail over
    heartbeat_s: float = HEARTBEAT_S
    #: largest WebSocket message accepted from a peer (SDP blobs are a few KB); larger closes with 1009
    max_ws_message: int = 256 * 1024
    #: largest HTTP request body (a job submission is well under 1 KiB)
    max_body: int = 64 * 1024
    #: listen backlog: thousands of nodes reconnect at once after a coordinator restart
    backlog: int = 1024
    #: SQLite file of accounts (``engine.coordinator.accounts``); None: no accounts, auth off
    accounts_path: str | None = None
    #: "on", "off", or "auto": on when the accounts file holds an active account
    auth: str = "auto"
    #: HMAC key of session tokens; None: random for this run (a restart invalidates sessions)
    session_secret: bytes | None = None
    session_ttl_s: float = DEFAULT_TTL_S
    #: per-IP and per-account request rate limits
    rate_limits: RateLimits = field(default_factory=RateLimits)
    hello_timeout_s: float = 10.0
    #: STUN/TURN servers handed to peers (RTCIceServer dicts); empty means host candidates only
    ice_servers: tuple[dict[str, Any], ...] = field(default_factory=tuple)
    #: TURN servers sharing a secret with us: each peer gets its own short-lived credential
    turn: TurnConfig | None = None
    #: copies of every fragment the placement aims for when capacity allows
    min_replicas: int = 2
    #: a rebalance moves nodes only for a bottleneck gain above this share (no thrashing)
    min_gain: float = 0.15
    #: placement runs once joins, leaves and measurements have been quiet this long ...
    placement_settle_s: float = 1.0
    #: ... and no node is still measuring (nodes starting together are planned together), but
    #: never later than this after the first unplanned event
    placement_max_wait_s: float = 20.0
    #: SQLite file of the ledger (``engine.ledger.store``); ":memory:" keeps nothing after exit
    ledger_path: str = ":memory:"
    #: what a unit of work is worth, per model (``engine.ledger.pricing``)
    pricing: Pricing = field(default_factory=lambda: Pricing(default=DEFAULT_PRICE_PER_MTOK))
    #: no placement this soon after start: after a coordinator restart the nodes reconnect with
    #: what they hold, and none should be moved to cover for one that is merely slower to return
    placement_grace_s: float = 5.0
    #: how far an honest hop's work may be from the spot checks' reference (``kluster bench verify``)
    audit_tolerance: Tolerance = field(default_factory=Tolerance)


def _error(status: int, err: KlusterError | str, code: str = "coordinator") -> web.Response:
    if isinstance(err, KlusterError):
        code, message = err.code, str(err)
    else:
        message = err
    return web.json_response({"error": {"code": code, "message": message}}, status=status)


def _span(raw: Any, units: int) -> Span | None:
    """A fragment span [a, b) from a peer's message, if well-formed and within the pack."""
    if not isinstance(raw, list | tuple) or len(raw) != 2:
        return None
    a, b = raw
    if not all(isinstance(v, int) and not isinstance(v, bool) for v in (a, b)) or not 0 <= a < b <= units:
        return None
    return int(a), int(b)


def _positive(raw: Any) -> float | None:
    if isinstance(raw, int | float) and not isinstance(raw, bool) and 0 < raw < 1e12:
        return float(raw)
    return None


def _describe_span(layout: PackLayout, span: Span) -> str:
    a, b = span
    start, end = layout.layers(span)
    units = f"fragment {a}" if b - a == 1 else f"fragments {a}-{b - 1}"
    return f"{layout.model_id} {units} (layers {start}-{end - 1})"


def _clean_counts(raw: Any, keys: tuple[str, ...]) -> dict[str, int]:
    """The known non-negative integer counters of a node's report (anything else is dropped)."""
    if not isinstance(raw, dict):
        return {}
    return {k: v for k in keys if isinstance(v := raw.get(k), int) and not isinstance(v, bool) and 0 <= v < 2**62}


def _clean_rtts(raw: Any, limit: int = 256) -> dict[str, float]:
    """A node's RTT report, keeping only well-formed entries (at most ``limit``)."""
    if not isinstance(raw, dict):
        return {}
    out: dict[str, float] = {}
    for peer, ms in list(raw.items())[:limit]:
        if isinstance(peer, str) and len(peer) <= 64 and isinstance(ms, int | float) and 0 <= ms < 600_000:
            out[peer] = round(float(ms), 3)
    return out


def _read_config(pack: Pack) -> dict[str, Any]:
    """The model's ``config.json`` as a dict (sent to nodes to benchmark; the manifests cover its hash)."""
    path = pack.fragment_dir(0) / CONFIG
    try:
        raw = json.loads(path.read_text(encoding="utf-8"))
    except (OSError, ValueError) as exc:
        raise FragmentError(f"cannot read {path}: {exc}") from None
    if not isinstance(raw, dict):
        raise FragmentError(f"{path} is not a JSON object")
    return raw


class Coordinator:
    """The aiohttp application and its in-memory view of connected peers."""

    def __init__(self, config: CoordinatorConfig) -> None:
        self.config = config
        self.registry = Registry(config.db_path)
        self.packs: dict[str, Pack] = {}
        #: per model: what a node benchmarks before placement (config.json as sent, dtype)
        self._bench: dict[str, tuple[dict[str, Any], str]] = {}
        self._configs: dict[str, ModelConfig] = {}
        layouts: dict[str, PackLayout] = {}
        #: MoE packs with expert fragments: served apart from layer placement (engine.coordinator.experts)
        self.moe = ExpertBoard()
        for root in config.packs:
            if self.moe.add_if_expert_pack(root):
                continue
            pack = read_pack(root)
            self.packs[pack.model_id] = pack
            raw = _read_config(pack)
            layouts[pack.model_id] = pack_layout(pack.model_id, pack.manifests, parse_config(raw))
            self._bench[pack.model_id] = (raw, pack.manifests[0].dtype)
            self._configs[pack.model_id] = parse_config(raw)
        self.layouts = layouts
        self.placer = Placer(layouts, min_replicas=config.min_replicas, min_gain=config.min_gain)
        #: node -> live sessions it last reported (routing load)
        self._sessions: dict[str, int] = {}
        #: what each node last said it sent: full messages and step frames (engine.protocol.frames)
        self._frames: dict[str, dict[str, int]] = {}
        self._replan_task: asyncio.Task[None] | None = None
        self._ice_task: asyncio.Task[None] | None = None
        self._replan_dirty = False
        self._replan_quiet_at = 0.0
        self._replan_first: float | None = None
        self._grace_until = 0.0
        self._sockets: dict[str, web.WebSocketResponse] = {}
        self._roles: dict[str, str] = {}
        #: nodes seen since start (a reconnect is a resume); ids come from keys, so they recur
        self._known: set[str] = set()
        #: peer -> set once the handler of its current socket has cleaned up after it
        self._left: dict[str, asyncio.Event] = {}
        #: node -> {peer: measured round trip in ms}, as last reported by the node
        self._rtts: dict[str, dict[str, float]] = {}
        #: job and grid events for watchers (``GET /v1/events``, the TUI)
        self.events = EventHub()
        self.jobs: JobService | None = None
        self.accounts = AccountStore(config.accounts_path, durable=False) if config.accounts_path else None
        self.gate = AuthGate(
            self.accounts,
            enabled=self._auth_enabled(),
            secret=config.session_secret or secrets.token_bytes(32),
            ttl_s=config.session_ttl_s,
            limits=config.rate_limits,
        )
        #: node -> the account it registered under (auth on), for earnings
        self._node_accounts: dict[str, str] = {}
        #: client -> the developer account of its hello (auth on): only it may take routes for it
        self._client_accounts: dict[str, str] = {}
        #: work receipts -> ledger (engine.coordinator.billing)
        self.billing = Billing(
            Ledger(config.ledger_path),
            config.pricing,
            self.events,
            supplier_account=lambda peer: self._node_accounts.get(peer, peer),
        )
        #: spot checks (engine.coordinator.verifier); each node's projection key derives from this secret
        self._audit_secret = self.registry.secret("audit", lambda: secrets.token_bytes(32))
        self.verifier = Verifier(
            self.packs,
            lambda peer: node_key(self._audit_secret, peer),
            self._send_to,
            tolerance=config.audit_tolerance,
        )
        #: nodes a spot check caught: peer id -> why (they may not register again)
        self._banned = self.registry.banned()
        self.billing.banned.update(self._banned)
        self._runner: web.AppRunner | None = None
        self._closed = False

    def _auth_enabled(self) -> bool:
        """``auth``: on, off, or auto (on once the accounts file holds an active account); says which."""
        mode, store = self.config.auth, self.accounts
        if mode not in ("on", "off", "auto"):
            raise ConfigError(f"auth must be on, off or auto, got {mode!r}")
        active = store.active_count() if store is not None else 0
        if mode == "on" and store is None:
            raise ConfigError("auth on needs an accounts file")
        if mode == "on" or (mode == "auto" and active):
            where = store.path if store is not None else ""
            log.log(logging.INFO if active else logging.WARNING, "auth is on: %d active accounts in %s", active, where)
            return True
        log.warning(
            "auth is off: anyone can register nodes and submit jobs (add users with `kluster coordinator add-user`)"
        )
        if store is not None:
            log.info("accounts file: %s (%d active accounts)", store.path, active)
        return False

    # ------------------------------------------------------------------ HTTP

    def app(self) -> web.Application:
        app = web.Application(client_max_size=self.config.max_body, middlewares=[self.gate.middleware()])
        app.router.add_get("/v1/health", self._health)
        app.router.add_post(SESSION_PATH, self.gate.exchange)
        app.router.add_get("/v1/models", self._models)
        app.router.add_get("/v1/nodes", self._nodes)
        app.router.add_get("/v1/route", self._route)
        app.router.add_post("/v1/audit", self._audit)
        app.router.add_get("/v1/earnings", self._earnings)
        app.router.add_get("/v1/spend", self._spend)
        app.router.add_get("/v1/models/{model}/fragments/{fragment}/{file}", self._fragment_file)
        app.router.add_get("/v1/models/{model}/tokenizer/{file}", self._tokenizer_file)
        app.router.add_get("/v1/ws", self._ws)
        self.moe.add_routes(app)
        self.jobs = add_job_routes(
            app,
            db_path=self.config.db_path,
            hub=self.events,
            is_served=self.packs.__contains__,
            served=lambda: sorted(self.packs),
            has_route=self._has_route,
        )
        return app

    def _has_route(self, model_id: str) -> bool:
        """Whether live ready nodes cover every layer now: the job queue starts a model's jobs only then."""
        try:
            self._plan_route(model_id, frozenset())
        except (NoRouteError, ConfigError):
            return False
        return True

    def _speed(self, peer_id: str, fallback: float) -> float:
        m = self.placer.measurement(peer_id)
        return m.layers_per_s if m is not None and m.layers_per_s > 0 else fallback

    def _plan_route(
        self, model_id: str, exclude: frozenset[str], allow: frozenset[str] | None = None
    ) -> list[tuple[NodeRow, int, int]]:
        """The fastest route for ``model_id`` over ready nodes: [(node, first_layer, end_layer), ...].

        Costs are measured: round trips nodes report (20 ms where unknown, and to the client,
        whose position is unknown), each node's measured speed and its live sessions.
        """
        layout = self.layouts[model_id]
        rows = {
            n.peer_id: n
            for n in self.registry.online_nodes()
            if n.ready and n.model_id == model_id and n.span is not None and n.span[1] <= layout.units
        }
        known = [m.layers_per_s for p in rows if (m := self.placer.measurement(p)) is not None and m.layers_per_s > 0]
        fallback = sum(known) / len(known) if known else 1.0  # e.g. taken back before re-measuring
        hosts = []
        for peer, row in rows.items():
            if row.span is None:
                continue
            start, end = layout.layers(row.span)
            hosts.append(HostView(peer, start, end, self._speed(peer, fallback), load=self._sessions.get(peer, 0)))
        ends_on = None if allow is None else frozenset(p for p, row in rows.items() if p in allow or row.name in allow)
        hops = route_layers(layout, hosts, self._rtts, exclude=exclude, ends_on=ends_on)
        return [(rows[peer], start, end) for peer, start, end in hops]

    async def _health(self, _: web.Request) -> web.Response:
        st = self.verifier.stats
        body = {
            "ok": True,
            "version": __version__,
            "nodes": len(self._sockets),
            "auth": self.gate.enabled,
            "spot_checks": {
                "audits": st.audits,
                "passed": st.passed,
                "failed": st.failed,
                "unavailable": st.unavailable,
                "positions": st.positions,
                "max_pass_error": round(st.max_pass_error, 6),
                "banned": len(self._banned),
            },
        }
        return web.json_response(body)

    async def _models(self, _: web.Request) -> web.Response:
        nodes = self.registry.online_nodes()
        out = []
        for pack in self.packs.values():
            frags = []
            for m in pack.manifests:
                hosts = [
                    n
                    for n in nodes
                    if n.model_id == pack.model_id and n.span is not None and n.span[0] <= m.index < n.span[1]
                ]
                frags.append(
                    {
                        "index": m.index,
                        "name": m.name,
                        "start": m.start,
                        "end": m.end,
                        "bytes": m.bytes,
                        "hosts": [n.name for n in hosts],
                        "ready": sum(n.ready for n in hosts),
                    }
                )
            out.append(
                {
                    "model_id": pack.model_id,
                    "num_layers": pack.num_layers,
                    "fragments": frags,
                    "tokenizer": pack.tokenizer_files,
                }
            )
        return web.json_response({"models": out})

    async def _nodes(self, _: web.Request) -> web.Response:
        """Live nodes: what each serves (``fragments``/``layers``, loaded), was assigned, measured and claimed."""
        out = []
        for node in self.registry.describe():
            peer = str(node["peer_id"])
            a, b = node.pop("unit_start"), node.pop("unit_end")
            layout = self.layouts.get(str(node["model_id"]))
            served = (a, b) if isinstance(a, int) and isinstance(b, int) else None
            node["fragments"] = None if served is None else list(served)
            node["layers"] = None if served is None or layout is None else list(layout.layers(served))
            node.update(self.placer.describe(peer))
            node["sessions"] = self._sessions.get(peer, 0)
            node["rtt_ms"] = self._rtts.get(peer, {})
            node["frames_sent"] = self._frames.get(peer, {})
            node["experts"] = self.moe.describe_node(peer)
            node["account"] = self._node_accounts.get(peer)
            out.append(node)
        return web.json_response({"nodes": out})

    async def _route(self, request: web.Request) -> web.Response:
        model_id = request.query.get("model", "")
        if model_id not in self.packs:
            served = ", ".join(sorted(self.packs)) or "none"
            return _error(404, f"model '{model_id}' is not served here (served: {served})", "model_not_found")
        excluded = frozenset(p for p in request.query.get("exclude", "").split(",") if p)
        # a private job: only these nodes (names or peer ids) may hold its embeddings and head
        raw_allow = request.query.get("allow")
        allow = None if raw_allow is None else frozenset(a for a in raw_allow.split(",") if a)
        try:
            if allow is not None and not allow:
                raise ConfigError("allow= names no node: name the nodes that may hold the embeddings and head")
            budget = self._budget(model_id, request.query.get("activation"))
            route = self._plan_route(model_id, excluded, allow)
        except ConfigError as exc:
            return _error(400, exc)
        except NoRouteError as exc:
            return _error(503, exc)
        layout = self.layouts[model_id]
        skip = frozenset(budget["skip"]) if budget else frozenset()
        body: dict[str, Any] = {
            "model_id": model_id,
            "route": [
                {"peer_id": n.peer_id, "name": n.name, "index": layout.unit_of(start), "start": start, "end": end}
                for n, start, end in route
                if activation_plan.runs_any(skip, start, end)  # a hop whose layers are all skipped drops out
            ],
        }
        if budget:
            body["budget"] = {**budget, "hops": len(body["route"]), "full_hops": len(route)}
        if "client" in request.query:
            try:
                body["job"] = self._assign_route(request, model_id, body["route"])
                self.verifier.remember(
                    body["job"],
                    RouteRecord(
                        model_id,
                        request.query["client"],
                        tuple(AuditHop(h["peer_id"], h["name"], h["start"], h["end"]) for h in body["route"]),
                        skip,
                    ),
                )
            except ForbiddenError as exc:
                return _error(403, exc)
            except ConfigError as exc:
                return _error(400, exc)
            except CoordinatorError as exc:
                return _error(503, exc)
        return web.json_response(body)

    def _assign_route(self, request: web.Request, model_id: str, hops: list[dict[str, Any]]) -> str:
        """Mint the route's job id and record each hop's assignment (the only work receipts can earn for).

        ``client`` must be a connected client and, with auth on, one of the requesting account;
        the developer billed is that account, else ``tenant``, else the client's peer id.
        """
        client = request.query["client"]
        if self._roles.get(client) != "client":  # e.g. reconnecting after a blip: the client retries
            raise CoordinatorError(f"client {client!r} is not connected to this coordinator")
        claims = request.get(ACCOUNT)
        if not self._may_act_for(request, client):
            raise ForbiddenError(f"client {client} is not one of account '{claims.sub}'")
        developer = claims.sub if claims is not None else request.query.get("tenant", "")[:128]
        job = new_job_id(request.query.get("job", "")[:64])
        raw_tokens = request.query.get("tokens")
        extra: dict[str, Any] = {}
        if raw_tokens is not None:
            if not raw_tokens.isdigit() or not 0 < int(raw_tokens) <= 10_000_000:
                raise ConfigError(f"tokens must be an integer in 1..10000000, got {raw_tokens!r}")
            extra["max_tokens"] = int(raw_tokens)
        pack = self.packs[model_id]
        self.billing.assign(
            job,
            client=client,
            developer=developer,
            model=model_id,
            model_layers=pack.num_layers,
            hops=[Hop(h["peer_id"], pack.manifests[h["index"]].name, (h["start"], h["end"])) for h in hops],
            **extra,
        )
        return job

    def _may_act_for(self, request: web.Request, client: str) -> bool:
        """Whether the request's account (auth on) is the one ``client`` said hello under; admins may act
        for any client, and with auth off anyone may."""
        claims = request.get(ACCOUNT)
        return claims is None or claims.role == ADMIN or self._client_accounts.get(client) == claims.sub

    async def _send_to(self, peer_id: str, message: dict[str, Any]) -> bool:
        """Send a control message to a connected peer; False when it is not connected."""
        ws = self._sockets.get(peer_id)
        if ws is None or ws.closed:
            return False
        try:
            await ws.send_json(message)
        except (ConnectionError, RuntimeError):
            return False
        return True

    async def _audit(self, request: web.Request) -> web.Response:
        """``POST /v1/audit``: a client's spot check of one of its sessions (engine.coordinator.verifier).

        Body: ``job``, ``session`` (the wire session id), ``client`` (its peer id), ``tokens`` (the
        session's token at every position checked), ``prompt_tokens`` (how many of them the client fed
        itself: the prompt, or a failover's replay; the route answers only for the tokens after),
        ``sampling`` (``temperature``, ``top_p``, ``seed``; older clients: ``greedy``), ``codec``. Only
        the client the job's route was handed to may audit it. Guilty nodes are banned here. Each
        request spends its positions from the caller's check budget (429 once it is spent).
        """
        try:
            body = await request.json()
        except ValueError:
            return _error(400, "the audit request is not JSON", "bad_request")
        if not isinstance(body, dict):
            return _error(400, "the audit request must be a JSON object", "bad_request")
        job, session, client = str(body.get("job", "")), str(body.get("session", ""))[:64], str(body.get("client", ""))
        tokens, prompt = body.get("tokens"), body.get("prompt_tokens")
        try:  # charged before anything else: the budget bounds what a caller may ask, bogus asks too
            self.gate.charge_audit(request, len(tokens) if isinstance(tokens, list) else 1)
        except RateLimitedError as exc:
            return refusal(exc)
        record = self.verifier.route_of(job)
        if record is None:
            return _error(404, f"no route of job {job!r} is known here", "not_found")
        if record.client != client or not self._may_act_for(request, client):
            return _error(403, f"job {job} is not this client's", "forbidden")
        if not isinstance(tokens, list) or not all(type(t) is int for t in tokens) or type(prompt) is not int:
            return _error(400, "tokens must be a list of token ids and prompt_tokens an integer", "bad_request")
        try:
            verdict = await self.verifier.audit(
                job,
                session,
                tokens,
                prompt_tokens=prompt,
                sampling=claimed_sampling(body),
                codec=str(body.get("codec", "fp32")),
            )
        except KlusterError as exc:
            return _error(400, exc, "bad_request")
        for culprit in verdict.get("guilty", ()):
            await self._ban(culprit["peer_id"], culprit["name"], job, f"returned wrong work on job {job}")
        for peer, name, partners in self.verifier.repeat_offenders():
            reason = f"contradicted {partners} different nodes about what it sent or received"
            await self._ban(peer, name, job, reason)
        return web.json_response(verdict)

    async def _ban(self, peer_id: str, name: str, job: str, reason: str) -> None:
        """A spot check caught ``peer_id``: it earns nothing more, loses what ``job`` paid it, and is
        disconnected for good (its clients fail over at once, as when a node leaves)."""
        if peer_id in self._banned:
            return
        log.warning("banning node %s (%s): %s", name, peer_id, reason)
        self._banned[peer_id] = reason
        self.registry.ban(peer_id, name, job, reason)
        try:
            await self.billing.forfeit(job, peer_id)
        except LedgerError as exc:
            log.error("could not take back the earnings of banned node %s: %s", peer_id, exc)
        self.events.node_event(events.NODE_BANNED, peer_id, name, reason=reason)
        ws = self._sockets.get(peer_id)
        if ws is not None:
            with contextlib.suppress(Exception):
                await ws.close(code=CLOSE_BANNED, message=f"banned: {reason}".encode()[:120])

    async def _earnings(self, request: web.Request) -> web.Response:
        """``GET /v1/earnings``: a supplier's credits (its own account with auth on, else ``?account=``)."""
        return await self._statement(request, Kind.CREDIT)

    async def _spend(self, request: web.Request) -> web.Response:
        """``GET /v1/spend``: a developer's debits, same shape as ``/v1/earnings``."""
        return await self._statement(request, Kind.DEBIT)

    async def _statement(self, request: web.Request, kind: Kind) -> web.Response:
        claims = request.get(ACCOUNT)
        named = request.query.get("account", "")
        if claims is not None and (claims.role != ADMIN or not named):
            account = claims.sub  # an account sees only its own statement; an admin may name any
        elif named:
            account = named[:256]
        else:
            return _error(400, "name the account: ?account=<supplier peer id or developer name> (auth is off)")
        try:
            return web.json_response(await self.billing.statement(account, kind))
        except LedgerError as exc:
            return _error(500, exc)

    def _budget(self, model_id: str, raw: str | None) -> dict[str, Any] | None:
        """The layers a request's activation budget skips (None: the whole model runs)."""
        if raw is None:
            return None
        try:
            budget = float(raw)
        except ValueError:
            raise ConfigError(f"activation must be a number in (0, 1], got {raw!r}") from None
        if budget == 1.0:
            return None
        importance = activation_plan.pack_importance(self.packs[model_id].manifests)
        if importance is None:
            raise ConfigError(
                f"model '{model_id}' is not calibrated, so no layers can be chosen to skip "
                "(run 'kluster calibrate MODEL --text FILE', then pack it again)"
            )
        cfg = self._configs[model_id]
        return activation_plan.describe(activation_plan.plan_layers(importance, cfg, budget), cfg, budget)

    def _pack_for(self, request: web.Request) -> Pack:
        pack = self.packs.get(request.match_info["model"])
        if pack is None:
            raise web.HTTPNotFound(text="unknown model")
        return pack

    async def _fragment_file(self, request: web.Request) -> web.StreamResponse:
        pack = self._pack_for(request)
        names = {m.name: m for m in pack.manifests}
        frag, fname = request.match_info["fragment"], request.match_info["file"]
        if frag not in names or fname not in (WEIGHTS, CONFIG, "manifest.json"):
            raise web.HTTPNotFound(text="no such fragment file")
        return web.FileResponse(pack.root / frag / fname)

    async def _tokenizer_file(self, request: web.Request) -> web.StreamResponse:
        pack = self._pack_for(request)
        fname = request.match_info["file"]
        if fname not in TOKENIZER_FILES or not (pack.tokenizer_dir / fname).is_file():
            raise web.HTTPNotFound(text="no such tokenizer file")
        return web.FileResponse(pack.tokenizer_dir / fname)

    # ------------------------------------------------------------- WebSocket

    async def _ws(self, request: web.Request) -> web.WebSocketResponse:
        ws = web.WebSocketResponse(
            max_msg_size=self.config.max_ws_message,
            timeout=CLOSE_S,
            heartbeat=self.config.heartbeat_s,
            compress=False,  # small JSON: deflate would cost CPU and a zlib state per socket for nothing
        )
        await ws.prepare(request)
        nonce = secrets.token_urlsafe(32)
        try:
            await ws.send_json({"type": "challenge", "nonce": nonce})
            hello = await asyncio.wait_for(ws.receive_json(), self.config.hello_timeout_s)
        except (TimeoutError, ValueError, TypeError, ConnectionError, RuntimeError):
            await ws.close(code=CLOSE_BAD_HELLO, message=b"expected hello")
            return ws
        if not isinstance(hello, dict) or hello.get("type") != "hello" or hello.get("role") not in ("node", "client"):
            await ws.close(code=CLOSE_BAD_HELLO, message=b"expected hello")
            return ws
        role = str(hello["role"])
        name = str(hello.get("name") or role)[:64]
        try:
            public_key = check_hello(hello.get("key"), hello.get("sig"), role, nonce)
        except IdentityError as exc:
            log.warning("refused %s %s from %s: %s", role, name, request.remote, exc)
            reason = f"hello without a valid identity proof ({exc}); is this kluster too old?"
            await ws.close(code=CLOSE_BAD_HELLO, message=reason.encode()[:120])  # a close reason fits 123 bytes
            return ws
        try:
            account = self.gate.check_hello(hello, role)
        except KlusterError as exc:
            log.warning("refused %s %s from %s: %s", role, name, request.remote, exc)
            await ws.close(code=CLOSE_UNAUTHORIZED, message=str(exc).encode()[:120])
            return ws
        peer_id = peer_id_for(role[0], public_key)
        if peer_id in self._banned:
            log.warning("refused banned node %s (%s) from %s", name, peer_id, request.remote)
            await ws.close(code=CLOSE_BANNED, message=f"banned: {self._banned[peer_id]}".encode()[:120])
            return ws
        if account is not None and role == "node":
            self._record_account(peer_id, name, account)
        elif account is not None:
            self._client_accounts[peer_id] = account
        await self._take_over(peer_id, name)
        resumed = peer_id in self._known
        if role == "node":
            self._known.add(peer_id)
        left = self._left[peer_id] = asyncio.Event()
        self._sockets[peer_id] = ws
        self._roles[peer_id] = role
        await ws.send_json(
            {
                "type": "welcome",
                "peer_id": peer_id,
                "ice_servers": self._ice_servers_for(peer_id),
            }
        )
        log.info("%s %s %s as %s", role, name, "reconnected" if resumed else "connected", peer_id)
        if role == "node":
            await ws.send_json({"type": "audit_key", "key": node_key(self._audit_secret, peer_id).hex()})
            if resumed:
                self.registry.set_online(peer_id)
            else:
                self.registry.add_node(peer_id, name)
            self.events.node_event(events.NODE_JOINED, peer_id, name, resumed=resumed)
            await self._node_joined(peer_id, ws, hello)
        pinger = asyncio.create_task(ping_forever(ws, self.config.heartbeat_s), name=f"ping-{peer_id}")
        try:
            async for data in receive_json(ws, self.config.heartbeat_s * HEARTBEAT_MISSES, f"{role} {name}"):
                await self._on_message(peer_id, role, ws, data)
        finally:
            pinger.cancel()
            try:
                if self._sockets.get(peer_id) is ws:  # else a newer socket of this peer took over
                    await self._peer_left(peer_id, role, name)
            finally:
                left.set()
                if self._left.get(peer_id) is left:
                    del self._left[peer_id]
        return ws

    def _record_account(self, peer_id: str, name: str, account: str) -> None:
        """Remember (in memory and the accounts file) the account a node registered under."""
        old = self._node_accounts.get(peer_id)
        if old == account:
            return
        if old is not None:
            log.warning("node %s (%s) moved from account %s to %s", peer_id, name, old, account)
        self._node_accounts[peer_id] = account
        if self.accounts is not None:
            self.accounts.record_node(peer_id, name, account)

    async def _peer_left(self, peer_id: str, role: str, name: str) -> None:
        self._sockets.pop(peer_id, None)
        self._roles.pop(peer_id, None)
        if role == "node":
            self.registry.set_offline(peer_id)
            self._rtts.pop(peer_id, None)
            self._sessions.pop(peer_id, None)
            self._frames.pop(peer_id, None)
            self.moe.left(peer_id)
            self.placer.left(peer_id)
            self._replan_soon()
            self.events.node_event(events.NODE_LEFT, peer_id, name)
            await self._broadcast_to_clients({"type": "node_gone", "peer_id": peer_id, "name": name})
        log.info("%s %s (%s) disconnected", role, name, peer_id)

    async def _take_over(self, peer_id: str, name: str) -> None:
        """Close the open socket of a peer whose key just proved itself on a new one; wait for its clean-up.

        Only the key's holder gets here, so the new socket is the one to keep: the old one belongs
        to a process that died without closing (kill -9, a reboot) and is not noticed yet, or to a
        second process using the same key file, which is told why (CLOSE_REPLACED) and stops.
        """
        while (old := self._sockets.get(peer_id)) is not None:
            log.warning("%s (%s) connected again with the same identity key; closing its older socket", peer_id, name)
            left = self._left.get(peer_id)
            with contextlib.suppress(Exception):  # it may be half-dead already
                await old.close(code=CLOSE_REPLACED, message=b"replaced by a newer connection with this identity key")
            if left is not None:
                with contextlib.suppress(TimeoutError):
                    await asyncio.wait_for(left.wait(), CLOSE_S + 4)
            if self._sockets.get(peer_id) is old:  # its handler is stuck: forget the socket ourselves
                self._sockets.pop(peer_id, None)

    def _ice_servers_for(self, peer_id: str) -> list[dict[str, Any]]:
        """The static STUN/TURN servers, plus TURN with a credential minted now for ``peer_id``."""
        servers = list(self.config.ice_servers)
        if self.config.turn is not None:
            servers.append(self.config.turn.server_for(peer_id))
        return servers

    async def _refresh_ice_forever(self, turn: TurnConfig) -> None:
        """Send every peer fresh TURN credentials each ttl/2, so the ones it holds never expire.

        coturn checks a credential only when an allocation is made, i.e. when a link opens; a node
        up for days opens links long after its ``welcome``, and those need a valid credential.
        """
        while True:
            await asyncio.sleep(turn.ttl_s / 2)
            for peer_id, ws in list(self._sockets.items()):
                with contextlib.suppress(ConnectionError, RuntimeError):
                    await ws.send_json({"type": ICE_SERVERS, "ice_servers": self._ice_servers_for(peer_id)})

    async def _node_joined(self, peer_id: str, ws: web.WebSocketResponse, hello: dict[str, Any]) -> None:
        """Keep what a reconnecting node still hosts, then have every node measure itself for its model.

        Placement waits for the measurement: only a speed the node measured on this model's layers
        places it, never the one it may claim in its hello.
        """
        name = str(hello.get("name") or "node")[:64]
        if "hosting" not in hello and await self.moe.node_joined(peer_id, name, ws, spare=not self.packs):
            return  # an expert node: no measurement, no layer placement
        claimed = _positive(hello.get("claimed_layers_per_s"))
        hosting = hello.get("hosting")
        model_id = await self._take_back(peer_id, hosting, claimed) if isinstance(hosting, dict) else None
        if model_id is None:
            model_id = self.placer.choose_model()
            if model_id is None:
                log.warning("node %s joined but no model is served", peer_id)
                return
            self.placer.joined(peer_id, model_id, claimed)
        config, dtype = self._bench[model_id]
        self.placer.measuring(peer_id, asyncio.get_running_loop().time())
        await ws.send_json({"type": "measure", "model_id": model_id, "config": config, "dtype": dtype})

    async def _take_back(self, peer_id: str, hosting: dict[str, Any], claimed: float | None) -> str | None:
        """A node that already holds fragments of a served model keeps them (no reload after a blip)."""
        model_id = str(hosting.get("model_id"))
        layout = self.layouts.get(model_id)
        span = None if layout is None else _span(hosting.get("units"), layout.units)
        if layout is None or span is None:
            return None
        self.placer.joined(peer_id, model_id, claimed)
        self.placer.hosting(peer_id, model_id, span)
        self.registry.set_span(peer_id, model_id, span, ready=True)
        log.info("node %s still hosts %s", peer_id, _describe_span(layout, span))
        await self._broadcast_to_clients({"type": "node_ready", "peer_id": peer_id})
        return model_id

    async def _broadcast_to_clients(self, message: dict[str, Any]) -> None:
        """Tell every connected client at once (a client whose route used a lost node fails over)."""
        for peer_id, ws in list(self._sockets.items()):
            if self._roles.get(peer_id) == "client" and not ws.closed:
                try:
                    await ws.send_json(message)
                except (ConnectionError, RuntimeError) as exc:
                    log.debug("could not notify %s: %s", peer_id, exc)

    # ------------------------------------------------------------- placement

    def _replan_soon(self) -> None:
        """Ask for a placement run once things settle (see ``placement_settle_s``)."""
        if self._closed:
            return
        now = asyncio.get_running_loop().time()
        self._replan_dirty = True
        self._replan_quiet_at = now + self.config.placement_settle_s
        if self._replan_first is None:
            self._replan_first = now
        if self._replan_task is None or self._replan_task.done():
            self._replan_task = asyncio.create_task(self._replan_when_settled(), name="placement")

    async def _replan_when_settled(self) -> None:
        loop = asyncio.get_running_loop()
        limit = max(self.config.placement_max_wait_s, 2 * self.config.placement_settle_s)
        while self._replan_dirty and not self._closed:
            now = loop.time()
            if now < self._grace_until:
                await asyncio.sleep(min(0.5, self._grace_until - now))
                continue
            first = self._replan_first if self._replan_first is not None else now
            quiet = now >= self._replan_quiet_at and self.placer.measuring_count(now, limit) == 0
            if not quiet and now < first + limit:
                await asyncio.sleep(0.1)
                continue
            self._replan_dirty = False
            self._replan_first = None
            try:
                await self._replan()
            except (KlusterError, ConnectionError, RuntimeError) as exc:
                log.warning("placement run failed: %s", exc)

    async def _replan(self) -> None:
        """Run placement over live measured nodes and send every node whose span changed its assignment."""
        for peer_id, model_id, span in self.placer.replan():
            ws = self._sockets.get(peer_id)
            if ws is None or ws.closed:
                continue
            layout = self.layouts[model_id]
            manifests = self.packs[model_id].manifests[span[0] : span[1]]
            log.info("assigning %s to %s", _describe_span(layout, span), peer_id)
            await ws.send_json(
                {
                    "type": "assign",
                    "model_id": model_id,
                    "units": list(span),
                    "manifests": [m.to_json() for m in manifests],
                    "files_url": f"/v1/models/{model_id}/fragments/",
                }
            )

    def _on_capability(self, peer_id: str, data: dict[str, Any]) -> None:
        capability = data.get("capability")
        if not isinstance(capability, dict) or data.get("model_id") != self.placer.model_of(peer_id):
            log.warning("node %s sent a capability report for another model; ignored", peer_id)
            return
        self.registry.set_info(peer_id, json.dumps(capability))
        memory = capability.get("memory")
        offered = memory.get("offered_bytes") if isinstance(memory, dict) else None
        offered = int(offered) if isinstance(offered, int) and not isinstance(offered, bool) and offered > 0 else 0
        speed = measured_layers_per_s(capability)
        self.placer.measured(peer_id, Measurement(speed, offered))
        log.info("node %s measured %.0f layers/s, offers %d MiB", peer_id, speed, offered >> 20)
        self._replan_soon()

    async def _on_ready(self, peer_id: str, data: dict[str, Any]) -> None:
        """Record what the node actually loaded: routes must never send layers to a node without them."""
        model_id = str(data.get("model_id"))
        layout = self.layouts.get(model_id)
        span = None if layout is None else _span(data.get("units"), layout.units)
        if layout is None or span is None:
            self.registry.set_ready(peer_id, False)
            log.warning("node %s reports fragments this coordinator does not serve", peer_id)
            return
        self.registry.set_span(peer_id, model_id, span, ready=True)
        log.info("node %s ready with %s", peer_id, _describe_span(layout, span))
        await self._broadcast_to_clients({"type": "node_ready", "peer_id": peer_id})
        self.events.node_event(events.NODE_READY, peer_id, model_id=model_id, fragment=span[0], fragments=list(span))
        if self.jobs is not None:
            self.jobs.tick()  # queued jobs start now rather than at the next tick

    async def _on_message(self, peer_id: str, role: str, ws: web.WebSocketResponse, data: dict[str, Any]) -> None:
        kind = data.get("type")
        if kind == "signal":
            target = self._sockets.get(str(data.get("to")))
            if target is None or target.closed:
                await ws.send_json({"type": "signal_error", "to": data.get("to"), "message": "peer is not connected"})
                return
            await target.send_json({"type": "signal", "from": peer_id, "data": data.get("data")})
        elif kind == "capability" and role == "node":
            self._on_capability(peer_id, data)
        elif kind == "ready" and role == "node":
            await self._on_ready(peer_id, data)
        elif kind == "rtt" and role == "node":
            self._rtts[peer_id] = _clean_rtts(data.get("peers"))
            sessions = data.get("sessions")
            if isinstance(sessions, int) and not isinstance(sessions, bool) and 0 <= sessions < 1_000_000:
                self._sessions[peer_id] = sessions
            self._frames[peer_id] = _clean_counts(data.get("frames"), frames.COUNTERS)
        elif kind == "audit_reply" and role == "node":
            self.verifier.on_reply(peer_id, data)
        elif kind == "receipt" and role == "node":
            await self._relay_receipt(peer_id, data.get("receipt"))
        elif kind == "countersigned" and role == "client":
            await self._credit(peer_id, ws, data.get("receipt"))
        elif kind in EXPERT_MESSAGES and role == "node":
            self.moe.on_message(peer_id, data)
        elif kind == "draining" and role == "node":
            self.registry.set_ready(peer_id, False)  # no new routes through it; live sessions finish
            self.placer.retire(peer_id)
            self._replan_soon()
            log.info("node %s is draining", peer_id)
            self.events.node_event(events.NODE_DRAINING, peer_id)
        elif kind == "failed" and role == "node":
            # It keeps serving what it had loaded (if anything); plan the model without it.
            self.placer.retire(peer_id)
            self._replan_soon()
            log.warning("node %s failed to load its assignment: %s", peer_id, str(data.get("message"))[:300])
        else:
            self.registry.touch(peer_id)

    async def _relay_receipt(self, node: str, text: Any) -> None:
        """A node's signed receipt goes to its job's client to countersign (if the job was assigned to it)."""
        try:
            receipt = json.loads(text)["receipt"] if isinstance(text, str) else None
            job, supplier = str(receipt["job_id"]), str(receipt["supplier"])
        except (ValueError, TypeError, KeyError):
            log.info("node %s sent a malformed receipt; dropped", node)
            return
        client = self.billing.client_of(job, supplier) if supplier == node else None
        if client is None or not await self._send_to(client, {"type": "receipt", "receipt": text}):
            log.info("receipt of %s for job %s has no client to countersign it; dropped", node, job)

    async def _credit(self, client: str, ws: web.WebSocketResponse, text: Any) -> None:
        """A countersigned receipt: credit it (or not) and tell the sender the verdict."""
        try:
            decision = await self.billing.submit_json(text)
        except LedgerError as exc:
            decision = f"the ledger could not record it: {exc}"
        if isinstance(decision, str):
            reply: dict[str, Any] = {"type": "credit", "ok": False, "reject": "bad_receipt", "detail": decision}
        else:
            reply = {
                "type": "credit",
                "ok": decision.ok,
                "job_id": decision.job_id,
                "supplier": decision.supplier,
                "units": decision.units,
                "reject": None if decision.reject is None else decision.reject.value,
                "detail": decision.detail,
            }
        log.debug("receipt from client %s: %s", client, reply)
        with contextlib.suppress(ConnectionError, RuntimeError):
            await ws.send_json(reply)

    # ------------------------------------------------------------- lifecycle

    async def start(self) -> int:
        """Bind and start serving; returns the bound port (useful with port 0)."""
        self._grace_until = asyncio.get_running_loop().time() + self.config.placement_grace_s
        self._runner = web.AppRunner(self.app(), handle_signals=False, access_log=None)
        await self._runner.setup()
        site = web.TCPSite(self._runner, self.config.host, self.config.port, backlog=self.config.backlog)
        await site.start()
        server = site._server
        port = server.sockets[0].getsockname()[1] if server and server.sockets else self.config.port
        log.info("coordinator listening on http://%s:%d", self.config.host, port)
        if self.config.turn is not None:
            self._ice_task = asyncio.create_task(self._refresh_ice_forever(self.config.turn), name="turn-credentials")
        return int(port)

    async def shutdown(self) -> None:
        if self._closed:
            return
        self._closed = True
        if self._ice_task is not None:
            self._ice_task.cancel()
            with contextlib.suppress(asyncio.CancelledError):
                await self._ice_task
        if self._replan_task is not None:
            self._replan_task.cancel()
            with contextlib.suppress(asyncio.CancelledError):
                await self._replan_task
        for ws in list(self._sockets.values()):
            await ws.close()
        if self._runner is not None:
            await self._runner.cleanup()
        self.registry.close()
        self.billing.close()
        if self.accounts is not None:
            self.accounts.close()
