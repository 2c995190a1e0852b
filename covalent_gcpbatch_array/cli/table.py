"""Plain-text tables for the listings, in the manner of ``kubectl get``.

Columns are separated by two spaces, with no borders. Essential columns (ids, states, counts)
are never shortened; only the columns marked ``shrink`` (long free text, kept last) give way
to a narrow terminal: cut with ``…`` down to their minimum width, then left out. With no
width (output to a pipe or file) nothing is cut. Lines never end in spaces.
"""

from __future__ import annotations

import os
import shutil
from collections.abc import Sequence
from dataclasses import dataclass
from typing import TextIO

__all__ = ["Column", "output_width", "render"]

_GAP = "  "
_ELLIPSIS = "…"


@dataclass(frozen=True)
class Column:
    """One column: its header, how it aligns, and whether it may give way."""

    header: str
    right: bool = False  # right-aligned (numbers)
    shrink: bool = False  # long text: cut, or left out, when the width is short
    min_width: int = 12  # a shrinking column narrower than this is left out


def output_width(out: TextIO) -> int | None:
    """The width to fit: the terminal's, or ``$COLUMNS`` if set; ``None`` (no limit) otherwise."""
    if out.isatty():
        return shutil.get_terminal_size().columns
    columns = os.environ.get("COLUMNS", "")
    return int(columns) if columns.isdigit() and int(columns) > 0 else None


def render(columns: Sequence[Column], rows: Sequence[Sequence[str]], width: int | None) -> str:
    """The table as text, one line per row after the header line, fitted to ``width``."""
    widths = [
        max([len(column.header), *(len(row[i]) for row in rows)])
        for i, column in enumerate(columns)
    ]
    shown = list(range(len(columns)))
    if width is not None:
        for i in reversed(shown.copy()):
            if not columns[i].shrink:
                continue
            excess = sum(widths[j] for j in shown) + len(_GAP) * (len(shown) - 1) - width
            if excess <= 0:
                break
            if widths[i] - excess >= columns[i].min_width:
                widths[i] -= excess
            else:
                shown.remove(i)
    visible = [(columns[i], widths[i]) for i in shown]
    lines = [[column.header for column in columns], *rows]
    return "".join(_line(visible, [cells[i] for i in shown]) + "\n" for cells in lines)


def _line(visible: list[tuple[Column, int]], cells: list[str]) -> str:
    parts = []
    for (column, size), cell in zip(visible, cells, strict=True):
        if len(cell) > size:
            cell = cell[: size - 1] + _ELLIPSIS
        parts.append(cell.rjust(size) if column.right else cell.ljust(size))
    return _GAP.join(parts).rstrip()
