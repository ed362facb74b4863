"""The night: a LangGraph graph from the day's sessions to verified memories.

    gather ─▶ revisit ─▶ route ─▶ read ×(user turns: the note-taker) ─▶ triage ◀──────────┐
                                                                            │             │
                        pending (a note) ─▶ verify ─────────────────────────┼─────────────┤
                        failed (round < K) ─▶ reshape ──────────────────────┼─────────────┤
                        passed ─▶ dream (the dreamer, then the dream check) ┼─────────────┤
                        dreamt ─▶ consult (persona) ────────────────────────┘─────────────┘
                        nothing left ─▶ consolidate ─▶ park ─▶ handoff ─▶ learn (forge) ─▶ END

Independent agent calls fan out with ``Send`` (a :class:`ReadTask` or :class:`ReviewTask`
each) so the local model batches them. The state holds pydantic records (sessions,
candidates, forget requests, parked thoughts, the consolidation's and the subconscious'
outcomes), checkpointed after every step by LangGraph's SQLite checkpointer, which revives
them as the same classes (:data:`STATE_RECORDS`): a night killed at any point resumes
without repeating finished agent calls (an agent call whose diary line was written before
the kill, but whose result the checkpoint missed, is taken from that line:
:func:`replayed`), and every id is deterministic so consolidation never adds a memory
twice. A node killed half-way runs again whole, so each one's writes are safe to repeat
(consolidate reads back what it had done from the store, learn from the model version).

The subconscious: *park* keeps what tonight rejected (not for being already known) or the
persona vetoed as parked thoughts in the memory store; on the user's next nights *revisit*
sends each back through verify/reshape/consult as a pending candidate citing the new turns
most like it. It becomes a memory when the new evidence carries it, and expires after
``night.park_nights`` nights.
"""

from __future__ import annotations

import hashlib
import json
import operator
import re
from dataclasses import dataclass
from datetime import datetime, timezone
from pathlib import Path
from typing import Annotated, Any, Callable, Literal, Optional, TypedDict

from langgraph.graph import END, START, StateGraph
from langgraph.runtime import Runtime
from langgraph.types import Send
from pydantic import BaseModel, Field

from reverie.agents.dreamer import Dreamer
from reverie.agents.notetaker import NoteTaker
from reverie.agents.persona import PersonaConsultant
from reverie.agents.reshaper import Reshaper
from reverie.agents.router import forget_requests, values_meant, verbatim_chunks
from reverie.agents.verifier import Verifier
from reverie.files import atomic_write_text
from reverie.memory.daylog import DayLog
from reverie.memory.diary import Diary, DiaryStep
from reverie.memory.facts import FactStore, MemoryIndex
from reverie.memory.identity import Identity
from reverie.memory.manage import (asks_to_forget, claim_edits, forget_memory, is_user_edit,
                                   memories_like)
from reverie.memory.records import Candidate, ForgetRequest, Memory, ParkedThought, Session, now
from reverie.memory.store import MemoryStore
from reverie.prompts import ChatFrame
from reverie.training.dataset import curate


def merge(old: dict | None, new: dict | None) -> dict:
    """Reducer: candidates by id, the newest version wins."""
    return {**(old or {}), **(new or {})}


class Consolidation(BaseModel):
    """What :func:`consolidate` did, as memory ids: ``added`` (new, or superseding),
    ``superseded`` (the old ones), ``duplicates`` (existing ones seen again), ``deleted``
    (on a forget request), ``dropped`` (approved tonight but asked to be forgotten),
    ``revived``: revisited candidate id -> the memory it became or joined, and
    ``kept_edits``: the user's edits a candidate from older evidence would have superseded."""

    added: list[str] = Field(default_factory=list)
    superseded: list[str] = Field(default_factory=list)
    duplicates: list[str] = Field(default_factory=list)
    deleted: list[str] = Field(default_factory=list)
    dropped: list[str] = Field(default_factory=list)
    revived: dict[str, str] = Field(default_factory=dict)
    kept_edits: list[str] = Field(default_factory=list)


class Subconscious(BaseModel):
    """What :func:`park` did, as parked-thought ids (see its docstring for each outcome)."""

    parked: list[str] = Field(default_factory=list)
    revived: list[str] = Field(default_factory=list)
    known: list[str] = Field(default_factory=list)
    forgotten: list[str] = Field(default_factory=list)
    expired: list[str] = Field(default_factory=list)
    kept: list[str] = Field(default_factory=list)


class ReadTask(BaseModel):
    """One note-taker call: user turn ``turn_id`` of ``session``; ``forget``: the user's
    requests to forget (tonight's), which its notes are checked against at once."""

    night_id: str
    session: Session
    turn_id: str
    forget: list[ForgetRequest] = Field(default_factory=list)


class ReviewTask(BaseModel):
    """One verify, reshape, dream or consult call on ``candidate``, read against its
    ``session``."""

    night_id: str
    candidate: Candidate
    session: Session


class NightState(TypedDict, total=False):
    """The night's checkpointed state. The caller gives ``night_id``, ``user_id`` (None:
    every user) and ``include_consumed``; each node adds what its docstring says."""

    night_id: str
    user_id: Optional[str]
    include_consumed: bool
    sessions: list[Session]                  # gather
    parked: list[ParkedThought]              # revisit: tonight's users' parked thoughts
    forget: list[ForgetRequest]              # route
    routed_chunks: Annotated[int, operator.add]
    candidates: Annotated[dict[str, Candidate], merge]  # read, revisit, verify, reshape, dream, consult
    consolidation: Consolidation             # consolidate
    subconscious: Subconscious               # park
    training_set: str                        # handoff: the hand-off file
    forge: dict                              # learn: the ForgeOutcome's fields


# The classes the checkpointer may revive (its msgpack allowlist).
STATE_RECORDS = (Session, Candidate, ForgetRequest, ParkedThought, Consolidation, Subconscious,
                 ReadTask, ReviewTask)


@dataclass
class NightDeps:
    """What the nodes use (not checkpointed): agents, stores, the diary."""

    night: Any  # NightConfig
    notetaker: NoteTaker
    dreamer: Dreamer
    verifier: Verifier
    reshaper: Reshaper
    persona: PersonaConsultant
    identity: Identity
    daylog: DayLog
    store: MemoryStore
    facts: FactStore
    index: MemoryIndex
    similarity: Callable[[str, str], float]
    diary: Diary
    training_dir: Path
    forge: Any  # ForgeConfig: how the training set is composed
    frame: Optional[ChatFrame] = None  # the chat's prompt, which training rows are put in
    # learner(night_id, training-set path) -> ForgeOutcome (reverie.training.forge.learn);
    # None: the night stops at the training set
    learner: Optional[Callable[[str, Path], Any]] = None
    # what unlearning rows answer (prompts/unlearn.yaml); None: the shipped file's
    unlearn_answer: Optional[str] = None


# -- nodes -----------------------------------------------------------------------------

def gather(state: NightState, runtime: Runtime[NightDeps]) -> dict:
    """Unconsumed sessions (of one user, or all) from the day log."""
    deps = runtime.context
    sessions = deps.daylog.unconsumed(state.get("user_id"), state.get("include_consumed", False))
    deps.diary.record(DiaryStep(step_id="gather", night_id=state["night_id"], agent="gather",
                                verdict=f"{len(sessions)} sessions",
                                parsed=[s.session_id for s in sessions]))
    return {"sessions": sessions}


# A parked thought is revisited only against new user turns at least this close (cosine,
# MiniLM): a related turn scores about 0.5-0.85, an unrelated one below 0.35.
REVISIT_SIMILARITY = 0.4
REVISIT_TURNS = 2


def revisit(state: NightState, runtime: Runtime[NightDeps]) -> dict:
    """Parked thoughts of tonight's users back into the night: each becomes a ``pending``
    candidate citing the (at most two) new user turns of one session most similar to it,
    so the verifier judges it on new evidence. A thought with no such turn is not
    revisited; :func:`park` ages it."""
    deps, night_id = runtime.context, state["night_id"]
    sessions = state.get("sessions", [])
    snapshot, candidates = [], {}
    for user in sorted({s.user_id for s in sessions}):  # a user's thoughts, their turns only
        turns = [(s, m) for s in sessions if s.user_id == user for m in s.messages
                 if m.role == "user"]
        for p in deps.store.parked(user):
            snapshot.append(p)
            scored = sorted(((deps.similarity(p.statement(), m.content), i)
                             for i, (_, m) in enumerate(turns)), key=lambda x: (-x[0], x[1]))
            if not scored or scored[0][0] < REVISIT_SIMILARITY:
                continue
            session = turns[scored[0][1]][0]
            best = [(sim, turns[i][1].turn_id) for sim, i in scored
                    if sim >= REVISIT_SIMILARITY and turns[i][0] is session][:REVISIT_TURNS]
            cites = [m.turn_id for m in session.messages if m.turn_id in {t for _, t in best}]
            c = Candidate(id=f"{p.id}@{night_id}", night_id=night_id, user_id=user,
                          session_id=session.session_id, kind=p.kind, question=p.question,
                          answer=p.answer, phrasings=p.phrasings, neighbours=p.neighbours,
                          text=p.text, cites=cites,
                          revives=p.id, history=[{"agent": "subconscious", "parked_id": p.id,
                                                  "parked_in": p.night_id,
                                                  "nights_seen": p.nights_seen,
                                                  "reasons": p.reasons}])
            candidates[c.id] = c
            deps.diary.record(DiaryStep(
                step_id=f"revisit:{p.id}", night_id=night_id, agent="subconscious",
                candidate_id=c.id, session_id=session.session_id, verdict="revisit",
                raw_output=p.statement(),
                scores={f"similarity {t}": round(sim, 3) for sim, t in best},
                reasons=[f"parked in night {p.night_id}: " + ("; ".join(p.reasons) or "no reason")],
                parsed={"parked_id": p.id, "cites": cites, "nights_seen": p.nights_seen}))
    return {"parked": snapshot, "candidates": candidates}


def route(state: NightState, runtime: Runtime[NightDeps]) -> dict:
    """Verbatim material to the fact store; the user's forget requests noted."""
    deps = runtime.context
    routed, forget = 0, []
    for session in state["sessions"]:
        chunks = verbatim_chunks(session, deps.night.verbatim_min_chars)
        new = deps.facts.add(chunks)
        requests = [r.model_copy(update={"values": values_meant(r, state["sessions"])})
                    for r in forget_requests(session)]
        forget += requests
        routed += len(chunks)
        deps.diary.record(DiaryStep(
            step_id=f"route:{session.session_id}", night_id=state["night_id"], agent="router",
            session_id=session.session_id, verdict="routed",
            raw_output="\n".join(f"[{c.turn_id}] {', '.join(c.kinds)}: {c.text[:160]}" for c in chunks),
            parsed={"chunks": len(chunks), "new_chunks": new,
                    "forget_requests": [r.target for r in requests]}))
    return {"routed_chunks": routed, "forget": forget}


def fan_out_reads(state: NightState) -> list[Send] | Literal["triage"]:
    """A :class:`ReadTask` per user turn of every session (a turn asking to forget is not
    read: it says what not to remember), or on to triage (no sessions)."""
    sends, forget = [], state.get("forget", [])
    for session in state["sessions"]:
        asks = {r.turn_id for r in forget if r.session_id == session.session_id}
        mine = [r for r in forget if r.user_id == session.user_id]
        sends += [Send("read", ReadTask(night_id=state["night_id"], session=session,
                                        turn_id=m.turn_id, forget=mine))
                  for m in session.messages if m.role == "user" and m.turn_id not in asks]
    return sends or "triage"


async def read(task: ReadTask, runtime: Runtime[NightDeps]) -> dict:
    """The note-taker on one user turn: its notes (``pending`` candidates) into
    ``candidates``; a note that one of the user's forget requests means is ``rejected`` at
    once (never verified, dreamed on, kept or parked)."""
    deps, session = runtime.context, task.session
    step_id = f"read:{session.session_id}:{task.turn_id}"
    if (done := replayed(deps, step_id)) is not None:
        return done
    notes, result = await deps.notetaker.read(session, task.turn_id, task.night_id)
    for i, c in enumerate(notes):
        if hit := forget_hit(task.forget, c, deps):
            why = f"the user asked to forget: {hit.text}"
            notes[i] = c.model_copy(update={"status": "rejected", "reasons": [why],
                                            "history": c.history + [{"agent": "forget",
                                                                     "reason": why}]})
    deps.diary.record(DiaryStep(step_id=step_id, night_id=task.night_id, agent="notetaker",
                                session_id=session.session_id,
                                verdict=f"{len(notes)} note{'s' * (len(notes) != 1)}",
                                **result.diary_fields(), produced=produced(notes)))
    return {"candidates": {c.id: c for c in notes}}


def replayed(deps: NightDeps, step_id: str) -> Optional[dict]:
    """The state update of agent step ``step_id`` if this night's diary holds it (a run
    killed after writing the step's line but before the checkpoint took its result), else
    None: the resumed night uses it and does not call the agent a second time."""
    step = deps.diary.recorded(step_id)
    if step is None or step.produced is None:
        return None
    return {"candidates": {c["id"]: Candidate.model_validate(c) for c in step.produced}}


def produced(candidates: list[Candidate]) -> list[dict]:
    """Candidates as the diary keeps them for :func:`replayed` (JSON)."""
    return [c.model_dump(mode="json") for c in candidates]


def triage(state: NightState) -> dict:
    """A meeting point: every fan-out returns here and :func:`next_work` decides."""
    return {}


# Which node takes a candidate in each status (the others are settled).
REVIEW = {"pending": "verify", "failed": "reshape", "passed": "dream", "dreamt": "consult"}


def next_work(state: NightState) -> list[Send] | Literal["consolidate"]:
    """A :class:`ReviewTask` per unsettled candidate: verify the pending, reshape the
    failed, dream on the passed, consult on the dreamt; when every candidate is settled,
    consolidate."""
    sessions = {s.session_id: s for s in state.get("sessions", [])}
    sends = [Send(REVIEW[c.status], ReviewTask(night_id=state["night_id"], candidate=c,
                                               session=sessions[c.session_id]))
             for c in state.get("candidates", {}).values() if c.status in REVIEW]
    return sends or "consolidate"


async def verify(task: ReviewTask, runtime: Runtime[NightDeps]) -> dict:
    """The verifier on a pending candidate: ``passed``, ``failed`` (to reshape) or
    ``rejected``, with its scores and reasons."""
    deps, before = runtime.context, task.candidate
    if (done := replayed(deps, f"verify:{before.id}:{before.round}")) is not None:
        return done
    after, result = await deps.verifier.verify(before, task.session)
    deps.diary.record(DiaryStep(
        step_id=f"verify:{after.id}:{before.round}", night_id=task.night_id, agent="verifier",
        candidate_id=after.id, session_id=after.session_id, round=before.round,
        scores=after.scores.model_dump(), verdict=after.status, reasons=after.reasons,
        **result.diary_fields(), produced=produced([after])))
    return {"candidates": {after.id: after}}


async def reshape(task: ReviewTask, runtime: Runtime[NightDeps]) -> dict:
    """The reshaper on a failed candidate: rewritten and ``pending`` again (next round), or
    ``rejected`` once ``night.reshape_rounds`` are spent."""
    deps, before = runtime.context, task.candidate
    if (done := replayed(deps, f"reshape:{before.id}:{before.round}")) is not None:
        return done
    after, result = await deps.reshaper.reshape(before, task.session)
    deps.diary.record(DiaryStep(
        step_id=f"reshape:{after.id}:{before.round}", night_id=task.night_id, agent="reshaper",
        candidate_id=after.id, session_id=after.session_id, round=before.round,
        verdict="reshaped" if after.status == "pending" else after.status,
        reasons=before.reasons, **result.diary_fields(), produced=produced([after])))
    return {"candidates": {after.id: after}}


async def dream(task: ReviewTask, runtime: Runtime[NightDeps]) -> dict:
    """The dreamer on a verified note (``night.dream_bursts`` calls), then the verifier's
    check of what it wrote: ``dreamt`` with the phrasings and neighbour questions that fit
    the note, or ``rejected`` when no question is left."""
    deps, before = runtime.context, task.candidate
    step_id = f"dream:{before.id}:{before.round}"
    if (done := replayed(deps, step_id)) is not None:
        return done
    dreamt, calls = await deps.dreamer.dream(before)
    for burst, result in enumerate(calls):
        deps.diary.record(DiaryStep(
            step_id=f"{step_id}:b{burst}", night_id=task.night_id, agent="dreamer",
            candidate_id=before.id, session_id=before.session_id, round=before.round,
            verdict=f"{sum(map(len, (result.parsed or {}).values()))} lines",
            **result.diary_fields()))
    after = deps.verifier.check_dream(dreamt)
    check = after.history[-1]
    deps.diary.record(DiaryStep(
        step_id=step_id, night_id=task.night_id, agent="verifier", candidate_id=after.id,
        session_id=after.session_id, round=before.round, verdict=after.status,
        reasons=after.reasons[len(before.reasons):], checks=check["dropped"],
        parsed={"question": after.question, "answer": after.answer,
                "phrasings": after.phrasings, "neighbours": after.neighbours},
        produced=produced([after])))
    return {"candidates": {after.id: after}}


async def consult(task: ReviewTask, runtime: Runtime[NightDeps]) -> dict:
    """The persona consultant on a passed candidate: ``approved`` (with any identity items
    it proposes) or ``vetoed``."""
    deps = runtime.context
    if (done := replayed(deps, f"persona:{task.candidate.id}")) is not None:
        return done
    after, result = await deps.persona.review(task.candidate)
    deps.diary.record(DiaryStep(
        step_id=f"persona:{after.id}", night_id=task.night_id, agent="persona",
        candidate_id=after.id, session_id=after.session_id,
        verdict="approve" if after.status == "approved" else "veto",
        reasons=[after.persona_note] if after.persona_note else [], **result.diary_fields(),
        produced=produced([after])))
    return {"candidates": {after.id: after}}


def consolidate(state: NightState, runtime: Runtime[NightDeps]) -> dict:
    """Memory operations: add, supersede a contradicted fact (old kept and linked),
    merge duplicates, and delete what the user explicitly asked to forget (every version,
    :func:`reverie.memory.manage.forget_memory`). A user's edit is not superseded by a
    candidate whose session is not newer than the edit (the user corrected that).

    Holds the store's exclusive lock throughout (:meth:`MemoryStore.exclusive`), so a
    ``reverie memories forget`` or ``edit`` in another process waits and cannot delete a
    memory between this node's reading it and writing it (store and index stay together)."""
    with runtime.context.store.exclusive():
        return _consolidate(state, runtime)


def _consolidate(state: NightState, runtime: Runtime[NightDeps]) -> dict:
    deps, night_id = runtime.context, state["night_id"]
    ops = Consolidation()
    forget = state.get("forget", [])
    approved = sorted((c for c in state.get("candidates", {}).values() if c.status == "approved"),
                      key=lambda c: c.id)

    def log(op: str, memory_id: str, text: str, reasons: list[str] = (),
            c: Optional[Candidate] = None):
        # the candidate's id ties the step to its thread in the diary (a duplicate's
        # memory_id is the other memory's, so its step id names the candidate too: two
        # candidates can duplicate one memory)
        step_id = f"consolidate:{op}:{memory_id}"
        step_id += f":{c.id}" if op in ("duplicate", "kept-edit") else ""
        deps.diary.record(DiaryStep(step_id=step_id, night_id=night_id,
                                    agent="consolidate", memory_id=memory_id, verdict=op,
                                    raw_output=text, reasons=list(reasons),
                                    candidate_id=c.id if c else "",
                                    session_id=c.session_id if c else ""))

    sessions = {s.session_id: s for s in state.get("sessions", [])}
    for request in forget:  # only ever on the user's explicit request
        why = f"forget request in {request.session_id}/{request.turn_id} (night {night_id})"
        for memory, sim in memories_like(deps.store, deps.index, request.user_id,
                                         request.target, deps.night.forget_similarity,
                                         values=request.values):
            for memory_id in forget_memory(deps.store, deps.index, memory.id, reason=why,
                                           request=request.text):
                ops.deleted.append(memory_id)
                log("delete", memory_id, request.text,
                    [f"similarity {sim:.2f} to '{request.target}'"]
                    + ([f"a version of {memory.id}"] if memory_id != memory.id else []))
        # deleted by this night before it was killed (resumed): their tombstones say so
        for gone in deps.store.deletions(request.user_id):
            if gone["reason"] == why and gone["id"] not in ops.deleted:
                ops.deleted.append(gone["id"])
                log("delete", gone["id"], request.text)

    # what this night did before it was killed (resumed), found in the store: the
    # duplicates it noted (by their history entry) and, below, the memories it added
    noted = {h.get("reason"): m.id for user in sorted({c.user_id for c in approved})
             for m in deps.store.list(user_id=user, include_superseded=True)
             for h in m.history if f"(night {night_id}, " in h.get("reason", "")}
    for c in approved:
        memory = to_memory(c)
        stored = deps.store.get(memory.id)
        if stored is not None:  # added already: by this night before a kill, or an earlier one
            if stored.night_id == night_id:
                gone = [a for a in stored.associated
                        if (old := deps.store.get(a)) and old.superseded_by == memory.id]
                ops.added.append(memory.id)
                ops.superseded += gone
                log("supersede" if gone else "add", memory.id, memory.statement(),
                    [f"supersedes {a}" for a in gone], c)
            if c.revives:
                ops.revived[c.id] = memory.id
            continue
        seen = f"seen again in {c.session_id} (night {night_id}, candidate {c.id})" \
            + (f"; {revived_note(c)}" if c.revives else "")
        if seen in noted:
            ops.duplicates.append(noted[seen])
            if c.revives:
                ops.revived[c.id] = noted[seen]
            log("duplicate", noted[seen], c.statement(), [f"same as {noted[seen]}"], c)
            continue
        hit = forget_hit(forget, c, deps)
        if hit:
            ops.dropped.append(memory.id)
            log("dropped", memory.id, c.statement(), [f"the user asked to forget: {hit.text}"], c)
            continue
        op, other = decide(memory, deps)
        if op == "supersede" and older_than_edit(sessions.get(c.session_id),
                                                 deps.store.get(other)):
            ops.kept_edits.append(other)
            log("kept-edit", other, c.statement(),
                [f"the user corrected this memory after session {c.session_id}"], c)
            continue
        if op == "duplicate":
            existing = deps.store.get(other)
            existing.associated = sorted(set(existing.associated) | {f"{c.session_id}:{t}" for t in c.cites})
            deps.store.update(existing, reason=seen)
            ops.duplicates.append(other)
            if c.revives:
                ops.revived[c.id] = other
            log("duplicate", other, c.statement(), [f"same as {other}"], c)
            continue
        if op == "supersede":
            deps.store.supersede(other, memory, reason=f"contradicted by {c.session_id} "
                                 f"({', '.join(c.cites)}) in night {night_id}")
            deps.index.upsert(deps.store.get(other))
            ops.superseded.append(other)
            log("supersede", memory.id, memory.statement(), [f"supersedes {other}"], c)
        else:
            deps.store.add(memory)
            log("add", memory.id, memory.statement(), c=c)
        deps.index.upsert(memory)
        ops.added.append(memory.id)
        if c.revives:
            ops.revived[c.id] = memory.id
    return {"consolidation": ops}


def park(state: NightState, runtime: Runtime[NightDeps]) -> dict:
    """The subconscious: settle the thoughts revisit read, then park tonight's new ones.

    An earlier thought is *revived* (its revisit became a memory), *known* (its revisit
    was rejected as already known), *forgotten* (like a forget request of its user),
    *expired* (``expires_after`` nights seen without support) or *kept* (a night older,
    with tonight's reasons). Then every candidate of tonight rejected for a reason other
    than being already known, or vetoed by the persona, is parked, once per content and
    never if the user asked to forget it. Decisions come from the state alone and every
    write is keyed by a deterministic id (or guarded by ``last_night``), so a resumed
    night repeats none."""
    deps, night_id = runtime.context, state["night_id"]
    night, ops = deps.night, state["consolidation"]
    cands = sorted(state.get("candidates", {}).values(), key=lambda c: c.id)
    forget = state.get("forget", [])
    out = Subconscious()

    def log(op: str, p: ParkedThought, reasons: list[str], **fields) -> None:
        getattr(out, op).append(p.id)
        deps.diary.record(DiaryStep(step_id=f"park:{op}:{p.id}", night_id=night_id,
                                    agent="subconscious", verdict=op, raw_output=p.statement(),
                                    reasons=reasons, **fields))

    def known(c: Candidate) -> bool:  # the verifier's novelty test: nothing left to learn
        return c.status == "rejected" and c.scores.novelty < night.min_novelty

    revisits = {c.revives: c for c in cands if c.revives}
    for p in state.get("parked", []):
        c = revisits.get(p.id)
        fields = {"candidate_id": c.id, "session_id": c.session_id} if c else {}
        if hit := forget_hit(forget, p, deps):
            deps.store.remove_parked(p.id)
            log("forgotten", p, [f"the user asked to forget: {hit.text}"], **fields)
        elif c and c.status == "approved":
            deps.store.remove_parked(p.id)
            if memory_id(c.id) in ops.dropped:  # consolidate dropped it on a forget request
                log("forgotten", p, ["dropped at consolidation: the user asked to forget it"],
                    **fields)
            else:
                memory = ops.revived.get(c.id, memory_id(c.id))
                log("revived", p, [f"{revived_note(c)} into memory {memory}"],
                    memory_id=memory, **fields)
        elif c and known(c):
            deps.store.remove_parked(p.id)
            log("known", p, c.reasons, **fields)
        else:
            seen = p.nights_seen + 1
            reasons = c.reasons if c else p.reasons
            why = (f"revisited in night {night_id}: {c.status}" if c
                   else f"no new turn like it in night {night_id}")
            if seen >= p.expires_after:
                deps.store.remove_parked(p.id)
                log("expired", p, [f"unsupported for {seen} nights (parked in night "
                                   f"{p.night_id}); {why}", *reasons], **fields)
                continue
            stored = deps.store.get_parked(p.id)
            if stored is not None and stored.last_night != night_id:  # once per night
                deps.store.update_parked(stored.model_copy(update={
                    "nights_seen": seen, "last_night": night_id, "reasons": reasons}), why)
            log("kept", p, [f"{why}; nights seen {seen}/{p.expires_after}", *reasons], **fields)

    taken = {(p.user_id, p.kind, _norm(p.statement())) for p in state.get("parked", [])}
    taken |= {(c.user_id, c.kind, _norm(c.statement())) for c in cands if c.status == "approved"}
    for c in cands:
        if c.revives or c.status not in ("rejected", "vetoed") or known(c):
            continue
        key = (c.user_id, c.kind, _norm(c.statement()))
        if key in taken or forget_hit(forget, c, deps):
            continue
        taken.add(key)
        p = ParkedThought(id=parked_id(c.id), user_id=c.user_id, candidate_id=c.id, kind=c.kind,
                          question=c.question, answer=c.answer, phrasings=c.phrasings,
                          neighbours=c.neighbours, text=c.text, reasons=c.reasons,
                          night_id=night_id,
                          source_session=c.session_id, source_turns=c.cites,
                          last_night=night_id, expires_after=night.park_nights,
                          history=[{"at": now().isoformat(), "reason": f"{c.status} in night "
                                    f"{night_id} (round {c.round})"}])
        deps.store.add_parked(p)  # a no-op when a resumed night parks it again
        log("parked", p, c.reasons, candidate_id=c.id, session_id=c.session_id)
    return {"subconscious": out}


def handoff(state: NightState, runtime: Runtime[NightDeps]) -> dict:
    """Tonight's training set (:func:`reverie.training.dataset.curate`): tonight's memories
    and the user's edits no night has trained yet, the earlier ones due for replay, the
    identity items, and unlearning rows for deleted memories a model version had learned
    (the store's ``unlearning`` table); written to the one file the forge completes and
    trains on. Sessions are marked consumed."""
    deps, night_id = runtime.context, state["night_id"]
    user = state.get("user_id")
    added = set(state["consolidation"].added)
    tonight = [m for m in (deps.store.get(i) for i in sorted(added)) if m and not m.superseded_by]
    tonight += [m for m in claim_edits(deps.store, user, night_id) if m.id not in added]
    new = {m.id for m in tonight}
    # a night for one user replays and checks only that user's earlier memories
    earlier = [m for m in deps.store.list(user_id=user, status=["verified", "learned"])
               if m.id not in new]
    items = list(deps.identity.core) + [i for c in state.get("candidates", {}).values()
                                        if c.status == "approved" for i in c.identity_items]
    ts = curate(tonight, earlier, items, deps.forge, deps.frame,
                forgotten=deps.store.unlearning(user), answer=deps.unlearn_answer)
    path = ts.save(deps.training_dir / f"{night_id}.jsonl")
    deps.daylog.mark_consumed(state["sessions"], night_id)
    deps.diary.record(DiaryStep(step_id="handoff", night_id=night_id, agent="handoff",
                                verdict=f"{len(ts.rows)} training examples, "
                                        f"{len(ts.new_items)} held-out questions",
                                raw_output=str(path), parsed=ts.counts))
    return {"training_set": str(path)}


def learn(state: NightState, runtime: Runtime[NightDeps]) -> dict:
    """The forge: train on tonight's memories; promote the new version or roll back."""
    deps, night_id = runtime.context, state["night_id"]
    if deps.learner is None:
        return {"forge": {"skipped": "forge disabled"}}
    outcome = deps.learner(night_id, Path(state["training_set"]))
    for memory_id in outcome.learned:
        m = deps.store.get(memory_id)
        if m is not None and m.status != "learned":
            m.status, m.learned_in = "learned", outcome.version or ""
            deps.store.update(m, reason=f"answered closed-book after night {night_id}")
    for memory_id in getattr(outcome, "unlearned", []):  # its record is erased at last
        if deps.store.finish_unlearning(memory_id):
            deps.diary.record(DiaryStep(step_id=f"unlearned:{memory_id}", night_id=night_id,
                                        agent="forge", memory_id=memory_id, verdict="unlearned",
                                        reasons=[f"{outcome.version} no longer answers it"]))
    again = f"replayed in night {night_id}"
    for memory_id in outcome.replayed:
        m = deps.store.get(memory_id)
        # once a night: a resumed night may run this node a second time
        if m is not None and not any(h.get("reason") == again for h in m.history):
            m.replays += 1
            deps.store.update(m, reason=again)
    verdict = f"promoted {outcome.version}" if outcome.promoted else \
        ("nothing to learn" if not outcome.pre else f"rolled back to {outcome.parent}")
    deps.diary.record(DiaryStep(step_id="forge", night_id=night_id, agent="forge", verdict=verdict,
                                reasons=outcome.reasons, duration_s=outcome.seconds,
                                scores={f"{k} pre": v for k, v in outcome.pre.items()} |
                                       {f"{k} post": v for k, v in outcome.post.items()},
                                parsed={"counts": outcome.counts, "train": {
                                    k: v for k, v in outcome.train.items() if k != "losses"}}))
    result = {k: v for k, v in outcome.__dict__.items()}
    return {"forge": result}


# -- consolidation and hand-off helpers -------------------------------------------------

def memory_id(candidate_id: str) -> str:
    return "mem-" + hashlib.sha1(candidate_id.encode()).hexdigest()[:12]


def forget_hit(forget: list[ForgetRequest], record, deps: NightDeps) -> Optional[ForgetRequest]:
    """The forget request of ``record``'s user that means it, if any: one of its texts
    (note, question, answer, phrasings) carries the request's numbers or names, or is at
    least ``night.forget_similarity`` like it (:func:`reverie.memory.manage.asks_to_forget`)."""
    return next((r for r in forget if r.user_id == record.user_id and
                 asks_to_forget(r.target, record, deps.similarity,
                                deps.night.forget_similarity, r.values)), None)


def parked_id(candidate_id: str) -> str:
    """The parked thought's id for a candidate (deterministic: a resumed night parks once)."""
    return "park-" + hashlib.sha1(candidate_id.encode()).hexdigest()[:12]


def revived_note(c: Candidate) -> str:
    """``revived from parked thought <id> (parked in night <night>)`` for a revisited
    candidate (its first history entry is revisit's)."""
    origin = next((h for h in c.history if h.get("agent") == "subconscious"), {})
    return (f"revived from parked thought {c.revives} "
            f"(parked in night {origin.get('parked_in', '?')})")


def to_memory(c: Candidate) -> Memory:
    at = now().isoformat()
    history = [{"at": at, "reason": "verified", "status": "verified", "candidate": c.id}]
    if c.revives:
        history.append({"at": at, "reason": revived_note(c), "status": "verified",
                        "parked": c.revives})
    return Memory(id=memory_id(c.id), user_id=c.user_id, kind=c.kind, text=c.text,
                  question=c.question, answer=c.answer, phrasings=c.phrasings,
                  neighbours=c.neighbours, scores=c.scores,
                  status="verified", source_session=c.session_id, source_turns=c.cites,
                  night_id=c.night_id, history=history)


def older_than_edit(session: Optional[Session], memory: Optional[Memory]) -> bool:
    """Whether ``memory`` is the user's edit and ``session`` is no newer than it (its last
    time: the latest message time, else ``ended_at``, else ``started_at``; naive times read
    as UTC; a session without a time counts as older)."""
    if memory is None or not is_user_edit(memory):
        return False
    if session is None:
        return True
    times = [m.timestamp for m in session.messages] + [session.ended_at, session.started_at]
    times = [t if t.tzinfo else t.replace(tzinfo=timezone.utc) for t in times if t is not None]
    return not times or max(times) <= memory.created_at


def _norm(s: str) -> str:
    return " ".join(s.lower().replace(".", " ").split())


def _same(a: str, b: str) -> bool:
    return _norm(a) == _norm(b)


_VALUE = re.compile(r"(?<=\s)[A-Z][\w'-]*|\d[\d:/.,-]*")


def slot_and_values(note: str) -> tuple[str, set[str]]:
    """A note's slot and values: its names and numbers masked, and those names and
    numbers. ``"The user lives in Lisbon now."`` -> ``("The user lives in X now.",
    {"Lisbon"})``. Two notes with the same slot say the same thing of the same attribute;
    their values say whether they agree."""
    return _VALUE.sub("X", note), {v.rstrip(".,") for v in _VALUE.findall(note)}


def decide(memory: Memory, deps: NightDeps) -> tuple[str, str]:
    """``("add", "")``, ``("duplicate", id)`` or ``("supersede", id)`` against the user's
    current memories (thresholds in config ``night``).

    Two notes are about one attribute when their slots (:func:`slot_and_values`) are at
    least ``slot_similarity`` alike (measured with MiniLM: "The user lives in X." against
    "... in X now." 0.95, "The user's dog is called X." against "... is a two-year-old
    beagle." 0.60, sister against brother 0.85); then the same values are a duplicate and
    other values supersede (Porto, then Lisbon). Comparing the questions instead let "What
    kind of dog is my dog?" supersede "What is my dog's name?" (sample day, 2026-12-07).
    Notes with no name or number are duplicates when their statements are at least
    ``duplicate_similarity`` alike, and never supersede. A memory without a note (older
    memories, a user's edit) is compared by its question, as before notes."""
    night = deps.night
    for other_id, sim in deps.index.nearest(memory.statement(), memory.user_id, k=5):
        other = deps.store.get(other_id)
        if other is None or other.superseded_by or other.kind != memory.kind:
            continue
        if memory.text and other.text:
            (slot, values), (other_slot, other_values) = map(slot_and_values,
                                                             (memory.text, other.text))
            if not values and not other_values:
                if _same(memory.text, other.text) or sim >= night.duplicate_similarity:
                    return "duplicate", other_id
                continue
            if deps.similarity(slot, other_slot) >= night.slot_similarity:
                return ("duplicate" if values == other_values else "supersede"), other_id
            continue
        if memory.kind == "fact":
            same_question = deps.similarity(memory.question, other.question) >= night.supersede_similarity
            if same_question and (_same(memory.answer, other.answer) or sim >= night.duplicate_similarity):
                return "duplicate", other_id
            if same_question:
                return "supersede", other_id
        elif sim >= night.duplicate_similarity:
            return "duplicate", other_id
    return "add", ""


# -- the graph --------------------------------------------------------------------------

def build_graph() -> StateGraph:
    """The night's graph (uncompiled): compile it with a checkpointer to run."""
    g = StateGraph(NightState, context_schema=NightDeps)
    for node in (gather, revisit, route, read, triage, verify, reshape, dream, consult,
                 consolidate, park, handoff, learn):
        g.add_node(node)  # named after its function

    g.add_edge(START, "gather")
    g.add_edge("gather", "revisit")
    g.add_edge("revisit", "route")
    g.add_conditional_edges("route", fan_out_reads, ["read", "triage"])
    g.add_edge("read", "triage")
    g.add_conditional_edges("triage", next_work,
                            ["verify", "reshape", "dream", "consult", "consolidate"])
    for node in ("verify", "reshape", "dream", "consult"):
        g.add_edge(node, "triage")
    g.add_edge("consolidate", "park")
    g.add_edge("park", "handoff")
    g.add_edge("handoff", "learn")
    g.add_edge("learn", END)
    return g


def new_night_id() -> str:
    return datetime.now().strftime("%Y%m%d-%H%M%S")
