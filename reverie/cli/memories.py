"""``reverie memories``: a user's memories as things they manage (list, show, forget, edit,
export), and the index's upkeep (check, reindex).

Every memory is in one of three states: ``active`` (the current version: retrieved by the
chat, trained and replayed at night), ``superseded`` (an outdated version, kept in the
history of the one that replaced it) or ``deleted`` (forgotten on request: a tombstone,
the content erased; a learned one is unlearned by the next night first). ``--json`` and
``export`` write the records as pydantic dumps with a ``state`` key added; a deleted
memory is its tombstone (``id``, ``user_id``, ``state``, ``deleted_at``, ``reason``,
``request``, ``unlearning``: whether the next night still has to unlearn it).

Forget and edit go through :mod:`reverie.memory.manage`, as the night's own "forget ..."
requests do: the store and the memory index change at once, so the chat's retrieval
stops returning a forgotten memory (or an edit's old version) without waiting for a night.
"""

from __future__ import annotations

import contextlib
import json
import sys
from pathlib import Path
from typing import Optional

import typer
from rich.table import Table
from rich.text import Text

from reverie.cli.output import console, fail, print_json, show_table

memories_app = typer.Typer(help="Your memories: list, show, forget, edit, export.",
                           no_args_is_help=True)

STATES = ("active", "superseded", "deleted", "all")
REQUEST = "reverie memories forget"


def _settings(ctx: typer.Context):
    """The settings the root command's ``--config`` and ``--data-dir`` name (read from its
    parameters: this module is imported by :mod:`reverie.cli.main`, so never imports it)."""
    from reverie.config import ConfigError, load_settings

    params = ctx.find_root().params
    try:
        return load_settings(params.get("config"), data_dir=params.get("data_dir"))
    except ConfigError as exc:
        fail(str(exc), 2, label="configuration error\n")


def _user(settings, user: Optional[str]) -> str:
    from reverie.memory.daylog import validate_user_id

    try:
        return validate_user_id(user or settings.wake.user)
    except ValueError as exc:
        fail(f"--user: {exc}", 2)


def _store(settings):
    from reverie.memory.store import MemoryStore

    return MemoryStore(settings.paths.memories_db)


def _index(settings):
    """The memory index: the one place this command opens Chroma (the client the chat's
    retrieval opens: :func:`reverie.memory.facts.open_client`) and the embedder."""
    from reverie.memory.facts import ChromaUnavailable, MemoryIndex, open_client
    from reverie.runtime.embeddings import MiniLMEmbeddingFunction
    from reverie.runtime.fetch import FetchError
    from reverie.runtime.models import Runtime

    try:
        embedder = Runtime(settings).embedder()
    except (FetchError, OSError, ValueError) as exc:  # not fetched, no folder, a bad source
        fail(f"the embedding model (models.embedding): {exc}")
    try:
        return MemoryIndex(open_client(settings), MiniLMEmbeddingFunction(embedder))
    except ChromaUnavailable as exc:
        fail(str(exc))


@contextlib.contextmanager
def _index_errors():
    """A Chroma server (``memory.chroma_url``) that stops answering mid-change: a message,
    exit 1. The store was written first and retrieval reads each hit back from it, so a
    forgotten memory is out of retrieval anyway; ``reverie memories reindex`` brings the
    index back in line (an edit is retrieved once it has)."""
    from reverie.locks import LockTimeout
    from reverie.memory.facts import ChromaUnavailable

    try:
        yield
    except ChromaUnavailable as exc:
        fail(f"{exc}. The memory store is changed but the index may not be: run `reverie "
             "memories reindex` once the server answers")
    except LockTimeout as exc:  # a night's consolidation held the store (it takes seconds)
        fail(f"{exc}; nothing was changed: try again")


# ------------------------------------------------------------------------------ records

def _state(memory) -> str:
    return "superseded" if memory.superseded_by else "active"


# What a memory says, in the order a person reads it: the note first, then its Q&A.
LEADING = ("id", "kind", "text", "question", "answer", "phrasings", "neighbours")


def _record(memory) -> dict:
    fields = memory.model_dump(mode="json")
    lead = {k: fields.pop(k) for k in LEADING}
    return {**lead, "state": _state(memory), **fields}


def _tombstone(tomb: dict, waiting: set[str]) -> dict:
    return {"id": tomb["id"], "user_id": tomb["user_id"], "state": "deleted",
            "deleted_at": tomb["deleted_at"], "reason": tomb["reason"],
            "request": tomb["request"], "unlearning": tomb["id"] in waiting}


def _records(store, user_id: str, state: str) -> list[dict]:
    """The user's memories in ``state`` (one of :data:`STATES`) as records, oldest first
    (deleted ones after the stored ones, by deletion time)."""
    out = []
    if state != "deleted":
        out = [_record(m) for m in store.list(user_id=user_id, include_superseded=True)
               if state in ("all", _state(m))]
    if state in ("deleted", "all"):
        waiting = {m.id for m in store.unlearning(user_id)}
        out += [_tombstone(t, waiting) for t in store.deletions(user_id)]
    return out


def _resolve(store, ref: str, deleted: bool = False) -> str:
    """The memory id ``ref`` names: itself, or the one stored id it begins (tombstoned ids
    too with ``deleted``). Fails (exit 1) when none or several match."""
    ids = [m.id for m in store.list(include_superseded=True)]
    if deleted:
        ids += [t["id"] for t in store.deletions()]
    if ref in ids:
        return ref
    matches = sorted({i for i in ids if i.startswith(ref)}) if ref else []
    if len(matches) == 1:
        return matches[0]
    if not matches:
        fail(f"no memory with id {ref!r} (see `reverie memories list --status all`)")
    fail(f"{ref!r} is the start of {len(matches)} memory ids ({', '.join(matches[:5])}"
         f"{', ...' if len(matches) > 5 else ''}): give more of it")


def _learned(memory) -> str:
    return _learned_text(memory.status, memory.learned_in)


def _learned_text(status: str, version: str) -> str:
    """"yes (the version that learned it)" for a learned memory, else "no"."""
    if status != "learned":
        return "no"
    return f"yes ({version})" if version else "yes"


# ------------------------------------------------------------------------------ output

def _show(title: str, columns: tuple[str, ...], rows: list[list[str]]) -> None:
    """A table of plain values (no markup read in them), never cut: folded on a terminal,
    tab-separated lines elsewhere (:func:`reverie.cli.output.show_table`)."""
    table = Table(title=title, title_justify="left")
    for col in columns:
        table.add_column(col, overflow="fold")
    for row in rows:
        table.add_row(*(Text(str(cell)) for cell in row))
    show_table(table)


def _row(record: dict) -> list[str]:
    if record["state"] == "deleted":
        return [record["id"], "-", f"(forgotten: {record['request']})", "-", "-", "deleted",
                "unlearning at the next night" if record["unlearning"] else "-",
                f"deleted {record['deleted_at'][:16]}"]
    status = record["state"] if record["state"] == "active" else \
        f"superseded by {record['superseded_by']}"
    return [record["id"], record["kind"], record["text"] or "-", record["question"] or "-",
            record["answer"] or "-", status,
            _learned_text(record["status"], record.get("learned_in", "")),
            record["created_at"][:16].replace("T", " ")]


# ------------------------------------------------------------------------------ commands

@memories_app.command("list")
def list_(ctx: typer.Context,
          user: Optional[str] = typer.Option(None, "--user", "-u", help="whose memories "
                                             "(default: wake.user)"),
          status: str = typer.Option("active", "--status", help="active | superseded | "
                                     "deleted | all"),
          as_json: bool = typer.Option(False, "--json", help="a JSON array of the records "
                                       "(each with a 'state' key), nothing else")):
    """Your memories: id, kind, note (what the memory says), question, answer, state,
    learned (by which model version), created."""
    if status not in STATES:
        fail(f"--status must be one of {', '.join(STATES)}, not {status!r}", 2)
    settings = _settings(ctx)
    user_id = _user(settings, user)
    with _store(settings) as store:
        records = _records(store, user_id, status)
    if as_json:
        print_json(records)
        return
    if not records:
        console.print(f"no {'' if status == 'all' else status + ' '}memories of {user_id}",
                      highlight=False, soft_wrap=True)
        return
    _show(f"{status} memories of {user_id} ({len(records)})",
          ("id", "kind", "note", "question", "answer", "status", "learned", "created"),
          [_row(r) for r in records])


def _steps(settings, ids: set[str]) -> list:
    """Diary steps of every night about any of ``ids`` (memory or candidate ids), by time."""
    from reverie.memory.diary import filter_steps, read_steps

    found = []
    root = settings.paths.diary
    for path in sorted(root.glob("*/steps.jsonl")) if root.exists() else []:
        text = path.read_text(encoding="utf-8")
        if not any(i in text for i in ids):  # cheap: most nights never name it
            continue
        steps = read_steps(path)
        seen = set()
        for i in sorted(ids):
            for s in filter_steps(steps, memory=i):
                if s.step_id not in seen:
                    seen.add(s.step_id)
                    found.append(s)
    return sorted(found, key=lambda s: s.at)


def _origin(memory) -> str:
    from reverie.memory.manage import USER_EDIT, is_user_edit

    if is_user_edit(memory):
        edit = next(h for h in memory.history if h.get("reason") == USER_EDIT)
        trained = f"; trained in night {memory.night_id}" if memory.night_id else \
            "; the next night trains it"
        return f"your edit of {edit.get('edit_of', '?')}{trained}"
    candidate = next((h["candidate"] for h in memory.history if h.get("candidate")), "")
    where = f"night {memory.night_id}" if memory.night_id else "no night recorded"
    return f"{where}, candidate {candidate or '?'}, session {memory.source_session or '?'}" \
           f" (turns {', '.join(memory.source_turns) or '-'})"


@memories_app.command("show")
def show(ctx: typer.Context,
         memory_id: str = typer.Argument(..., metavar="ID", help="a memory id, or the start "
                                         "of one")):
    """One memory: every field, its versions, the diary steps that made it, and whether a
    model version learned it."""
    settings = _settings(ctx)
    with _store(settings) as store:
        memory_id = _resolve(store, memory_id, deleted=True)
        memory = store.get(memory_id)
        if memory is None:
            _show_deleted(settings, store, memory_id)
            return
        versions = store.versions(memory_id)
    fields = _record(memory)
    fields["made by"] = _origin(memory)
    fields["learned"] = _learned(memory)
    _show(f"memory {memory.id}", ("field", "value"),
          [[k, v if isinstance(v, str) else json.dumps(v, ensure_ascii=False)]
           for k, v in fields.items() if k != "history"])
    _show("versions (oldest first)",
          ("id", "state", "note", "question", "answer", "learned", "made by"),
          [[("▶ " if v.id == memory.id else "") + v.id, _state(v), v.text or "-",
            v.question or "-", v.answer or "-", _learned(v), _origin(v)]
           for v in versions])
    _show("history", ("version", "at", "status", "what happened"),
          [[v.id, h.get("at", "")[:19].replace("T", " "), h.get("status", ""),
            h.get("reason", "")] for v in versions for h in v.history])
    if memory.associated:
        _show("merged with (sessions and turns seen again, versions replaced)",
              ("associated",), [[a] for a in memory.associated])
    ids = {v.id for v in versions} | {h["candidate"] for v in versions for h in v.history
                                      if h.get("candidate")}
    _print_steps(_steps(settings, ids))


def _show_deleted(settings, store, memory_id: str) -> None:
    tomb = next(t for t in store.deletions() if t["id"] == memory_id)
    waiting = {m.id for m in store.unlearning(tomb["user_id"])}
    record = _tombstone(tomb, waiting)
    record["content"] = "erased" if memory_id not in waiting else \
        "kept until the next night has unlearned it (a model version had learned it)"
    _show(f"memory {memory_id} (deleted)", ("field", "value"),
          [[k, str(v)] for k, v in record.items()])
    _print_steps(_steps(settings, {memory_id}))


def _print_steps(steps) -> None:
    if not steps:
        console.print("no diary steps name it", highlight=False, soft_wrap=True)
        return
    _show("diary steps (reverie diary show NIGHT --memory ID for the full text)",
          ("night", "at", "agent", "verdict", "candidate / memory", "reasons"),
          [[s.night_id, s.at.strftime("%Y-%m-%d %H:%M:%S"), s.agent, s.verdict,
            " / ".join(x for x in (s.candidate_id, s.memory_id) if x),
            "; ".join(s.reasons)] for s in steps])


@memories_app.command("forget")
def forget(ctx: typer.Context,
           what: str = typer.Argument(..., metavar="ID|TEXT", help="a memory id (or the "
                                      "start of one), or text: your memories like it"),
           user: Optional[str] = typer.Option(None, "--user", "-u", help="with TEXT: whose "
                                              "memories (default: wake.user)"),
           yes: bool = typer.Option(False, "--yes", "-y", help="do not ask to confirm")):
    """Forget memories now: out of the chat's retrieval at once, kept only as a deletion
    (with every version), and unlearned by the next night if a model version learned them."""
    from reverie.memory.manage import forget_memory, memories_like

    settings = _settings(ctx)
    with _store(settings) as store:
        chosen = _forget_by_id(store, what)
        index = _index(settings)
        if chosen is None:
            user_id = _user(settings, user)
            threshold = settings.night.forget_similarity
            hits = memories_like(store, index, user_id, what, threshold)
            if not hits:
                fail(f"no memory of {user_id} is like {what!r} (similarity at least "
                     f"{threshold}, night.forget_similarity)")
            chosen = [m for m, _ in hits]
            rows = [[m.id, m.kind, m.statement(), f"{sim:.2f}", _learned(m)] for m, sim in hits]
            _show(f"memories of {user_id} like {what!r}",
                  ("id", "kind", "memory", "similarity", "learned"), rows)
        if not yes and not typer.confirm(f"Forget {len(chosen)} memor"
                                         f"{'y' if len(chosen) == 1 else 'ies'} (every "
                                         f"version)?", default=False):
            fail("nothing forgotten")
        for memory in chosen:
            with _index_errors():
                deleted = forget_memory(store, index, memory.id, reason="forgotten with "
                                        f"`{REQUEST}`", request=f"{REQUEST} {what}")
            if not deleted:
                console.print(f"{memory.id} was already gone", soft_wrap=True)
                continue
            waiting = {m.id for m in store.unlearning(memory.user_id)} & set(deleted)
            note = "; a model version had learned it: the next night unlearns it" \
                if waiting else ""
            console.print(f"forgot {', '.join(deleted)}{note}", highlight=False,
                          soft_wrap=True)


def _forget_by_id(store, what: str):
    """``[memory]`` when ``what`` is a stored id (or the start of one); None when it is
    text. A word that begins several ids, or a forgotten id, fails."""
    if any(ch.isspace() for ch in what):
        return None
    ids = [m.id for m in store.list(include_superseded=True)] + \
        [t["id"] for t in store.deletions()]
    if not any(i.startswith(what) for i in ids):
        return None
    memory = store.get(_resolve(store, what, deleted=True))
    if memory is None:
        fail(f"memory {_resolve(store, what, deleted=True)} is already forgotten")
    _show(f"memory {memory.id}", ("id", "kind", "memory", "state", "learned"),
          [[memory.id, memory.kind, memory.statement(), _state(memory), _learned(memory)]])
    return [memory]


@memories_app.command("edit")
def edit(ctx: typer.Context,
         memory_id: str = typer.Argument(..., metavar="ID", help="a memory id, or the start "
                                         "of one"),
         question: Optional[str] = typer.Option(None, "--question", help="a fact's new question"),
         answer: Optional[str] = typer.Option(None, "--answer", help="a fact's new answer"),
         text: Optional[str] = typer.Option(None, "--text", help="a preference's or rule's "
                                            "new text (or a fact's sentence)")):
    """Correct a memory: a new version supersedes it (the old one stays in its history), the
    chat retrieves the correction at once, and the next night trains it."""
    from reverie.memory.manage import edit_memory

    if question is None and answer is None and text is None:
        fail("give at least one of --question, --answer, --text", 2)
    settings = _settings(ctx)
    with _store(settings) as store:
        memory_id = _resolve(store, memory_id)
        try:
            with _index_errors():
                new = edit_memory(store, _index(settings), memory_id, question=question,
                                  answer=answer, text=text)
        except KeyError:
            fail(f"no memory with id {memory_id!r}")
        except ValueError as exc:
            fail(str(exc))
    console.print(f"{new.id} supersedes {memory_id}: {new.statement()}\n"
                  f"(the next night trains it; `reverie memories show {new.id}`)",
                  highlight=False, markup=False, soft_wrap=True)


@memories_app.command("export")
def export(ctx: typer.Context,
           user: Optional[str] = typer.Option(None, "--user", "-u", help="whose memories "
                                              "(default: wake.user)"),
           out: Optional[Path] = typer.Option(None, "--out", "-o", help="write this file "
                                              "(atomically) instead of stdout")):
    """Every memory as JSON Lines, one record per line with its 'state' (active,
    superseded, deleted)."""
    from reverie.files import atomic_write_jsonl

    settings = _settings(ctx)
    user_id = _user(settings, user)
    with _store(settings) as store:
        records = _records(store, user_id, "all")
    if out is None:
        sys.stdout.write("".join(json.dumps(r, ensure_ascii=False) + "\n" for r in records))
        return
    try:
        atomic_write_jsonl(out, records)
    except OSError as exc:
        fail(f"--out {out}: {exc}")
    console.print(f"{len(records)} memories of {user_id} -> {out}", highlight=False,
                  markup=False, soft_wrap=True)


@memories_app.command("reindex")
def reindex(ctx: typer.Context,
            user: Optional[str] = typer.Option(None, "--user", "-u", help="only this user's "
                                               "memories (default: everyone's)")):
    """Bring the memory index back in line with the memory store (every stored version
    indexed, deleted ones removed): after a Chroma server failed mid-change."""
    settings = _settings(ctx)
    user_id = _user(settings, user) if user else None
    with _store(settings) as store, _index_errors():
        done = _index(settings).sync(store, user_id)
    console.print(f"indexed {done['indexed']} memories, removed {done['removed']} stale "
                  "entries", highlight=False, soft_wrap=True)


@memories_app.command("check")
def check(ctx: typer.Context,
          user: Optional[str] = typer.Option(None, "--user", "-u", help="only this user's "
                                             "memories (default: everyone's)"),
          as_json: bool = typer.Option(False, "--json", help="print the comparison as JSON "
                                       "and nothing else")):
    """Compare the memory index with the memory store, changing neither: ids stored but not
    indexed, indexed but not stored (deleted), indexed with another text or superseded
    mark. Exit 1 when they differ (`reverie memories reindex` brings them back in line)."""
    from reverie.locks import LockTimeout
    from reverie.memory.facts import ChromaUnavailable

    settings = _settings(ctx)
    user_id = _user(settings, user) if user else None
    with _store(settings) as store:
        try:
            found = _index(settings).check(store, user_id)
        except (ChromaUnavailable, LockTimeout) as exc:
            fail(str(exc))
        stored = len(store.list(user_id=user_id, include_superseded=True))
    agree = not any(found.values())
    whose = f"memor{'y' if stored == 1 else 'ies'} of {user_id or 'every user'}"
    if as_json:
        print_json({"agree": agree, "memories": stored, **found})
    elif agree:
        console.print(f"the memory index agrees with the store: {stored} {whose}",
                      highlight=False, soft_wrap=True)
    else:
        why = {"missing": "stored, not indexed", "stale": "indexed, not stored (deleted)",
               "differ": "indexed with another text, user or superseded mark"}
        _show(f"the memory index differs from the store ({stored} {whose})",
              ("id", "problem"), [[i, why[k]] for k, ids in found.items() for i in ids])
        console.print("run `reverie memories reindex` to bring the index back in line",
                      highlight=False, soft_wrap=True)
    if not agree:
        raise typer.Exit(1)
