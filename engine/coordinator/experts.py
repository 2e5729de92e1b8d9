"""The coordinator's view of MoE packs with expert fragments: who holds which experts.

A pack with expert fragments (``engine.fragments.experts``) is served apart from the layer
placement: its trunk runs in the client (``engine.client.experts``) and each expert fragment
must sit on a node. Placement here is deliberately plain, because all expert fragments of a pack
are the same size and every token needs every fragment reachable: a joining node gets the expert
fragment with the fewest hosts (ties: the lowest index), so the first M nodes get the M
fragments and later ones add copies. The coordinator only asks for this while some expert
fragment has no host, or when it serves no other model; otherwise nodes go to layer placement.

Messages (WebSocket, besides those in ``engine.coordinator.app``)::

  coord -> node   assign_experts {model_id, manifest, files_url}   fetch, verify, load, serve
  node -> coord   experts_ready {model_id, fragment} | experts_failed {message}
  node -> coord   expert_stats {fragment, bytes, layers: {L: {messages, rows: {E: n}}}}
                  what the node received (counted where rows arrive)

HTTP: ``GET /v1/experts?model=M`` (trunk manifests, expert fragments with their hosts and
counters), ``GET /v1/experts/{model}/files/{fragment}/{file}`` and
``GET /v1/experts/{model}/tokenizer/{file}``.
"""

from __future__ import annotations

import logging
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from aiohttp import web

from engine.fragments.experts import ExpertPack, is_expert_pack, read_expert_pack
from engine.fragments.manifest import CONFIG, MANIFEST, WEIGHTS
from engine.fragments.pack import TOKENIZER_FILES

log = logging.getLogger(__name__)

#: WebSocket message types from nodes that ``ExpertBoard.on_message`` handles
NODE_MESSAGES = frozenset({"experts_ready", "experts_failed", "expert_stats"})
_MAX_COUNT = 2**62


@dataclass
class _Host:
    name: str
    model_id: str
    fragment: str
    ready: bool = False
    stats: dict[str, Any] = field(default_factory=dict)


def _count(v: Any) -> int | None:
    return v if isinstance(v, int) and not isinstance(v, bool) and 0 <= v < _MAX_COUNT else None


def clean_stats(raw: dict[str, Any], max_layers: int = 4096, max_experts: int = 4096) -> dict[str, Any]:
    """A node's ``expert_stats``, keeping only well-formed counters (layer and expert keys as strings)."""
    layers: dict[str, Any] = {}
    raw_layers = raw.get("layers")
    for key, entry in list(raw_layers.items())[:max_layers] if isinstance(raw_layers, dict) else ():
        if not (isinstance(key, str) and key.isdigit() and isinstance(entry, dict)):
            continue
        rows = entry.get("rows")
        clean_rows = {
            e: n
            for e, v in (list(rows.items())[:max_experts] if isinstance(rows, dict) else ())
            if isinstance(e, str) and e.isdigit() and (n := _count(v)) is not None
        }
        layers[key] = {"messages": _count(entry.get("messages")) or 0, "rows": clean_rows}
    return {"bytes": _count(raw.get("bytes")) or 0, "layers": layers}


class ExpertBoard:
    """Expert packs served, which node holds which expert fragment, and what each received."""

    def __init__(self) -> None:
        self.packs: dict[str, ExpertPack] = {}
        self._hosts: dict[str, _Host] = {}

    def add_if_expert_pack(self, root: Path) -> bool:
        """Serve ``root`` here if it is a pack with expert fragments (``False``: a plain pack)."""
        if not is_expert_pack(root):
            return False
        pack = read_expert_pack(root)
        self.packs[pack.model_id] = pack
        log.info("serving %s as a trunk and %d expert fragments", pack.model_id, len(pack.experts))
        return True

    def _load(self, model_id: str, fragment: str) -> int:
        return sum(1 for h in self._hosts.values() if (h.model_id, h.fragment) == (model_id, fragment))

    def _choice(self, spare: bool) -> tuple[ExpertPack, int] | None:
        """The expert fragment with the fewest hosts; None if every one has a host and ``spare`` is False."""
        best: tuple[int, str, int] | None = None
        for model_id, pack in sorted(self.packs.items()):
            for m in pack.experts:
                load = self._load(model_id, m.name)
                if best is None or load < best[0]:
                    best = (load, model_id, m.index)
        if best is None or (best[0] > 0 and not spare):
            return None
        return self.packs[best[1]], best[2]

    async def node_joined(self, peer_id: str, name: str, ws: web.WebSocketResponse, *, spare: bool) -> bool:
        """Give a joining node an expert fragment if one lacks a host (any, when ``spare``); True if it got one."""
        choice = self._choice(spare)
        if choice is None:
            return False
        pack, index = choice
        m = pack.experts[index]
        self._hosts[peer_id] = _Host(name, pack.model_id, m.name)
        log.info("assigning %s of %s to %s (%s)", m.name, pack.model_id, name, peer_id)
        await ws.send_json(
            {
                "type": "assign_experts",
                "model_id": pack.model_id,
                "manifest": m.to_json(),
                "files_url": f"/v1/experts/{pack.model_id}/files/",
            }
        )
        return True

    def on_message(self, peer_id: str, data: dict[str, Any]) -> None:
        host = self._hosts.get(peer_id)
        kind = data.get("type")
        if host is None:
            log.warning("node %s sent %s but holds no expert fragment; ignored", peer_id, kind)
        elif kind == "experts_ready" and (data.get("model_id"), data.get("fragment")) == (host.model_id, host.fragment):
            host.ready = True
            log.info("node %s ready with %s of %s", peer_id, host.fragment, host.model_id)
        elif kind == "expert_stats" and data.get("fragment") == host.fragment:
            host.stats = clean_stats(data)
        elif kind == "experts_failed":
            log.warning("node %s cannot host %s: %s", peer_id, host.fragment, str(data.get("message"))[:300])
            del self._hosts[peer_id]

    def left(self, peer_id: str) -> None:
        self._hosts.pop(peer_id, None)

    def describe_node(self, peer_id: str) -> dict[str, Any] | None:
        """What ``GET /v1/nodes`` shows for an expert node (None for other nodes)."""
        h = self._hosts.get(peer_id)
        if h is None:
            return None
        return {"model_id": h.model_id, "fragment": h.fragment, "ready": h.ready, "received": h.stats}

    # ------------------------------------------------------------------ HTTP

    def add_routes(self, app: web.Application) -> None:
        app.router.add_get("/v1/experts", self._experts)
        app.router.add_get("/v1/experts/{model}/files/{fragment}/{file}", self._file)
        app.router.add_get("/v1/experts/{model}/tokenizer/{file}", self._tokenizer)

    async def _experts(self, request: web.Request) -> web.Response:
        pack = self.packs.get(request.query.get("model", ""))
        if pack is None:
            served = ", ".join(sorted(self.packs)) or "none"
            message = f"model '{request.query.get('model', '')}' has no expert pack here (served: {served})"
            return web.json_response({"error": {"code": "model_not_found", "message": message}}, status=404)
        fragments = []
        for m in pack.experts:
            hosts = [
                {"peer_id": p, "name": h.name, "ready": h.ready, "received": h.stats}
                for p, h in sorted(self._hosts.items())
                if (h.model_id, h.fragment) == (pack.model_id, m.name)
            ]
            fragments.append({"name": m.name, "manifest": m.to_json(), "hosts": hosts})
        return web.json_response(
            {
                "model_id": pack.model_id,
                "trunk": [m.to_json() for m in pack.trunk.manifests],
                "experts": fragments,
                "tokenizer": pack.trunk.tokenizer_files,
                "files_url": f"/v1/experts/{pack.model_id}/files/",
            }
        )

    def _pack(self, request: web.Request) -> ExpertPack:
        pack = self.packs.get(request.match_info["model"])
        if pack is None:
            raise web.HTTPNotFound(text="unknown model")
        return pack

    async def _file(self, request: web.Request) -> web.StreamResponse:
        pack = self._pack(request)
        frag, fname = request.match_info["fragment"], request.match_info["file"]
        if pack.manifest(frag) is None or fname not in (WEIGHTS, CONFIG, MANIFEST):
            raise web.HTTPNotFound(text="no such fragment file")
        return web.FileResponse(pack.root / frag / fname)

    async def _tokenizer(self, request: web.Request) -> web.StreamResponse:
        pack = self._pack(request)
        fname = request.match_info["file"]
        if fname not in TOKENIZER_FILES or not (pack.trunk.tokenizer_dir / fname).is_file():
            raise web.HTTPNotFound(text="no such tokenizer file")
        return web.FileResponse(pack.trunk.tokenizer_dir / fname)
