"""Nodes tab: every live node with what it serves and measured; sortable by any column.

Columns: name, GPU, layers served, ready, measured layers/s, live sessions, median round trip to
its peers, fragments, memory offered (MiB).

Sorting is done on the data before the rows go in (not with DataTable.sort), so it survives the
refresh every few seconds: ``s`` moves to the next column, ``S`` flips the order, a click on a
header sorts by it (a second click flips).
"""

from __future__ import annotations

import contextlib
from collections.abc import Callable
from typing import TYPE_CHECKING, Any, ClassVar, cast

from rich.text import Text
from textual.app import ComposeResult
from textual.binding import Binding, BindingType
from textual.containers import Vertical
from textual.widgets import DataTable
from textual.widgets.data_table import ColumnKey, RowDoesNotExist, RowKey

from dev_tui.grid import gpu_label, node_layers, node_rtt, node_speed, span_of
from dev_tui.widgets.tables import Cell, Row, selected_key, sync_rows

if TYPE_CHECKING:
    from dev_tui.app import KlusterTui


def _fragments(node: dict[str, Any]) -> str:
    span = span_of(node.get("fragments"))
    if span is None:
        return "-"
    return f"{span[0]}" if span[1] - span[0] == 1 else f"{span[0]}-{span[1] - 1}"


def _mem_mib(node: dict[str, Any]) -> float | None:
    offered = node.get("memory_offered_bytes")
    return offered / 2**20 if isinstance(offered, int | float) else None


def _num(value: float | None, fmt: str) -> str:
    return "-" if value is None else format(value, fmt)


#: column label -> (sort key, cell text); None sorts last whichever the direction. Most useful first:
#: at 80 columns the last ones scroll (left/right) into view.
COLUMNS: dict[str, tuple[Callable[[dict[str, Any]], Any], Callable[[dict[str, Any]], Cell]]] = {
    "Name": (lambda n: str(n.get("name", "")), lambda n: str(n.get("name", ""))),
    "GPU": (gpu_label, gpu_label),
    "Layers": (lambda n: (span_of(n.get("layers")) or (None,))[0], node_layers),
    "Rdy": (
        lambda n: int(bool(n.get("ready"))),
        lambda n: Text("yes", style="green") if n.get("ready") else Text("no", style="yellow"),
    ),
    "L/s": (node_speed, lambda n: _num(node_speed(n), ".0f")),
    "Sess": (lambda n: n.get("sessions"), lambda n: str(n.get("sessions", 0))),
    "RTT ms": (node_rtt, lambda n: _num(node_rtt(n), ".1f")),
    "Frag": (lambda n: (span_of(n.get("fragments")) or (None,))[0], _fragments),
    "MiB": (_mem_mib, lambda n: _num(_mem_mib(n), ".0f")),
}
#: fixed widths (others fit their content); a long GPU name is cut rather than pushing columns away
WIDTHS = {"GPU": 16}
LABELS = list(COLUMNS)


def sort_nodes(nodes: list[dict[str, Any]], column: str, reverse: bool) -> list[dict[str, Any]]:
    key = COLUMNS[column][0]
    known = [n for n in nodes if key(n) is not None]
    unknown = [n for n in nodes if key(n) is None]
    return sorted(known, key=key, reverse=reverse) + unknown


class NodesPane(Vertical):
    BINDINGS: ClassVar[list[BindingType]] = [
        Binding("s", "sort_next", "Sort column"),
        Binding("S", "sort_reverse", "Reverse"),
    ]
    DEFAULT_CSS = """
    NodesPane DataTable { height: 1fr; }
    """

    def __init__(self, *, id: str | None = None) -> None:
        super().__init__(id=id)
        self.sort_column = "Name"
        self.reverse = False

    def compose(self) -> ComposeResult:
        table: DataTable[Cell] = DataTable(cursor_type="row", zebra_stripes=True, id="nodes-table")
        for label in LABELS:
            table.add_column(label + " ", key=label, width=WIDTHS.get(label))  # room for the sort arrow
        yield table

    @property
    def tui(self) -> KlusterTui:
        return cast("KlusterTui", self.app)

    def on_mount(self) -> None:
        self.refresh_view()
        self.set_interval(1.0, self.refresh_view)

    def rows(self) -> list[Row]:
        nodes = sort_nodes(self.tui.grid.nodes, self.sort_column, self.reverse)
        return [(str(n.get("peer_id")), [cell(n) for _, cell in COLUMNS.values()]) for n in nodes]

    def _label_headers(self) -> None:
        table = self.query_one(DataTable)
        for label in LABELS:
            arrow = ("▼" if self.reverse else "▲") if label == self.sort_column else " "
            table.columns[ColumnKey(label)].label = Text(label + arrow)
        table.refresh()

    def refresh_view(self) -> None:
        self._label_headers()
        sync_rows(self.query_one(DataTable), self.rows())

    def sort_by(self, column: str, reverse: bool | None = None) -> None:
        if reverse is None:
            reverse = not self.reverse if column == self.sort_column else False
        self.sort_column, self.reverse = column, reverse
        table = self.query_one(DataTable)
        keep = selected_key(table)
        table.clear()  # also drops the table's render caches, so the header arrow redraws
        self.refresh_view()
        if keep is not None:
            with contextlib.suppress(RowDoesNotExist):
                table.move_cursor(row=table.get_row_index(RowKey(keep)), animate=False)

    def on_data_table_header_selected(self, event: DataTable.HeaderSelected) -> None:
        event.stop()
        if event.column_key.value in COLUMNS:
            self.sort_by(str(event.column_key.value))

    def action_sort_next(self) -> None:
        self.sort_by(LABELS[(LABELS.index(self.sort_column) + 1) % len(LABELS)], reverse=False)

    def action_sort_reverse(self) -> None:
        self.sort_by(self.sort_column, not self.reverse)
