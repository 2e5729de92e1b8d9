"""The job HTTP API on a real aiohttp server (loopback) with a real SQLite file.

Which models have a route is a plain set the tests edit, standing in for live nodes: the route
decision itself belongs to the scheduler and is tested there.
"""

from __future__ import annotations

import asyncio
import json
import time
from collections.abc import AsyncIterator, Awaitable, Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import aiohttp
import pytest
from aiohttp import web
from aiohttp.test_utils import TestClient, TestServer

from engine.coordinator.events import NODE_JOINED, EventHub
from engine.coordinator.jobs import DEFAULT_LIMITS, QueueLimits
from engine.coordinator.jobs_api import JobService, add_job_routes


@dataclass
class Grid:
    """What the coordinator would know: models served, and those with live routes now."""

    served: set[str] = field(default_factory=lambda: {"m"})
    routed: set[str] = field(default_factory=lambda: {"m"})


@dataclass
class Api:
    client: TestClient
    service: JobService
    hub: EventHub
    grid: Grid

    async def post(self, path: str, body: Any = None, status: int = 200) -> dict[str, Any]:
        resp = await self.client.post(path, json=body)
        data = await resp.json()
        assert resp.status == status, data
        return data

    async def get(self, path: str, status: int = 200, **params: str) -> dict[str, Any]:
        resp = await self.client.get(path, params=params)
        data = await resp.json()
        assert resp.status == status, data
        return data

    async def submit(self, tenant: str = "acme", **extra: Any) -> dict[str, Any]:
        return await self.post("/v1/jobs", {"tenant": tenant, "model": "m", **extra}, status=202)


ApiFactory = Callable[..., Awaitable[Api]]


@pytest.fixture
async def make_api(tmp_path: Path) -> AsyncIterator[ApiFactory]:
    """Start job APIs on loopback (same db file each time, to test restarts); all are closed at teardown."""
    clients: list[TestClient] = []

    async def make(limits: QueueLimits = DEFAULT_LIMITS, grid: Grid | None = None, heartbeat_s: float = 15.0) -> Api:
        grid = grid or Grid()
        app, hub = web.Application(), EventHub()
        service = add_job_routes(
            app,
            db_path=str(tmp_path / "coordinator.sqlite3"),
            hub=hub,
            is_served=grid.served.__contains__,
            has_route=grid.routed.__contains__,
            limits=limits,
            tick_s=0.05,
            heartbeat_s=heartbeat_s,
        )
        client = TestClient(TestServer(app, host="127.0.0.1"))
        await client.start_server()
        clients.append(client)
        return Api(client, service, hub, grid)

    yield make
    for client in clients:
        await client.close()


async def test_submit_runs_at_once_when_a_slot_is_free(make_api: ApiFactory) -> None:
    api = await make_api()
    job = await api.submit(priority=7, params={"prompt": "hello"})
    assert job["state"] == "running" and job["position"] is None
    assert job["token"] and job["params"] == {"prompt": "hello"} and job["priority"] == 7
    shown = await api.get(f"/v1/jobs/{job['id']}")
    assert "token" not in shown and shown["state"] == "running"
    await api.post(f"/v1/jobs/{job['id']}/state", {"token": job["token"], "state": "running", "tokens": 4})
    done = await api.post(f"/v1/jobs/{job['id']}/state", {"token": job["token"], "state": "done", "tokens": 9})
    assert (done["state"], done["tokens"]) == ("done", 9) and done["finished_at"] >= done["started_at"]


async def test_queued_job_has_a_position_and_a_long_poll_sees_it_start(make_api: ApiFactory) -> None:
    api = await make_api(QueueLimits(max_running_per_model=1))
    first = await api.submit()
    second = await api.submit(tenant="other")
    assert (second["state"], second["position"]) == ("queued", 1)

    async def finish_first_soon() -> None:
        await asyncio.sleep(0.2)
        await api.post(f"/v1/jobs/{first['id']}/state", {"token": first["token"], "state": "done"})

    t0 = time.monotonic()
    finisher = asyncio.create_task(finish_first_soon())
    waited = await api.get(f"/v1/jobs/{second['id']}/wait", state="queued", timeout="10")
    await finisher
    assert waited["state"] == "running"
    assert 0.15 < time.monotonic() - t0 < 5  # woke on the change, not on the timeout

    unchanged = await api.get(f"/v1/jobs/{second['id']}/wait", timeout="0.1")  # default: its state now
    assert unchanged["state"] == "running"


async def test_no_route_queues_then_fails_with_a_clear_error_never_hangs(make_api: ApiFactory) -> None:
    api = await make_api(QueueLimits(queue_timeout_s=0.3), Grid(routed=set()))
    job = await api.submit()
    assert (job["state"], job["position"]) == ("queued", 1)
    waited = await api.get(f"/v1/jobs/{job['id']}/wait", state="queued", timeout="10")
    assert waited["state"] == "failed"
    assert waited["error"] == "no route for model 'm' within 0.3 s: not enough live nodes serve it"

    refused = await api.post("/v1/jobs", {"tenant": "acme", "model": "m", "wait_for_route": False}, status=503)
    assert refused["error"]["code"] == "no_route"


async def test_a_route_appearing_starts_the_waiting_job(make_api: ApiFactory) -> None:
    api = await make_api(grid=Grid(routed=set()))
    job = await api.submit()
    api.grid.routed.add("m")  # nodes came up; the ticker notices without any request
    waited = await api.get(f"/v1/jobs/{job['id']}/wait", state="queued", timeout="10")
    assert waited["state"] == "running"


async def test_cancel_needs_the_token_and_the_runner_sees_it(make_api: ApiFactory) -> None:
    api = await make_api()
    job = await api.submit()
    wrong = await api.post(f"/v1/jobs/{job['id']}/cancel", {"token": "guess"}, status=400)
    assert "'token' does not match" in wrong["error"]["message"]
    watcher = asyncio.create_task(api.get(f"/v1/jobs/{job['id']}/wait", state="running", timeout="10"))
    await asyncio.sleep(0.1)
    cancelled = await api.post(f"/v1/jobs/{job['id']}/cancel", {"token": job["token"]})
    assert cancelled["state"] == "cancelled"
    assert (await watcher)["state"] == "cancelled"
    late = await api.post(f"/v1/jobs/{job['id']}/state", {"token": job["token"], "state": "done"}, status=409)
    assert late["error"] == {
        "code": "bad_job_state",
        "message": f"job '{job['id']}' is cancelled; it cannot become done",
    }


async def test_list_by_tenant_and_admission_limit(make_api: ApiFactory) -> None:
    api = await make_api(QueueLimits(max_running_per_tenant=1, max_queued_per_tenant=2))
    for _ in range(3):
        await api.submit("a")
    await api.submit("b")
    full = await api.post("/v1/jobs", {"tenant": "a", "model": "m"}, status=429)
    assert full["error"]["code"] == "queue_full" and "tenant 'a' already has 2 queued jobs" in full["error"]["message"]
    mine = (await api.get("/v1/jobs", tenant="a"))["jobs"]
    assert [(j["state"], j["position"]) for j in mine] == [("running", None), ("queued", 1), ("queued", 2)]
    assert len((await api.get("/v1/jobs"))["jobs"]) == 4


@pytest.mark.parametrize(
    ("method", "path", "body", "status", "code", "message"),
    [
        ("POST", "/v1/jobs", b"{not json", 400, "bad_config", "the request body is not valid JSON"),
        ("POST", "/v1/jobs", b"[]", 400, "bad_config", "a job must be a JSON object"),
        ("POST", "/v1/jobs", b'{"tenant": "a"}', 400, "bad_config", "'model' must be a non-empty string"),
        ("POST", "/v1/jobs", b'{"tenant": "a", "model": "x"}', 404, "model_not_found", "model 'x' is not served"),
        ("POST", "/v1/jobs", b'{"tenant": "a", "model": "m", "priority": 99}', 400, "bad_config", "'priority'"),
        ("GET", "/v1/jobs/job-nope", b"", 404, "job_not_found", "no job 'job-nope'"),
        ("GET", "/v1/jobs/job-nope/wait", b"", 404, "job_not_found", "no job 'job-nope'"),
        ("POST", "/v1/jobs/job-nope/cancel", b"{}", 404, "job_not_found", "no job 'job-nope'"),
        ("POST", "/v1/jobs/job-nope/state", b"{}", 404, "job_not_found", "no job 'job-nope'"),
    ],
)
async def test_bad_input_is_a_one_line_json_error(
    make_api: ApiFactory, method: str, path: str, body: bytes, status: int, code: str, message: str
) -> None:
    api = await make_api()
    resp = await api.client.request(method, path, data=body, headers={"Content-Type": "application/json"})
    data = await resp.json()
    assert resp.status == status
    assert data["error"]["code"] == code and message in data["error"]["message"]
    assert "\n" not in data["error"]["message"]


async def test_bad_report_and_wait_arguments(make_api: ApiFactory) -> None:
    api = await make_api()
    job = await api.submit()
    url = f"/v1/jobs/{job['id']}"
    for body, message in [
        ({"token": job["token"], "state": "paused"}, "'state' must be running, done or failed"),
        ({"token": job["token"], "state": "running", "tokens": -1}, "'tokens'"),
        ({"token": job["token"], "state": "failed", "error": 3}, "'error' must be a string"),
    ]:
        assert message in (await api.post(url + "/state", body, status=400))["error"]["message"]
    assert "'timeout'" in (await api.get(url + "/wait", status=400, timeout="600"))["error"]["message"]
    assert "'state' must be one of" in (await api.get(url + "/wait", status=400, state="x"))["error"]["message"]


async def read_events(resp: aiohttp.ClientResponse, count: int) -> list[tuple[str, dict[str, Any] | None]]:
    """The next ``count`` SSE items: (event kind, data) for events, (': comment', None) for comments."""
    out: list[tuple[str, dict[str, Any] | None]] = []
    kind = None
    while len(out) < count:
        line = (await asyncio.wait_for(resp.content.readline(), 10)).decode().rstrip("\n")
        if line.startswith(":"):
            out.append((line, None))
        elif line.startswith("event: "):
            kind = line[len("event: ") :]
        elif line.startswith("data: ") and kind is not None:
            out.append((kind, json.loads(line[len("data: ") :])))
            kind = None
    return out


async def test_event_stream_carries_job_and_node_events(make_api: ApiFactory) -> None:
    api = await make_api(QueueLimits(max_running_per_model=1))
    async with api.client.get("/v1/events") as resp:
        assert resp.headers["Content-Type"] == "text/event-stream"
        assert await read_events(resp, 1) == [(": connected", None)]
        first = await api.submit()
        second = await api.submit()
        await api.post(f"/v1/jobs/{second['id']}/cancel", {"token": second["token"]})
        api.hub.node_event(NODE_JOINED, "n-1", "node-1")
        seen = await read_events(resp, 5)
    assert [(kind, data["job"]["id"] if "job" in data else data["name"]) for kind, data in seen] == [
        ("job.queued", first["id"]),
        ("job.started", first["id"]),
        ("job.queued", second["id"]),
        ("job.cancelled", second["id"]),
        ("node.joined", "node-1"),
    ]
    assert seen[2][1]["job"]["position"] == 1 and "params" not in seen[2][1]["job"]
    assert [data["seq"] for _, data in seen] == [1, 2, 3, 4, 5]


async def test_event_stream_heartbeats_and_resumes_after_last_event_id(make_api: ApiFactory) -> None:
    api = await make_api(heartbeat_s=0.1)
    for _ in range(2):
        await api.submit()  # seq 1-2 queued/started, 3-4 again
    async with api.client.get("/v1/events", headers={"Last-Event-ID": "2"}) as resp:
        seen = await read_events(resp, 4)
    assert seen[0] == (": connected", None)
    assert [(kind, data["seq"]) for kind, data in seen[1:3]] == [("job.queued", 3), ("job.started", 4)]
    assert seen[3] == (": ping", None)  # nothing new: a heartbeat comment keeps proxies and the TUI informed


async def test_restart_keeps_queued_jobs_and_lets_a_running_one_finish(make_api: ApiFactory) -> None:
    limits = QueueLimits(max_running_per_model=1)
    before = await make_api(limits)
    running = await before.submit()
    queued = await before.submit()
    await before.client.close()  # the same database file, as after a crash and restart

    after = await make_api(limits)
    assert (await after.get(f"/v1/jobs/{queued['id']}"))["state"] == "queued"
    assert (await after.get(f"/v1/jobs/{running['id']}"))["state"] == "running"
    # the runner kept generating through the nodes and reports as usual
    await after.post(f"/v1/jobs/{running['id']}/state", {"token": running["token"], "state": "done"})
    waited = await after.get(f"/v1/jobs/{queued['id']}/wait", state="queued", timeout="10")
    assert waited["state"] == "running"


async def test_shutdown_answers_long_polls_and_ends_event_streams(make_api: ApiFactory) -> None:
    api = await make_api(grid=Grid(routed=set()))
    job = await api.submit()
    async with api.client.get("/v1/events") as resp:
        await read_events(resp, 1)
        poll = asyncio.create_task(api.get(f"/v1/jobs/{job['id']}/wait", state="queued", timeout="30"))
        await asyncio.sleep(0.1)
        t0 = time.monotonic()
        await api.client.server.close()
        assert (await poll)["state"] == "queued"
        assert (await asyncio.wait_for(resp.content.read(), 5)).strip() == b""  # the stream ended, silently
        assert time.monotonic() - t0 < 5
