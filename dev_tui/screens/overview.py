"""Overview tab: nodes online and their GPUs, fragments and replicas per model, tokens/s, queue length."""

from __future__ import annotations

from typing import TYPE_CHECKING, cast

from rich.text import Text
from textual.app import ComposeResult
from textual.containers import Horizontal, VerticalScroll
from textual.widgets import Sparkline, Static

from dev_tui.grid import gpu_label, node_layers, node_speed

if TYPE_CHECKING:
    from dev_tui.app import KlusterTui

#: nodes listed here before "... and N more" (the Nodes tab lists all)
MAX_NODES = 8
SPARK_SECONDS = 60


def replica_style(ready: int) -> str:
    """No ready copy: the model cannot run; one: no failover target; two or more: fine."""
    return "bold red" if ready == 0 else "yellow" if ready == 1 else "green"


class OverviewPane(VerticalScroll):
    DEFAULT_CSS = """
    OverviewPane { padding: 0 1; }
    OverviewPane #ov-summary { height: 1; }
    OverviewPane #ov-rate-row { height: 3; margin-top: 1; }
    OverviewPane #ov-rate-label { width: 16; }
    OverviewPane Sparkline { width: 1fr; height: 3; }
    OverviewPane .section { margin-top: 1; text-style: bold; }
    """

    def compose(self) -> ComposeResult:
        yield Static(id="ov-summary")
        with Horizontal(id="ov-rate-row"):
            yield Static(id="ov-rate-label")
            yield Sparkline([], summary_function=max, id="ov-spark")
        yield Static("Nodes", classes="section")
        yield Static(id="ov-nodes")
        yield Static("Models: fragments and ready copies", classes="section")
        yield Static(id="ov-models")

    @property
    def tui(self) -> KlusterTui:
        return cast("KlusterTui", self.app)

    def on_mount(self) -> None:
        self.refresh_view()
        self.set_interval(0.5, self.refresh_view)

    def aggregate(self) -> list[float]:
        """Tokens per second over the grid: other clients' reported progress plus our own jobs' tokens."""
        now = self.tui.clock()
        total = self.tui.grid.throughput.series(now, SPARK_SECONDS)
        for job in self.tui.local_jobs.values():
            total = [a + b for a, b in zip(total, job.rate.series(now, SPARK_SECONDS), strict=True)]
        return total

    def refresh_view(self) -> None:
        grid = self.tui.grid
        series = self.aggregate()
        now_rate = sum(series[-6:-1]) / 5
        summary = Text()
        summary.append("Nodes ", style="bold")
        summary.append(f"{len(grid.nodes)} online, {grid.ready_nodes()} ready")
        summary.append("   Jobs ", style="bold")
        summary.append(f"{grid.running()} running, ")
        queued = grid.queue_length()
        summary.append(f"{queued} queued", style="yellow" if queued else "")
        self.query_one("#ov-summary", Static).update(summary)
        label = Text.assemble(
            ("Tokens/s\n", "bold"), (f"{now_rate:.1f} now\n", ""), (f"{max(series):.0f} peak 60s", "grey50")
        )
        self.query_one("#ov-rate-label", Static).update(label)
        self.query_one("#ov-spark", Sparkline).data = series
        self.query_one("#ov-nodes", Static).update(self._nodes_text())
        self.query_one("#ov-models", Static).update(self._models_text())

    def _nodes_text(self) -> Text:
        nodes = self.tui.grid.nodes
        if not nodes:
            return Text("no nodes online" if self.tui.grid.connected else "waiting for the coordinator", style="grey50")
        out = Text()
        for node in nodes[:MAX_NODES]:
            ready = bool(node.get("ready"))
            speed = node_speed(node)
            out.append("● " if ready else "○ ", style="green" if ready else "yellow")
            out.append(f"{node.get('name', '?')!s:<12.12} ")
            out.append(f"{gpu_label(node):<22.22} ", style="cyan")
            out.append(f"layers {node_layers(node):<6} ")
            out.append(f"{speed:5.0f} layers/s" if speed is not None else "  measuring", style="grey70")
            out.append("\n")
        if len(nodes) > MAX_NODES:
            out.append(f"... and {len(nodes) - MAX_NODES} more (n: Nodes tab)\n", style="grey50")
        out.rstrip()
        return out

    def _models_text(self) -> Text:
        grid = self.tui.grid
        if not grid.models:
            return Text("no models served" if grid.connected else "waiting for the coordinator", style="grey50")
        out = Text()
        for model in grid.models:
            frags = grid.fragments(model)
            out.append(f"{model.get('model_id')}", style="bold")
            out.append(f"  {model.get('num_layers', '?')} layers, {len(frags)} fragments\n", style="grey70")
            for frag in frags:
                out.append(f"  #{frag.index} L{frag.start}-{frag.end - 1} ")
                out.append(f"x{frag.ready}", style=replica_style(frag.ready))
            out.append("\n")
        out.rstrip()
        return out
