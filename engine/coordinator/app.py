"""The coordinator: the control plane the maintainers run (``kluster coordinator``).

It never carries activations. It registers nodes over a WebSocket, tells each which fragment to
host, serves fragment files and tokenizers over HTTP, relays WebRTC offers/answers between peers,
and answers "which nodes should my request go through" with a route.

WebSocket ``/v1/ws`` messages (JSON objects with a ``type``):
  peer -> coord   hello {role: node|client, name, resume?: {peer_id, token}, hosting?: {model_id, fragment}}
                  first message, within ``hello_timeout_s``; ``resume`` keeps the peer id across a
                  reconnect, ``hosting`` keeps a node's loaded fragment
  coord -> peer   welcome {peer_id, resume_token, ice_servers}
  coord -> client node_gone {peer_id, name}  a node's socket closed: routes through it are broken
  coord -> client node_ready {peer_id}        a node (new or back after a blip) can be routed through
  both ways       ping                        every ``heartbeat_s``; 3 silent intervals drop the socket
  coord -> node   assign {model_id, manifest, files_url}
  node -> coord   ready {model_id, fragment, capability} | failed {message} | draining {}
  node -> coord   rtt {peers: {peer_id: ms}}  measured heartbeat round trips to linked peers
  peer -> coord   signal {to, data}           relayed as signal {from, data}
  coord -> peer   signal_error {to, message}  the target is not connected
"""

from __future__ import annotations

import asyncio
import json
import logging
import secrets
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from aiohttp import web

from engine import __version__
from engine.coordinator import events
from engine.coordinator.events import EventHub
from engine.coordinator.jobs_api import JobService, add_job_routes
from engine.coordinator.registry import Registry
from engine.errors import KlusterError, NoRouteError
from engine.fragments.manifest import CONFIG, WEIGHTS
from engine.fragments.pack import TOKENIZER_FILES
from engine.fragments.store import Pack, read_pack
from engine.scheduler.placement import FragmentSlot, choose_fragment, plan_route
from engine.transport.signaling import CLOSE_S, HEARTBEAT_MISSES, HEARTBEAT_S, ping_forever, receive_json

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
    #: largest WebSocket message accepted from a peer (SDP blobs are a few KB)
    max_ws_message: int = 256 * 1024
    hello_timeout_s: float = 10.0
    #: STUN/TURN servers handed to peers (RTCIceServer dicts); empty means host candidates only
    ice_servers: tuple[dict[str, Any], ...] = field(default_factory=tuple)


def _error(status: int, err: KlusterError | str, code: str = "coordinator") -> web.Response:
    if isinstance(err, KlusterError):
        code, message = err.code, str(err)
    else:
        message = err
    return web.json_response({"error": {"code": code, "message": message}}, status=status)


def _clean_rtts(raw: Any, limit: int = 256) -> dict[str, float]:
    """A node's RTT report, keeping only well-formed entries (at most ``limit``)."""
    if not isinstance(raw, dict):
        return {}
    out: dict[str, float] = {}
    for peer, ms in list(raw.items())[:limit]:
        if isinstance(peer, str) and len(peer) <= 64 and isinstance(ms, int | float) and 0 <= ms < 600_000:
            out[peer] = round(float(ms), 3)
    return out


class Coordinator:
    """The aiohttp application and its in-memory view of connected peers."""

    def __init__(self, config: CoordinatorConfig) -> None:
        self.config = config
        self.registry = Registry(config.db_path)
        self.packs: dict[str, Pack] = {}
        for root in config.packs:
            pack = read_pack(root)
            self.packs[pack.model_id] = pack
        self.slots = [
            FragmentSlot(p.model_id, m.index, m.start, m.end) for p in self.packs.values() for m in p.manifests
        ]
        self._sockets: dict[str, web.WebSocketResponse] = {}
        self._roles: dict[str, str] = {}
        #: proof of identity for peers that reconnect (issued in each welcome)
        self._resume_tokens: dict[str, str] = {}
        #: node -> {peer: measured round trip in ms}, as last reported by the node
        self._rtts: dict[str, dict[str, float]] = {}
        #: job and grid events for watchers (``GET /v1/events``, the TUI)
        self.events = EventHub()
        self.jobs: JobService | None = None
        self._runner: web.AppRunner | None = None
        self._closed = False

    # ------------------------------------------------------------------ HTTP

    def app(self) -> web.Application:
        app = web.Application(client_max_size=1024 * 1024)
        app.router.add_get("/v1/health", self._health)
        app.router.add_get("/v1/models", self._models)
        app.router.add_get("/v1/nodes", self._nodes)
        app.router.add_get("/v1/route", self._route)
        app.router.add_get("/v1/models/{model}/fragments/{fragment}/{file}", self._fragment_file)
        app.router.add_get("/v1/models/{model}/tokenizer/{file}", self._tokenizer_file)
        app.router.add_get("/v1/ws", self._ws)
        self.jobs = add_job_routes(
            app,
            db_path=self.config.db_path,
            hub=self.events,
            is_served=self.packs.__contains__,
            has_route=self._has_route,
        )
        return app

    def _has_route(self, model_id: str) -> bool:
        """Whether live ready nodes cover every layer now: the job queue starts a model's jobs only then."""
        try:
            plan_route(model_id, self.slots, self.registry.online_nodes())
        except NoRouteError:
            return False
        return True

    async def _health(self, _: web.Request) -> web.Response:
        return web.json_response({"ok": True, "version": __version__, "nodes": len(self._sockets)})

    async def _models(self, _: web.Request) -> web.Response:
        nodes = self.registry.online_nodes()
        out = []
        for pack in self.packs.values():
            frags = []
            for m in pack.manifests:
                hosts = [n for n in nodes if n.model_id == pack.model_id and n.fragment == m.index]
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
        nodes = self.registry.describe()
        for node in nodes:
            node["rtt_ms"] = self._rtts.get(str(node["peer_id"]), {})
        return web.json_response({"nodes": nodes})

    async def _route(self, request: web.Request) -> web.Response:
        model_id = request.query.get("model", "")
        if model_id not in self.packs:
            served = ", ".join(sorted(self.packs)) or "none"
            return _error(404, f"model '{model_id}' is not served here (served: {served})", "model_not_found")
        excluded = {p for p in request.query.get("exclude", "").split(",") if p}
        nodes = [n for n in self.registry.online_nodes() if n.peer_id not in excluded]
        try:
            route = plan_route(model_id, self.slots, nodes)
        except NoRouteError as exc:
            return _error(503, exc)
        return web.json_response(
            {
                "model_id": model_id,
                "route": [
                    {"peer_id": n.peer_id, "name": n.name, "index": s.index, "start": s.start, "end": s.end}
                    for n, s in route
                ],
            }
        )

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
        ws = web.WebSocketResponse(max_msg_size=self.config.max_ws_message, timeout=CLOSE_S)
        await ws.prepare(request)
        try:
            hello = await asyncio.wait_for(ws.receive_json(), self.config.hello_timeout_s)
        except (TimeoutError, ValueError, TypeError):
            await ws.close(code=4000, message=b"expected hello")
            return ws
        if not isinstance(hello, dict) or hello.get("type") != "hello" or hello.get("role") not in ("node", "client"):
            await ws.close(code=4000, message=b"expected hello")
            return ws
        role = str(hello["role"])
        name = str(hello.get("name") or role)[:64]
        peer_id = self._resumed_id(hello.get("resume")) or f"{role[0]}-{secrets.token_hex(6)}"
        resumed = peer_id in self._resume_tokens
        self._resume_tokens[peer_id] = secrets.token_urlsafe(16)
        self._sockets[peer_id] = ws
        self._roles[peer_id] = role
        await ws.send_json(
            {
                "type": "welcome",
                "peer_id": peer_id,
                "resume_token": self._resume_tokens[peer_id],
                "ice_servers": list(self.config.ice_servers),
            }
        )
        log.info("%s %s %s as %s", role, name, "reconnected" if resumed else "connected", peer_id)
        if role == "node":
            if resumed:
                self.registry.set_online(peer_id)
            else:
                self.registry.add_node(peer_id, name)
            self.events.node_event(events.NODE_JOINED, peer_id, name, resumed=resumed)
            if not await self._take_back(peer_id, hello.get("hosting")):
                await self._assign(peer_id, ws)
        pinger = asyncio.create_task(ping_forever(ws, self.config.heartbeat_s), name=f"ping-{peer_id}")
        try:
            async for data in receive_json(ws, self.config.heartbeat_s * HEARTBEAT_MISSES, f"{role} {name}"):
                await self._on_message(peer_id, role, ws, data)
        finally:
            pinger.cancel()
            self._sockets.pop(peer_id, None)
            self._roles.pop(peer_id, None)
            if role == "node":
                self.registry.set_offline(peer_id)
                self._rtts.pop(peer_id, None)
                self.events.node_event(events.NODE_LEFT, peer_id, name)
                await self._broadcast_to_clients({"type": "node_gone", "peer_id": peer_id, "name": name})
            log.info("%s %s (%s) disconnected", role, name, peer_id)
        return ws

    def _resumed_id(self, resume: Any) -> str | None:
        """A reconnecting peer keeps its id if it proves it held it (the token from its last welcome)."""
        if not isinstance(resume, dict):
            return None
        peer_id, token = resume.get("peer_id"), resume.get("token")
        known = self._resume_tokens.get(str(peer_id))
        if known is None or not isinstance(token, str) or not secrets.compare_digest(known, token):
            return None
        if peer_id in self._sockets:  # still connected: a second socket may not take over the id
            return None
        return str(peer_id)

    async def _take_back(self, peer_id: str, hosting: Any) -> bool:
        """A node that already holds a fragment of a served model keeps it (no reload after a blip)."""
        if not isinstance(hosting, dict):
            return False
        pack = self.packs.get(str(hosting.get("model_id")))
        index = hosting.get("fragment")
        if pack is None or not isinstance(index, int) or not 0 <= index < len(pack.manifests):
            return False
        self.registry.assign(peer_id, pack.model_id, index)
        self.registry.set_ready(peer_id, True)
        log.info("node %s still hosts %s fragment %d", peer_id, pack.model_id, index)
        await self._broadcast_to_clients({"type": "node_ready", "peer_id": peer_id})
        return True

    async def _broadcast_to_clients(self, message: dict[str, Any]) -> None:
        """Tell every connected client at once (a client whose route used a lost node fails over)."""
        for peer_id, ws in list(self._sockets.items()):
            if self._roles.get(peer_id) == "client" and not ws.closed:
                try:
                    await ws.send_json(message)
                except (ConnectionError, RuntimeError) as exc:
                    log.debug("could not notify %s: %s", peer_id, exc)

    async def _assign(self, peer_id: str, ws: web.WebSocketResponse) -> None:
        slot = choose_fragment(self.slots, self.registry.online_nodes())
        if slot is None:
            log.warning("node %s joined but no model is served", peer_id)
            return
        manifest = self.packs[slot.model_id].manifests[slot.index]
        log.info(
            "assigning %s fragment %d (layers %d-%d) to %s", slot.model_id, slot.index, slot.start, slot.end, peer_id
        )
        self.registry.assign(peer_id, slot.model_id, slot.index)
        await ws.send_json(
            {
                "type": "assign",
                "model_id": slot.model_id,
                "manifest": manifest.to_json(),
                "files_url": f"/v1/models/{slot.model_id}/fragments/{manifest.name}/",
            }
        )

    async def _on_message(self, peer_id: str, role: str, ws: web.WebSocketResponse, data: dict[str, Any]) -> None:
        kind = data.get("type")
        if kind == "signal":
            target = self._sockets.get(str(data.get("to")))
            if target is None or target.closed:
                await ws.send_json({"type": "signal_error", "to": data.get("to"), "message": "peer is not connected"})
                return
            await target.send_json({"type": "signal", "from": peer_id, "data": data.get("data")})
        elif kind == "ready" and role == "node":
            capability = data.get("capability")
            if isinstance(capability, dict):
                self.registry.set_info(peer_id, json.dumps(capability))
            # Record what the node actually loaded: after a reconnect mid-load it may differ from
            # the latest assignment, and a route must never send layers to a node without them.
            if not await self._take_back(peer_id, {"model_id": data.get("model_id"), "fragment": data.get("fragment")}):
                self.registry.set_ready(peer_id, False)
                log.warning("node %s reports a fragment this coordinator does not serve", peer_id)
            log.info("node %s ready with %s fragment %s", peer_id, data.get("model_id"), data.get("fragment"))
            self.events.node_event(
                events.NODE_READY, peer_id, model_id=data.get("model_id"), fragment=data.get("fragment")
            )
            if self.jobs is not None:
                self.jobs.tick()  # queued jobs start now rather than at the next tick
        elif kind == "rtt" and role == "node":
            self._rtts[peer_id] = _clean_rtts(data.get("peers"))
        elif kind == "draining" and role == "node":
            self.registry.set_ready(peer_id, False)  # no new routes through it; live sessions finish
            log.info("node %s is draining", peer_id)
            self.events.node_event(events.NODE_DRAINING, peer_id)
        elif kind == "failed" and role == "node":
            self.registry.set_ready(peer_id, False)
            log.warning("node %s failed to load its fragment: %s", peer_id, str(data.get("message"))[:300])
        else:
            self.registry.touch(peer_id)

    # ------------------------------------------------------------- lifecycle

    async def start(self) -> int:
        """Bind and start serving; returns the bound port (useful with port 0)."""
        self._runner = web.AppRunner(self.app(), handle_signals=False, access_log=None)
        await self._runner.setup()
        site = web.TCPSite(self._runner, self.config.host, self.config.port)
        await site.start()
        server = site._server
        port = server.sockets[0].getsockname()[1] if server and server.sockets else self.config.port
        log.info("coordinator listening on http://%s:%d", self.config.host, port)
        return int(port)

    async def shutdown(self) -> None:
        if self._closed:
            return
        self._closed = True
        for ws in list(self._sockets.values()):
            await ws.close()
        if self._runner is not None:
            await self._runner.cleanup()
        self.registry.close()
