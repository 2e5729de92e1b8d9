"""The coordinator client (one-line errors, bearer token, event stream), and the app while the coordinator is down."""

from __future__ import annotations

import socket
from collections.abc import AsyncIterator

import pytest
from aiohttp import web
from textual.widgets import Static

from dev_tui.api import STREAM_CONNECTED, CoordinatorApi, StaticToken, credentials_for
from dev_tui.app import KlusterTui
from dev_tui.config import TuiConfig
from engine.errors import CoordinatorError, JobStateError


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


@pytest.fixture
async def server() -> AsyncIterator[tuple[str, dict[str, list[str]]]]:
    """A stand-in coordinator: records headers, answers a list, an error, and a short event stream."""
    seen: dict[str, list[str]] = {"auth": [], "last_id": []}

    async def nodes(request: web.Request) -> web.Response:
        seen["auth"].append(request.headers.get("Authorization", ""))
        if request.headers.get("Authorization") == "Bearer stale":  # a session from before a restart
            return web.json_response({"error": {"code": "unauthorized", "message": "session expired"}}, status=401)
        return web.json_response({"nodes": [{"name": "a"}]})

    async def cancel(_: web.Request) -> web.Response:
        return web.json_response(
            {"error": {"code": "bad_job_state", "message": "job 'j' finished long ago"}}, status=409
        )

    async def events(request: web.Request) -> web.StreamResponse:
        seen["last_id"].append(request.headers.get("Last-Event-ID", ""))
        resp = web.StreamResponse(headers={"Content-Type": "text/event-stream"})
        await resp.prepare(request)
        await resp.write(b': connected\n\nid: 4\nevent: node.left\ndata: {"kind": "node.left", "seq": 4}\n\n')
        return resp  # the stream ends: the client must say so

    app = web.Application()
    app.router.add_get("/v1/nodes", nodes)
    app.router.add_post("/v1/jobs/{id}/cancel", cancel)
    app.router.add_get("/v1/events", events)
    runner = web.AppRunner(app)
    await runner.setup()
    port = free_port()
    await web.TCPSite(runner, "127.0.0.1", port).start()
    try:
        yield f"http://127.0.0.1:{port}", seen
    finally:
        await runner.cleanup()


async def test_calls_carry_the_token_and_errors_are_typed(server: tuple[str, dict[str, list[str]]]) -> None:
    url, seen = server
    api = CoordinatorApi(url + "/", StaticToken("s3cret"))
    try:
        assert await api.nodes() == [{"name": "a"}]
        assert seen["auth"] == ["Bearer s3cret"]
        with pytest.raises(JobStateError, match="finished long ago"):
            await api.cancel("j", "tok")
        got = []
        with pytest.raises(CoordinatorError, match="closed the event stream"):
            async for event in api.events("3"):
                got.append(event)
        assert got == [{"kind": STREAM_CONNECTED}, {"kind": "node.left", "seq": 4}]
        with pytest.raises(CoordinatorError):
            async for _ in api.events("4"):  # a reconnect names the last event it saw
                pass
        assert seen["last_id"] == ["3", "4"]
    finally:
        await api.close()


class Sessions:
    """Credentials whose first session is stale: a 401 must get one refresh and one retry."""

    def __init__(self) -> None:
        self.session, self.refreshed = "stale", 0

    async def headers(self) -> dict[str, str]:
        return {"Authorization": f"Bearer {self.session}"}

    async def refresh(self) -> str:
        self.refreshed += 1
        self.session = "fresh"
        return self.session

    async def close(self) -> None:
        return None


async def test_a_refused_session_is_renewed_once(server: tuple[str, dict[str, list[str]]]) -> None:
    url, seen = server
    sessions = Sessions()
    api = CoordinatorApi(url, sessions)
    try:
        assert await api.nodes() == [{"name": "a"}]
        assert seen["auth"] == ["Bearer stale", "Bearer fresh"] and sessions.refreshed == 1
    finally:
        await api.close()


def test_credentials_exchange_the_token_for_sessions_when_the_engine_can() -> None:
    assert credentials_for("http://c:1", None) is None
    try:
        from engine.coordinator.auth import SessionAuth
    except ImportError:  # a coordinator without accounts: the token itself is the bearer
        assert isinstance(credentials_for("http://c:1", "t"), StaticToken)
    else:
        assert isinstance(credentials_for("http://c:1", "t"), SessionAuth)


async def test_unreachable_coordinator_is_one_line() -> None:
    api = CoordinatorApi(f"http://127.0.0.1:{free_port()}", timeout_s=2)
    try:
        with pytest.raises(CoordinatorError) as err:
            await api.jobs()
        assert str(err.value).endswith("connection refused") and "\n" not in str(err.value)
    finally:
        await api.close()


async def test_app_shows_the_outage_and_retries() -> None:
    app = KlusterTui(TuiConfig(coordinator=f"http://127.0.0.1:{free_port()}"), warm_up=False)
    async with app.run_test(size=(80, 24)) as pilot:
        for _ in range(100):
            await pilot.pause(0.05)
            if app.grid.error:
                break
        await pilot.pause(0.6)
        banner = app.query_one("#banner-text", Static)
        text = str(getattr(banner.content, "plain", banner.content))
        assert app.query_one("#banner").display and text == "✖ coordinator unreachable: connection refused"
        assert "offline" in str(getattr(app.query_one("#status", Static).content, "plain", ""))
        revision = app.grid.revision
        await pilot.press("r")
        for _ in range(40):
            await pilot.pause(0.05)
            if app.grid.revision > revision:
                break
        assert app.grid.revision > revision and app.grid.connected is False  # retried at once, still down
