"""Jobs tab: this TUI's jobs and the coordinator's live jobs in one table; open or cancel under the cursor."""

from __future__ import annotations

from typing import TYPE_CHECKING, Any, ClassVar, cast

from rich.text import Text
from textual.app import ComposeResult
from textual.binding import Binding, BindingType
from textual.containers import Vertical
from textual.widgets import DataTable, Static

from dev_tui.widgets.tables import Cell, Row, selected_key, sync_rows

if TYPE_CHECKING:
    from dev_tui.app import KlusterTui

STATE_STYLE = {
    "submitting": "grey70",
    "queued": "yellow",
    "running": "cyan",
    "done": "green",
    "failed": "bold red",
    "cancelled": "grey50",
}
COLUMNS = ("Job", "State", "Tenant", "Model", "Pri", "Tokens", "Age", "")


def age(seconds: float) -> str:
    seconds = max(0.0, seconds)
    if seconds < 60:
        return f"{seconds:.0f}s"
    if seconds < 3600:
        return f"{seconds // 60:.0f}m"
    return f"{seconds // 3600:.0f}h"


def _created(job: dict[str, Any], default: float) -> float:
    value = job.get("created_at")
    return float(value) if isinstance(value, int | float) else default


def state_cell(state: str, position: Any = None) -> Text:
    label = f"queued #{position}" if state == "queued" and position is not None else state
    return Text(label, style=STATE_STYLE.get(state, ""))


class JobsPane(Vertical):
    BINDINGS: ClassVar[list[BindingType]] = [
        Binding("enter", "open", "Open", show=True),
        Binding("c", "cancel", "Cancel job"),
    ]
    DEFAULT_CSS = """
    JobsPane DataTable { height: 1fr; }
    JobsPane #jobs-hint { height: 1; color: $text-muted; padding: 0 1; }
    """

    def compose(self) -> ComposeResult:
        table: DataTable[Cell] = DataTable(cursor_type="row", zebra_stripes=True, id="jobs-table")
        for label in COLUMNS:
            table.add_column(label, key=label or "here")
        yield table
        yield Static("enter: open   c: cancel (jobs started here)   l: launch", id="jobs-hint")

    @property
    def tui(self) -> KlusterTui:
        return cast("KlusterTui", self.app)

    def on_mount(self) -> None:
        self.refresh_view()
        self.set_interval(0.5, self.refresh_view)

    def rows(self) -> list[Row]:
        tui = self.tui
        now = tui.clock()
        rows: list[Row] = []
        seen: set[str] = set()
        for job in reversed(list(tui.local_jobs.values())):
            seen.add(job.id)
            cells: list[Cell] = [
                job.id,
                state_cell(job.state, job.position),
                tui.config.tenant,
                job.spec.model,
                str(job.spec.priority),
                str(job.tokens),
                age(now - job.created),
                Text("here", style="cyan"),
            ]
            rows.append((job.key, cells))
        remote = sorted(tui.grid.jobs, key=lambda j: -_created(j, 0.0))
        for job in remote:
            job_id = str(job.get("id"))
            if job_id in seen:
                continue
            cells = [
                job_id,
                state_cell(str(job.get("state")), job.get("position")),
                str(job.get("tenant", "")),
                str(job.get("model", "")),
                str(job.get("priority", "")),
                str(job.get("tokens", 0)),
                age(now - _created(job, now)),
                "",
            ]
            rows.append((job_id, cells))
        return rows

    def refresh_view(self) -> None:
        sync_rows(self.query_one(DataTable), self.rows())

    def on_data_table_row_selected(self, event: DataTable.RowSelected) -> None:
        event.stop()
        if event.row_key.value is not None:
            self.tui.open_job(str(event.row_key.value))

    def action_open(self) -> None:
        key = selected_key(self.query_one(DataTable))
        if key is not None:
            self.tui.open_job(key)

    def action_cancel(self) -> None:
        key = selected_key(self.query_one(DataTable))
        if key is not None:
            self.tui.cancel_job(key)
