"""What a user does to their own memories, shared by the CLI (``reverie memories``) and the
night: forget, edit, and the questions both ask of a memory (a user's edit? learned where?).

* :func:`forget_memory` deletes a memory and every version of it from the store (tombstoned;
  a learned one waits in the store's ``unlearning`` table for the next night to unlearn)
  and from the memory index, so retrieval stops returning it at once. The night's
  "forget ..." requests (:func:`reverie.graphs.night.consolidate`) and ``reverie memories
  forget`` both go through it, with :func:`memories_like` to find what a text means.
* :func:`edit_memory` writes a user's correction as a new version that supersedes the old
  one (kept in history), marked :data:`USER_EDIT`; the next night trains it
  (:func:`claim_edits`) and its consolidation does not supersede it with older evidence.
"""

from __future__ import annotations

import re
from typing import Callable, Iterable, Optional

from reverie.memory.facts import MemoryIndex
from reverie.memory.records import Memory, now
from reverie.memory.store import MemoryStore

USER_EDIT = "user edit"
"""The history reason (and supersede reason) of a version the user wrote."""


def forget_memory(store: MemoryStore, index: MemoryIndex, memory_id: str, reason: str,
                  request: str) -> list[str]:
    """Forget a memory on the user's request: it and every version of it
    (:meth:`MemoryStore.versions`) are deleted from the store (a tombstone each, with
    ``reason`` and ``request``, the user's words) and removed from the index.

    The store is written first: retrieval reads each hit back from the store, so a memory
    is out of retrieval as soon as its row is gone, even if the index write then fails
    (:meth:`MemoryIndex.sync` removes the leftover).

    Returns:
        the ids deleted, oldest version first; empty when ``memory_id`` is not stored
        (unknown, or deleted already).

    Raises:
        reverie.locks.LockTimeout: a night's consolidation held the store for minutes.
    """
    with store.exclusive():  # a night's consolidation must not interleave (see there)
        ids = [m.id for m in store.versions(memory_id)]
        deleted = [i for i in ids if store.delete(i, reason=reason, request=request)]
        for i in ids:
            index.remove(i)
    return deleted


_NUMBER = re.compile(r"\d[\d\s().,+/-]*\d|\d")
_NAME = re.compile(r"(?<=\s)[A-Z][\w'-]+")
_PLAIN = frozenset("""I I'm I've I'd My Please Thanks Forget Remember You Your The It""".split())


def forget_keys(target: str) -> set[str]:
    """What a forget request names exactly: its numbers of three digits or more (digits
    only: "555-0142" -> "5550142") and its capitalised words after the first ("my friend
    Kenji" -> "kenji"), lower-cased. A memory that carries one of them is what the user
    meant, however its sentence is phrased."""
    numbers = {re.sub(r"\D", "", n) for n in _NUMBER.findall(target)}
    names = {w.lower().removesuffix("'s") for w in _NAME.findall(f" {target}")
             if w not in _PLAIN}
    return {n for n in numbers if len(n) >= 3} | names


def carries(texts: Iterable[str], keys: set[str]) -> bool:
    """Whether any of ``texts`` holds one of :func:`forget_keys`' ``keys`` (numbers by
    their digits, names as whole words)."""
    for text in texts:
        digits = {re.sub(r"\D", "", n) for n in _NUMBER.findall(text)}
        words = {w.lower().removesuffix("'s") for w in re.findall(r"[\w'-]+", text)}
        if keys & (digits | words):
            return True
    return False


def texts_of(record) -> list[str]:
    """Every text of a memory, candidate or parked thought: note, question, answer,
    phrasings (what a forget request must find wherever it is said)."""
    return [t for t in (record.text, record.question, record.answer, *record.phrasings) if t]


def asks_to_forget(target: str, record, similarity: Callable[[str, str], float],
                   min_similarity: float, values: Iterable[str] = ()) -> float:
    """How much "forget ``target``" means ``record``: 1.0 when one of its texts carries
    the target's numbers or names, or one of ``values`` (what the request named by kind:
    :func:`reverie.agents.router.values_meant`), else the highest similarity of ``target``
    to any of its texts at or above ``min_similarity``, else 0.0."""
    texts = texts_of(record)
    keys = forget_keys(target) | {k for v in values for k in forget_keys(f" {v}")}
    if carries(texts, keys):
        return 1.0
    best = max((similarity(target, t) for t in texts), default=0.0)
    return best if best >= min_similarity else 0.0


def memories_like(store: MemoryStore, index: MemoryIndex, user_id: str, text: str,
                  min_similarity: float, k: int = 10,
                  values: Iterable[str] = ()) -> list[tuple[Memory, float]]:
    """The user's current memories whose statement is at least ``min_similarity`` (cosine,
    the ``night.forget_similarity`` scale) like ``text``, most similar first, at most ``k``,
    and every one of them that carries the numbers or names ``text`` gives
    (:func:`forget_keys`, with similarity 1.0), or one of ``values`` (what a request named
    by kind): what "forget ``text``" means."""
    out: dict[str, tuple[Memory, float]] = {}
    keys = forget_keys(text) | {k for v in values for k in forget_keys(f" {v}")}
    if keys:
        for memory in store.list(user_id=user_id):
            if carries(texts_of(memory), keys):
                out[memory.id] = (memory, 1.0)
    for memory_id, similarity in index.nearest(text, user_id, k=k):
        memory = store.get(memory_id)
        if (memory is not None and memory.user_id == user_id and similarity >= min_similarity
                and memory_id not in out):
            out[memory_id] = (memory, similarity)
    return sorted(out.values(), key=lambda x: -x[1])


def is_user_edit(memory: Memory) -> bool:
    """Whether the user wrote this version (``reverie memories edit``)."""
    return any(h.get("reason") == USER_EDIT for h in memory.history)


def edit_memory(store: MemoryStore, index: MemoryIndex, memory_id: str, *,
                question: Optional[str] = None, answer: Optional[str] = None,
                text: Optional[str] = None) -> Memory:
    """A user's correction: a new version of the memory, superseding it.

    The new version keeps the old one's kind, scores and source; it is ``verified`` (not
    learned: the next night trains it) with an empty ``night_id`` until then. A fact whose
    question or answer changed loses its old ``text`` sentence unless ``text`` is given
    (it would state the old answer), and its dreamer phrasings when the question changed
    (they rephrase the old question). The index gets the new version and the old one's
    superseded mark at once, so retrieval returns only the correction.

    Returns:
        the new version as stored.

    Raises:
        KeyError: no memory ``memory_id`` is stored (unknown or deleted).
        ValueError: it is an outdated version (edit the current one, named in the
            message); nothing would change; a fact would be left without question or
            answer, or a preference or rule without text.
    """
    with store.exclusive():  # a night's consolidation must not interleave (see there)
        return _edit(store, index, memory_id, question, answer, text)


def _edit(store: MemoryStore, index: MemoryIndex, memory_id: str, question: Optional[str],
          answer: Optional[str], text: Optional[str]) -> Memory:
    old = store.get(memory_id)
    if old is None:
        raise KeyError(memory_id)
    if old.superseded_by:
        raise ValueError(f"memory {old.id} is an outdated version (superseded by "
                         f"{old.superseded_by}): edit the current one")
    changes = {k: v.strip() for k, v in (("question", question), ("answer", answer),
                                           ("text", text)) if v is not None}
    if not changes or all(getattr(old, k) == v for k, v in changes.items()):
        raise ValueError(f"nothing to change in memory {old.id}: give a new --question, "
                         f"--answer or --text")
    new_question = changes.get("question", old.question)
    new_answer = changes.get("answer", old.answer)
    new_text = changes.get("text", old.text)
    phrasings = old.phrasings
    if old.kind == "fact":
        if not new_question or not new_answer:
            raise ValueError(f"memory {old.id} is a fact: it needs a question and an answer")
        if "text" not in changes and (new_question, new_answer) != (old.question, old.answer):
            new_text = ""
        if new_question != old.question:
            phrasings = []
    elif not new_text:
        raise ValueError(f"memory {old.id} is a {old.kind}: it needs a text")
    new = Memory(user_id=old.user_id, kind=old.kind, question=new_question, answer=new_answer,
                 phrasings=phrasings, text=new_text, scores=old.scores, status="verified",
                 source_session=old.source_session, source_turns=old.source_turns,
                 history=[{"at": now().isoformat(), "reason": USER_EDIT, "status": "verified",
                           "edit_of": old.id}])
    stored = store.supersede(old.id, new, reason=USER_EDIT)
    index.upsert(stored)
    # Re-indexed (not removed) with its superseded mark, as the night does: the index
    # mirrors every stored version (MemoryIndex.sync would put it back).
    index.upsert(store.get(old.id))
    return stored


def claim_edits(store: MemoryStore, user_id: Optional[str], night_id: str) -> list[Memory]:
    """The user's edits no night has trained yet (current, ``verified``, empty
    ``night_id``), now marked as this night's, plus those already marked so (a resumed
    night finds them again); one user's or, with ``user_id`` None, everyone's."""
    out = []
    for m in store.list(user_id=user_id, status="verified"):
        if not is_user_edit(m) or m.night_id not in ("", night_id):
            continue
        if not m.night_id:
            m = store.update(m.model_copy(update={"night_id": night_id}),
                             reason=f"user edit handed to the forge in night {night_id}")
        out.append(m)
    return out


__all__ = ["USER_EDIT", "asks_to_forget", "carries", "claim_edits", "edit_memory",
           "forget_keys", "forget_memory", "is_user_edit", "memories_like", "texts_of"]
