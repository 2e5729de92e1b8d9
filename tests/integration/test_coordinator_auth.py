"""Accounts, sessions, rate limits and WebSocket limits at a real coordinator on loopback.

Accounts are made with the real ``kluster coordinator add-user``; the coordinator runs in-process
(as in test_coordinator_identity.py) except in the last test, where real coordinator, node and
``kluster generate`` processes run a generation with auth on.
"""

from __future__ import annotations

import asyncio
import json
import os
import secrets
import subprocess
import sys
import time
from collections.abc import AsyncIterator, Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import aiohttp
import pytest

from engine.coordinator.accounts import AccountStore
from engine.coordinator.app import Coordinator, CoordinatorConfig
from engine.coordinator.auth import CLOSE_UNAUTHORIZED, SESSION_PATH, AuthError, SessionAuth, encode_token
from engine.coordinator.ratelimit import Limit, RateLimits
from engine.errors import CoordinatorError, PeerError
from engine.transport.identity import Identity, hello_proof
from engine.transport.signaling import SignalingClient, ws_url

pytestmark = pytest.mark.timeout(120)

HEARTBEAT_S = 1.0


def kluster(*args: str) -> str:
    proc = subprocess.run(
        [sys.executable, "-m", "engine.cli", *args], capture_output=True, text=True, timeout=60, check=False
    )
    assert proc.returncode == 0, proc.stderr
    return proc.stdout


def add_user(accounts: Path, name: str, role: str) -> str:
    out = json.loads(kluster("coordinator", "add-user", name, "--role", role, "--accounts", str(accounts), "--json"))
    assert out["name"] == name and out["role"] == role
    return str(out["token"])


@dataclass(frozen=True)
class Accounts:
    path: Path
    supplier: str
    developer: str


@pytest.fixture(scope="module")
def accounts(tmp_path_factory: pytest.TempPathFactory) -> Accounts:
    path = tmp_path_factory.mktemp("accounts") / "accounts.sqlite3"
    return Accounts(path, add_user(path, "sup", "supplier"), add_user(path, "dev", "developer"))


Start = Callable[..., Any]


@pytest.fixture
async def start(accounts: Accounts) -> AsyncIterator[Start]:
    """start(**config) -> (coordinator, url); auth is on because the accounts file has accounts."""
    started: list[Coordinator] = []

    async def make(**overrides: Any) -> tuple[Coordinator, str]:
        config = CoordinatorConfig(port=0, accounts_path=str(accounts.path), heartbeat_s=HEARTBEAT_S, **overrides)
        coord = Coordinator(config)
        started.append(coord)
        port = await coord.start()
        return coord, f"http://127.0.0.1:{port}"

    try:
        yield make
    finally:
        for coord in started:
            await coord.shutdown()


async def _http(
    method: str, url: str, session: str | None = None, **kwargs: Any
) -> tuple[int, dict[str, Any], dict[str, str]]:
    headers = {"Authorization": f"Bearer {session}"} if session else {}
    async with aiohttp.ClientSession() as http, http.request(method, url, headers=headers, **kwargs) as resp:
        text = await resp.text()
        return resp.status, json.loads(text) if text.startswith("{") else {"text": text}, dict(resp.headers)


async def _session(url: str, token: str) -> str:
    auth = SessionAuth(url, token)
    try:
        return await auth.refresh()
    finally:
        await auth.close()


async def _hello(url: str, extra: dict[str, Any], me: Identity | None = None, role: str = "node") -> tuple[Any, ...]:
    """A raw hello; returns (http, ws, first answer) with the socket still open (caller closes both)."""
    me = me or Identity.ephemeral()
    http = aiohttp.ClientSession()
    ws = await http.ws_connect(ws_url(url), autoping=False)
    nonce = (await ws.receive_json(timeout=5))["nonce"]
    hello = {
        "type": "hello",
        "role": role,
        "name": "raw",
        "key": me.public_b64,
        "sig": me.sign_b64(hello_proof(role, nonce)),
    }
    await ws.send_json({**hello, **extra})
    return http, ws, await ws.receive(timeout=5)


async def test_a_node_with_a_supplier_token_registers_under_its_account(start: Start, accounts: Accounts) -> None:
    _, url = await start()
    auth = SessionAuth(url, accounts.supplier)
    node = SignalingClient(url, "node", "gpu-1")
    try:
        await auth.refresh()
        assert (auth.account, auth.role) == ("sup", "supplier")
        peer = await node.connect(auth.hello())
        status, body, _ = await _http("GET", url + "/v1/nodes", await _session(url, accounts.developer))
        assert status == 200
        assert [(n["peer_id"], n["account"]) for n in body["nodes"]] == [(peer, "sup")]
        store = AccountStore(accounts.path)
        assert store.node_account(peer) == "sup"  # persisted for earnings
        store.close()
        # A reconnect needs a fresh session (each opens one socket); hello() fetched one meanwhile.
        await node.shutdown()
        await asyncio.sleep(0.5)
        assert await node.connect(auth.hello()) == peer
    finally:
        await node.shutdown()
        await auth.close()


async def test_without_a_session_nothing_but_health_is_open(start: Start) -> None:
    _, url = await start()
    node = SignalingClient(url, "node", "n")
    with pytest.raises(CoordinatorError, match="refused us: no session token"):
        await node.connect()
    assert (await _http("GET", url + "/v1/health"))[0] == 200
    for method, path in [
        ("GET", "/v1/route?model=m"),
        ("POST", "/v1/jobs"),
        ("GET", "/v1/nodes"),
        ("GET", "/v1/events"),
    ]:
        status, body, headers = await _http(method, url + path)
        assert status == 401, path
        assert body["error"]["code"] == "unauthorized" and "Authorization: Bearer" in body["error"]["message"]
        assert headers["WWW-Authenticate"].startswith("Bearer")


async def test_roles_are_kept_apart(start: Start, accounts: Accounts) -> None:
    _, url = await start()
    dev = await _session(url, accounts.developer)
    http, ws, answer = await _hello(url, {"session": dev})
    try:
        assert answer.type == aiohttp.WSMsgType.CLOSE and ws.close_code == CLOSE_UNAUTHORIZED
        assert answer.extra == "a developer account cannot register a node"
    finally:
        await ws.close()
        await http.close()
    sup = await _session(url, accounts.supplier)
    status, body, _ = await _http("POST", url + "/v1/jobs", sup, json={"tenant": "sup", "model": "m"})
    assert (status, body["error"]["code"]) == (403, "forbidden")
    assert body["error"]["message"] == "a supplier account cannot use /v1/jobs"
    assert (await _http("GET", url + "/v1/route?model=m", sup))[0] == 403
    assert (await _http("GET", url + "/v1/models", sup))[0] == 200  # what any account may read
    client = SignalingClient(url, "client", "c")
    try:
        with pytest.raises(CoordinatorError, match="a supplier account cannot connect as a client"):
            await client.connect({"session": await _session(url, accounts.supplier)})
        await client.connect({"session": await _session(url, accounts.developer)})
    finally:
        await client.shutdown()


async def test_a_session_opens_one_socket_only(start: Start, accounts: Accounts) -> None:
    _, url = await start()
    session = await _session(url, accounts.supplier)
    first = SignalingClient(url, "node", "a")
    second = SignalingClient(url, "node", "b")
    try:
        await first.connect({"session": session})
        with pytest.raises(CoordinatorError, match=r"already opened a WebSocket \(replayed jti\)"):
            await second.connect({"session": session})
    finally:
        await first.shutdown()
        await second.shutdown()


async def test_the_exchange_refuses_replays_unknown_tokens_and_forgeries(start: Start, accounts: Accounts) -> None:
    _, url = await start()
    exchange = url + SESSION_PATH
    nonce = secrets.token_urlsafe(24)
    status, body, _ = await _http("POST", exchange, accounts.developer, json={"nonce": nonce})
    assert status == 200 and body["account"] == "dev" and body["expires_in"] == 600
    status, body, _ = await _http("POST", exchange, accounts.developer, json={"nonce": nonce})
    assert (status, body["error"]["message"]) == (401, "replayed nonce: every session request needs a fresh one")
    assert (await _http("POST", exchange, accounts.developer, json={"nonce": "short"}))[0] == 400
    assert (await _http("POST", exchange, accounts.developer + "x", json={"nonce": nonce + "x"}))[0] == 401
    assert (await _http("POST", exchange, None, json={"nonce": nonce + "y"}))[0] == 401
    # Forged sessions at the HTTP gate: alg none, and HS256 with a guessed secret.
    claims = {"sub": "dev", "role": "admin", "aud": "kluster-coordinator", "iat": int(time.time()), "jti": "x" * 16}
    claims.update(exp=int(time.time()) + 600, nonce="n" * 16)
    unsigned = encode_token({"alg": "none"}, claims, b"").rsplit(".", 1)[0] + "."
    guessed = encode_token({"alg": "HS256"}, claims, b"k" * 32)
    confused = encode_token({"alg": "RS256"}, claims, b"k" * 32)
    for token, reason in ((unsigned, "algorithm 'none'"), (guessed, "signature"), (confused, "algorithm 'RS256'")):
        status, body, _ = await _http("GET", url + "/v1/jobs", token)
        assert status == 401 and reason in body["error"]["message"], body


async def test_a_disabled_account_is_refused_at_its_next_request(start: Start, tmp_path: Path) -> None:
    path = tmp_path / "accounts.sqlite3"
    token = add_user(path, "temp", "developer")
    coord = Coordinator(CoordinatorConfig(port=0, accounts_path=str(path)))
    url = f"http://127.0.0.1:{await coord.start()}"
    try:
        session = await _session(url, token)
        assert (await _http("GET", url + "/v1/jobs", session))[0] == 200
        kluster("coordinator", "disable-user", "temp", "--accounts", str(path))
        status, body, _ = await _http("GET", url + "/v1/jobs", session)
        assert (status, body["error"]["message"]) == (401, "account 'temp' is disabled or gone")
        status, body, _ = await _http("POST", url + SESSION_PATH, token, json={"nonce": secrets.token_urlsafe(24)})
        assert (status, body["error"]["message"]) == (401, "account 'temp' is disabled")
    finally:
        await coord.shutdown()


async def test_a_token_does_no_harm_where_auth_is_off(tmp_path: Path) -> None:
    # kluster demo with a $KLUSTER_TOKEN left in the shell: its grid has no accounts, auth is off.
    coord = Coordinator(CoordinatorConfig(port=0, accounts_path=str(tmp_path / "accounts.sqlite3")))
    url = f"http://127.0.0.1:{await coord.start()}"
    auth = SessionAuth(url, "kt1_" + "x" * 43)
    node = SignalingClient(url, "node", "n")
    try:
        assert (await _http("GET", url + "/v1/health"))[1]["auth"] is False
        assert await auth.refresh() == "" and auth.required is False
        assert await auth.headers() == {}
        await node.connect(auth.hello())
        assert (await _http("GET", url + "/v1/nodes"))[0] == 200
    finally:
        await node.shutdown()
        await auth.close()
        await coord.shutdown()


async def test_a_client_refuses_a_session_minted_for_another_request() -> None:
    # A replayed answer (a session someone captured earlier) carries another nonce than ours.
    from aiohttp import web

    stale = encode_token({"alg": "HS256"}, {"nonce": "an-earlier-request-nonce"}, b"k" * 32)

    async def health(_: web.Request) -> web.Response:
        return web.json_response({"ok": True, "auth": True})

    async def session(_: web.Request) -> web.Response:
        return web.json_response({"session": stale, "expires_in": 600})

    app = web.Application()
    app.router.add_get("/v1/health", health)
    app.router.add_post(SESSION_PATH, session)
    runner = web.AppRunner(app)
    await runner.setup()
    site = web.TCPSite(runner, "127.0.0.1", 0)
    await site.start()
    port = site._server.sockets[0].getsockname()[1]  # type: ignore[union-attr]
    auth = SessionAuth(f"http://127.0.0.1:{port}", "kt1_" + "x" * 43)
    try:
        with pytest.raises(AuthError, match="a session for another request"):
            await auth.refresh()
    finally:
        await auth.close()
        await runner.cleanup()


async def test_floods_get_429_with_retry_after(start: Start, accounts: Accounts) -> None:
    _, url = await start(rate_limits=RateLimits(per_ip=Limit(1.0, 5.0), per_account=None))
    answers = [await _http("GET", url + "/v1/health") for _ in range(6)]
    assert [a[0] for a in answers] == [200] * 5 + [429]
    _, body, headers = answers[-1]
    assert body["error"]["code"] == "rate_limited" and headers["Retry-After"] == "1"
    await asyncio.sleep(1.1)
    assert (await _http("GET", url + "/v1/health"))[0] == 200

    _, url = await start(rate_limits=RateLimits(per_ip=None, per_account=Limit(0.5, 3.0)))
    session = await _session(url, accounts.developer)  # the exchange takes one of the 3
    statuses = [(await _http("GET", url + "/v1/jobs", session))[0] for _ in range(3)]
    assert statuses == [200, 200, 429]
    _, body, headers = await _http("GET", url + "/v1/jobs", session)
    assert body["error"]["message"].startswith("too many requests from account 'dev'")
    assert headers["Retry-After"] == "2"


async def test_spot_checks_are_held_to_a_budget_of_positions_per_account(start: Start, accounts: Accounts) -> None:
    _, url = await start(rate_limits=RateLimits(per_ip=None, per_account=None, audit_positions=Limit(100.0, 1000.0)))
    session = await _session(url, accounts.developer)
    body = {"job": "j-unknown", "session": "s", "client": "c", "tokens": [1] * 600, "prompt_tokens": 1}
    status, answer, _ = await _http("POST", url + "/v1/audit", session, json=body)
    assert status == 404, answer  # asked and charged, though there is no such job
    status, answer, headers = await _http("POST", url + "/v1/audit", session, json=body)
    assert status == 429 and answer["error"]["message"].startswith("spot checks of account 'dev' are over")
    assert headers["Retry-After"] == "2"  # 200 positions missing at 100/s


async def test_oversized_messages_and_bodies_are_refused(start: Start, accounts: Accounts) -> None:
    coord, url = await start()
    # Before the hello (nobody authenticated yet) and after it: 1009 "message too big" either way.
    async with aiohttp.ClientSession() as http, http.ws_connect(ws_url(url)) as ws:
        await ws.receive_json(timeout=5)
        await ws.send_str("x" * (coord.config.max_ws_message + 1))
        msg = await ws.receive(timeout=5)
        assert msg.type == aiohttp.WSMsgType.CLOSE and msg.data == aiohttp.WSCloseCode.MESSAGE_TOO_BIG
    http, ws, welcome = await _hello(url, {"session": await _session(url, accounts.supplier)})
    try:
        assert json.loads(welcome.data)["type"] == "welcome"
        await ws.send_str(json.dumps({"type": "signal", "to": "x", "data": "y" * coord.config.max_ws_message}))
        while (msg := await ws.receive(timeout=5)).type not in (aiohttp.WSMsgType.CLOSE, aiohttp.WSMsgType.CLOSED):
            pass
        assert ws.close_code == aiohttp.WSCloseCode.MESSAGE_TOO_BIG
    finally:
        await ws.close()
        await http.close()
    session = await _session(url, accounts.developer)
    status, _, _ = await _http("POST", url + "/v1/jobs", session, data=b"{" + b" " * coord.config.max_body + b"}")
    assert status == 413


async def test_a_silent_socket_is_dropped_within_two_heartbeats(start: Start, accounts: Accounts) -> None:
    coord, url = await start()
    live_auth = SessionAuth(url, accounts.supplier)
    live = SignalingClient(url, "node", "live")
    me = Identity.ephemeral()
    http, ws, welcome = await _hello(url, {"session": await _session(url, accounts.supplier)}, me)
    try:
        await live_auth.refresh()
        await live.connect(live_auth.hello())
        serving = asyncio.create_task(live.run())  # answers pings, sends its own: must stay
        assert json.loads(welcome.data)["type"] == "welcome"
        silent_since = time.monotonic()  # from now on the raw socket sends nothing and answers no ping
        dead = me.peer_id("n")
        while dead in coord._sockets and time.monotonic() - silent_since < 10:
            await asyncio.sleep(0.02)
        dropped_after = time.monotonic() - silent_since
        assert HEARTBEAT_S <= dropped_after <= 2 * HEARTBEAT_S, dropped_after
        await asyncio.sleep(HEARTBEAT_S)
        assert live.peer_id in coord._sockets and not serving.done()
        _, body, _ = await _http("GET", url + "/v1/nodes", await _session(url, accounts.developer))
        assert [n["name"] for n in body["nodes"]] == ["live"]
    finally:
        await ws.close()
        await http.close()
        await live.shutdown()
        await live_auth.close()


async def test_a_developer_queues_jobs_as_itself(start: Start, accounts: Accounts, smollm2_pack3: Path) -> None:
    _, url = await start(packs=(smollm2_pack3,))
    session = await _session(url, accounts.developer)
    body = {"tenant": "someone-else", "model": "smollm2-135m", "wait_for_route": True}
    status, job, _ = await _http("POST", url + "/v1/jobs", session, json=body)
    assert status == 202 and job["tenant"] == "dev"
    status, _, _ = await _http("POST", url + f"/v1/jobs/{job['id']}/cancel", session, json={"token": job["token"]})
    assert status == 200


@pytest.mark.slow
def test_a_grid_with_auth_on_generates_and_refuses_a_node_without_a_token(smollm2_pack3: Path, tmp_path: Path) -> None:
    from engine.launcher import LocalCluster

    path = tmp_path / "accounts.sqlite3"
    supplier, developer = add_user(path, "farm", "supplier"), add_user(path, "app", "developer")
    (tmp_path / "supplier.token").write_text(supplier + "\n")
    (tmp_path / "developer.token").write_text(developer + "\n")
    nodes = {f"node-{i}": ["--token-file", str(tmp_path / "supplier.token")] for i in (1, 2, 3)}
    cluster = LocalCluster(
        smollm2_pack3, 3, log_dir=tmp_path / "logs", node_args=nodes, coordinator_args=["--accounts", str(path)]
    )
    try:
        cluster.start()
        with pytest.raises(PeerError, match="Authorization: Bearer"):  # the launcher polls without a session
            asyncio.run(cluster.wait_for_route("smollm2-135m", timeout_s=1))
        proc = subprocess.run(
            [
                sys.executable, "-m", "engine.cli", "generate", "--coordinator", cluster.url, "--wait-for-route",
                "--token-file", str(tmp_path / "developer.token"), "--prompt", "Hello", "--max-new-tokens", "4",
                "--json", "--tenant", "someone-else",
            ],
            capture_output=True, text=True, timeout=300, check=False,
        )  # fmt: skip
        assert proc.returncode == 0, proc.stderr[-3000:]
        events = [json.loads(line) for line in proc.stdout.splitlines()]
        assert events[-1]["event"] == "done" and events[-1]["stats"]["generated_tokens"] >= 1

        async def nodes_and_jobs() -> tuple[dict[str, Any], dict[str, Any]]:
            session = await _session(cluster.url, developer)
            return (await _http("GET", cluster.url + "/v1/nodes", session))[1], (
                await _http("GET", cluster.url + "/v1/jobs", session)
            )[1]

        nodes_view, jobs_view = asyncio.run(nodes_and_jobs())
        assert {n["account"] for n in nodes_view["nodes"]} == {"farm"}
        assert [j["tenant"] for j in jobs_view["jobs"]] == ["app"]
        # A node without a token stops at once with the coordinator's one-line reason.
        lone = subprocess.run(
            [sys.executable, "-m", "engine.cli", "node", "--coordinator", cluster.url, "--name", "lone",
             "--cache-dir", str(tmp_path / "cache")],
            capture_output=True, text=True, timeout=120, check=False, env={**os.environ, "KLUSTER_TOKEN": ""},
        )  # fmt: skip
        assert lone.returncode == 2
        assert "refused us: no session token" in lone.stderr.strip().splitlines()[-1]
    finally:
        cluster.stop()
