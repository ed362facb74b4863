"""The long-term memory store: one SQLite file of :class:`~reverie.memory.records.Memory` records.

Operations (the night's *consolidate* step):

* :meth:`MemoryStore.add` a new memory; adding an id that already exists is a no-op, so a
  night that was killed and resumed can replay its writes;
* :meth:`MemoryStore.update` a memory in place (status changes, new scores, phrasings), with
  a ``history`` entry for each change;
* :meth:`MemoryStore.supersede` a contradicted memory: the new version is added and the old
  one is kept, linked to it by ``superseded_by`` (and the new one lists the old id in
  ``associated``), never silently lost;
* :meth:`MemoryStore.delete` a memory, only because the user asked ("forget ..."): the
  record is removed and a tombstone (id, user, time, reason, the request) is kept in the
  ``deletions`` table. The memory's content is not kept anywhere; a deleted id can never be
  added again (a resumed night must not bring back what the user asked to forget).
  A deleted memory that a model version had *learned* (status ``learned``: its answer is in
  the weights) is the one exception: its record waits in the ``unlearning`` table
  (:meth:`MemoryStore.unlearning`) until a night has trained the answer away, and is then
  erased (:meth:`MemoryStore.finish_unlearning`).

Parked thoughts (:class:`~reverie.memory.records.ParkedThought`, the night's "subconscious": what a
night rejected or vetoed, re-verified on later nights) live beside the memories, per user:
:meth:`MemoryStore.add_parked` (a no-op for an id already parked), :meth:`~MemoryStore.parked`,
:meth:`~MemoryStore.update_parked` (with a ``history`` entry) and
:meth:`~MemoryStore.remove_parked` (revived, expired or forgotten: the diary says which).

Every change is one SQLite transaction (``BEGIN IMMEDIATE`` ... ``COMMIT``, rolled back on
any exception), so a crash leaves either the whole change or none of it. The database runs
in WAL mode, so other processes can read while a night writes.

Layout: table ``memories`` keyed by id, with ``user_id``, ``kind``, ``status``,
``superseded_by``, ``created_at``, ``updated_at`` columns for filtering and the full record
as JSON (``record``); table ``deletions`` of tombstones; table ``parked`` of parked
thoughts (``user_id``, ``night_id``, times and the record as JSON); table ``unlearning`` of
deleted learned memories waiting to be unlearned (``user_id``, ``deleted_at``, the record).
"""

from __future__ import annotations

import sqlite3
import threading
from collections.abc import Iterable, Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import Optional, get_args

from reverie.locks import hold
from reverie.memory.records import Memory, MemoryKind, MemoryStatus, ParkedThought, now

# How long a change of the store and the index waits for another process's (a night's
# consolidation takes seconds; `reverie memories forget` less).
CHANGE_TIMEOUT = 300.0

STATUSES: tuple[str, ...] = get_args(MemoryStatus)
KINDS: tuple[str, ...] = get_args(MemoryKind)

_SCHEMA = f"""
CREATE TABLE IF NOT EXISTS memories (
    id            TEXT PRIMARY KEY,
    user_id       TEXT NOT NULL CHECK (user_id <> ''),
    kind          TEXT NOT NULL CHECK (kind IN ({", ".join(repr(k) for k in KINDS)})),
    status        TEXT NOT NULL CHECK (status IN ({", ".join(repr(s) for s in STATUSES)})),
    superseded_by TEXT,
    created_at    TEXT NOT NULL,
    updated_at    TEXT NOT NULL,
    record        TEXT NOT NULL
);
CREATE INDEX IF NOT EXISTS memories_user_status ON memories (user_id, status);
CREATE TABLE IF NOT EXISTS deletions (
    id         TEXT PRIMARY KEY,
    user_id    TEXT NOT NULL,
    deleted_at TEXT NOT NULL,
    reason     TEXT NOT NULL,
    request    TEXT NOT NULL
);
CREATE INDEX IF NOT EXISTS deletions_user ON deletions (user_id);
CREATE TABLE IF NOT EXISTS parked (
    id         TEXT PRIMARY KEY,
    user_id    TEXT NOT NULL CHECK (user_id <> ''),
    night_id   TEXT NOT NULL,
    created_at TEXT NOT NULL,
    updated_at TEXT NOT NULL,
    record     TEXT NOT NULL
);
CREATE INDEX IF NOT EXISTS parked_user ON parked (user_id);
CREATE TABLE IF NOT EXISTS unlearning (
    id         TEXT PRIMARY KEY,
    user_id    TEXT NOT NULL,
    deleted_at TEXT NOT NULL,
    record     TEXT NOT NULL
);
"""


def _as_list(value: Optional[str | Iterable[str]]) -> Optional[list[str]]:
    if value is None:
        return None
    return [value] if isinstance(value, str) else list(value)


class MemoryStore:
    """Memories in a SQLite file, safe to share between threads.

    Args:
        path: the database file (created with its parent folder if missing), usually
            ``Paths.memories_db``; ``":memory:"`` for a throw-away store.

    All methods serialise on one lock over one connection (opened with
    ``check_same_thread=False``), so the store may be used from several threads.
    Returned :class:`Memory` objects are copies: changing them changes nothing until passed
    to :meth:`update`.
    """

    def __init__(self, path: Path | str):
        self.path = path if str(path) == ":memory:" else Path(path)
        if isinstance(self.path, Path):
            self.path.parent.mkdir(parents=True, exist_ok=True)
        self._lock = threading.RLock()
        self._changing = threading.RLock()  # exclusive() of a ":memory:" store
        # isolation_level=None: no implicit transactions; _tx() issues BEGIN/COMMIT itself.
        self._conn = sqlite3.connect(str(self.path), check_same_thread=False,
                                     isolation_level=None, timeout=30.0)
        self._conn.execute("PRAGMA journal_mode=WAL")
        self._conn.execute("PRAGMA synchronous=FULL")
        self._conn.execute("PRAGMA secure_delete=ON")  # deleted content is overwritten
        with self._tx() as c:
            for statement in _SCHEMA.split(";"):
                if statement.strip():
                    c.execute(statement)

    # ---------------------------------------------------------------- plumbing

    @contextmanager
    def _tx(self) -> Iterator[sqlite3.Connection]:
        """One write transaction under the lock: committed at the end, rolled back (and the
        exception re-raised) on any error."""
        with self._lock:
            self._conn.execute("BEGIN IMMEDIATE")
            try:
                yield self._conn
            except BaseException:
                self._conn.execute("ROLLBACK")
                raise
            self._conn.execute("COMMIT")

    def exclusive(self, timeout: float = CHANGE_TIMEOUT):
        """A context manager to hold while changing the store and the memory index together
        (:class:`reverie.memory.facts.MemoryIndex`, which mirrors it), so that another
        process's or thread's change of both (a night's consolidation, ``reverie memories
        forget``/``edit``/``reindex``) does not interleave with this one and leave the two
        apart, or find a memory gone between its read and its write.

        An OS file lock beside the database (``<file>.lock``), re-entrant in one thread; a
        thread lock for a ``":memory:"`` store. Readers (retrieval) take no lock.

        Raises:
            reverie.locks.LockTimeout: another holder kept it for over ``timeout`` seconds.
        """
        if not isinstance(self.path, Path):
            return self._changing
        return hold(self.path.with_name(self.path.name + ".lock"), timeout,
                    f"the memory store {self.path}")

    def _read(self, conn: sqlite3.Connection, memory_id: str) -> Optional[Memory]:
        row = conn.execute("SELECT record FROM memories WHERE id = ?", (memory_id,)).fetchone()
        return Memory.model_validate_json(row[0]) if row else None

    def _insert(self, conn: sqlite3.Connection, m: Memory) -> None:
        conn.execute(
            "INSERT INTO memories (id, user_id, kind, status, superseded_by, created_at,"
            " updated_at, record) VALUES (?, ?, ?, ?, ?, ?, ?, ?)",
            (m.id, m.user_id, m.kind, m.status, m.superseded_by, m.created_at.isoformat(),
             m.updated_at.isoformat(), m.model_dump_json()))

    def _replace(self, conn: sqlite3.Connection, m: Memory) -> None:
        conn.execute(
            "UPDATE memories SET kind = ?, status = ?, superseded_by = ?, updated_at = ?,"
            " record = ? WHERE id = ?",
            (m.kind, m.status, m.superseded_by, m.updated_at.isoformat(), m.model_dump_json(),
             m.id))

    def _deleted(self, conn: sqlite3.Connection, memory_id: str) -> bool:
        return conn.execute("SELECT 1 FROM deletions WHERE id = ?",
                            (memory_id,)).fetchone() is not None

    @staticmethod
    def _log(m: Memory, reason: str) -> Memory:
        """A copy of ``m`` with ``updated_at`` now and a history entry appended."""
        at = now()
        return m.model_copy(update={
            "updated_at": at,
            "history": [*m.history, {"at": at.isoformat(), "reason": reason,
                                     "status": m.status}]})

    # ---------------------------------------------------------------- writes

    def add(self, memory: Memory) -> bool:
        """Add a memory.

        Returns:
            True if it was added; False if a memory with this id is already stored, or was
            deleted on the user's request (a tombstone exists): the store is then unchanged.
            Adding the same memory twice is therefore a no-op.

        Raises:
            sqlite3.Error: the database could not be written (nothing was written).
        """
        with self._tx() as c:
            if self._deleted(c, memory.id):
                return False
            if c.execute("SELECT 1 FROM memories WHERE id = ?", (memory.id,)).fetchone():
                return False
            self._insert(c, memory)
            return True

    def update(self, memory: Memory, reason: str) -> Memory:
        """Replace a stored memory with ``memory`` (same id), appending
        ``{"at", "reason", "status"}`` to its ``history`` and setting ``updated_at`` to now.

        The history written is ``memory.history`` plus the new entry (pass the record you got
        from :meth:`get`, changed, so earlier entries are kept). ``memory`` itself is not
        modified; ``created_at`` stays the stored one.

        Returns:
            the memory as stored.

        Raises:
            KeyError: no memory with this id is stored.
            ValueError: ``memory.user_id`` differs from the stored memory's (a memory never
                moves between users).
        """
        with self._tx() as c:
            old = _same_owner(self._read(c, memory.id), memory, "memory")
            stored = self._log(memory.model_copy(update={"created_at": old.created_at}),
                               reason)
            self._replace(c, stored)
            return stored

    def supersede(self, old_id: str, new: Memory, reason: str) -> Memory:
        """Replace a contradicted (outdated) memory by ``new``, keeping the old one.

        In one transaction: ``new`` is added (if a memory with ``new.id`` is already stored,
        the stored one is kept), ``old_id`` is added to its ``associated`` list, the old
        memory gets ``superseded_by = new.id`` and both get a history entry. Calling it again
        with the same arguments changes nothing (idempotent, for resumed nights).

        Returns:
            the new memory as stored.

        Raises:
            KeyError: no memory ``old_id`` is stored.
            ValueError: the users differ; ``new.id == old_id``; the old memory is already
                superseded by another memory (supersede the newest version instead); or
                ``new.id`` was deleted on the user's request.
        """
        if new.id == old_id:
            raise ValueError(f"a memory cannot supersede itself ({old_id})")
        with self._tx() as c:
            old = self._read(c, old_id)
            if old is None:
                raise KeyError(old_id)
            current = self._read(c, new.id)
            if old.user_id != new.user_id or (current and current.user_id != old.user_id):
                raise ValueError(f"cannot supersede memory {old_id} of user {old.user_id!r} "
                                 f"by one of user {new.user_id!r}")
            if old.superseded_by == new.id and current is not None:
                return current  # already done
            if old.superseded_by is not None:
                raise ValueError(f"memory {old_id} is already superseded by "
                                 f"{old.superseded_by}")
            if current is None:
                if self._deleted(c, new.id):
                    raise ValueError(f"memory {new.id} was deleted on the user's request")
                associated = new.associated if old_id in new.associated \
                    else [*new.associated, old_id]
                stored = self._log(new.model_copy(update={"associated": associated}),
                                   f"supersedes {old_id}: {reason}")
                self._insert(c, stored)
            else:
                associated = current.associated if old_id in current.associated \
                    else [*current.associated, old_id]
                stored = self._log(current.model_copy(update={"associated": associated}),
                                   f"supersedes {old_id}: {reason}")
                self._replace(c, stored)
            self._replace(c, self._log(old.model_copy(update={"superseded_by": new.id}),
                                       f"superseded by {new.id}: {reason}"))
            return stored

    def delete(self, memory_id: str, reason: str, request: str) -> bool:
        """Delete a memory because the user asked, and record a tombstone.

        Only for an explicit request from the user in conversation ("forget ..."); a
        contradicted memory is superseded, not deleted. The record (its content) is removed;
        the freed database pages are overwritten (``secure_delete``) and the write-ahead log
        is checkpointed, so the text does not linger in the file. The tombstone keeps the
        id, the user id, the time, ``reason`` and ``request`` (the user's words, e.g.
        ``"forget where I work"``), so a diary can say that something was forgotten on
        request. Other memories' links to this id (``superseded_by``,
        ``associated``) are left as they are; to forget every version of a memory, delete
        each id of :meth:`versions`.

        A memory with status ``learned`` is in a model version's weights: in the same
        transaction its record moves to the ``unlearning`` table, where the next night finds
        it (:meth:`unlearning`) to train the answer away; :meth:`finish_unlearning` then
        erases it.

        Returns:
            True if it was deleted; False if no memory with this id is stored (nothing
            written).

        Raises:
            sqlite3.Error: the database could not be written (nothing was written).
        """
        with self._tx() as c:
            row = c.execute("SELECT user_id, status, record FROM memories WHERE id = ?",
                            (memory_id,)).fetchone()
            if row is None:
                return False
            at = now().isoformat()
            c.execute("DELETE FROM memories WHERE id = ?", (memory_id,))
            c.execute("INSERT OR REPLACE INTO deletions (id, user_id, deleted_at, reason,"
                      " request) VALUES (?, ?, ?, ?, ?)",
                      (memory_id, row[0], at, reason, request))
            if row[1] == "learned":
                c.execute("INSERT OR REPLACE INTO unlearning (id, user_id, deleted_at, record)"
                          " VALUES (?, ?, ?, ?)", (memory_id, row[0], at, row[2]))
        # Pages are zeroed on delete (secure_delete); copy them back from the WAL and empty
        # it, so earlier page images holding the content do not linger there either.
        with self._lock:
            self._conn.execute("PRAGMA wal_checkpoint(TRUNCATE)")
        return True

    def unlearning(self, user_id: Optional[str] = None) -> list[Memory]:
        """Deleted memories a model version had learned, waiting for a night to unlearn
        them (their records as they were when deleted), oldest deletion first; only this
        user's if ``user_id`` is given."""
        sql, args = "SELECT record FROM unlearning", ()
        if user_id is not None:
            sql, args = sql + " WHERE user_id = ?", (user_id,)
        with self._lock:
            rows = self._conn.execute(sql + " ORDER BY deleted_at, id", args).fetchall()
        return [Memory.model_validate_json(r[0]) for r in rows]

    def finish_unlearning(self, memory_id: str) -> bool:
        """Erase a deleted memory's record once a promoted model version no longer answers
        it (overwritten in the file as for :meth:`delete`); its tombstone stays.

        Returns:
            True if it was waiting; False if not (nothing written).
        """
        with self._tx() as c:
            if c.execute("DELETE FROM unlearning WHERE id = ?", (memory_id,)).rowcount == 0:
                return False
        with self._lock:
            self._conn.execute("PRAGMA wal_checkpoint(TRUNCATE)")
        return True

    # ---------------------------------------------------------------- parked thoughts

    def _read_parked(self, conn: sqlite3.Connection, thought_id: str) -> Optional[ParkedThought]:
        row = conn.execute("SELECT record FROM parked WHERE id = ?", (thought_id,)).fetchone()
        return ParkedThought.model_validate_json(row[0]) if row else None

    def add_parked(self, thought: ParkedThought) -> bool:
        """Park a thought.

        Returns:
            True if it was added; False if a thought with this id is already parked (the
            store is then unchanged, so a resumed night parks nothing twice).
        """
        with self._tx() as c:
            if self._read_parked(c, thought.id) is not None:
                return False
            c.execute("INSERT INTO parked (id, user_id, night_id, created_at, updated_at, record)"
                      " VALUES (?, ?, ?, ?, ?, ?)",
                      (thought.id, thought.user_id, thought.night_id,
                       thought.created_at.isoformat(), thought.updated_at.isoformat(),
                       thought.model_dump_json()))
            return True

    def get_parked(self, thought_id: str) -> Optional[ParkedThought]:
        """The parked thought with this id, or None (never parked, or removed)."""
        with self._lock:
            return self._read_parked(self._conn, thought_id)

    def parked(self, user_id: Optional[str] = None) -> list[ParkedThought]:
        """Parked thoughts, oldest first (by ``created_at``, then id); only this user's if
        ``user_id`` is given."""
        sql, args = "SELECT record FROM parked", ()
        if user_id is not None:
            sql, args = sql + " WHERE user_id = ?", (user_id,)
        with self._lock:
            rows = self._conn.execute(sql + " ORDER BY created_at, id", args).fetchall()
        return [ParkedThought.model_validate_json(r[0]) for r in rows]

    def update_parked(self, thought: ParkedThought, reason: str) -> ParkedThought:
        """Replace a parked thought with ``thought`` (same id), appending ``{"at",
        "reason"}`` to its ``history`` and setting ``updated_at`` to now (``created_at``
        stays the stored one).

        Returns:
            the thought as stored.

        Raises:
            KeyError: no thought with this id is parked.
            ValueError: ``thought.user_id`` differs from the stored one's.
        """
        with self._tx() as c:
            old = _same_owner(self._read_parked(c, thought.id), thought, "parked thought")
            at = now()
            stored = thought.model_copy(update={
                "created_at": old.created_at, "updated_at": at,
                "history": [*thought.history, {"at": at.isoformat(), "reason": reason}]})
            c.execute("UPDATE parked SET updated_at = ?, record = ? WHERE id = ?",
                      (at.isoformat(), stored.model_dump_json(), thought.id))
            return stored

    def remove_parked(self, thought_id: str) -> bool:
        """Remove a parked thought (revived, expired, or the user asked to forget it); its
        content is overwritten in the file as for :meth:`delete`.

        Returns:
            True if it was removed; False if no thought with this id is parked.
        """
        with self._tx() as c:
            if c.execute("DELETE FROM parked WHERE id = ?", (thought_id,)).rowcount == 0:
                return False
        with self._lock:
            self._conn.execute("PRAGMA wal_checkpoint(TRUNCATE)")
        return True

    # ---------------------------------------------------------------- reads

    def get(self, memory_id: str) -> Optional[Memory]:
        """The memory with this id, or None if there is none (never stored, or deleted)."""
        with self._lock:
            return self._read(self._conn, memory_id)

    def list(self, user_id: Optional[str] = None,
             status: Optional[str | Iterable[str]] = None,
             kind: Optional[str | Iterable[str]] = None,
             include_superseded: bool = False) -> list[Memory]:
        """Memories matching every filter given, oldest first (by ``created_at``, then id).

        Args:
            user_id: only this user's memories (None: every user's).
            status: a status or several (None: any).
            kind: a kind or several (None: any).
            include_superseded: also return memories that were superseded (outdated
                versions); by default only current ones.
        """
        where, args = [], []
        if user_id is not None:
            where.append("user_id = ?")
            args.append(user_id)
        for column, values in (("status", _as_list(status)), ("kind", _as_list(kind))):
            if values is not None:
                where.append(f"{column} IN ({', '.join('?' for _ in values)})")
                args.extend(values)
        if not include_superseded:
            where.append("superseded_by IS NULL")
        sql = "SELECT record FROM memories"
        if where:
            sql += " WHERE " + " AND ".join(where)
        sql += " ORDER BY created_at, id"
        with self._lock:
            rows = self._conn.execute(sql, args).fetchall()
        return [Memory.model_validate_json(r[0]) for r in rows]

    def versions(self, memory_id: str) -> list[Memory]:
        """Every stored version of a memory, oldest first: follows ``superseded_by`` links
        back to the first version and forward to the current one. Empty if the id is not
        stored."""
        with self._lock:
            m = self._read(self._conn, memory_id)
            if m is None:
                return []
            chain, seen = [m], {m.id}
            while True:  # backwards: the memory whose superseded_by is chain[0]
                row = self._conn.execute("SELECT record FROM memories WHERE superseded_by = ?",
                                         (chain[0].id,)).fetchone()
                if row is None:
                    break
                prev = Memory.model_validate_json(row[0])
                if prev.id in seen:
                    break
                chain.insert(0, prev)
                seen.add(prev.id)
            while chain[-1].superseded_by and chain[-1].superseded_by not in seen:
                nxt = self._read(self._conn, chain[-1].superseded_by)
                if nxt is None:
                    break
                chain.append(nxt)
                seen.add(nxt.id)
            return chain

    def deletions(self, user_id: Optional[str] = None) -> list[dict]:
        """Tombstones, oldest first: dicts with ``id``, ``user_id``, ``deleted_at`` (ISO
        string), ``reason`` and ``request``; only this user's if ``user_id`` is given."""
        sql = "SELECT id, user_id, deleted_at, reason, request FROM deletions"
        args: tuple = ()
        if user_id is not None:
            sql += " WHERE user_id = ?"
            args = (user_id,)
        with self._lock:
            rows = self._conn.execute(sql + " ORDER BY deleted_at, id", args).fetchall()
        keys = ("id", "user_id", "deleted_at", "reason", "request")
        return [dict(zip(keys, r)) for r in rows]

    def counts(self, user_id: Optional[str] = None) -> dict[str, int]:
        """Stored memories per status (every status present, 0 when none), superseded
        versions included; only this user's if ``user_id`` is given."""
        sql = "SELECT status, COUNT(*) FROM memories"
        args: tuple = ()
        if user_id is not None:
            sql += " WHERE user_id = ?"
            args = (user_id,)
        with self._lock:
            rows = self._conn.execute(sql + " GROUP BY status", args).fetchall()
        out = dict.fromkeys(STATUSES, 0)
        out.update({status: n for status, n in rows})
        return out

    def __len__(self) -> int:
        with self._lock:
            return self._conn.execute("SELECT COUNT(*) FROM memories").fetchone()[0]

    # ---------------------------------------------------------------- lifecycle

    def close(self) -> None:
        """Close the connection (idempotent)."""
        with self._lock:
            self._conn.close()

    def __enter__(self) -> MemoryStore:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()

    def __repr__(self) -> str:
        return f"MemoryStore({str(self.path)!r})"


__all__ = ["MemoryStore", "STATUSES", "KINDS"]


def _same_owner(old, new, what: str):
    """``old`` (the stored record, or None), checked to be ``new``'s: same user.

    Raises:
        KeyError: nothing stored under ``new.id``.
        ValueError: the stored record is another user's (records never move between users).
    """
    if old is None:
        raise KeyError(new.id)
    if old.user_id != new.user_id:
        raise ValueError(f"{what} {new.id} belongs to user {old.user_id!r}, not {new.user_id!r}")
    return old
