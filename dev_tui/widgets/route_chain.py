"""The route drawn as a chain of boxes, one per hop, coloured by health.

::

    ╭─ node-3 ───────╮        ╭─ node-2 ───────╮        ╭─ node-1 ───────╮
    │ L0-9      ● ok │  0.1ms │ L10-19    ● ok │  0.1ms │ L20-29    ● ok │ ↺
    │ 12.3ms   81t/s │ ─────▶ │ 13.0ms   77t/s │ ─────▶ │ 17.1ms   58t/s │
    ╰────────────────╯        ╰────────────────╯        ╰────────────────╯

Each box shows the hop's layers, its health, its smoothed milliseconds per token (queue +
compute) and the tokens/s that cost allows; an arrow shows the one-way link delay to the next
hop; ``↺`` is the ring (the last hop feeds each token back to the first). Hops wrap onto more
rows when the terminal is narrow, so 80 columns hold three hops per row.
"""

from __future__ import annotations

from rich.text import Text
from textual.geometry import Size
from textual.widget import Widget

from dev_tui.localjobs import Health, HopView

BOX = 18
GAP = 8
_STYLE = {Health.WAITING: "grey50", Health.OK: "green", Health.SLOW: "yellow", Health.GONE: "bold red"}
_MARK = {Health.WAITING: "○ wait", Health.OK: "● ok", Health.SLOW: "● slow", Health.GONE: "✖ gone"}


def _fit(text: str, width: int) -> str:
    return text if len(text) <= width else text[: width - 1] + "…"


def _ms(value: float | None) -> str:
    if value is None:
        return "…"
    return f"{value / 1000:.1f}s" if value >= 1000 else f"{value:.1f}ms"


def _box(hop: HopView) -> list[Text]:
    style = _STYLE[hop.health]
    inner = BOX - 2
    title = _fit(f" {hop.name} ", inner - 1)
    top = (
        Text("╭─", style=style)
        + Text(title, style=f"bold {style}")
        + Text("─" * (inner - 1 - len(title)) + "╮", style=style)
    )
    layers = f"L{hop.start}-{hop.end - 1}"
    mark = _MARK[hop.health]
    line1 = (
        Text("│", style=style)
        + Text(f" {layers:<{inner - 3 - len(mark)}} ")
        + Text(mark, style=style)
        + Text(" │", style=style)
    )
    rate = f"{hop.tok_s:.0f}t/s" if hop.tok_s is not None else ""
    cost = _ms(hop.ms_per_token)
    line2 = Text("│", style=style) + Text(f" {cost:<{inner - 3 - len(rate)}} {rate} ") + Text("│", style=style)
    bottom = Text("╰" + "─" * inner + "╯", style=style)
    return [top, line1, line2, bottom]


def _arrow(hop: HopView, last: bool) -> list[Text]:
    if last:
        return [Text(" " * GAP), Text(" ↺".ljust(GAP), style="cyan"), Text(" " * GAP), Text(" " * GAP)]
    link = _ms(hop.link_ms) if hop.link_ms is not None else ""
    return [
        Text(" " * GAP),
        Text(link.center(GAP), style="grey70"),
        Text(" " + "─" * (GAP - 3) + "▶ "),
        Text(" " * GAP),
    ]


def rows_for(width: int, hops: int) -> int:
    per_row = max(1, (width + GAP) // (BOX + GAP))
    return max(1, -(-hops // per_row))


def render_chain(hops: list[HopView], width: int) -> Text:
    """The whole chain as text for a given width (pure, so it is tested without a terminal)."""
    if not hops:
        return Text("no route yet", style="grey50")
    per_row = max(1, (width + GAP) // (BOX + GAP))
    lines: list[Text] = []
    for first in range(0, len(hops), per_row):
        row = hops[first : first + per_row]
        parts = [Text(), Text(), Text(), Text()]
        for i, hop in enumerate(row):
            index = first + i
            for line, piece in zip(parts, _box(hop), strict=True):
                line.append_text(piece)
            arrow = _arrow(hop, last=index == len(hops) - 1)
            if index != first + len(row) - 1 or index == len(hops) - 1:
                for line, piece in zip(parts, arrow, strict=True):
                    line.append_text(piece)
        lines.extend(parts)
    return Text("\n").join(lines)


class RouteChain(Widget):
    """Draws ``hops``; call ``show`` with the job's route whenever it changed."""

    DEFAULT_CSS = """
    RouteChain { height: auto; width: 1fr; }
    """

    def __init__(self, *, id: str | None = None) -> None:
        super().__init__(id=id)
        self.hops: list[HopView] = []

    def show(self, hops: list[HopView]) -> None:
        self.hops = list(hops)
        self.refresh(layout=True)

    def get_content_height(self, container: Size, viewport: Size, width: int) -> int:
        return 1 if not self.hops else 4 * rows_for(width, len(self.hops))

    def render(self) -> Text:
        return render_chain(self.hops, self.content_size.width or 80)
