"""kluster-tui driven with Pilot against a real coordinator and real node processes.

What a user does: see the grid, launch a chat job from the form and watch it stream (the text
must equal ``kluster generate``'s greedy output), cancel a queued job, sort the nodes table, and
kill -9 a node of a running job's route (the route view shows it within 3 s, the job completes
with the same text). The failover test stops a node, so it stays last in this module.
"""

from __future__ import annotations

import argparse
import asyncio
import io
import time
from collections.abc import Callable
from typing import Any

import aiohttp
import pytest
from textual.pilot import Pilot
from textual.widgets import DataTable, Input, Static

from dev_tui.app import KlusterTui
from dev_tui.config import TuiConfig
from dev_tui.localjobs import Health, LaunchSpec, LocalJob
from dev_tui.screens.detail import JobDetailScreen
from dev_tui.screens.launch import LaunchScreen
from dev_tui.screens.nodes import NodesPane
from dev_tui.widgets.route_chain import RouteChain
from engine.launcher import LocalCluster

pytestmark = pytest.mark.slow

MODEL = "smollm2-135m"
PROMPT = "Tell me about the history of Rome."
TOKENS = 40
SIZE = (100, 30)


def plain(widget: Static) -> str:
    content = widget.content
    return str(getattr(content, "plain", content))


async def until(pilot: Pilot[Any], check: Callable[[], bool], timeout_s: float, what: str) -> float:
    """Pause the app until ``check()`` holds; returns the seconds it took."""
    start = time.monotonic()
    while not check():
        if time.monotonic() - start > timeout_s:
            raise AssertionError(f"timed out after {timeout_s:g} s waiting for {what}")
        await pilot.pause(0.05)
    return time.monotonic() - start


def tui(cluster: LocalCluster, tenant: str = "tui-test") -> KlusterTui:
    return KlusterTui(TuiConfig(coordinator=cluster.url, tenant=tenant, refresh_s=1.0))


@pytest.fixture(scope="module")
def reference(tui_cluster: LocalCluster) -> str:
    """``kluster generate --chat --json`` for PROMPT through the same grid (greedy)."""
    from engine.cli.generate import run_remote

    args = argparse.Namespace(
        model=MODEL,
        prompt=PROMPT,
        chat=True,
        max_new_tokens=TOKENS,
        temperature=0.0,
        top_p=1.0,
        seed=0,
        json=True,
        route_wait=60.0,
        codec="fp32",
        activation=1.0,
        verify=False,
        draft_tokens=2,
        tenant="reference",
        priority=5,
        wait_for_route=False,
    )
    done = asyncio.run(run_remote(args, tui_cluster.url, out=io.StringIO()))
    return str(done["text"])


async def test_overview_shows_the_grid(tui_cluster: LocalCluster) -> None:
    app = tui(tui_cluster)
    async with app.run_test(size=SIZE) as pilot:
        await until(pilot, lambda: app.grid.connected is True and app.grid.streaming, 20, "the first poll and stream")
        await pilot.pause(0.6)
        summary = plain(app.query_one("#ov-summary", Static))
        nodes = plain(app.query_one("#ov-nodes", Static))
        models = plain(app.query_one("#ov-models", Static))
        assert "4 online, 4 ready" in summary
        assert all(f"node-{i}" in nodes for i in range(1, 5))
        assert "CPU (no GPU)" in nodes
        assert "2 fragments" in models and "#0 L0-14 x2" in models and "#1 L15-29 x2" in models
        assert "live" in plain(app.query_one("#status", Static))


async def test_chat_job_streams_and_equals_kluster_generate(tui_cluster: LocalCluster, reference: str) -> None:
    app = tui(tui_cluster)
    async with app.run_test(size=SIZE) as pilot:
        await until(pilot, lambda: bool(app.grid.models), 20, "the model list")
        await pilot.press("l")
        await until(pilot, lambda: isinstance(app.screen, LaunchScreen), 5, "the launch form")
        app.screen.query_one("#max_new_tokens", Input).value = str(TOKENS)
        prompt = app.screen.query_one("#prompt", Input)
        prompt.value = PROMPT[:-1]  # typing it all key by key costs seconds; the last key is typed
        prompt.focus()
        await pilot.press("end", PROMPT[-1], "enter")
        await until(pilot, lambda: isinstance(app.screen, JobDetailScreen), 5, "the job screen")
        job = next(iter(app.local_jobs.values()))
        shown: set[str] = set()

        def seen_text() -> bool:
            shown.add(plain(app.screen.query_one("#d-text", Static)))
            return job.finished

        await until(pilot, seen_text, 60, "the job to finish")
        await pilot.pause(0.4)
        assert job.state == "done", job.error
        assert job.text == reference
        assert plain(app.screen.query_one("#d-text", Static)) == reference
        partial = {t for t in shown if t and t != reference and reference.startswith(t)}
        assert len(partial) >= 2, "the output should appear token by token, not all at once"
        assert [h.name for h in app.screen.query_one(RouteChain).hops] == [h.name for h in job.route]
        assert job.job_id is not None and "done" in plain(app.screen.query_one("#d-events", Static))


async def _submit_raw(http: aiohttp.ClientSession, url: str, tenant: str) -> dict[str, Any]:
    async with http.post(url + "/v1/jobs", json={"tenant": tenant, "model": MODEL}) as resp:
        return dict(await resp.json())


async def test_cancel_a_queued_job(tui_cluster: LocalCluster) -> None:
    url, tenant = tui_cluster.url, "tui-busy"
    async with aiohttp.ClientSession() as http:
        holders = [await _submit_raw(http, url, tenant) for _ in range(2)]  # the tenant's 2 running slots
        assert [h["state"] for h in holders] == ["running", "running"]
        try:
            app = tui(tui_cluster, tenant=tenant)
            async with app.run_test(size=SIZE) as pilot:
                await until(pilot, lambda: app.grid.connected is True, 20, "the first poll")
                (job,) = app.launch(LaunchSpec(MODEL, ("Hello",), max_new_tokens=8))
                await until(pilot, lambda: job.state == "queued", 20, "the job to queue")
                await pilot.press("j")
                table = app.query_one("#jobs-table", DataTable)
                await until(pilot, lambda: table.row_count >= 1, 5, "the jobs table")
                assert table.get_row_at(0)[0] == job.id  # local jobs first, cursor on it
                await pilot.press("c")
                await until(pilot, lambda: job.state == "cancelled", 10, "the cancel")
                async with http.get(f"{url}/v1/jobs/{job.job_id}") as resp:
                    assert (await resp.json())["state"] == "cancelled"
                await until(pilot, lambda: "cancelled" in str(table.get_row_at(0)[1]), 5, "the table to show it")
        finally:
            for holder in holders:
                await http.post(f"{url}/v1/jobs/{holder['id']}/cancel", json={"token": holder["token"]})


async def test_nodes_table_sorts_by_a_clicked_header(tui_cluster: LocalCluster) -> None:
    app = tui(tui_cluster)
    async with app.run_test(size=SIZE) as pilot:
        await until(pilot, lambda: len(app.grid.nodes) == 4, 20, "4 nodes")
        await pilot.press("n")
        await pilot.pause()
        pane = app.query_one(NodesPane)
        table = pane.query_one(DataTable)
        labels = list(table.columns)
        column = next(k for k in labels if k.value == "L/s")
        x = sum(table.columns[k].get_render_width(table) for k in labels[: labels.index(column)]) + 1

        def speeds() -> list[float]:
            return [float(str(table.get_row_at(i)[4])) for i in range(table.row_count)]

        await pilot.click(table, offset=(x, 0))
        await pilot.pause()
        assert (pane.sort_column, pane.reverse) == ("L/s", False)
        assert speeds() == sorted(speeds()) and len(speeds()) == 4
        await pilot.click(table, offset=(x, 0))
        await pilot.pause()
        assert pane.reverse and speeds() == sorted(speeds(), reverse=True)
        await pilot.press("s")  # keyboard: the next column
        assert pane.sort_column == "Sess"


async def test_kill_a_routed_node_shows_failover_and_job_completes(tui_cluster: LocalCluster, reference: str) -> None:
    app = tui(tui_cluster)
    async with app.run_test(size=SIZE) as pilot:
        await until(pilot, lambda: app.grid.streaming, 20, "the event stream")
        (job,) = app.launch(LaunchSpec(MODEL, (PROMPT,), max_new_tokens=TOKENS))
        app.open_job(job.key)
        await until(pilot, lambda: job.tokens >= 5, 60, "5 tokens")
        victim = job.route[0]
        tui_cluster.kill_node(victim.name)  # SIGKILL
        chain = app.screen.query_one(RouteChain)
        events = app.screen.query_one("#d-events", Static)

        def failover_shown() -> bool:
            gone = any(h.peer_id == victim.peer_id and h.health is Health.GONE for h in chain.hops)
            return gone or "failover" in plain(events)

        took = await until(pilot, failover_shown, 3.0, "the route view to show the failover")
        await until(pilot, lambda: job.finished, 60, "the job to finish")
        await pilot.pause(0.4)
        assert job.state == "done", job.error
        assert job.failovers == 1 and victim.name not in [h.name for h in job.route]
        assert "failover from " + victim.name in plain(events) or _logged(job, "failover from " + victim.name)
        assert job.text == reference, "a failover must not change greedy output"
        print(f"failover shown {took:.2f} s after the kill")


def _logged(job: LocalJob, text: str) -> bool:
    return any(text in e.text for e in job.events)
