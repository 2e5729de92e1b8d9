"""The coordinator hands each peer STUN/TURN servers with its own fresh TURN credential.

Real coordinator on loopback and a real SignalingClient; the credentials are checked the way
coturn checks them (recompute the HMAC with the shared secret, compare the expiry).
"""

from __future__ import annotations

import asyncio
import base64
import hashlib
import hmac
import time
from pathlib import Path
from typing import cast

import pytest
from aiortc import RTCIceServer

from engine.cli import main
from engine.coordinator.app import Coordinator, CoordinatorConfig
from engine.coordinator.turn import SECRET_ENV, TurnConfig
from engine.transport.peer import PeerManager
from engine.transport.signaling import SignalingClient

SECRET = "shared-with-coturn"
TURN_URL = "turn:192.0.2.7:3478?transport=udp"
STUN = {"urls": "stun:192.0.2.7:3478"}


def _valid(username: str, credential: str) -> bool:
    """What coturn does: the HMAC must match and the expiry lie in the future."""
    expected = base64.b64encode(hmac.new(SECRET.encode(), username.encode(), hashlib.sha1).digest()).decode()
    return hmac.compare_digest(expected, credential) and int(username.split(":")[0]) > time.time()


async def test_welcome_carries_per_peer_credentials_and_they_are_refreshed() -> None:
    config = CoordinatorConfig(port=0, ice_servers=(STUN,), turn=TurnConfig((TURN_URL,), SECRET, ttl_s=2))
    coordinator = Coordinator(config)
    port = await coordinator.start()
    url = f"http://127.0.0.1:{port}"
    clients = [SignalingClient(url, "client", f"c{i}") for i in range(2)]
    try:
        ids = [await c.connect() for c in clients]
        first = []
        for client, peer_id in zip(clients, ids, strict=True):
            stun, turn = client.ice_servers
            assert stun.urls == STUN["urls"] and stun.username is None
            assert turn.urls == [TURN_URL]
            assert turn.username is not None and turn.credential is not None
            assert turn.username.endswith(f":{peer_id}")  # the TURN server's log names the peer
            assert _valid(turn.username, turn.credential)
            assert 0 < int(turn.username.split(":")[0]) - time.time() <= 2
            first.append(turn.username)
        assert first[0] != first[1]

        # Every ttl/2 (1 s here) the coordinator sends fresh ones; the peer's PeerManager takes
        # them for the links it opens next.
        client = clients[0]
        peers = _Peers()
        client.peers = cast(PeerManager, peers)
        reader = asyncio.create_task(client.run())
        deadline = time.monotonic() + 5
        while client.ice_servers[1].username == first[0] and time.monotonic() < deadline:
            await asyncio.sleep(0.05)
        fresh = client.ice_servers[1]
        assert fresh.username != first[0] and fresh.username is not None and fresh.credential is not None
        assert fresh.username.endswith(f":{ids[0]}") and _valid(fresh.username, fresh.credential)
        assert peers.servers[-1][1].username == fresh.username
        await client.shutdown()
        await reader
    finally:
        for c in clients:
            await c.shutdown()
        await coordinator.shutdown()


async def test_without_turn_the_static_servers_are_handed_out_unchanged() -> None:
    coordinator = Coordinator(CoordinatorConfig(port=0, ice_servers=(STUN,)))
    port = await coordinator.start()
    client = SignalingClient(f"http://127.0.0.1:{port}", "client", "c")
    try:
        await client.connect()
        assert [(s.urls, s.username) for s in client.ice_servers] == [(STUN["urls"], None)]
    finally:
        await client.shutdown()
        await coordinator.shutdown()


class _Peers:
    """Stands in for the PeerManager: records the servers it is told to use for new links."""

    def __init__(self) -> None:
        self.servers: list[list[RTCIceServer]] = []

    def set_ice_servers(self, servers: list[RTCIceServer]) -> None:
        self.servers.append(list(servers))


def _one_error_line(capsys: pytest.CaptureFixture[str]) -> str:
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1, err
    assert err[0].startswith("kluster: error: ")
    return err[0]


@pytest.mark.parametrize(
    ("args", "message"),
    [
        (["--turn", TURN_URL], f"--turn needs the TURN server's shared secret: set {SECRET_ENV} or --turn-secret-file"),
        (["--turn-secret-file", "{secret}"], "--turn-secret-file needs at least one --turn URL"),
        (["--turn", "turn.example.org"], "is not a TURN URL"),
        (["--stun", "stun.example.org:3478"], "is not a STUN URL"),
        (["--turn", TURN_URL, "--turn-secret-file", "{missing}"], "cannot read the TURN secret file"),
        (["--turn", TURN_URL, "--turn-secret-file", "{secret}", "--turn-ttl", "5"], "--turn-ttl must be between"),
    ],
)
def test_bad_coordinator_ice_options_are_one_line(
    args: list[str],
    message: str,
    tmp_path: Path,
    capsys: pytest.CaptureFixture[str],
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    monkeypatch.delenv(SECRET_ENV, raising=False)
    (tmp_path / "secret").write_text(SECRET + "\n")
    args = [a.format(secret=tmp_path / "secret", missing=tmp_path / "missing") for a in args]
    assert main(["coordinator", "--port", "0", "--db", ":memory:", *args]) == 2
    assert message in _one_error_line(capsys)
