"""Job detail: streaming output, the route as a chain, failovers and grid events, tokens/s, cost so far.

A job launched here is generated in this process, so everything is live. A job of another client
is known only through the coordinator (state, position, reported tokens): the screen says so
rather than showing an empty route.
"""

from __future__ import annotations

from typing import TYPE_CHECKING, Any, ClassVar, cast

from rich.text import Text
from textual.app import ComposeResult
from textual.binding import Binding, BindingType
from textual.containers import Horizontal, VerticalScroll
from textual.screen import Screen
from textual.widgets import Footer, Sparkline, Static

from dev_tui.localjobs import LocalJob
from dev_tui.screens.jobs_list import STATE_STYLE
from dev_tui.widgets.route_chain import RouteChain

if TYPE_CHECKING:
    from dev_tui.app import KlusterTui

#: timeline lines shown (the newest; the full timeline scrolls with the output)
EVENT_LINES = 4
#: seconds the job's tokens/s sparkline covers
SPARK_SECONDS = 30
_LEVEL = {"info": "grey70", "warn": "yellow", "error": "bold red"}


def money(value: float) -> str:
    return f"${value:.4f}" if value < 100 else f"${value:,.2f}"


class JobDetailScreen(Screen[None]):
    BINDINGS: ClassVar[list[BindingType]] = [
        Binding("escape", "back", "Back"),
        Binding("c", "cancel", "Cancel job"),
        Binding("end", "follow", "Follow output", show=False),
    ]
    DEFAULT_CSS = """
    JobDetailScreen { padding: 0 1; }
    JobDetailScreen #d-head { height: 1; }
    JobDetailScreen #d-prompt { height: 1; color: $text-muted; }
    JobDetailScreen RouteChain { margin-top: 1; }
    JobDetailScreen #d-events { height: auto; max-height: 5; }
    JobDetailScreen #d-rate-row { height: 1; }
    JobDetailScreen #d-rate-label { width: 16; }
    JobDetailScreen Sparkline { width: 1fr; height: 1; }
    JobDetailScreen #d-output { height: 1fr; border-top: solid $primary-darken-2; }
    """

    def __init__(self, key: str) -> None:
        super().__init__()
        self.key = key
        self._seen = -1

    def compose(self) -> ComposeResult:
        yield Static(id="d-head")
        yield Static(id="d-prompt")
        yield RouteChain(id="d-route")
        yield Static(id="d-events")
        with Horizontal(id="d-rate-row"):
            yield Static(id="d-rate-label")
            yield Sparkline([], summary_function=max, id="d-spark")
        with VerticalScroll(id="d-output"):
            yield Static(id="d-text")
        yield Footer()

    @property
    def tui(self) -> KlusterTui:
        return cast("KlusterTui", self.app)

    def on_mount(self) -> None:
        self.refresh_view()
        self.set_interval(0.2, self.refresh_view)

    def on_resize(self) -> None:
        self._seen = -1  # timeline lines are cut to the width: redraw them

    def refresh_view(self) -> None:
        job = self.tui.find_local(self.key)
        if job is None:
            self._show_remote(self.tui.find_remote(self.key))
            return
        self._show_rate(job)
        if job.revision == self._seen:
            return
        self._seen = job.revision
        self._show_local(job)

    def _show_rate(self, job: LocalJob) -> None:
        now = self.tui.clock()
        end = job.finished_at if job.finished and job.finished_at is not None else now  # a finished job's line stays
        self.query_one("#d-spark", Sparkline).data = job.rate.series(end, SPARK_SECONDS)
        self.query_one("#d-rate-label", Static).update(Text(f"{job.decode_tok_s(now):5.1f} tok/s", style="bold"))

    def _show_local(self, job: LocalJob) -> None:
        head = Text(no_wrap=True, overflow="ellipsis")
        head.append(job.id, style="bold")
        head.append("  ")
        state = f"queued #{job.position}" if job.state == "queued" and job.position is not None else job.state
        head.append(state, style=STATE_STYLE.get(job.state, ""))
        head.append(f"  {job.tokens} tokens")
        if job.failovers:
            head.append(f"  {job.failovers} failover{'s' * (job.failovers > 1)}", style="yellow")
        head.append(f"  cost {money(job.cost(self.tui.config.price_per_mtok))} est.", style="grey70")
        self.query_one("#d-head", Static).update(head)
        prompt = Text(no_wrap=True, overflow="ellipsis")
        prompt.append(job.spec.model, style="cyan")
        prompt.append(" › " + " ".join(job.prompt.split()))
        self.query_one("#d-prompt", Static).update(prompt)
        self.query_one(RouteChain).show(job.route)
        box = self.query_one("#d-events", Static)
        width = max(20, (box.size.width or self.size.width or 80) - 8)
        events = Text()
        for event in job.events[-EVENT_LINES:]:
            line = event.text if len(event.text) <= width else event.text[: width - 1] + "…"
            events.append(f"{event.at:6.1f}s ", style="grey50")
            events.append(line + "\n", style=_LEVEL.get(event.level, ""))
        events.rstrip()
        box.update(events)
        output = self.query_one("#d-output", VerticalScroll)
        at_end = output.scroll_y >= output.max_scroll_y - 1
        body = Text(job.text or ("" if job.finished else "(waiting for the first token)"))
        if job.error and job.state == "failed":
            body.append(("\n\n" if job.text else "") + f"✖ {job.error}", style="bold red")
        self.query_one("#d-text", Static).update(body)
        if at_end:
            output.call_after_refresh(output.scroll_end, animate=False)

    def _show_remote(self, job: dict[str, Any] | None) -> None:
        if job is None:
            self.query_one("#d-head", Static).update(
                Text(f"{self.key}: no longer listed by the coordinator", style="grey50")
            )
            return
        state = str(job.get("state"))
        head = Text()
        head.append(str(job.get("id")), style="bold")
        head.append("  ")
        head.append(state, style=STATE_STYLE.get(state, ""))
        head.append(f"  {job.get('model')}  {job.get('tokens', 0)} tokens  tenant {job.get('tenant')}")
        self.query_one("#d-head", Static).update(head)
        self.query_one("#d-prompt", Static).update(
            Text(
                "Another client runs this job: only its queue state and reported tokens are known here.", style="grey50"
            )
        )
        lines = [f"priority {job.get('priority')}"]
        if job.get("position") is not None:
            lines.append(f"position {job.get('position')} in the queue")
        if job.get("error"):
            lines.append(f"error: {job.get('error')}")
        params = job.get("params")
        if isinstance(params, dict) and params:
            lines.append("params: " + ", ".join(f"{k}={v}" for k, v in params.items()))
        self.query_one("#d-events", Static).update("\n".join(lines))

    def action_back(self) -> None:
        self.dismiss(None)

    def action_cancel(self) -> None:
        self.tui.cancel_job(self.key)

    def action_follow(self) -> None:
        self.query_one("#d-output", VerticalScroll).scroll_end(animate=False)
