"""Refresh a DataTable from fresh rows without losing the user's place.

Live data arrives every few seconds; clearing and refilling a table would throw the cursor back
to the top each time, which makes keyboard use (cancel the job under the cursor) a race. Rows are
updated in place when the keys and their order are unchanged, and rebuilt otherwise with the
cursor put back on the same key.
"""

from __future__ import annotations

from collections.abc import Sequence

from rich.text import Text
from textual.widgets import DataTable
from textual.widgets.data_table import RowKey

Cell = str | Text
Row = tuple[str, Sequence[Cell]]


def selected_key(table: DataTable[Cell]) -> str | None:
    """The key of the row under the cursor, or None in an empty table."""
    if table.row_count == 0:
        return None
    try:
        key, _ = table.coordinate_to_cell_key(table.cursor_coordinate)
    except Exception:  # the cursor points past a row that just went away
        return None
    return None if key.value is None else str(key.value)


def sync_rows(table: DataTable[Cell], rows: list[Row]) -> None:
    current = [str(k.value) for k in table.rows]
    wanted = [key for key, _ in rows]
    if current == wanted:
        columns = list(table.columns)
        for key, cells in rows:
            for column, value in zip(columns, cells, strict=False):
                if table.get_cell(key, column) != value:
                    table.update_cell(key, column, value)
        return
    keep = selected_key(table)
    table.clear()
    for key, cells in rows:
        table.add_row(*cells, key=key)
    if keep is not None and keep in wanted:
        table.move_cursor(row=table.get_row_index(RowKey(keep)), animate=False)
