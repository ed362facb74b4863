"""The day log: every conversation session, stored as JSON Lines under ``data_dir/days``.

Layout::

    days/<user_id>/<YYYY-MM-DD>.jsonl   one :class:`~reverie.memory.records.Session` per line
                                        (the date of ``started_at``, else today in UTC)
    days/consumed.jsonl                 one line per session a night consumed, whole or
                                        its first turns: {"content_hash", "night_id",
                                        "session_id", "user_id", "turns", "at"}
    days.lock (beside the folder)       the writers' lock (an OS file lock)

Every write replaces a whole file atomically (a temporary file beside it, flushed and
fsynced, then ``os.replace``), so a crash leaves either the old file or the new one, never a
half-written one, and a reader sees whole lines only. Damaged lines already in a file are
kept verbatim on rewrite and skipped (with a warning naming file and line) on read.

Several writers at once (processes and threads: ``reverie chat``, ``reverie serve``,
``reverie ingest``, a night) are safe: every read-change-write of a file holds the day
log's lock (:func:`reverie.locks.hold` on ``days.lock``), so no writer's change is lost.
One session is written by one writer (a chat's session, a server's conversation); many
sessions of one user, in one day file, may be written at once.

Consumption is recorded per session and turn count: a night marks the turns it read
(``turns``: the first n messages, ``content_hash``: the hash of those n), so a session
that grows after the night read it (a chat going on while a cron night runs) is not lost
and not slept twice: :meth:`DayLog.unconsumed` hands the next night that session with
only its new turns. A record without ``turns`` (older logs) consumes the session whose
whole content has that hash.
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
from reverie.locks import hold
from reverie.memory.records import Session, now

CONSUMED_FILE = "consumed.jsonl"
# How long a writer waits for another: a write takes milliseconds, so only a stuck
# process (on a hung file system) holds it this long.
WRITE_TIMEOUT = 60.0
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
    """The file's lines without line endings (blank lines dropped); [] if it is missing.
    Split at newlines only: ``splitlines`` would also split at U+2028, U+2029 and NEL, which
    a session's JSON holds raw inside its strings."""
    if not path.exists():
        return []
    return [ln for ln in path.read_text(encoding="utf-8").split("\n") if ln.strip()]


def _numbered_lines(path: Path) -> Iterator[tuple[int, str]]:
    """``(line number from 1, line)`` for each non-blank line; nothing if the file is missing."""
    if not path.exists():
        return
    for number, line in enumerate(path.read_text(encoding="utf-8").split("\n"), 1):
        if line.strip():    # newlines only, as in _raw_lines
            yield number, line


def _join(lines: Iterable[str]) -> str:
    lines = list(lines)
    return "\n".join(lines) + "\n" if lines else ""


class DayLog:
    """The sessions of every user, by day, in a folder (``DayLog(paths.days)``).

    Args:
        root: the ``days`` folder; created on the first write.

    Sessions are identified by :attr:`Session.content_hash` (user, roles, texts): a session
    already in the log is not written again, whatever its id. Consumption by a night is
    recorded by session id, turn count and the hash of those turns (see the module's
    docstring). Safe for several writers, processes and threads, at once: each write holds
    the day log's lock (``<root>.lock`` beside the folder, so the folder holds day files
    only).
    """

    def __init__(self, root: str | Path):
        self.root = Path(root)

    # -- files ----------------------------------------------------------------------------

    @property
    def consumed_path(self) -> Path:
        return self.root / CONSUMED_FILE

    def _writing(self):
        """The writers' lock: held around every read-change-write of the log's files."""
        return hold(self.lock_path, WRITE_TIMEOUT, f"the day log {self.root}")

    @property
    def lock_path(self) -> Path:
        """The writers' lock file, ``<root>.lock`` beside the folder."""
        return self.root.with_name(self.root.name + ".lock")

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
        place, each with ``os.replace``, so no file is ever half-written. Holds the day
        log's lock throughout, so a concurrent writer's sessions are neither lost nor
        written twice.

        Raises:
            ValueError: a session's user id is not safe as a folder name (nothing written).
            OSError: a file could not be written (no file is left half-written);
                :class:`reverie.locks.LockTimeout` when another writer held the lock for
                over ``WRITE_TIMEOUT`` seconds.
        """
        for s in sessions:
            validate_user_id(s.user_id)
        if not sessions:
            return []
        with self._writing():
            return self._append(sessions)

    def _append(self, sessions: list[Session]) -> list[Session]:
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
        rewritten atomically under the day log's lock; other lines, damaged ones included,
        are kept as they were, and another writer's lines written meanwhile are kept too.

        Returns the day file. Raises ``ValueError`` for an unsafe user id, ``OSError`` when
        the file cannot be written (:class:`reverie.locks.LockTimeout`: the lock stayed
        held by another writer).
        """
        path = self.path_for(session)
        with self._writing():
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
        """``{content_hash: night_id}`` for every record of a night's consumption (latest
        wins): a whole session's hash, or the hash of the first turns a night read of a
        session that grew later."""
        return {rec["content_hash"]: str(rec.get("night_id", ""))
                for _, rec in self._consumed_records() if rec}

    def mark_consumed(self, sessions: list[Session], night_id: str) -> None:
        """Record that ``night_id`` consumed these sessions: each as the night read it,
        whole or (from :meth:`unconsumed`) only its turns after those an earlier night
        consumed. Each is found in the log by user, session id and turns, and recorded as
        its first n turns up to the last one the night read, so turns a writer added after
        the night read the session stay unconsumed. A session no longer in the log is
        recorded by its own hash. consumed.jsonl is rewritten atomically under the day
        log's lock; a record with the same hash is re-recorded under the new night.
        """
        with self._writing():
            stored: dict[tuple[str, str], list[Session]] = {}
            for user in sorted({s.user_id for s in sessions}):
                for s in self.sessions(user):
                    stored.setdefault((s.user_id, s.session_id), []).append(s)
            at = now().isoformat()
            new: dict[str, str] = {}
            for s in sessions:
                turns, h = _locate(s, stored.get((s.user_id, s.session_id), []))
                rec = {"content_hash": h, "night_id": night_id, "session_id": s.session_id,
                       "user_id": s.user_id, "turns": turns, "at": at}
                if turns is None:
                    del rec["turns"]
                new.setdefault(h, json.dumps(rec, ensure_ascii=False))
            kept = [line for line, rec in self._consumed_records()
                    if not rec or rec["content_hash"] not in new]
            atomic_write_text(self.consumed_path, _join(kept + list(new.values())))

    def unmark_consumed(self, hashes: Iterable[str]) -> int:
        """Forget that these content hashes were consumed, so the next night processes them
        again; the records of the earlier turns of the same sessions (same user and session
        id, fewer turns) go too, so such a session is read whole. Returns how many records
        were removed (consumed.jsonl is rewritten atomically under the day log's lock)."""
        drop = set(hashes)
        with self._writing():
            records = list(self._consumed_records())
            cut: dict[tuple, int] = {}  # (user, session) -> turns of a dropped record
            for _, rec in records:
                if rec and rec["content_hash"] in drop:
                    key = (rec.get("user_id"), rec.get("session_id"))
                    turns = rec.get("turns")
                    cut[key] = max(cut.get(key, 0), turns if isinstance(turns, int) else 1 << 30)

            def dropped(rec: dict) -> bool:
                if rec["content_hash"] in drop:
                    return True
                turns = rec.get("turns")
                limit = cut.get((rec.get("user_id"), rec.get("session_id")))
                return limit is not None and isinstance(turns, int) and turns < limit

            kept = [line for line, rec in records if not rec or not dropped(rec)]
            removed = len(records) - len(kept)
            if removed:
                atomic_write_text(self.consumed_path, _join(kept))
        return removed

    def unconsumed(self, user_id: Optional[str] = None,
                   include_consumed: bool = False) -> list[Session]:
        """What no night has consumed yet (every session, whole, with
        ``include_consumed``), of one user or all, sorted by ``started_at`` (None last):
        whole sessions, and sessions that grew after a night read them with only their new
        turns (same session id, turn ids and other fields; the turns before are consumed).
        """
        sessions = self.sessions(user_id)
        if include_consumed:
            return sessions
        records = [rec for _, rec in self._consumed_records() if rec]
        whole = {rec["content_hash"] for rec in records}
        partial: dict[tuple[str, str], list[tuple[int, str]]] = {}
        for rec in records:
            turns = rec.get("turns")
            if isinstance(turns, int) and turns > 0:
                key = (rec.get("user_id"), rec.get("session_id"))
                partial.setdefault(key, []).append((turns, rec["content_hash"]))
        out = []
        for s in sessions:
            if s.content_hash in whole:
                continue
            done = max((n for n, h in partial.get((s.user_id, s.session_id), [])
                        if n < len(s.messages) and _first(s, n).content_hash == h), default=0)
            out.append(s if not done else s.model_copy(update={"messages": s.messages[done:]}))
        return out


def _first(session: Session, n: int) -> Session:
    """``session`` with only its first ``n`` messages (for their content hash)."""
    return session.model_copy(update={"messages": session.messages[:n]})


def _turns(messages) -> list[tuple[str, str, str]]:
    return [(m.turn_id, m.role, m.content) for m in messages]


def _locate(read: Session, stored: list[Session]) -> tuple[Optional[int], str]:
    """Where the turns a night read (``read``: a whole session or its new turns) sit in
    the log's sessions of the same user and id: ``(n, hash of the first n turns)`` with n
    the position just past them; ``(None, read.content_hash)`` when no stored session
    holds them in a row."""
    want = _turns(read.messages)
    for s in stored:
        have = _turns(s.messages)
        for k in range(len(have) - len(want) + 1):
            if have[k][0] == want[0][0] and have[k:k + len(want)] == want:
                n = k + len(want)
                return n, (s if n == len(have) else _first(s, n)).content_hash
    return None, read.content_hash
