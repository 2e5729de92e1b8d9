"""The tray icons: one SVG per state, generated here and exported to ``assets/icons``.

The SVG text is the single source: the app renders it at run time (so an installed wheel needs
no data files), and ``python -m supplier_gui.icons assets/icons`` writes the SVG and PNG copies
the README and packagers use; a test checks the copies still match. States differ by glyph as
well as colour (a GPU chip with a ring, an arrow, a bolt, two bars, an exclamation mark), so they
read in a monochrome panel and for colour-blind users too.
"""

from __future__ import annotations

import sys
from pathlib import Path
from typing import TYPE_CHECKING

from supplier_gui.state import TrayState

if TYPE_CHECKING:
    from PySide6.QtGui import QIcon

_COLOURS = {
    TrayState.IDLE: ("#8a9099", "#5f6670"),
    TrayState.SHARING: ("#2f7de1", "#1d5bb0"),
    TrayState.SERVING: ("#22a45d", "#157a43"),
    TrayState.PAUSED: ("#e0a100", "#a87800"),
    TrayState.ERROR: ("#d93b3b", "#a32424"),
}

_GLYPHS = {
    TrayState.IDLE: '<circle cx="32" cy="32" r="8" fill="none" stroke="#ffffff" stroke-width="4.5"/>',
    TrayState.SHARING: '<path d="M32 17 L44 31 H36.5 V46 H27.5 V31 H20 Z" fill="#ffffff"/>',
    TrayState.SERVING: '<path d="M36 15 L21 36 H30.5 L27 49 L43 27 H33.5 Z" fill="#ffffff"/>',
    TrayState.PAUSED: (
        '<rect x="22" y="20" width="7.5" height="24" rx="1.5" fill="#ffffff"/>'
        '<rect x="34.5" y="20" width="7.5" height="24" rx="1.5" fill="#ffffff"/>'
    ),
    TrayState.ERROR: (
        '<rect x="28.25" y="16" width="7.5" height="21" rx="2.5" fill="#ffffff"/>'
        '<circle cx="32" cy="44.5" r="4.25" fill="#ffffff"/>'
    ),
}

#: sizes of the exported PNGs (the tray picks what it needs from the SVG at run time)
PNG_SIZE = 64


def icon_svg(state: TrayState) -> str:
    fill, edge = _COLOURS[state]
    pins = "".join(
        f'<line x1="{p}" y1="3" x2="{p}" y2="10"/><line x1="{p}" y1="54" x2="{p}" y2="61"/>'
        f'<line x1="3" y1="{p}" x2="10" y2="{p}"/><line x1="54" y1="{p}" x2="61" y2="{p}"/>'
        for p in (21, 32, 43)
    )
    return (
        '<svg xmlns="http://www.w3.org/2000/svg" width="64" height="64" viewBox="0 0 64 64">'
        f'<g stroke="{edge}" stroke-width="4" stroke-linecap="round">{pins}</g>'
        f'<rect x="9" y="9" width="46" height="46" rx="9" fill="{fill}" stroke="{edge}" stroke-width="3"/>'
        f"{_GLYPHS[state]}</svg>\n"
    )


def render_png(state: TrayState, size: int = PNG_SIZE) -> bytes:
    """The icon rasterised (needs Qt but no display)."""
    from PySide6.QtCore import QBuffer, QByteArray, QIODevice
    from PySide6.QtGui import QImage, QPainter
    from PySide6.QtSvg import QSvgRenderer

    image = QImage(size, size, QImage.Format.Format_ARGB32_Premultiplied)
    image.fill(0)
    renderer = QSvgRenderer(QByteArray(icon_svg(state).encode()))
    painter = QPainter(image)
    painter.setRenderHint(QPainter.RenderHint.Antialiasing)
    renderer.render(painter)
    painter.end()
    out = QByteArray()
    buf = QBuffer(out)
    buf.open(QIODevice.OpenModeFlag.WriteOnly)
    image.save(buf, "PNG")
    buf.close()
    return bytes(out.data())


def make_icon(state: TrayState) -> QIcon:
    """The icon at the sizes trays ask for (Qt is imported here: export needs no display)."""
    from PySide6.QtCore import QByteArray
    from PySide6.QtGui import QIcon, QImage, QPainter, QPixmap
    from PySide6.QtSvg import QSvgRenderer

    renderer = QSvgRenderer(QByteArray(icon_svg(state).encode()))
    icon = QIcon()
    for size in (16, 22, 24, 32, 48, 64, 128):
        image = QImage(size, size, QImage.Format.Format_ARGB32_Premultiplied)
        image.fill(0)
        painter = QPainter(image)
        painter.setRenderHint(QPainter.RenderHint.Antialiasing)
        renderer.render(painter)
        painter.end()
        icon.addPixmap(QPixmap.fromImage(image))
    return icon


def export(folder: Path) -> list[Path]:
    """Write ``kluster-<state>.svg`` and ``.png`` for every state into ``folder``."""
    folder.mkdir(parents=True, exist_ok=True)
    written = []
    for state in TrayState:
        svg, png = folder / f"kluster-{state.value}.svg", folder / f"kluster-{state.value}.png"
        svg.write_text(icon_svg(state), encoding="utf-8")
        png.write_bytes(render_png(state))
        written += [svg, png]
    return written


if __name__ == "__main__":
    target = Path(sys.argv[1]) if len(sys.argv) > 1 else Path("assets/icons")
    for path in export(target):
        sys.stdout.write(f"{path}\n")
