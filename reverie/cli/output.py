"""Where the CLI writes: ``console`` (stdout) and ``err`` (stderr), and its one error path."""

from __future__ import annotations

from typing import NoReturn

import typer
from rich.console import Console
from rich.markup import escape

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
