"""The peer side of the coordinator WebSocket: hello/welcome, signal relay, control messages.

Nodes and clients both hold one of these. Signals addressed to us go to the ``PeerManager``;
a ``signal_error`` (the target is not connected) fails the pending connection at once instead of
letting it run into the connect timeout; everything else goes to the owner's ``on_control``.
"""

from __future__ import annotations

import asyncio
import contextlib
import json
import logging
from collections.abc import Awaitable, Callable
from typing import Any

import aiohttp
from aiortc import RTCIceServer

from engine.errors import CoordinatorError, KlusterError, error_for_code
from engine.transport.peer import PeerManager

log = logging.getLogger(__name__)

OnControl = Callable[[dict[str, Any]], Awaitable[None]]

#: WebSocket ping interval towards the coordinator (a pong late by half of it drops the socket)
HEARTBEAT_S = 3.0


def ws_url(base: str) -> str:
    """``http://host:port`` -> ``ws://host:port/v1/ws`` (https -> wss)."""
    base = base.rstrip("/")
    if base.startswith("https://"):
        return "wss://" + base[len("https://") :] + "/v1/ws"
    if base.startswith("http://"):
        return "ws://" + base[len("http://") :] + "/v1/ws"
    raise CoordinatorError(f"coordinator URL must start with http:// or https://, got {base!r}")


def ice_servers_from(raw: Any) -> list[RTCIceServer]:
    servers = []
    for s in raw if isinstance(raw, list) else []:
        if isinstance(s, dict) and s.get("urls"):
            servers.append(RTCIceServer(urls=s["urls"], username=s.get("username"), credential=s.get("credential")))
    return servers


class SignalingClient:
    """One WebSocket to the coordinator for the lifetime of a node or client."""

    def __init__(
        self,
        coordinator: str,
        role: str,
        name: str,
        *,
        on_control: OnControl | None = None,
        connect_timeout: float = 10.0,
    ) -> None:
        self.coordinator = coordinator.rstrip("/")
        self._url = ws_url(self.coordinator)
        self.role, self.name = role, name
        self._on_control = on_control
        self._connect_timeout = connect_timeout
        self._session: aiohttp.ClientSession | None = None
        self._ws: aiohttp.ClientWebSocketResponse | None = None
        self.peer_id = ""
        self.ice_servers: list[RTCIceServer] = []
        self.peers: PeerManager | None = None
        self.closed = asyncio.Event()
        self._resume_token = ""

    async def connect(self, extra: dict[str, Any] | None = None) -> str:
        """Open the WebSocket and say hello; returns our peer id. Fails fast with a one-line error.

        Called again after the socket closed, it asks to keep the previous peer id (the coordinator
        grants it with the token it issued), so routes and WebRTC links through us stay valid.
        """
        await self._close_socket()
        timeout = aiohttp.ClientTimeout(total=None, connect=self._connect_timeout, sock_connect=self._connect_timeout)
        self._session = aiohttp.ClientSession(timeout=timeout)
        hello: dict[str, Any] = {"type": "hello", "role": self.role, "name": self.name, **(extra or {})}
        if self.peer_id and self._resume_token:
            hello["resume"] = {"peer_id": self.peer_id, "token": self._resume_token}
        try:
            self._ws = await self._session.ws_connect(self._url, heartbeat=HEARTBEAT_S, max_msg_size=1 << 20)
            await self._ws.send_json(hello)
            welcome = await asyncio.wait_for(self._ws.receive_json(), self._connect_timeout)
        except (aiohttp.ClientError, OSError, TimeoutError, ValueError, TypeError) as exc:
            await self.shutdown()
            raise CoordinatorError(
                f"cannot reach the coordinator at {self.coordinator}: {exc or type(exc).__name__}"
            ) from None
        if not isinstance(welcome, dict) or welcome.get("type") != "welcome":
            await self.shutdown()
            raise CoordinatorError(f"{self.coordinator} did not answer like a Kluster coordinator")
        self.peer_id = str(welcome["peer_id"])
        token = welcome.get("resume_token")
        self._resume_token = token if isinstance(token, str) else ""
        self.ice_servers = ice_servers_from(welcome.get("ice_servers"))
        self.closed.clear()
        return self.peer_id

    async def send(self, message: dict[str, Any]) -> None:
        if self._ws is None or self._ws.closed:
            raise CoordinatorError("lost the connection to the coordinator")
        try:
            await self._ws.send_json(message)
        except (aiohttp.ClientError, ConnectionError) as exc:
            raise CoordinatorError(f"lost the connection to the coordinator: {exc}") from None

    async def send_signal(self, to: str, data: dict[str, Any]) -> None:
        await self.send({"type": "signal", "to": to, "data": data})

    async def run(self) -> None:
        """Read messages until the WebSocket closes; then set ``closed``."""
        if self._ws is None:
            raise CoordinatorError("not connected")
        try:
            async for msg in self._ws:
                if msg.type != aiohttp.WSMsgType.TEXT:
                    continue
                try:
                    data = json.loads(msg.data)
                except ValueError:
                    log.warning("coordinator sent a non-JSON message")
                    continue
                if isinstance(data, dict):
                    await self._dispatch(data)
        finally:
            self.closed.set()

    async def _dispatch(self, data: dict[str, Any]) -> None:
        kind = data.get("type")
        if kind == "signal" and self.peers is not None:
            try:
                await self.peers.handle_signal(str(data.get("from")), data.get("data") or {})
            except KlusterError as exc:
                log.warning("bad signal from %s: %s", data.get("from"), exc)
        elif kind == "signal_error" and self.peers is not None:
            log.info("coordinator: peer %s is not connected", data.get("to"))
            await self.peers.close_peer(str(data.get("to")))
        elif self._on_control is not None:
            try:
                await self._on_control(data)
            except KlusterError as exc:
                log.error("%s", exc)

    async def http_json(self, path: str, params: dict[str, str] | None = None) -> Any:
        """GET a JSON document from the coordinator's HTTP API; error bodies become one-line errors."""
        if self._session is None:
            raise CoordinatorError("not connected")
        return await get_json(self._session, self.coordinator + path, params)

    async def http_bytes(self, path: str) -> bytes:
        if self._session is None:
            raise CoordinatorError("not connected")
        try:
            async with self._session.get(self.coordinator + path) as resp:
                if resp.status != 200:
                    raise CoordinatorError(f"coordinator answered HTTP {resp.status} for {path}")
                return await resp.read()
        except (aiohttp.ClientError, OSError) as exc:
            raise CoordinatorError(f"coordinator request {path} failed: {exc}") from None

    async def _close_socket(self) -> None:
        with contextlib.suppress(Exception):
            if self._ws is not None:
                await self._ws.close()
        if self._session is not None:
            await self._session.close()
        self._ws, self._session = None, None

    async def shutdown(self) -> None:
        await self._close_socket()
        self.closed.set()


async def get_json(session: aiohttp.ClientSession, url: str, params: dict[str, str] | None = None) -> Any:
    try:
        async with session.get(url, params=params) as resp:
            body = await resp.json(content_type=None)
            if resp.status >= 400:
                err = body.get("error", {}) if isinstance(body, dict) else {}
                raise error_for_code(
                    err.get("code"), str(err.get("message") or f"coordinator answered HTTP {resp.status}")
                )
            return body
    except (aiohttp.ClientError, OSError, ValueError) as exc:
        raise CoordinatorError(f"coordinator request {url} failed: {exc}") from None
