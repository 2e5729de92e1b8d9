"""NAT traversal through a real coturn, with the coordinator's short-lived TURN credentials.

Emulated hosts: the coordinator, the client, two nodes and a TURN server (coturn with
``use-auth-secret``). The switch drops every packet between any two peers (client, nodes), as
two firewalls or symmetric NATs would; each still reaches the coordinator and the TURN server.
A generation must then cross the relay and give exactly the tokens of ``kluster generate --local``.
Credentials minted with an expiry in the past must be refused by coturn (401) and leave two
peers unable to link, while fresh ones in the same topology link them through the relay.
"""

from __future__ import annotations

import asyncio
import itertools
import json
import secrets
import subprocess
import time
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import pytest

from engine.coordinator.turn import mint
from engine.errors import TransportError
from engine.launcher import kluster_command
from engine.transport.probe_peer import ProbePeer, relay
from engine.wan_cluster import WanCluster
from engine.wanemu import Topology
from engine.wanemu.turnserver import TurnServer, turnserver_unavailable_reason

pytestmark = [pytest.mark.wan, pytest.mark.slow, pytest.mark.timeout(300)]

PROMPT = "Tell me about the history of Rome."
TOKENS = 16
PEERS = ("client", "n1", "n2")


@pytest.fixture(scope="session")  # session: checked before the (session) model fixtures are built
def turn_ready(wan_root: None) -> None:
    reason = turnserver_unavailable_reason()
    if reason is not None:
        pytest.skip(reason)


def _reference_tokens(model_dir: Path) -> list[int]:
    """``kluster generate --local``: the whole model in one process, the tokens to match."""
    cmd = kluster_command(
        "generate", "--local", "--model", str(model_dir), "--prompt", PROMPT, "--chat",
        "--max-new-tokens", str(TOKENS), "--json",
    )  # fmt: skip
    out = subprocess.run(cmd, capture_output=True, text=True, timeout=120, check=True).stdout
    done = [e for e in map(json.loads, out.splitlines()) if e["event"] == "done"]
    return list(done[0]["token_ids"])


def test_generation_crosses_the_relay_when_peers_cannot_reach_each_other(
    turn_ready: None, smollm2_pack3: Path, smollm2_dir: Path, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    want = _reference_tokens(smollm2_dir)
    monkeypatch.setenv("KLUSTER_LOGLEVEL", "INFO")  # the processes log each link's ICE path
    turn: dict[str, TurnServer] = {}

    def prepare(topo: Topology) -> Sequence[str]:
        secret = secrets.token_urlsafe(24)
        turn["server"] = TurnServer(topo.host("turn"), secret, tmp_path / "turn").start()
        for a, b in itertools.combinations(PEERS, 2):
            topo.block(a, b)
        secret_file = tmp_path / "turn-secret"
        secret_file.write_text(secret + "\n")
        secret_file.chmod(0o600)
        server = turn["server"]
        return ["--stun", server.stun_url, "--turn", server.url, "--turn-secret-file", str(secret_file)]

    with WanCluster(smollm2_pack3, 2, tmp_path, extra_hosts=("turn",), prepare=prepare) as grid:
        t0 = time.monotonic()
        events = grid.generate(PROMPT, TOKENS)
        took = time.monotonic() - t0
        blocked = {(a, b): grid.topo.blocked_packets(a, b) for a, b in itertools.permutations(PEERS, 2)}
    server = turn["server"]
    log = server.log()
    assert server.proc is not None and server.proc.poll() is not None, "coturn outlived the topology"

    done = next(e for e in events if e["event"] == "done")
    route = next(e for e in events if e["event"] == "route")
    print(f"relayed generation: {took:.1f} s; direct packets dropped: {blocked}")
    assert done["token_ids"] == want
    assert len(route["nodes"]) == 2, "a two-hop route: client -> node -> node -> client"
    # The peers did try the direct path (ICE checks host to host) and the switch dropped it...
    first, second = (f"n{n['name'].rsplit('-', 1)[1]}" for n in route["nodes"])
    for a, b in (("client", first), (first, second)):
        assert blocked[(a, b)] + blocked[(b, a)] > 0, f"{a} and {b} never tried the direct path"
    # ...so every byte between them crossed coturn, which authenticated each peer by the
    # credential minted for its peer id: allocations, then channel bindings to the other peers.
    for node in route["nodes"]:
        lines = server.lines_for_peer(node["peer_id"])
        assert any("ALLOCATE processed, success" in line for line in lines), node
        # "error 401", as coturn logs a refusal: the bare digits also turn up in the credential's
        # expiry time, which is part of every line about this peer (<1764354012:n-...>)
        assert not any("error 401" in line for line in lines), node
    client_lines = [line for line in log.splitlines() if ":c-" in line]  # client ids: c-<key id>
    assert any("ALLOCATE processed, success" in line for line in client_lines), "the client allocated no relay"
    assert "CHANNEL_BIND processed, success" in log
    # And each process saw every link it opened or accepted land on a relayed candidate pair.
    for name in ("client-1", *(n["name"] for n in route["nodes"])):
        opened = [line for line in (tmp_path / f"{name}.log").read_text().splitlines() if " is open (" in line]
        assert opened, f"{name} opened no link"
        assert all(line.endswith("(via TURN relay)") for line in opened), (name, opened)


async def _link(a: ProbePeer, b: ProbePeer) -> dict[str, Any]:
    """Open a link a -> b with one echo round trip; the ICE pair a's side ended up on."""
    await a.request("rtt", peer=b.name, count=1, size=64, timeout=30)
    reply = await a.request("path", peer=b.name)
    return dict(reply["path"])


async def test_expired_credentials_are_refused_and_fresh_ones_relay(turn_ready: None, tmp_path: Path) -> None:
    secret = secrets.token_urlsafe(24)
    async with Topology(["turn", "a", "b"], seed=7) as topo:
        server = await asyncio.to_thread(TurnServer(topo.host("turn"), secret, tmp_path / "turn").start)
        topo.block("a", "b")
        async with (
            ProbePeer("a", prefix=topo.host("a").exec_args([]), connect_timeout=6) as a,
            ProbePeer("b", prefix=topo.host("b").exec_args([]), connect_timeout=6) as b,
        ):
            relay(a, b)

            async def hand_out(ttl_s: float) -> dict[str, str]:
                users = {}
                for probe in (a, b):
                    cred = mint(secret, probe.name, ttl_s=ttl_s)
                    turn = {"urls": [server.url], "username": cred.username, "credential": cred.credential}
                    await probe.request("ice", servers=[{"urls": [server.stun_url]}, turn])
                    users[probe.name] = cred.username
                return users

            # Expired a minute ago: coturn refuses both allocations, so neither side has a relay
            # candidate and the direct path is blocked: the link never opens.
            expired = await hand_out(-60)
            t0 = time.monotonic()
            with pytest.raises(TransportError, match=r"PeerError: peer .* did not open a link within 6 s"):
                await _link(a, b)
            failed_after = time.monotonic() - t0
            # Fresh ones, same processes, same topology: the link opens through the relay.
            fresh = await hand_out(600)
            t0 = time.monotonic()
            path = await _link(a, b)
            opened_after = time.monotonic() - t0
        dropped = topo.blocked_packets("a", "b") + topo.blocked_packets("b", "a")

    print(f"expired: failed after {failed_after:.1f} s; fresh: relayed link open after {opened_after:.2f} s, {path}")
    for user in expired.values():
        lines = server.lines_for(user)
        assert any("error 401" in line for line in lines), lines
        assert not any("success" in line for line in lines), lines
    for user in fresh.values():
        assert any("ALLOCATE processed, success" in line for line in server.lines_for(user))
    assert path["relayed"] and "relay" in (path["local_type"], path["remote_type"])
    assert server.host.ip in (path["local"][0], path["remote"][0])
    assert dropped > 0, "the direct path was never tried"
    assert server.proc is not None and server.proc.poll() is not None, "coturn outlived the topology"
