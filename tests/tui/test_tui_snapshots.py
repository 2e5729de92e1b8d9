"""Pictures of every view at 80x24 and 100x30 (pytest-textual-snapshot), from fixed data.

The data comes from ``tui_fakes.FakeApi`` and a frozen clock, not a live grid (see ``tui_fakes.py``).
Update the pictures with ``pytest tests/tui --snapshot-update`` and look at each new one.
"""

from __future__ import annotations

from collections.abc import Awaitable, Callable
from typing import Any

import pytest
from textual.pilot import Pilot
from textual.widgets import Input
from tui_fakes import NOW, FakeApi, config, failover_job

from dev_tui.app import KlusterTui

SIZES = [(80, 24), (100, 30)]
Snap = Callable[..., bool]


def make_app(*, down: bool = False) -> KlusterTui:
    app = KlusterTui(config(), FakeApi(down=down), clock=lambda: NOW, warm_up=False)
    for second in range(0 if down else 60):  # a steady grid with a dip: what the sparkline should show
        app.grid.throughput.add(40 + (second * 7) % 23 - (30 if 35 <= second < 40 else 0), NOW - 60 + second)
    return app


async def settle(pilot: Pilot[Any]) -> None:
    """Wait for the first poll to land and the views to redraw from it."""
    app = pilot.app
    assert isinstance(app, KlusterTui)
    for _ in range(50):
        await pilot.pause(0.05)
        if app.grid.connected is not None:
            break
    await pilot.pause(0.6)  # the views redraw on 0.5 s timers


def before(*keys: str, job: bool = False) -> Callable[[Pilot[Any]], Awaitable[None]]:
    async def run(pilot: Pilot[Any]) -> None:
        app = pilot.app
        assert isinstance(app, KlusterTui)
        if job:
            local = failover_job()
            app.local_jobs[local.key] = local
        await settle(pilot)
        for key in keys:
            await pilot.press(key)
            await pilot.pause()
        await pilot.pause(0.3)

    return run


@pytest.mark.parametrize("size", SIZES, ids=["80x24", "100x30"])
def test_overview(snap_compare: Snap, size: tuple[int, int]) -> None:
    assert snap_compare(make_app(), terminal_size=size, run_before=before())


@pytest.mark.parametrize("size", SIZES, ids=["80x24", "100x30"])
def test_job_detail_after_failover(snap_compare: Snap, size: tuple[int, int]) -> None:
    async def run(pilot: Pilot[Any]) -> None:
        await before(job=True)(pilot)
        app = pilot.app
        assert isinstance(app, KlusterTui)
        app.open_job("tui-1")
        await pilot.pause(0.5)

    assert snap_compare(make_app(), terminal_size=size, run_before=run)


def test_jobs_list(snap_compare: Snap) -> None:
    assert snap_compare(make_app(), terminal_size=(80, 24), run_before=before("j", job=True))


def test_nodes_sorted_by_speed(snap_compare: Snap) -> None:
    # n: Nodes tab; s x4 moves the sort from Name to L/s (measured layers/s); S: fastest first
    keys = ("n", "s", "s", "s", "s", "S")
    assert snap_compare(make_app(), terminal_size=(80, 24), run_before=before(*keys))


def test_launch_form_with_a_mistake(snap_compare: Snap) -> None:
    async def run(pilot: Pilot[Any]) -> None:
        await before("l")(pilot)
        screen = pilot.app.screen
        screen.query_one("#max_new_tokens", Input).value = "0"
        screen.query_one("#prompt", Input).focus()
        await pilot.press(*"Why is the sky blue?")
        await pilot.press("ctrl+s")  # refused: the form stays, with one red line
        await pilot.pause(0.2)

    assert snap_compare(make_app(), terminal_size=(80, 24), run_before=run)


def test_help(snap_compare: Snap) -> None:
    assert snap_compare(make_app(), terminal_size=(80, 24), run_before=before("question_mark"))


def test_coordinator_unreachable(snap_compare: Snap) -> None:
    assert snap_compare(make_app(down=True), terminal_size=(80, 24), run_before=before())
