"""``kluster-tui``: the Textual app (tabs, screens, keys) and the workers that keep its state live.

Three kinds of worker run on the app's event loop and never block it: one polls nodes, models and
jobs (every ``--refresh`` s, or at once when an event says something changed), one follows the
coordinator's event stream (reconnecting from the last event id), and one per launched job runs
the generation itself (``runner.py``). They only write state (``GridModel``, ``LocalJob``); the
views redraw from that state on short timers. An unreachable coordinator is one red line with
the reason and a retry key, never a traceback.
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import logging
import os
import sys
import time
from collections.abc import Callable, Iterable
from pathlib import Path
from typing import Any, ClassVar

from rich.text import Text
from textual.app import App, ComposeResult, SystemCommand
from textual.binding import Binding, BindingType
from textual.containers import Horizontal, Vertical
from textual.css.query import NoMatches
from textual.screen import Screen
from textual.widgets import DataTable, Footer, Static, TabbedContent, TabPane
from textual.worker import Worker

from engine.errors import KlusterError

from .api import CoordinatorApi, GridApi, credentials_for
from .config import TuiConfig, load_config
from .grid import GridModel, span_of
from .localjobs import LaunchSpec, LocalJob
from .runner import import_client, run_job
from .screens.detail import JobDetailScreen
from .screens.help import HelpScreen
from .screens.jobs_list import JobsPane
from .screens.launch import LaunchScreen
from .screens.nodes import NodesPane
from .screens.overview import OverviewPane

log = logging.getLogger(__name__)

#: the most seconds between poll retries while the coordinator is unreachable
MAX_BACKOFF_S = 10.0
#: actions only the main screen offers (a letter typed in the launch form must not switch tabs)
_MAIN_ONLY = frozenset({"launch", "show_tab", "retry", "quit", "help"})


def _fragments_text(value: Any) -> str:
    """' with fragment 1' / ' with fragments 0-1' from a ``[start, end)`` span; '' when absent."""
    span = span_of(value)
    if span is None:
        return ""
    start, end = span
    return f" with fragment {start}" if end - start == 1 else f" with fragments {start}-{end - 1}"


class KlusterTui(App[None]):
    TITLE = "kluster-tui"
    CSS = """
    #top { dock: top; height: auto; }
    #status { height: 1; background: $panel; padding: 0 1; }
    #banner { height: 1; background: $error 25%; padding: 0 1; display: none; }
    #banner-text { width: 1fr; text-style: bold; }
    #banner-hint { width: auto; }
    #banner.shown { display: block; }
    TabbedContent { height: 1fr; }
    TabPane { padding: 0; }
    """
    BINDINGS: ClassVar[list[BindingType]] = [
        Binding("l", "launch", "Launch"),
        Binding("o", "show_tab('overview')", "Overview", show=False),
        Binding("j", "show_tab('jobs')", "Jobs", show=False),
        Binding("n", "show_tab('nodes')", "Nodes", show=False),
        Binding("r", "retry", "Refresh"),
        Binding("question_mark", "help", "Help", key_display="?"),
        Binding("q", "quit", "Quit"),
    ]

    def __init__(
        self,
        config: TuiConfig,
        api: GridApi | None = None,
        *,
        clock: Callable[[], float] = time.time,
        cache_dir: Path | None = None,
        warm_up: bool = True,
    ) -> None:
        super().__init__()
        self.config = config
        if api is None:
            api = CoordinatorApi(config.coordinator, credentials_for(config.coordinator, config.token))
        self.api: GridApi = api
        self.clock = clock
        self.grid = GridModel()
        self.local_jobs: dict[str, LocalJob] = {}
        self._job_workers: dict[str, Worker[None]] = {}
        self._launched_count = 0
        self._cache_dir = cache_dir
        self._warm_up = warm_up
        #: the model the launch form offers first: the last one launched
        self.default_model: str | None = None
        self._poll_wake = asyncio.Event()
        self._stream_wake = asyncio.Event()

    # ------------------------------------------------------------------ layout

    def compose(self) -> ComposeResult:
        with Vertical(id="top"):
            yield Static(id="status")
            with Horizontal(id="banner"):
                yield Static(id="banner-text")
                yield Static("  retrying · r: now", id="banner-hint")
        with TabbedContent(initial="overview"):
            with TabPane("Overview \\[o]", id="overview"):
                yield OverviewPane()
            with TabPane("Jobs \\[j]", id="jobs"):
                yield JobsPane()
            with TabPane("Nodes \\[n]", id="nodes"):
                yield NodesPane()
        yield Footer()

    def on_mount(self) -> None:
        self.run_worker(self._poll_loop(), name="poll", group="grid", exit_on_error=False)
        self.run_worker(self._event_loop(), name="events", group="grid", exit_on_error=False)
        if self._warm_up:  # torch loads in a thread now, so the first launch starts at once
            self.run_worker(import_client(), name="warm-up", exit_on_error=False)
        self.refresh_chrome()
        self.set_interval(0.5, self.refresh_chrome)

    def refresh_chrome(self) -> None:
        """The status line and the error banner (on the main screen only)."""
        try:
            status = self.query_one("#status", Static)
            banner = self.query_one("#banner", Horizontal)
        except NoMatches:  # another screen is on top: its own widgets show
            return
        grid = self.grid
        line = Text()
        line.append("kluster ", style="bold")
        line.append(self.config.coordinator, style="cyan")
        if grid.connected is None:
            line.append("  ○ connecting", style="yellow")
        elif grid.connected:
            line.append("  ● live" if grid.streaming else "  ● polling", style="green" if grid.streaming else "yellow")
        else:
            line.append("  ✖ offline", style="bold red")
        line.append(f"  tenant {self.config.tenant}", style="grey70")
        if self.config.token_source != "none":
            line.append(f"  token: {self.config.token_source}", style="grey70")
        status.update(line)
        banner.set_class(bool(grid.error), "shown")
        if grid.error:
            # the status line already names the coordinator: keep the reason, which must fit 80 columns
            message = grid.error.replace(
                f"cannot reach the coordinator at {self.config.coordinator}", "coordinator unreachable"
            )
            text = Text(f"✖ {message}", no_wrap=True, overflow="ellipsis")
            self.query_one("#banner-text", Static).update(text)

    async def on_unmount(self) -> None:
        await self.api.close()

    # ------------------------------------------------------------------ workers

    async def _wait(self, wake: asyncio.Event, seconds: float) -> None:
        with contextlib.suppress(TimeoutError):
            await asyncio.wait_for(wake.wait(), seconds)
        wake.clear()

    async def _poll_loop(self) -> None:
        failures = 0
        while True:
            try:
                await self._poll_once()
            except KlusterError as exc:
                failures += 1
                self.grid.set_error(str(exc))
            except Exception as exc:  # a bug or an answer we cannot read: say so, keep polling
                log.exception("poll failed")
                failures += 1
                self.grid.set_error(f"unexpected answer from the coordinator ({type(exc).__name__}); see the log")
            else:
                failures = 0
            delay = min(MAX_BACKOFF_S, 2.0 ** (failures - 1)) if failures else self.config.refresh_s
            await self._wait(self._poll_wake, delay)

    async def _poll_once(self) -> None:
        nodes = await self.api.nodes()
        models = await self.api.models()
        jobs = await self.api.jobs()
        local_ids = {j.id for j in self.local_jobs.values()}
        self.grid.set_snapshot(nodes, models, jobs, self.clock(), local_ids)
        rtts = self.grid.rtts()
        for job in self.local_jobs.values():
            if not job.finished:
                job.set_links(rtts)

    async def _event_loop(self) -> None:
        last_id: str | None = None
        failures = 0
        while True:
            try:
                async for event in self.api.events(last_id):
                    failures = 0
                    if not self.grid.streaming:
                        self.grid.streaming = True
                        self.grid.changed()
                    if isinstance(event.get("seq"), int):
                        last_id = str(event["seq"])
                    self.on_grid_event(event)
            except KlusterError as exc:
                log.info("event stream: %s", exc)
            except Exception:  # one bad event must not end live updates for good
                log.exception("event stream failed; reconnecting")
            if self.grid.streaming:
                self.grid.streaming = False
                self.grid.changed()
            failures += 1
            await self._wait(self._stream_wake, min(5.0, 0.5 * 2 ** (failures - 1)))

    def on_grid_event(self, event: dict[str, Any]) -> None:
        """One event from the stream: patch the jobs list, tell running jobs about their nodes."""
        if self.grid.apply_event(event):
            self._poll_wake.set()
        kind = str(event.get("kind", ""))
        if not kind.startswith("node."):
            return
        peer = str(event.get("peer_id"))
        name = str(event.get("name") or self._node_name(peer))
        now = self.clock()
        for job in self.local_jobs.values():
            if job.state != "running":
                continue
            if kind == "node.left":
                if not job.node_gone(peer, name, now):
                    job.log(now, f"grid: {name} left")
            elif kind == "node.ready":
                job.log(now, f"grid: {name} ready{_fragments_text(event.get('fragments'))}")
            elif kind == "node.joined":
                job.log(now, f"grid: {name} joined")
            elif kind == "node.draining":
                job.log(now, f"grid: {name} draining", "warn")

    def _node_name(self, peer: str) -> str:
        for node in self.grid.nodes:
            if node.get("peer_id") == peer:
                return str(node.get("name"))
        for job in self.local_jobs.values():
            for hop in job.route:
                if hop.peer_id == peer:
                    return hop.name
        return peer

    # ------------------------------------------------------------------ jobs

    def launch(self, spec: LaunchSpec) -> list[LocalJob]:
        """Start one local job per prompt (a batch queues them all; the coordinator orders them)."""
        from engine import paths

        jobs = []
        cache_dir = self._cache_dir or paths.cache_dir()
        for prompt in spec.prompts:
            self._launched_count += 1
            job = LocalJob(f"tui-{self._launched_count}", spec, prompt, self.clock())
            self.local_jobs[job.key] = job
            worker = self.run_worker(
                run_job(job, self.config, cache_dir, self.clock),
                name=job.key,
                group="jobs",
                exit_on_error=False,
            )
            self._job_workers[job.key] = worker
            jobs.append(job)
        return jobs

    def find_local(self, key: str) -> LocalJob | None:
        job = self.local_jobs.get(key)
        if job is not None:
            return job
        return next((j for j in self.local_jobs.values() if j.job_id == key), None)

    def find_remote(self, job_id: str) -> dict[str, Any] | None:
        return next((j for j in self.grid.jobs if j.get("id") == job_id), None)

    def open_job(self, key: str) -> None:
        if isinstance(self.screen, JobDetailScreen):
            self.pop_screen()
        self.push_screen(JobDetailScreen(key))

    def cancel_job(self, key: str) -> None:
        job = self.find_local(key)
        if job is not None:
            if job.finished:
                self.notify(f"{job.id} is already {job.state}", severity="warning")
                return
            worker = self._job_workers.get(job.key)
            if worker is not None:
                worker.cancel()
            self.notify(f"cancelling {job.id}")
            return
        remote = self.find_remote(key)
        if remote is None or remote.get("state") not in {"queued", "running"}:
            self.notify(f"{key} is not queued or running", severity="warning")
            return
        self.run_worker(self._cancel_remote(key), group="cancel", exit_on_error=False)

    async def _cancel_remote(self, job_id: str) -> None:
        """Ask the coordinator; it answers with its own reason (another client's job needs that client's token)."""
        try:
            await self.api.cancel(job_id, None)
        except KlusterError as exc:
            self.notify(f"cannot cancel {job_id}: {exc}", severity="error", timeout=8)
        else:
            self.notify(f"cancelled {job_id}")
            self._poll_wake.set()

    def _launched(self, spec: LaunchSpec | None) -> None:
        if spec is None:
            return
        self.default_model = spec.model
        jobs = self.launch(spec)
        if len(jobs) > 1:
            self.notify(f"batch of {len(jobs)} jobs launched; the Jobs tab lists them")
        self.push_screen(JobDetailScreen(jobs[0].key))

    # ------------------------------------------------------------------ actions

    def check_action(self, action: str, parameters: tuple[object, ...]) -> bool | None:
        """Letter keys act on the main screen only: in the launch form they are typed text."""
        return not (action in _MAIN_ONLY and isinstance(self.screen, LaunchScreen | HelpScreen))

    def _to_main(self) -> None:
        while len(self.screen_stack) > 1:
            self.pop_screen()

    def action_show_tab(self, tab: str) -> None:
        self._to_main()
        tabs = self.query_one(TabbedContent)
        tabs.active = tab
        with contextlib.suppress(NoMatches):  # the overview has no table
            tabs.get_pane(tab).query_one(DataTable).focus()

    def action_launch(self) -> None:
        models = [str(m.get("model_id")) for m in self.grid.models]
        self.push_screen(LaunchScreen(models, self.default_model), self._launched)

    def action_retry(self) -> None:
        self._poll_wake.set()
        self._stream_wake.set()
        self.notify("refreshing", timeout=1.5)

    def action_help(self) -> None:
        self.push_screen(HelpScreen())

    async def action_quit(self) -> None:
        """Cancel the jobs running here (the coordinator frees their slots at once), then exit."""
        live = [w for key, w in self._job_workers.items() if not self.local_jobs[key].finished]
        for worker in live:
            worker.cancel()
        if live:
            with contextlib.suppress(Exception):
                await asyncio.wait_for(asyncio.gather(*(w.wait() for w in live), return_exceptions=True), 5)
        await self.api.close()
        self.exit()

    def get_system_commands(self, screen: Screen[Any]) -> Iterable[SystemCommand]:
        yield from super().get_system_commands(screen)
        yield SystemCommand("Launch a job", "Model, prompt or batch file, parameters", self.action_launch)
        yield SystemCommand(
            "Overview", "Nodes, GPUs, fragments, tokens/s, queue", lambda: self.action_show_tab("overview")
        )
        yield SystemCommand("Jobs", "All jobs: open or cancel", lambda: self.action_show_tab("jobs"))
        yield SystemCommand("Nodes", "The nodes table (sortable)", lambda: self.action_show_tab("nodes"))
        yield SystemCommand("Refresh", "Poll the coordinator now; reconnect the event stream", self.action_retry)
        yield SystemCommand("Keys and views", "The help screen", self.action_help)
        for job in list(self.local_jobs.values())[-10:]:
            yield SystemCommand(f"Open {job.id}", job.prompt[:60], lambda key=job.key: self.open_job(key))


# ---------------------------------------------------------------------- command line


def setup_logging(path: Path | None) -> Path:
    """Log to a file: anything written to the terminal would tear the UI."""
    import platformdirs

    path = path or Path(platformdirs.user_log_dir("kluster")) / "tui.log"
    path.parent.mkdir(parents=True, exist_ok=True)
    level = getattr(logging, os.environ.get("KLUSTER_LOGLEVEL", "WARNING").upper(), logging.WARNING)
    handler = logging.FileHandler(path, encoding="utf-8")
    handler.setFormatter(logging.Formatter("%(asctime)s %(levelname)s %(name)s: %(message)s"))
    root = logging.getLogger()
    root.handlers[:] = [handler]
    root.setLevel(level)
    for noisy in ("aioice", "aiortc"):
        logging.getLogger(noisy).setLevel(max(logging.WARNING, level))
    return path


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(
        prog="kluster-tui",
        description="A terminal UI for a Kluster grid: overview, launch jobs, follow them hop by hop.",
        epilog="Token: $KLUSTER_TOKEN, the keyring (service 'kluster', user = coordinator URL), "
        "or 'token' in ~/.config/kluster/config.toml.",
    )
    p.add_argument(
        "--coordinator",
        metavar="URL",
        help="coordinator URL (default: $KLUSTER_COORDINATOR, config file, http://127.0.0.1:8765)",
    )
    p.add_argument("--tenant", metavar="NAME", help="tenant jobs are queued for (default: config file, 'default')")
    p.add_argument(
        "--price-per-mtok",
        type=float,
        default=None,
        metavar="PRICE",
        help="price per million tokens for the cost estimate (default 0)",
    )
    p.add_argument(
        "--refresh", type=float, default=None, metavar="S", help="seconds between polls of the coordinator (default 3)"
    )
    p.add_argument(
        "--log-file", type=Path, default=None, metavar="PATH", help="log file (default: the user log dir, tui.log)"
    )
    return p


def main(argv: list[str] | None = None) -> int:
    # Before torch loads (see engine/cli/__init__.py): idle OpenMP workers must not spin through the UI's time.
    os.environ.setdefault("GOMP_SPINCOUNT", "20000")
    args = build_parser().parse_args(argv)
    try:
        config = load_config(
            args.coordinator, tenant=args.tenant, price_per_mtok=args.price_per_mtok, refresh_s=args.refresh
        )
    except KlusterError as exc:
        print(f"kluster-tui: error: {exc}", file=sys.stderr)
        return 2
    setup_logging(args.log_file)
    KlusterTui(config).run()
    return 0


if __name__ == "__main__":
    sys.exit(main())
