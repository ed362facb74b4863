"""``reverie ingest``: import chat histories (or the shipped sample day) into the day log.

A plain function; ``reverie.cli`` wraps it with typer.
"""

from __future__ import annotations

import re
from pathlib import Path
from typing import Optional

from rich.console import Console
from rich.markup import escape

from reverie.cli.output import error
from reverie.memory.daylog import DayLog, validate_user_id
from reverie.memory.ingest import FORMATS, ingest, sample_day_path
from reverie.config import Settings


def parse_session_numbers(text: Optional[str]) -> Optional[set[int]]:
    """``"1"``, ``"1,3"``, ``"1-3"``, ``"1,4-6"`` -> a set of session numbers (1-based);
    ``None``/empty -> ``None``. Raises ``ValueError`` on anything else."""
    if text is None or not text.strip():
        return None
    out: set[int] = set()
    for part in text.split(","):
        part = part.strip()
        m = re.fullmatch(r"(\d+)(?:\s*-\s*(\d+))?", part)
        if not m:
            raise ValueError(f"invalid session selection {text!r}: use e.g. 1, 1,3 or 1-3")
        lo, hi = int(m.group(1)), int(m.group(2) or m.group(1))
        if lo < 1 or hi < lo:
            raise ValueError(f"invalid session range {part!r} in {text!r}")
        out.update(range(lo, hi + 1))
    return out


def ingest_command(files: list[Path], user: str, format: Optional[str], sessions: Optional[str],
                   force: bool, sample: bool, settings: Settings,
                   console: Optional[Console] = None, err: Optional[Console] = None) -> int:
    """Import ``files`` (and the sample day with ``sample``) for ``user`` into
    ``settings.paths.days``; print per-file counts and each error on its own line
    (``file:line: field: message``).

    Args:
        format: ``reverie``, ``openai``, ``sharegpt``, ``locomo``, or ``None``/``auto`` to detect.
        sessions: LoCoMo session numbers, ``"1"``, ``"1,3"`` or ``"1-3"``.
        force: re-import sessions a night already consumed (they become unconsumed).

    Returns:
        0 if every record was imported (or was in the log already); 1 if some records were
        rejected and the valid ones imported; 2 if nothing was importable (every file
        unreadable, empty, of no known format, or every record bad) or for a usage error
        (bad user id, format or session selection, no input: before anything is written).
        Never raises for bad input: each problem is printed as ``file:line: field: what``.
    """
    console = console or Console()
    err = err or Console(stderr=True)
    fmt = None if format in (None, "", "auto") else format
    try:
        validate_user_id(user)
        if fmt is not None and fmt not in FORMATS:
            raise ValueError(f"unknown format {format!r} (known: auto, {', '.join(FORMATS)})")
        selected = parse_session_numbers(sessions)
        if sample and (fmt or selected):
            raise ValueError("--sample imports the shipped sample day; it takes no --format "
                             "or --sessions")
    except ValueError as exc:
        error(str(exc), to=err)
        return 2
    if not files and not sample:
        error("name files to import, or --sample for the sample day", to=err)
        return 2
    daylog = DayLog(settings.paths.days)
    reports = []
    if sample:
        reports += ingest([sample_day_path()], daylog, user, fmt="reverie", force=force).files
    if files:
        reports += ingest(list(files), daylog, user, fmt=fmt, sessions=selected,
                          force=force).files
    n_errors = n_read = 0
    for fr in reports:
        name = "sample day" if sample and fr is reports[0] else fr.file
        mark = "[green]✓[/green]" if not fr.errors else "[yellow]![/yellow]"
        counts = [f"{fr.imported} imported"]
        if fr.skipped_duplicates:
            counts.append(f"{fr.skipped_duplicates} already in the log")
        if fr.skipped_consumed:
            counts.append(f"{fr.skipped_consumed} already consumed by a night")
        if fr.requeued:
            counts.append(f"{fr.requeued} requeued for the next night")
        if fr.errors:
            counts.append(f"{len(fr.errors)} error{'s' if len(fr.errors) != 1 else ''}")
        kind = f" ({fr.format})" if fr.format else ""
        console.print(f"{mark} {escape(name)}{kind}: {', '.join(counts)}", soft_wrap=True)
        for e in fr.errors:
            error(str(e), label="", to=err)
        n_errors += len(fr.errors)
        n_read += fr.read
    imported = sum(fr.imported for fr in reports)
    consumed = sum(fr.skipped_consumed for fr in reports)
    console.print(f"{imported} session{'s' if imported != 1 else ''} imported into "
                  f"{escape(str(settings.paths.days))}", soft_wrap=True)
    if consumed:
        console.print(f"{consumed} session{'s' if consumed != 1 else ''} already consumed by a "
                      "night were skipped (--force to process them again)", soft_wrap=True)
    if not n_errors:
        return 0
    return 1 if n_read else 2
