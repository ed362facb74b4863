"""The day log: every conversation session, stored as JSON Lines under ``data_dir/days``.

Layout::

    days/<user_id>/<YYYY-MM-DD>.jsonl   one :class:`~reverie.memory.records.Session` per line
                                        (the date of ``started_at``, else today in UTC)
    days/consumed.jsonl                 one line per session consumed by a night:
                                        {"content_hash", "night_id", "session_id", "user_id", "at"}

Every write replaces a whole file atomically (a temporary file beside it, flushed and
fsynced, then ``os.replace``), so a crash leaves either the old file or the new one, never a
half-written one. Damaged lines already in a file are kept verbatim on rewrite and skipped
(with a warning naming file and line) on read.
"""

from __future__ import annotations

import json
import os
import re
import warnings
from datetime import datetime, timezone
from pathlib import Path
from typing import Iterable, Iterator, Optional

from pydantic import ValidationError

from reverie.files import atomic_write_text, stage_text
from reverie.memory.records import Session, now

CONSUMED_FILE = "consumed.jsonl"
_USER_ID = re.compile(r"[A-Za-z0-9][A-Za-z0-9._-]*")


def validate_user_id(user_id: str) -> str:
    """Return ``user_id`` if it is safe as a folder name, else raise ``ValueError`` naming it.

    Allowed: letters, digits, ``-``, ``_`` and ``.``, starting with a letter or digit (so no
    ``.``/``..`` and no hidden folders), at most 128 characters, and not ``consumed.jsonl``.
    """
    if (not isinstance(user_id, str) or len(user_id) > 128 or not _USER_ID.fullmatch(user_id)
            or user_id == CONSUMED_FILE):
        raise ValueError(f"invalid user id {user_id!r}: use letters, digits, '-', '_' and '.', "
                         "starting with a letter or digit (it names a folder under days/)")
    return user_id


def _utc(dt: Optional[datetime]) -> Optional[datetime]:
    if dt is None:
        return None
    return dt.replace(tzinfo=timezone.utc) if dt.tzinfo is None else dt


def session_sort_key(session: Session) -> tuple:
    """Sort key: by ``started_at`` (naive times read as UTC), sessions without one last;
    ``sorted`` is stable, so ties keep their order in the log."""
    started = _utc(session.started_at)
    return (started is None, started or datetime.min.replace(tzinfo=timezone.utc))


def _raw_lines(path: Path) -> list[str]:
    """The file's lines without line endings (blank lines dropped); [] if it is missing."""
    if not path.exists():
        return []
    return [ln for ln in path.read_text(encoding="utf-8").splitlines() if ln.strip()]


def _numbered_lines(path: Path) -> Iterator[tuple[int, str]]:
    """``(line number from 1, line)`` for each non-blank line; nothing if the file is missing."""
    if not path.exists():
        return
    for number, line in enumerate(path.read_text(encoding="utf-8").splitlines(), 1):
        if line.strip():
            yield number, line


def _join(lines: Iterable[str]) -> str:
    lines = list(lines)
    return "\n".join(lines) + "\n" if lines else ""


class DayLog:
    """The sessions of every user, by day, in a folder (``DayLog(paths.days)``).

    Args:
        root: the ``days`` folder; created on the first write.

    Sessions are identified by :attr:`Session.content_hash` (user, roles, texts): a session
    already in the log is not written again, whatever its id, and consumption by a night is
    recorded by hash. Not safe for two writers at once (one process owns the data dir).
    """

    def __init__(self, root: str | Path):
        self.root = Path(root)

    # -- files ----------------------------------------------------------------------------

    @property
    def consumed_path(self) -> Path:
        return self.root / CONSUMED_FILE

    def path_for(self, session: Session) -> Path:
        """``root/<user_id>/<YYYY-MM-DD>.jsonl`` for the session (date of ``started_at``, as
        stored, else today in UTC). Raises ``ValueError`` for an unsafe user id."""
        validate_user_id(session.user_id)
        day = (session.started_at or now()).date().isoformat()
        return self.root / session.user_id / f"{day}.jsonl"

    def files(self, user_id: Optional[str] = None) -> list[Path]:
        """The day files, sorted (one user's, or everyone's)."""
        if not self.root.is_dir():
            return []
        if user_id is not None:
            folders = [self.root / validate_user_id(user_id)]
        else:
            folders = sorted(p for p in self.root.iterdir() if p.is_dir()
                             and not p.name.startswith("."))
        return [f for d in folders if d.is_dir() for f in sorted(d.glob("*.jsonl"))]

    def _read_file(self, path: Path) -> Iterator[Session]:
        for number, line in _numbered_lines(path):
            try:
                yield Session.model_validate_json(line)
            except ValidationError as exc:
                first = exc.errors()[0]
                where = ".".join(str(p) for p in first["loc"])
                detail = f"{where}: {first['msg']}" if where else first["msg"]
                warnings.warn(f"{path}:{number}: damaged session line skipped ({detail})",
                              stacklevel=3)

    # -- sessions -------------------------------------------------------------------------

    def sessions(self, user_id: Optional[str] = None) -> list[Session]:
        """Every stored session (of one user, or all), sorted by ``started_at`` (None last;
        ties in file order, files in name order).

        A damaged line is skipped with a ``warnings.warn`` naming its file and line.
        Raises ``ValueError`` for an unsafe ``user_id``.
        """
        out = [s for f in self.files(user_id) for s in self._read_file(f)]
        return sorted(out, key=session_sort_key)

    def hashes(self) -> set[str]:
        """The content hashes of every stored session."""
        return {s.content_hash for f in self.files() for s in self._read_file(f)}

    def append(self, sessions: list[Session]) -> list[Session]:
        """Add sessions to their day files; return the ones actually written (in input order).

        A session whose content hash is already in the log (or earlier in ``sessions``) is
        skipped, so importing the same history twice is a no-op. Every touched file is
        written to a temporary file first; only when all are written are they moved into
        place, each with ``os.replace``, so no file is ever half-written.

        Raises:
            ValueError: a session's user id is not safe as a folder name (nothing written).
            OSError: a file could not be written (no file is left half-written).
        """
        for s in sessions:
            validate_user_id(s.user_id)
        seen = self.hashes()
        written: list[Session] = []
        by_file: dict[Path, list[Session]] = {}
        for s in sessions:
            h = s.content_hash
            if h in seen:
                continue
            seen.add(h)
            written.append(s)
            by_file.setdefault(self.path_for(s), []).append(s)
        staged: list[tuple[Path, Path]] = []
        try:
            for path, new in by_file.items():
                staged.append((stage_text(path, _join(_raw_lines(path) +
                                                      [s.model_dump_json() for s in new])), path))
            for tmp, path in staged:
                os.replace(tmp, path)
        finally:
            for tmp, _ in staged:
                tmp.unlink(missing_ok=True)
        return written

    def save(self, session: Session) -> Path:
        """Write ``session`` into its day file, replacing the line with the same
        ``session_id`` (a chat logs its growing session after every turn). The file is
        rewritten atomically; other lines, damaged ones included, are kept as they were.

        Returns the day file. Raises ``ValueError`` for an unsafe user id.
        """
        path = self.path_for(session)
        lines = []
        for line in _raw_lines(path):
            try:
                same = json.loads(line).get("session_id") == session.session_id
            except (ValueError, AttributeError):
                same = False
            if not same:
                lines.append(line)
        atomic_write_text(path, _join(lines + [session.model_dump_json()]))
        return path

    def size(self, user_id: Optional[str] = None) -> int:
        """Characters of message text in the sessions no night has consumed yet (one
        user's, or everyone's): what the "sunset" trigger measures."""
        return sum(len(m.content) for s in self.unconsumed(user_id) for m in s.messages)

    # -- consumption by nights ------------------------------------------------------------

    def _consumed_records(self) -> Iterator[tuple[str, dict]]:
        """(raw line, parsed record) for each line of consumed.jsonl; damaged lines warn and
        come back with an empty record (kept verbatim on rewrite)."""
        path = self.consumed_path
        for number, line in _numbered_lines(path):
            try:
                rec = json.loads(line)
                if not (isinstance(rec, dict) and isinstance(rec.get("content_hash"), str)):
                    raise ValueError("expected an object with a content_hash")
            except ValueError as exc:
                warnings.warn(f"{path}:{number}: damaged line skipped ({exc})", stacklevel=3)
                yield line, {}
                continue
            yield line, rec

    def consumed(self) -> dict[str, str]:
        """``{content_hash: night_id}`` for every session a night has consumed (latest wins)."""
        return {rec["content_hash"]: str(rec.get("night_id", ""))
                for _, rec in self._consumed_records() if rec}

    def mark_consumed(self, sessions: list[Session], night_id: str) -> None:
        """Record that ``night_id`` consumed these sessions (rewrites consumed.jsonl
        atomically; a session already consumed is re-recorded under the new night)."""
        hashes = {s.content_hash for s in sessions}
        kept = [line for line, rec in self._consumed_records()
                if not rec or rec["content_hash"] not in hashes]
        at = now().isoformat()
        new, done = [], set()
        for s in sessions:
            h = s.content_hash
            if h in done:
                continue
            done.add(h)
            new.append(json.dumps({"content_hash": h, "night_id": night_id,
                                   "session_id": s.session_id, "user_id": s.user_id, "at": at},
                                  ensure_ascii=False))
        atomic_write_text(self.consumed_path, _join(kept + new))

    def unmark_consumed(self, hashes: Iterable[str]) -> int:
        """Forget that these content hashes were consumed, so the next night processes them
        again; returns how many were removed (consumed.jsonl is rewritten atomically)."""
        drop = set(hashes)
        records = list(self._consumed_records())
        kept = [line for line, rec in records if not rec or rec["content_hash"] not in drop]
        removed = len(records) - len(kept)
        if removed:
            atomic_write_text(self.consumed_path, _join(kept))
        return removed

    def unconsumed(self, user_id: Optional[str] = None,
                   include_consumed: bool = False) -> list[Session]:
        """The sessions no night has consumed yet (all of them with ``include_consumed``),
        of one user or all, sorted by ``started_at`` (None last)."""
        sessions = self.sessions(user_id)
        if include_consumed:
            return sessions
        done = self.consumed()
        return [s for s in sessions if s.content_hash not in done]
