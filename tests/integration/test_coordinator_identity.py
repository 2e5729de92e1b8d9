"""The coordinator's hello: peer ids derived from proven keys (real coordinator on loopback).

A peer proves it holds its key by signing the coordinator's fresh nonce; its peer id is
``<n|c>-<key id>``, the same on every reconnect and after a coordinator restart. Hellos without a
valid proof are closed with a reason the peer prints; a second socket proving the same key replaces
the first, whose owner stops instead of fighting for the id.
"""

from __future__ import annotations

import asyncio
from collections.abc import AsyncIterator
from typing import Any

import aiohttp
import pytest
from aiohttp import web

from engine.coordinator.app import Coordinator, CoordinatorConfig
from engine.errors import CoordinatorError
from engine.transport.identity import Identity, hello_proof
from engine.transport.signaling import CLOSE_BAD_HELLO, SignalingClient, ws_url

pytestmark = pytest.mark.timeout(60)


@pytest.fixture
async def coordinator() -> AsyncIterator[str]:
    coord = Coordinator(CoordinatorConfig(port=0))
    port = await coord.start()
    try:
        yield f"http://127.0.0.1:{port}"
    finally:
        await coord.shutdown()


async def _raw_hello(url: str, make_hello: Any) -> tuple[int | None, str]:
    """Send the hello ``make_hello(nonce)`` builds; the close code and reason the coordinator answers."""
    async with aiohttp.ClientSession() as http, http.ws_connect(ws_url(url)) as ws:
        challenge = await ws.receive_json(timeout=5)
        assert challenge["type"] == "challenge" and len(challenge["nonce"]) >= 32
        await ws.send_json(make_hello(challenge["nonce"]))
        msg = await ws.receive(timeout=5)
        assert msg.type == aiohttp.WSMsgType.CLOSE, msg
        return ws.close_code, str(msg.extra)


async def test_the_peer_id_is_derived_from_the_key_and_survives_reconnects(coordinator: str) -> None:
    me = Identity.ephemeral()
    node = SignalingClient(coordinator, "node", "n", identity=me)
    client = SignalingClient(coordinator, "client", "c")  # a fresh key per process
    try:
        assert await node.connect() == me.peer_id("n")
        assert await client.connect() == client.identity.peer_id("c")
        await node.shutdown()
        assert await node.connect() == me.peer_id("n")  # reconnect: same id, no token needed
    finally:
        await node.shutdown()
        await client.shutdown()
    # Another coordinator (a restart) derives the same id from the same key.
    other = Coordinator(CoordinatorConfig(port=0))
    port = await other.start()
    again = SignalingClient(f"http://127.0.0.1:{port}", "node", "n", identity=me)
    try:
        assert await again.connect() == me.peer_id("n")
    finally:
        await again.shutdown()
        await other.shutdown()


async def test_hellos_without_a_valid_proof_are_refused_with_a_reason(coordinator: str) -> None:
    me, other = Identity.ephemeral(), Identity.ephemeral()
    base = {"type": "hello", "role": "node", "name": "n"}
    cases = {
        "no key": lambda nonce: base,
        "a signature over another nonce": lambda nonce: {
            **base,
            "key": me.public_b64,
            "sig": me.sign_b64(hello_proof("node", "an old nonce")),
        },
        "someone else's key": lambda nonce: {
            **base,
            "key": other.public_b64,
            "sig": me.sign_b64(hello_proof("node", nonce)),
        },
        "a signature for another role": lambda nonce: {
            **base,
            "key": me.public_b64,
            "sig": me.sign_b64(hello_proof("client", nonce)),
        },
    }
    for what, make in cases.items():
        code, reason = await _raw_hello(coordinator, make)
        assert code == CLOSE_BAD_HELLO, what
        assert reason.startswith("hello without a valid identity proof"), (what, reason)
    # The same key with a proper proof is welcome.
    async with aiohttp.ClientSession() as http, http.ws_connect(ws_url(coordinator)) as ws:
        nonce = (await ws.receive_json(timeout=5))["nonce"]
        await ws.send_json({**base, "key": me.public_b64, "sig": me.sign_b64(hello_proof("node", nonce))})
        welcome = await ws.receive_json(timeout=5)
        assert welcome["type"] == "welcome" and welcome["peer_id"] == me.peer_id("n")


async def test_an_old_peer_that_sends_no_proof_gets_a_clear_error(coordinator: str) -> None:
    # What a SignalingClient sees when refused: the coordinator's reason, on one line.
    async with aiohttp.ClientSession() as http, http.ws_connect(ws_url(coordinator)) as ws:
        await ws.receive_json(timeout=5)
        await ws.send_json({"type": "hello", "role": "client", "name": "old"})
        msg = await ws.receive(timeout=5)
    assert "is this kluster too old?" in str(msg.extra)


async def test_a_second_socket_with_the_same_key_replaces_the_first_which_stops(coordinator: str) -> None:
    me = Identity.ephemeral()
    first = SignalingClient(coordinator, "node", "n", identity=me)
    second = SignalingClient(coordinator, "node", "n-copy", identity=me)
    try:
        await first.connect()
        serving = asyncio.create_task(first.serve(lambda: False))
        await asyncio.sleep(0.2)
        assert await second.connect() == first.peer_id
        with pytest.raises(CoordinatorError, match=r"another process connected .* with this node's identity key"):
            await asyncio.wait_for(serving, 10)
        assert first.replaced and not second.replaced
        async with aiohttp.ClientSession() as http:
            nodes = (await (await http.get(coordinator + "/v1/nodes")).json())["nodes"]
        assert [(n["peer_id"], n["online"]) for n in nodes] == [(me.peer_id("n"), 1)]  # one row, still online
    finally:
        await first.shutdown()
        await second.shutdown()


async def test_a_coordinator_that_assigns_an_id_not_derived_from_our_key_is_refused() -> None:
    async def fake_ws(request: web.Request) -> web.WebSocketResponse:
        ws = web.WebSocketResponse()
        await ws.prepare(request)
        await ws.send_json({"type": "challenge", "nonce": "n" * 43})
        await ws.receive_json()
        await ws.send_json({"type": "welcome", "peer_id": Identity.ephemeral().peer_id("n"), "ice_servers": []})
        await ws.receive()
        return ws

    app = web.Application()
    app.router.add_get("/v1/ws", fake_ws)
    runner = web.AppRunner(app)
    await runner.setup()
    site = web.TCPSite(runner, "127.0.0.1", 0)
    await site.start()
    port = site._server.sockets[0].getsockname()[1]  # type: ignore[union-attr]
    client = SignalingClient(f"http://127.0.0.1:{port}", "node", "n")
    try:
        with pytest.raises(CoordinatorError, match="which our key does not derive"):
            await client.connect()
    finally:
        await client.shutdown()
        await runner.cleanup()


async def test_a_node_banned_while_away_stops_reconnecting() -> None:
    """Refused at the hello with the ban's close code, a reconnecting node gives up (it used to retry forever)."""
    coord = Coordinator(CoordinatorConfig(port=0))
    port = await coord.start()
    client = SignalingClient(f"http://127.0.0.1:{port}", "node", "n")
    try:
        peer_id = await client.connect()
        await client.shutdown()  # away (a blip, a restart) when the spot check catches it
        await coord._ban(peer_id, "n", "j-test", "returned wrong work on job j-test")
        with pytest.raises(CoordinatorError, match="banned this node: banned: returned wrong work"):
            await asyncio.wait_for(client.reconnect(), 10)
    finally:
        await client.shutdown()
        await coord.shutdown()
