"""The dreamer: proposes candidate memories from a window of a session, at high temperature.

Facts come as Q&A with several phrasings of the question (a fact seen in one phrasing is
memorised but not extractable: Allen-Zhu & Li, "Physics of Language Models 3.1", 2023),
preferences and rules as one statement; every candidate cites the turn ids it came from.
Cited turn ids are constrained to the window's own ids by the grammar, and with
``night.extractive_answers`` a fact's answer must be words the user actually wrote (a
135M model otherwise invents answers or copies the prompt's example; measured on the
shipped sample day).
"""

from __future__ import annotations

import copy
import re
from typing import Literal

from pydantic import BaseModel, Field

from reverie.runtime.structured import constrains_decoding, json_schema, violations
from reverie.agents.common import AgentCall, call
from reverie.memory.records import Candidate, Message, Session, transcript_of

VARIABLES = frozenset({"user_id", "date", "transcript", "max_candidates", "phrasings"})


class DreamedMemory(BaseModel):
    """One proposed memory, in the order a careful note-taker writes it: what was said (one
    sentence about the user), where, then, for a fact, the question it answers, the answer
    and other ways to ask. The field order is the generation order: asked for the turn ids
    first, Qwen2.5-Coder-0.5B cited the window's first ids whatever it then wrote (LoCoMo
    conv-30 session 1)."""

    kind: Literal["fact", "preference", "rule"]
    statement: str = Field("", max_length=240)
    turns: list[str] = Field(min_length=1, max_length=4)
    question: str = Field("", max_length=160)
    answer: str = Field("", max_length=200)
    phrasings: list[str] = Field(default_factory=list, max_length=8)


class Dream(BaseModel):
    memories: list[DreamedMemory] = Field(default_factory=list, max_length=16)


_SPAN_WORD = re.compile(r"[\w'$€£%@.:/-]+")


def answer_spans(messages: list[Message], max_words: int = 6, limit: int = 600) -> list[str]:
    """Every run of 1 to ``max_words`` words of the user's turns (trailing punctuation
    stripped), at most ``limit``: the only answers an extractive dreamer may write."""
    spans: dict[str, None] = {}
    for m in messages:
        if m.role != "user":
            continue
        words = [w.strip(".,:;!?'\"") for w in _SPAN_WORD.findall(m.content)]
        words = [w for w in words if w]
        for n in range(1, max_words + 1):
            for i in range(len(words) - n + 1):
                spans.setdefault(" ".join(words[i:i + n]), None)
    return list(spans)[:limit]


# A note is about the user in the third person: without this the sleep model copied the
# user's first-person turn verbatim into the note (LoCoMo conv-30 session 1). Questions are
# only shaped as questions: a pattern demanding "the user" inside them made it glue words
# together to satisfy the pattern (sample day).
STATEMENT_PATTERN = r"^The user('s)? [^\"\\\n]{3,220}$"
QUESTION_PATTERN = r"^([A-Z][^\"\\\n?]{5,150}\?)?$"  # empty: not a fact


def narrow(item: dict, turn_ids: list[str], phrasings: int, spans: list[str] | None) -> dict:
    """Constrain one DreamedMemory's JSON schema in place: cited ids among ``turn_ids`` (at
    most two), a third-person statement, a question about the user, at most ``phrasings``
    rephrasings, and with ``spans`` a fact's answer copied from the user's words."""
    props = item["properties"]
    props["turns"]["items"] = {"enum": list(turn_ids)}
    props["turns"]["maxItems"] = 2
    props["statement"]["pattern"] = STATEMENT_PATTERN
    props["question"]["pattern"] = QUESTION_PATTERN
    props["phrasings"]["maxItems"] = phrasings
    props["phrasings"]["items"] = {"type": "string", "maxLength": 160,
                                   "pattern": QUESTION_PATTERN.replace(")?$", ")$")}
    if spans:
        props["answer"] = {"enum": [""] + list(spans)}
    return item


def grammar(turn_ids: list[str], max_candidates: int, phrasings: int,
            spans: list[str] | None = None) -> dict:
    """Dream's JSON schema narrowed for one window: turn ids as an enum (the user's turns:
    a memory is about what the user said), list lengths capped, and with ``spans``, a
    fact's answer must be one of them (copied from the user's words)."""
    schema = json_schema(Dream)
    narrow(schema["$defs"]["DreamedMemory"], turn_ids, phrasings, spans)
    schema["properties"]["memories"]["maxItems"] = max_candidates
    return schema


def _words(text: str) -> str:
    return " ".join(w for w in (w.strip(".,:;!?'\"") for w in _SPAN_WORD.findall(text)) if w)


def conform(drafts: list[DreamedMemory], item: dict,
            spans: list[str] | None) -> tuple[list[DreamedMemory], list[str]]:
    """For a model that was not grammar-bound: the drafts that meet ``item`` (one memory's
    narrowed JSON schema, as :func:`narrow` makes it), with a fact's answer first snapped to
    the user's words it spells (case and punctuation aside: "lisbon." -> "Lisbon"), and one
    note per draft changed or dropped, saying why. Lists longer than the schema allows
    (cited turns, phrasings) are cut to length."""
    by_words = {_words(s).lower(): s for s in spans or []}
    # a fact may come without its statement (the question and answer carry it)
    item = copy.deepcopy(item)
    item["properties"]["statement"]["pattern"] = f"^$|{STATEMENT_PATTERN}"
    # lists past the grammar's length are cut, not dropped: the first items are the best
    limits = {k: item["properties"][k].get("maxItems") for k in ("turns", "phrasings")}
    kept, notes = [], []
    for n, m in enumerate(drafts):
        m = m.model_copy(update={k: getattr(m, k)[:v] for k, v in limits.items() if v})
        if spans and m.answer and m.answer not in spans:
            snapped = by_words.get(_words(m.answer).lower())
            if snapped:
                notes.append(f"memory {n}: answer {m.answer!r} -> the user's words {snapped!r}")
                m = m.model_copy(update={"answer": snapped})
        problems = violations(item, m.model_dump(mode="json"))
        if problems:
            notes.append(f"memory {n} dropped: " + "; ".join(problems))
            continue
        kept.append(m)
    return kept, notes


def windows(session: Session, size: int) -> list[list[Message]]:
    """The session's turns in windows of ``size`` (the last window may be shorter)."""
    return [session.messages[i:i + size] for i in range(0, len(session.messages), size)]


def context(session: Session, cites: list[str], size: int) -> list[Message]:
    """The windows of ``session`` (as :func:`windows` cuts them) that hold a cited turn,
    joined: what the verifier and reshaper read. Candidates of one window share it, so
    their prompts share a head the engine prefills once. No real cite: the whole session."""
    parts = [w for w in windows(session, size) if any(m.turn_id in cites for m in w)]
    return [m for w in parts for m in w] or list(session.messages)


def user_turn_ids(messages: list[Message]) -> list[str]:
    """Ids of the user's turns (all ids when the user has none)."""
    return [m.turn_id for m in messages if m.role == "user"] or [m.turn_id for m in messages]


def clean_phrasings(question: str, phrasings: list[str]) -> list[str]:
    """Distinct rephrasings that are questions (end with "?") and differ from the question."""
    return [p for p in dict.fromkeys(p.strip() for p in phrasings)
            if p.endswith("?") and p.lower() != question.strip().lower()]


_WORDS = re.compile(r"[a-z0-9][a-z0-9'-]+")
_COMMON = frozenset("""the user user's and but for with that this have has had was were are is
not you your they them their she her his him its it's i'm i've from about into what when where
which who how why will would can could just really very also some more said says""".split())


def _content(text: str) -> set[str]:
    return {w.removesuffix("'s") for w in _WORDS.findall(text.lower()) if w not in _COMMON}


def attribute(text: str, cites: list[str], window: list[Message], most: int = 2) -> list[str]:
    """The user turns of ``window`` that state ``text``: the model's ``cites`` when one of
    them shares the most content words with it, else the turns that do (at most
    ``most``). A small model writes a good note and then cites the window's first ids
    (measured on the sample day and LoCoMo conv-30 session 1); lexical overlap finds the
    turn the note's words came from."""
    words = _content(text)
    turns = [m for m in window if m.role == "user"]
    if not words or not turns:
        return cites
    overlap = {m.turn_id: len(words & _content(m.content)) for m in turns}
    best = max(overlap.values())
    if best == 0 or any(overlap.get(c, 0) == best for c in cites):
        return cites
    ranked = sorted(turns, key=lambda m: -overlap[m.turn_id])
    return [m.turn_id for m in ranked[:most] if overlap[m.turn_id] >= max(1, best // 2)]


def note_text(m: DreamedMemory) -> str:
    """A draft's text: the statement (a preference or rule without one: its answer)."""
    return (m.statement if m.kind == "fact" else m.statement or m.answer).strip()


def cites_of(m: DreamedMemory, window: list[Message]) -> list[str]:
    """A draft's cited turns, checked against its words (:func:`attribute`)."""
    return attribute(f"{m.statement} {m.answer}", list(dict.fromkeys(m.turns)), window)


def to_candidates(dream: Dream, session: Session, night_id: str, prefix: str,
                  window: list[Message] | None = None) -> list[Candidate]:
    """Candidates from a dream; ids are ``<prefix>:<n>`` (deterministic, for resumable nights).
    Drafts with no content (a fact without question or answer, a statement-less rule) and
    repeats of an earlier draft's statement are dropped."""
    out, seen = [], set()
    for n, m in enumerate(dream.memories):
        key = " ".join((m.statement or m.question).lower().split())
        if key in seen:
            continue
        seen.add(key)
        if m.kind == "fact" and not (m.question.strip() and m.answer.strip()):
            continue
        if m.kind != "fact" and not (m.statement.strip() or m.answer.strip()):
            continue
        phrasings = clean_phrasings(m.question, m.phrasings)
        out.append(Candidate(id=f"{prefix}:{n}", night_id=night_id, user_id=session.user_id,
                             session_id=session.session_id, kind=m.kind,
                             question=m.question.strip(), answer=m.answer.strip(),
                             phrasings=phrasings, text=note_text(m),
                             cites=cites_of(m, window) if window else list(dict.fromkeys(m.turns))))
    return out


class Dreamer:
    """Args: model (any chat model; the dreamer role's, high temperature), prompt (the
    ``dreamer`` prompt template), night (``NightConfig``), attempts (structured tries)."""

    def __init__(self, model, prompt, night, attempts: int = 3):
        self.model, self.prompt, self.night, self.attempts = model, prompt, night, attempts

    async def dream(self, session: Session, window: list[Message], night_id: str,
                    prefix: str) -> tuple[list[Candidate], AgentCall]:
        ids = user_turn_ids(window)
        variables = {"user_id": session.user_id,
                     "date": f"{session.started_at:%Y-%m-%d}" if session.started_at else "unknown date",
                     "transcript": transcript_of(window),
                     "max_candidates": self.night.max_candidates, "phrasings": self.night.phrasings}
        spans = answer_spans(window) if self.night.extractive_answers else None
        if spans == []:  # no user words in this window: nothing to remember
            spans = None
        schema = grammar(ids, self.night.max_candidates, self.night.phrasings, spans)
        result = await call(self.model, self.prompt, variables, Dream, "dreamer", self.attempts,
                            schema)
        if result.parsed is None:
            return [], result
        dream = result.parsed
        known = set(ids)
        for m in dream.memories:  # other models are not grammar-bound: keep real ids only,
            # else the user turns that share the draft's words
            m.turns = ([t for t in m.turns if t in known]
                       or attribute(f"{m.statement} {m.question} {m.answer}", [], window)
                       or m.turns)[:2]
        if not constrains_decoding(self.model):  # the grammar's checks, after the call
            kept, result.checks = conform(dream.memories[:self.night.max_candidates],
                                          schema["$defs"]["DreamedMemory"], spans)
            dream = dream.model_copy(update={"memories": kept})
        return to_candidates(dream, session, night_id, prefix, window), result
