"""Keyboard use against the fixed-data API: palette, help, tabs, the launch form, cancelling another client's job."""

from __future__ import annotations

import socket
from dataclasses import replace
from pathlib import Path
from typing import Any

from textual.pilot import Pilot
from textual.widgets import DataTable, Input, TabbedContent
from tui_fakes import NOW, FakeApi, config

from dev_tui.app import KlusterTui
from dev_tui.screens.detail import JobDetailScreen
from dev_tui.screens.help import HelpScreen
from dev_tui.screens.launch import LaunchScreen


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


def make_app() -> tuple[KlusterTui, FakeApi]:
    api = FakeApi()
    return KlusterTui(config(), api, clock=lambda: NOW, warm_up=False), api


async def ready(pilot: Pilot[Any], app: KlusterTui) -> None:
    for _ in range(50):
        await pilot.pause(0.05)
        if app.grid.connected:
            return


async def test_tabs_help_and_palette() -> None:
    app, _ = make_app()
    async with app.run_test(size=(80, 24)) as pilot:
        await ready(pilot, app)
        await pilot.press("n")
        assert app.query_one(TabbedContent).active == "nodes"
        await pilot.press("question_mark")
        assert isinstance(app.screen, HelpScreen)
        await pilot.press("escape")
        await pilot.press("ctrl+p")
        await pilot.pause()
        await pilot.press(*"Launch a job")
        await pilot.pause(0.3)
        await pilot.press("enter")
        await pilot.pause(0.2)
        assert isinstance(app.screen, LaunchScreen)


async def test_letters_in_the_launch_form_are_text_and_escape_goes_back() -> None:
    app, _ = make_app()
    async with app.run_test(size=(80, 24)) as pilot:
        await ready(pilot, app)
        await pilot.press("l")
        assert isinstance(app.screen, LaunchScreen)
        await pilot.press(*"jolly queue")  # j, o, l, q are app keys elsewhere
        assert app.screen.query_one("#prompt", Input).value == "jolly queue"
        assert isinstance(app.screen, LaunchScreen) and app.is_running
        await pilot.press("escape")
        assert not isinstance(app.screen, LaunchScreen) and not app.local_jobs


async def test_cancelling_another_clients_job_asks_the_coordinator() -> None:
    app, api = make_app()
    async with app.run_test(size=(80, 24)) as pilot:
        await ready(pilot, app)
        await pilot.press("j")
        table = app.query_one("#jobs-table", DataTable)
        await pilot.pause(0.6)
        queued = next(i for i in range(table.row_count) if "queued" in str(table.get_row_at(i)[1]))
        table.move_cursor(row=queued)
        await pilot.press("c")
        await pilot.pause(0.2)
        assert api.cancelled == ["job-77b1e0c2a9f3"]
        done = next(i for i in range(table.row_count) if "done" in str(table.get_row_at(i)[1]))
        table.move_cursor(row=done)
        await pilot.press("c")  # finished: nothing to ask
        await pilot.pause(0.2)
        assert api.cancelled == ["job-77b1e0c2a9f3"]


async def test_a_batch_file_launches_a_job_per_prompt(tmp_path: Path) -> None:
    prompts = tmp_path / "prompts.txt"
    prompts.write_text("# two questions\nWhat is 2+2?\nName a colour.\n")
    closed = f"http://127.0.0.1:{free_port()}"  # the grid view is fixed data; the jobs themselves find no coordinator
    app = KlusterTui(replace(config(), coordinator=closed), FakeApi(), clock=lambda: NOW, warm_up=False)
    async with app.run_test(size=(80, 24)) as pilot:
        await ready(pilot, app)
        await pilot.press("l")
        await pilot.click("#kind-batch")
        await pilot.pause()
        app.screen.query_one("#file", Input).value = str(prompts)
        await pilot.press("ctrl+s")
        await pilot.pause(0.2)
        assert isinstance(app.screen, JobDetailScreen)
        assert [j.prompt for j in app.local_jobs.values()] == ["What is 2+2?", "Name a colour."]
        for _ in range(200):  # the engine's client modules load in a thread first
            await pilot.pause(0.05)
            if all(j.finished for j in app.local_jobs.values()):
                break
        for job in app.local_jobs.values():
            assert job.state == "failed" and job.error is not None and "cannot reach the coordinator" in job.error
