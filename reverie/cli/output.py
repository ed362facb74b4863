"""Where the CLI writes: ``console`` (stdout) and ``err`` (stderr), its one error path, and
the table and JSON printers that never cut a value."""

from __future__ import annotations

import json
from typing import Any, NoReturn

import typer
from rich.console import Console
from rich.errors import MarkupError
from rich.markup import escape
from rich.table import Table
from rich.text import Text

console = Console()
err = Console(stderr=True)


def error(message: str, label: str = "error: ", to: Console | None = None) -> None:
    """Print ``message`` on stderr after a red ``label``; the message is printed as it is
    (a bracket in a file name is not read as markup)."""
    (to or err).print(f"[red]{escape(label)}[/red]" + escape(message), soft_wrap=True)


def fail(message: str, code: int = 1, label: str = "error: ") -> NoReturn:
    """:func:`error`, then exit with ``code`` (1: the operation failed, 2: bad usage or
    configuration)."""
    error(message, label)
    raise typer.Exit(code)


def fold(table: Table) -> Table:
    """``table`` with every column wrapping (``overflow="fold"``, ``no_wrap=False``): a
    long value (a path, a model source) goes on over several lines instead of ending in
    "…". Returns the same table."""
    for column in table.columns:
        column.overflow, column.no_wrap = "fold", False
    return table


def _plain(cell) -> str:
    """A cell's text without markup, on one line (a tab or newline in it becomes a space)."""
    if isinstance(cell, str):
        try:
            cell = Text.from_markup(cell)
        except MarkupError:  # brackets that are not markup
            pass
    plain = cell.plain if isinstance(cell, Text) else str(cell)
    return plain.replace("\t", " ").replace("\n", " ")


def show_table(table: Table, to: Console | None = None) -> None:
    """Print ``table`` whole: on a terminal as a rich table whose cells wrap
    (:func:`fold`); elsewhere (a pipe, a file, cron) as tab-separated lines with nothing
    cut: ``# title``, the header row, then one line per row, markup removed."""
    to = to or console
    if to.is_terminal:
        to.print(fold(table))
        return
    lines = [f"# {_plain(table.title)}"] if table.title else []
    columns = table.columns
    lines.append("\t".join(_plain(c.header) for c in columns))
    cells = [list(c.cells) for c in columns]
    for i in range(table.row_count):
        lines.append("\t".join(_plain(col[i]) if i < len(col) else "" for col in cells))
    to.file.write("\n".join(lines) + "\n")  # past rich, which would expand the tabs
    to.file.flush()


def print_json(data: Any) -> None:
    """Write ``data`` as JSON (indented, UTF-8, dates and paths as strings) on stdout,
    nothing else: what ``--json`` prints, for ``jq`` and scripts."""
    typer.echo(json.dumps(data, indent=2, ensure_ascii=False, default=str))
