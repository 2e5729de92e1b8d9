"""The help screen: every key and what each view shows, in one place (``?``)."""

from __future__ import annotations

from typing import ClassVar

from textual.app import ComposeResult
from textual.binding import Binding, BindingType
from textual.containers import VerticalScroll
from textual.screen import ModalScreen
from textual.widgets import Static

HELP = """\
[b]kluster-tui[/b]: watch the grid, launch jobs, follow them hop by hop.

[b]Everywhere[/b]
  l        launch a job: model, chat prompt or file of prompts, parameters
  o j n    Overview / Jobs / Nodes tabs (or tab, shift+tab, a click)
  r        refresh now; retry at once when the coordinator is unreachable
  ctrl+p   command palette: every action by name
  ?  help    q  quit (jobs running here are cancelled first)

[b]Launch[/b]     enter or ctrl+s submits; escape goes back
[b]Jobs[/b]       enter opens the job under the cursor; c cancels it
[b]Nodes[/b]      s sorts by the next column, S reverses, a header click
           sorts by that column; left/right scroll the columns
[b]Job[/b]        streaming output, and the route as a chain of hops:
           ms/token and tokens/s each hop allows, health colour
           (green ok, yellow slow, red gone), link delay on arrows;
           failovers and grid events underneath; c cancels

Cost is tokens x --price-per-mtok, an estimate until the grid has prices.
Only the client that submitted a job can cancel it (the coordinator asks
for the job's token), so c works on jobs launched here.
Press escape or ? to close."""


class HelpScreen(ModalScreen[None]):
    BINDINGS: ClassVar[list[BindingType]] = [
        Binding("escape", "close", "Close"),
        Binding("question_mark", "close", "Close", show=False),
    ]
    DEFAULT_CSS = """
    HelpScreen { align: center middle; }
    HelpScreen VerticalScroll {
        width: 80; max-width: 100%; height: auto; max-height: 100%;
        border: round $primary; background: $surface; padding: 0 1;
    }
    """

    def compose(self) -> ComposeResult:
        with VerticalScroll():
            yield Static(HELP)

    def action_close(self) -> None:
        self.dismiss(None)
