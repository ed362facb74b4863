"""Atomic file writes: the one way Reverie replaces a file it owns.

A new file is written beside the old one under a temporary name, flushed and fsynced, then
moved over it with ``os.replace`` (atomic on POSIX and Windows), and the folder is fsynced
so the rename itself survives a power cut. A crash at any point leaves the old file or the
new one, never a mix.
"""

from __future__ import annotations

import json
import os
import shutil
import tempfile
import uuid
from pathlib import Path
from typing import Any


def fsync_dir(path: Path) -> None:
    """Flush a folder's entries (renames, new files) to disk; a no-op where folders cannot
    be opened (Windows)."""
    try:
        fd = os.open(str(path), os.O_RDONLY)
    except OSError:
        return
    try:
        os.fsync(fd)
    except OSError:
        pass
    finally:
        os.close(fd)


def stage_text(path: Path, text: str) -> Path:
    """Write ``text`` to a fresh temporary file beside ``path`` (parents created), fsynced,
    and return it: the caller moves it into place with ``os.replace`` (several files can be
    staged first and moved together) or removes it.

    Raises:
        OSError: the file could not be written (no temporary file is left behind).
    """
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(f".{path.name}.{os.getpid()}.{uuid.uuid4().hex[:8]}.tmp")
    try:
        with open(tmp, "w", encoding="utf-8") as fh:
            fh.write(text)
            fh.flush()
            os.fsync(fh.fileno())
    except BaseException:
        tmp.unlink(missing_ok=True)
        raise
    return tmp


def atomic_write_text(path: Path, text: str) -> None:
    """Replace ``path`` with ``text`` (UTF-8) atomically.

    Raises:
        OSError: it could not be written; ``path`` is unchanged.
    """
    path = Path(path)
    tmp = stage_text(path, text)
    try:
        os.replace(tmp, path)
    except BaseException:
        tmp.unlink(missing_ok=True)
        raise
    fsync_dir(path.parent)


def replace_folder(src: Path, dst: Path) -> None:
    """Move the complete folder ``src`` to ``dst`` (same file system). An existing ``dst``
    is first renamed aside and removed only after ``src`` took its place, so ``dst`` is at
    every moment the old folder, the new one, or (between two renames) absent; never a mix.

    Raises:
        OSError: a rename failed (``src`` is left where it was).
    """
    src, dst = Path(src), Path(dst)
    if not dst.exists():
        src.replace(dst)
    else:
        aside = Path(tempfile.mkdtemp(prefix=f".old-{dst.name}-", dir=dst.parent))
        dst.replace(aside / dst.name)
        src.replace(dst)
        shutil.rmtree(aside, ignore_errors=True)
    fsync_dir(dst.parent)


def atomic_write_json(path: Path, data: Any) -> None:
    """Replace ``path`` with ``data`` as indented JSON, atomically (see
    :func:`atomic_write_text`)."""
    atomic_write_text(path, json.dumps(data, indent=2) + "\n")


def atomic_write_jsonl(path: Path, rows: list[Any]) -> None:
    """Replace ``path`` with one JSON object per line (UTF-8, not ASCII-escaped)."""
    atomic_write_text(path, "".join(json.dumps(r, ensure_ascii=False) + "\n" for r in rows))
