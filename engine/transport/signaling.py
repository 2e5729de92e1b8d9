"""The peer side of the coordinator WebSocket: hello/welcome, signal relay, control messages.

Nodes and clients both hold one of these. The hello proves we hold our identity key: the
coordinator opens with a fresh nonce, the hello carries our public key and a signature over it,
and our peer id is derived from that key (``engine.transport.identity``), so nobody else can
register under it. Signals addressed to us go to the ``PeerManager``;
a ``signal_error`` (the target is not connected) fails the pending connection at once instead of
letting it run into the connect timeout; everything else goes to the owner's ``on_control``.
"""

from __future__ import annotations

import asyncio
import contextlib
import json
import logging
import random
from collections.abc import AsyncIterator, Awaitable, Callable
from typing import Any

import aiohttp
from aiortc import RTCIceServer

from engine.errors import CoordinatorError, KlusterError, error_for_code
from engine.transport.identity import Identity, hello_proof, key_id_of
from engine.transport.peer import OnLinkLost, OnMessage, PeerManager

log = logging.getLogger(__name__)

OnControl = Callable[[dict[str, Any]], Awaitable[None]]

#: Each side of the coordinator WebSocket sends a ping this often...
HEARTBEAT_S = 1.0
#: ...and drops the socket after this many intervals without hearing anything from the other.
HEARTBEAT_MISSES = 3
#: The ping itself: a constant string, so sending it costs no JSON encoding.
PING = '{"type":"ping"}'
#: How long closing a socket waits for the other side's close frame: a silent peer never sends
#: one, and aiohttp's default (10 s) would hold up the reconnect (or the node_gone notice) that long.
CLOSE_S = 1.0
#: Longest pause between reconnection attempts (doubling from 0.5 s, with +-25% jitter so that
#: thousands of nodes do not hammer a restarted coordinator in step)...
RECONNECT_MAX_S = 2.0
#: ...and the connect timeout of each attempt: a fresh SYN every few seconds finds a healed
#: network sooner than TCP's own SYN retries (1, 2, 4, 8 s apart) would.
RECONNECT_TIMEOUT_S = 3.0
#: WebSocket close codes the coordinator uses: a hello it refuses (no valid identity proof)...
CLOSE_BAD_HELLO = 4000
#: ...and an older socket of a peer whose key just connected again (kill -9 and restart, or two
#: processes sharing one key file: the replaced one stops instead of taking the id back).
CLOSE_REPLACED = 4001
#: ...and a node a spot check caught returning wrong work (it may not come back).
CLOSE_BANNED = 4004
#: Coordinator -> peer: fresh STUN/TURN servers (TURN credentials expire; see engine.coordinator.turn).
ICE_SERVERS = "ice_servers"


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
        identity: Identity | None = None,
    ) -> None:
        self.coordinator = coordinator.rstrip("/")
        #: our key (a node's long-term one; a fresh one per process when not given): our peer id
        #: is derived from it, and it signs our hello and every SDP our PeerManager sends
        self.identity = identity or Identity.ephemeral()
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
        #: set when the coordinator closed our socket because our key connected again elsewhere
        self.replaced = False
        #: why the coordinator banned us (CLOSE_BANNED), if it did
        self.banned: str | None = None

    async def connect(self, extra: dict[str, Any] | None = None, *, timeout_s: float | None = None) -> str:
        """Open the WebSocket and say hello; returns our peer id. Fails fast with a one-line error.

        Called again after the socket closed, it gets the same peer id back (the id is derived
        from our key), so routes and WebRTC links through us stay valid, even across a
        coordinator restart.
        """
        await self._close_socket()
        limit = self._connect_timeout if timeout_s is None else timeout_s
        timeout = aiohttp.ClientTimeout(total=None, connect=limit, sock_connect=limit)
        self._session = aiohttp.ClientSession(timeout=timeout)
        hello: dict[str, Any] = {"type": "hello", "role": self.role, "name": self.name, **(extra or {})}
        try:
            self._ws = await self._session.ws_connect(
                self._url, max_msg_size=1 << 20, timeout=aiohttp.ClientWSTimeout(ws_receive=None, ws_close=CLOSE_S)
            )
            challenge = await self._receive_object(self._ws, limit)
            nonce = challenge.get("nonce") if challenge.get("type") == "challenge" else None
            if isinstance(nonce, str):
                hello["key"] = self.identity.public_b64
                hello["sig"] = self.identity.sign_b64(hello_proof(self.role, nonce))
                await self._ws.send_json(hello)
                welcome = await self._receive_object(self._ws, limit)
        except (aiohttp.ClientError, OSError, TimeoutError, ValueError, TypeError) as exc:
            await self.shutdown()
            raise CoordinatorError(
                f"cannot reach the coordinator at {self.coordinator}: {exc or type(exc).__name__}"
            ) from None
        except CoordinatorError:
            await self.shutdown()
            raise
        if not isinstance(nonce, str) or welcome.get("type") != "welcome":
            await self.shutdown()
            raise CoordinatorError(f"{self.coordinator} did not answer like a Kluster coordinator")
        peer_id = str(welcome.get("peer_id"))
        if key_id_of(peer_id) != self.identity.id:
            await self.shutdown()
            raise CoordinatorError(f"{self.coordinator} assigned peer id {peer_id!r}, which our key does not derive")
        self.peer_id = peer_id
        self.ice_servers = ice_servers_from(welcome.get("ice_servers"))
        if self.peers is not None:  # after a reconnect: the new credentials serve the next links
            self.peers.set_ice_servers(self.ice_servers)
        self.closed.clear()
        return self.peer_id

    async def _receive_object(self, ws: aiohttp.ClientWebSocketResponse, limit: float) -> dict[str, Any]:
        """The next JSON object on ``ws`` during the handshake; a close becomes a one-line error with its reason."""
        msg = await asyncio.wait_for(ws.receive(), limit)
        if msg.type in (aiohttp.WSMsgType.CLOSE, aiohttp.WSMsgType.CLOSING, aiohttp.WSMsgType.CLOSED):
            reason = msg.extra if isinstance(msg.extra, str) and msg.extra else "no reason given"
            if ws.close_code == CLOSE_BANNED:  # for good: ``reconnect`` must not try again
                self.banned = reason
            raise CoordinatorError(f"the coordinator at {self.coordinator} refused us: {reason}")
        if msg.type != aiohttp.WSMsgType.TEXT:
            raise ValueError(f"unexpected {msg.type.name} message")
        data = json.loads(msg.data)
        if not isinstance(data, dict):
            raise ValueError("not a JSON object")
        return data

    async def send(self, message: dict[str, Any]) -> None:
        if self._ws is None or self._ws.closed:
            raise CoordinatorError("lost the connection to the coordinator")
        try:
            await self._ws.send_json(message)
        except (aiohttp.ClientError, ConnectionError) as exc:
            raise CoordinatorError(f"lost the connection to the coordinator: {exc}") from None

    async def send_signal(self, to: str, data: dict[str, Any]) -> None:
        await self.send({"type": "signal", "to": to, "data": data})

    def open_peers(
        self, on_message: OnMessage, *, on_link_lost: OnLinkLost | None = None, connect_timeout: float = 10.0
    ) -> PeerManager:
        """The peer links of this connection: our id and key, signals through us, our ICE servers.

        Becomes ``self.peers``, so incoming signals and refreshed ICE credentials reach it.
        """
        self.peers = PeerManager(
            self.peer_id,
            self.send_signal,
            on_message,
            identity=self.identity,
            ice_servers=self.ice_servers,
            connect_timeout=connect_timeout,
            on_link_lost=on_link_lost,
        )
        return self.peers

    async def run(self) -> None:
        """Read messages until the WebSocket closes or falls silent; then set ``closed``.

        Pings go out every :data:`HEARTBEAT_S`; the coordinator pings back, so a socket that
        brings nothing for :data:`HEARTBEAT_MISSES` intervals is dead (partition, frozen
        coordinator) and is closed here rather than left to TCP's minutes-long timeouts.
        """
        ws = self._ws
        if ws is None:
            raise CoordinatorError("not connected")
        pinger = asyncio.create_task(ping_forever(ws), name="coordinator-ping")
        try:
            async for data in receive_json(ws, HEARTBEAT_S * HEARTBEAT_MISSES, "the coordinator"):
                await self._dispatch(data)
        finally:
            if ws.close_code == CLOSE_REPLACED:
                self.replaced = True
            elif ws.close_code == CLOSE_BANNED:
                self.banned = "a spot check caught it returning wrong work"
            pinger.cancel()
            with contextlib.suppress(asyncio.CancelledError):
                await pinger
            self.closed.set()

    async def serve(
        self,
        stopping: Callable[[], bool],
        *,
        extra: Callable[[], dict[str, Any] | None] | None = None,
        on_new_identity: Callable[[str], Awaitable[None]] | None = None,
    ) -> None:
        """Read messages until ``stopping()``; after every drop, reconnect (``reconnect``) and go on.

        Nodes and clients both live through partitions and coordinator restarts this way. The
        peer id is derived from our key, so it survives; should a coordinator ever assign another,
        ``on_new_identity(old_id)`` lets the owner rebuild what was tied to the old id (its WebRTC
        links, steps waiting for replies addressed to it). Raises CoordinatorError if the
        coordinator closed our socket because our key connected again from elsewhere.
        """
        while not stopping():
            await self.run()
            if stopping():
                return
            if self.banned is not None:
                raise CoordinatorError(f"the coordinator banned this {self.role}: {self.banned}")
            if self.replaced:  # reconnecting would only take the id back and start a tug of war
                raise CoordinatorError(
                    f"another process connected to the coordinator with this {self.role}'s identity key "
                    f"(peer id {self.peer_id}); is one key file shared by two {self.role}s?"
                )
            log.warning("lost the coordinator; reconnecting")
            old_id = self.peer_id
            await self.reconnect(extra)
            if self.peer_id != old_id:
                log.info("reconnected as %s (was %s)", self.peer_id, old_id)
                if on_new_identity is not None:
                    await on_new_identity(old_id)

    async def reconnect(self, extra: Callable[[], dict[str, Any] | None] | None = None) -> None:
        """Connect again (keeping our peer id) until it works, pausing 0.5 s doubling to 2 s.

        ``extra`` is called before each attempt for the hello's extra fields (e.g. what a node
        hosts), so every attempt says what is true at that moment. Cancel to give up. A ban is
        final: CoordinatorError at once.
        """
        delay = 0.5
        while True:
            try:
                await self.connect(
                    extra() if extra is not None else None, timeout_s=min(self._connect_timeout, RECONNECT_TIMEOUT_S)
                )
                return
            except CoordinatorError as exc:
                if self.banned is not None:  # refused at the hello (banned while we were away)
                    raise CoordinatorError(f"the coordinator banned this {self.role}: {self.banned}") from None
                pause = delay * random.uniform(0.75, 1.25)
                log.info("coordinator still unreachable (%s); retrying in %.1f s", exc, pause)
                await asyncio.sleep(pause)
                delay = min(delay * 2, RECONNECT_MAX_S)

    async def _dispatch(self, data: dict[str, Any]) -> None:
        kind = data.get("type")
        if kind == "signal" and self.peers is not None:
            try:
                await self.peers.handle_signal(str(data.get("from")), data.get("data") or {})
            except KlusterError as exc:
                log.warning("bad signal from %s: %s", data.get("from"), exc)
        elif kind == ICE_SERVERS:
            self.ice_servers = ice_servers_from(data.get("ice_servers"))
            if self.peers is not None:
                self.peers.set_ice_servers(self.ice_servers)
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


async def ping_forever(ws: aiohttp.ClientWebSocketResponse | Any, interval_s: float = HEARTBEAT_S) -> None:
    """Send :data:`PING` every ``interval_s`` until the socket closes (or we are cancelled)."""
    while not ws.closed:
        await asyncio.sleep(interval_s)
        try:
            await ws.send_str(PING)
        except (aiohttp.ClientError, ConnectionError, RuntimeError):
            return


async def receive_json(ws: Any, silent_s: float, other: str) -> AsyncIterator[dict[str, Any]]:
    """The JSON objects arriving on ``ws`` (pings filtered out) until it closes or is silent too long.

    Shared by both ends of the coordinator socket (aiohttp's client and server sockets have the
    same ``receive``/``close``). Silence closes the socket, so its peer notices as well.
    """
    while not ws.closed:
        try:
            msg = await ws.receive(timeout=silent_s)
        except TimeoutError:
            log.warning("%s was silent for %.0f s; dropping the connection", other, silent_s)
            with contextlib.suppress(Exception):
                await ws.close()
            return
        if msg.type in (aiohttp.WSMsgType.CLOSE, aiohttp.WSMsgType.CLOSING, aiohttp.WSMsgType.CLOSED):
            return
        if msg.type == aiohttp.WSMsgType.ERROR:
            log.info("connection to %s failed: %s", other, ws.exception())
            return
        if msg.type != aiohttp.WSMsgType.TEXT or msg.data == PING:
            continue
        try:
            data = json.loads(msg.data)
        except ValueError:
            log.warning("%s sent a non-JSON message", other)
            continue
        if isinstance(data, dict):
            yield data


def raise_for_error_body(status: int, body: Any) -> None:
    """Turn a coordinator error answer ``{"error": {"code", "message"}}`` into its typed one-line error."""
    if status >= 400:
        err = body.get("error", {}) if isinstance(body, dict) else {}
        raise error_for_code(err.get("code"), str(err.get("message") or f"coordinator answered HTTP {status}"))


async def get_json(session: aiohttp.ClientSession, url: str, params: dict[str, str] | None = None) -> Any:
    try:
        async with session.get(url, params=params) as resp:
            body = await resp.json(content_type=None)
            raise_for_error_body(resp.status, body)
            return body
    except (aiohttp.ClientError, OSError, ValueError) as exc:
        raise CoordinatorError(f"coordinator request {url} failed: {exc}") from None
