"""Tables that print well anywhere: plain aligned text for logs, pipes and files, rich tables on a terminal.

A name (a tensor's, a checkpoint's) is never cut, wrapped or shortened: ``torchkeep inspect
m.pt | grep running_mean`` must find every one whole. Piped output is plain text, one row per
line, columns separated by at least two spaces, no box characters and no ANSI codes.
"""

from __future__ import annotations

import sys
from collections.abc import Sequence
from typing import TextIO

from rich.console import Console
from rich.measure import Measurement
from rich.table import Table
from rich.text import Text

__all__ = ["format_bytes", "format_table", "is_terminal", "print_table", "rich_table"]

Cell = str | Text


def format_table(
    headers: Sequence[str],
    rows: Sequence[Sequence[object]],
    *,
    right: Sequence[int] = (),
    rule: bool = True,
) -> str:
    """Columns padded to their widest cell, two spaces apart; nothing is ever cut.

    Args:
        headers (Sequence[str]): the first line.
        rows (Sequence[Sequence[object]]): one line each, ``str()`` of each cell.
        right (Sequence[int], default ()): indexes of right-aligned columns.
        rule (bool, default True): a line of dashes under the headers.

    Returns:
        The table, without a trailing newline.
    """
    cells = [[str(c) for c in headers]] + [[str(c) for c in row] for row in rows]
    widths = [max(len(row[i]) for row in cells) for i in range(len(headers))]

    def line(row: Sequence[str]) -> str:
        parts = [
            c.rjust(w) if i in right else c.ljust(w) for i, (c, w) in enumerate(zip(row, widths, strict=True))
        ]
        return "  ".join(parts).rstrip()

    lines = [line(cells[0])]
    if rule:
        lines.append("  ".join("-" * w for w in widths))
    return "\n".join(lines + [line(r) for r in cells[1:]])


def is_terminal(stream: TextIO | None = None) -> bool:
    """Whether ``stream`` (default: stdout) is a terminal; False for pipes, files and closed streams."""
    stream = sys.stdout if stream is None else stream
    try:
        return stream.isatty()
    except (AttributeError, ValueError):  # replaced by an object without isatty, or closed
        return False


def rich_table(
    headers: Sequence[str],
    rows: Sequence[Sequence[Cell]],
    *,
    right: Sequence[int] = (),
    whole: Sequence[int] = (0,),
) -> Table:
    """A rich table whose ``whole`` columns (the names) never wrap; the others fold when space is short."""
    table = Table(show_edge=False, header_style="bold")
    for i, header in enumerate(headers):
        table.add_column(
            header,
            justify="right" if i in right else "left",
            no_wrap=i in whole,
            overflow="ignore" if i in whole else "fold",
        )
    for row in rows:
        table.add_row(*(cell if isinstance(cell, Text) else Text(cell) for cell in row))
    return table


def print_table(
    headers: Sequence[str],
    rows: Sequence[Sequence[Cell]],
    *,
    right: Sequence[int] = (),
    whole: Sequence[int] = (0,),
) -> None:
    """Print a table to stdout: rich on a terminal, :func:`format_table` text (no rule) otherwise.

    On a terminal too narrow for the ``whole`` columns, the table is drawn at its full width
    and the terminal wraps its lines: a name is never cut.

    Args:
        headers (Sequence[str]): column titles.
        rows (Sequence[Sequence[str | Text]]): cells; ``Text`` keeps its style on a terminal.
        right (Sequence[int], default ()): right-aligned columns.
        whole (Sequence[int], default (0,)): columns never wrapped or cut on a terminal.
    """
    if not is_terminal():
        sys.stdout.write(
            format_table(headers, [[str(c) for c in row] for row in rows], right=right, rule=False)
        )
        sys.stdout.write("\n")
        return
    console = Console(highlight=False)
    table = rich_table(headers, rows, right=right, whole=whole)
    needed = Measurement.get(console, console.options.update_width(1 << 20), table)
    if needed.minimum > console.width:  # rich would cut the names to fit: draw the table unwrapped
        console = Console(highlight=False, width=needed.maximum)
    console.print(table)


def format_bytes(n: int) -> str:
    """``1536`` -> ``'1.5 KiB'``."""
    if n < 1024:
        return f"{n} B"
    value = n / 1024
    for unit in ("KiB", "MiB"):
        if value < 1024:
            return f"{value:.1f} {unit}"
        value /= 1024
    return f"{value:.1f} GiB"
