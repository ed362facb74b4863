"""Records that cross a boundary (files, stores, agents, the diary), as pydantic models."""

from __future__ import annotations

import hashlib
import html
import json
import re
import uuid
from datetime import datetime, timezone
from typing import Annotated, Literal, Optional

from pydantic import AfterValidator, BaseModel, ConfigDict, Field


def now() -> datetime:
    return datetime.now(timezone.utc)


def new_id(prefix: str) -> str:
    return f"{prefix}-{uuid.uuid4().hex[:10]}"


_SURROGATE = re.compile("[\ud800-\udfff]")


def check_text(value: str) -> str:
    """``value`` if it is valid Unicode, else ``ValueError`` naming the first lone surrogate
    and its position (``lone surrogate \\ud800 at character 5 (not valid Unicode)``).

    Python strings can hold lone surrogates (a JSON ``"\\ud800"`` escape, a file name or
    argument that is not UTF-8); UTF-8 cannot, so such text would fail later, when a day
    file, the diary or the memory store writes it."""
    bad = _SURROGATE.search(value)
    if bad:
        raise ValueError(f"lone surrogate \\u{ord(bad.group()):04x} at character {bad.start()} "
                         "(not valid Unicode)")
    return value


# Text that crosses a boundary: a str that UTF-8 can write (see check_text).
Text = Annotated[str, AfterValidator(check_text)]


class Message(BaseModel):
    """One turn of a conversation. ``turn_id`` is unique within its session (``t1``,
    ``t2``, ... or the source's own id, e.g. LoCoMo's ``D1:3``)."""

    model_config = ConfigDict(extra="forbid")

    turn_id: Text
    role: Literal["user", "assistant", "system"]
    content: Text
    timestamp: Optional[datetime] = None


class Session(BaseModel):
    """A conversation session as stored in the day log (one JSON line).

    ``content_hash`` identifies the conversation's content (user, roles, texts), so a session
    imported twice, or already consumed by a night, is recognised whatever its id."""

    model_config = ConfigDict(extra="forbid")

    session_id: Text
    user_id: str
    started_at: Optional[datetime] = None
    ended_at: Optional[datetime] = None
    source: Text = ""
    messages: list[Message] = Field(min_length=1)

    @property
    def content_hash(self) -> str:
        payload = json.dumps([self.user_id, [(m.role, m.content) for m in self.messages]],
                             ensure_ascii=False)
        return hashlib.sha256(payload.encode()).hexdigest()[:32]

    def turn(self, turn_id: str) -> Optional[Message]:
        return next((m for m in self.messages if m.turn_id == turn_id), None)

    def transcript(self, turn_ids: Optional[list[str]] = None) -> str:
        """The turns fenced for a prompt (:func:`transcript_of`): all, or the ones given."""
        keep = set(turn_ids) if turn_ids else None
        return transcript_of([m for m in self.messages if keep is None or m.turn_id in keep])


TRANSCRIPT_OPEN, TRANSCRIPT_CLOSE = "<transcript>", "</transcript>"
TURN_CLOSE = "</turn>"

# What day text could use to break out of a prompt's fence or to become a control token
# once the prompt is tokenized: a "<" opening a tag ("</transcript>", "<turn ...>",
# SmolLM2's "<filename>") or a control token ("<|im_start|>", DeepSeek's fullwidth bars),
# and a bracketed control token ("[INST]", "[/INST]", Mistral's "[TOOL_CALLS]").
_OPENS_TAG = re.compile(r"<(?=[/|!?A-Za-z_\uff5c])")
_BRACKET_TOKEN = re.compile(r"\[(?=/?[A-Z][A-Z_]*\])")


def neutralise(text: str) -> str:
    """Day text (or text derived from it) made inert for an agent prompt: each ``<`` that
    opens a tag or a control token becomes ``&lt;`` and each ``[`` of an ``[INST]``-style
    token ``&#91;``, so the text can neither close :func:`transcript_of`'s fence nor forge
    a turn, and a tokenizer cannot read ``<|im_start|>`` in it as its special token (HF
    tokenizers match added tokens anywhere in the text they encode). Everything else is
    kept as written; ``"x < 3"`` and ``"<3"`` are left alone."""
    return _BRACKET_TOKEN.sub("&#91;", _OPENS_TAG.sub("&lt;", text))


def _attribute(value: str) -> str:
    return html.escape(" ".join(value.split()), quote=True)


def transcript_of(messages: list[Message]) -> str:
    """The turns for an agent prompt, fenced so that nothing the day says can leave the
    fence::

        <transcript>
        <turn id="t1" role="user">
        I adopted a beagle.
        </turn>
        ...
        </transcript>

    Reverie writes every tag and each turn's id and role; the contents go through
    :func:`neutralise`, so the day's text holds no tag of its own. The prompt files say
    what the tags mean."""
    turns = [f'<turn id="{_attribute(m.turn_id)}" role="{m.role}">\n{neutralise(m.content)}\n'
             f"{TURN_CLOSE}" for m in messages]
    return "\n".join([TRANSCRIPT_OPEN, *turns, TRANSCRIPT_CLOSE])


def statement_of(record) -> str:
    """One line for prompts, embeddings and the diary: the note-taker's sentence about the
    user when there is one, else a fact's question and answer, else the answer."""
    if record.text:
        return record.text
    if record.kind == "fact" and record.question:
        return f"{record.question} {record.answer}".strip()
    return record.answer


MemoryKind = Literal["fact", "preference", "rule", "forget"]
MemoryStatus = Literal["candidate", "verified", "rejected", "learned"]


class Scores(BaseModel):
    """The verifier's scores, each in [0, 1]."""

    grounding: float = 0.0
    novelty: float = 0.0
    importance: float = 0.0
    utility: float = 0.0


class MemoryContent(BaseModel):
    """What a memory says, whatever stage it is at (candidate, memory, parked thought): the
    note-taker's ``text`` ("The user's dog is called Biscuit."), then the dreamer's
    ``question`` in the user's voice, the ``answer`` said to the user ("Your dog is called
    Biscuit."), more ``phrasings`` of the question, and ``neighbours``: general questions
    near the fact that are not about the user (the forge keeps their answers as they were).
    A memory from before notes (or a user's edit) may have a question and answer alone."""

    kind: MemoryKind
    question: Text = ""
    answer: Text = ""
    phrasings: list[Text] = Field(default_factory=list)
    text: Text = ""
    neighbours: list[Text] = Field(default_factory=list)

    def statement(self) -> str:
        """One line for prompts, embeddings and the diary."""
        return statement_of(self)


class Memory(MemoryContent):
    """A memory in the long-term store.

    Facts are Q&A (``question``, ``answer``) with several ``phrasings`` of the question;
    preferences and rules are a ``text`` statement. ``superseded_by`` links an outdated
    memory to the one that replaced it (the old one is kept); ``history`` records every
    change with its time and reason. ``learned_in`` names the model version whose gate first
    answered the memory closed-book (status ``learned``); ``night_id`` is the night it came
    from (for a user's edit: empty until the night that first trains it)."""

    model_config = ConfigDict(extra="forbid")

    id: str = Field(default_factory=lambda: new_id("mem"))
    user_id: str
    scores: Scores = Field(default_factory=Scores)
    status: MemoryStatus = "candidate"
    parsed: bool = True
    created_at: datetime = Field(default_factory=now)
    updated_at: datetime = Field(default_factory=now)
    source_session: str = ""
    source_turns: list[str] = Field(default_factory=list)
    associated: list[str] = Field(default_factory=list)
    superseded_by: Optional[str] = None
    night_id: str = ""
    replays: int = 0
    learned_in: str = ""
    history: list[dict] = Field(default_factory=list)


CandidateStatus = Literal["pending", "failed", "passed", "dreamt", "rejected", "approved",
                          "vetoed"]


class IdentityItem(BaseModel):
    """A Q&A pair about the assistant itself (the "old core" mixed into training)."""

    question: str
    answer: str


class Candidate(MemoryContent):
    """A candidate memory moving through the night: a note on one user turn, then its dream.

    ``status``: ``pending`` (the note, to verify) -> ``passed`` | ``failed`` (to reshape,
    while ``round`` < the configured rounds) | ``rejected``; a passed note is dreamed on and
    its dream checked: ``dreamt`` (or ``rejected``: no question left); then the persona
    consultant makes a dreamt one ``approved`` or ``vetoed``. ``history`` keeps every version and verdict.
    ``revives`` is the id of the :class:`ParkedThought` a revisited candidate came from."""

    id: str
    night_id: str
    user_id: str
    session_id: str
    kind: Literal["fact", "preference", "rule"]
    cites: list[str] = Field(default_factory=list)
    round: int = 0
    status: CandidateStatus = "pending"
    reasons: list[str] = Field(default_factory=list)
    scores: Scores = Field(default_factory=Scores)
    persona_note: str = ""
    identity_items: list[IdentityItem] = Field(default_factory=list)
    revives: str = ""
    history: list[dict] = Field(default_factory=list)

    def content(self) -> dict:
        """The memory's content alone (what the reshaper rewrites)."""
        return {"kind": self.kind, "statement": self.text, "question": self.question,
                "answer": self.answer, "phrasings": self.phrasings,
                "neighbours": self.neighbours, "turns": self.cites}


class ForgetRequest(BaseModel):
    """A user's explicit request to forget something, found in a user turn; ``values``: what
    it names by kind in the user's other turns (an amount for "the salary")."""

    user_id: str
    session_id: str
    turn_id: str
    text: str
    target: str
    values: list[str] = Field(default_factory=list)


class ParkedThought(MemoryContent):
    """A candidate a night could not keep yet, carried to later nights ("the subconscious").

    Parked when the verifier rejected it (for want of evidence or grounding, not because it
    was already known) or the persona consultant vetoed it. Each later night with new
    sessions of its user re-verifies it against the most similar new turns; it becomes a
    memory when it passes, and is dropped once ``nights_seen`` reaches ``expires_after``.
    ``id`` is derived from ``candidate_id``, so a resumed night parks it once; ``night_id``
    is the night it was parked in, ``last_night`` the last night that counted it (a resumed
    night counts it once); ``history`` records every change with its time and reason."""

    model_config = ConfigDict(extra="forbid")

    id: str
    user_id: str
    candidate_id: str
    kind: Literal["fact", "preference", "rule"]
    reasons: list[str] = Field(default_factory=list)
    night_id: str
    source_session: str = ""
    source_turns: list[str] = Field(default_factory=list)
    nights_seen: int = 0
    last_night: str = ""
    expires_after: int = Field(3, ge=1)
    created_at: datetime = Field(default_factory=now)
    updated_at: datetime = Field(default_factory=now)
    history: list[dict] = Field(default_factory=list)
