"""The router (deterministic): sends verbatim material to the fact store and finds the
user's explicit requests to forget. LoRA learns the how; retrieval keeps the what."""

from __future__ import annotations

import re

from reverie.memory.facts import FactChunk, chunk_verbatim, is_verbatim
from reverie.memory.records import ForgetRequest, Session

# "forget my old number", "please forget about X", "can you forget that I ..."
_FORGET = re.compile(r"\bforget\b\s+(?:about\s+|that\s+)?(?P<target>[^.!?\n]{3,})", re.IGNORECASE)
_NOT = re.compile(r"\b(?:don'?t|do not|never|won'?t|not)\s+(?:\w+\s+){0,2}forget\b", re.IGNORECASE)


def forget_requests(session: Session) -> list[ForgetRequest]:
    """The user's turns that ask to forget something ("don't forget ..." does not count)."""
    out = []
    for m in session.messages:
        if m.role != "user" or _NOT.search(m.content):
            continue
        match = _FORGET.search(m.content)
        if match:
            out.append(ForgetRequest(user_id=session.user_id, session_id=session.session_id,
                                     turn_id=m.turn_id, text=m.content,
                                     target=match.group("target").strip()))
    return out


# A request naming a kind of value ("forget the salary I mentioned") means the values of that
# kind the user gave ("They pay me £52,000", measured on an invented day: the note carried
# the amount and never the word "salary").
_KINDS = (
    (re.compile(r"\b(?:salary|pay|paid|income|wages?|earn\w*|money)\b", re.I),
     re.compile(r"[£$€]\s?\d[\d,.]*\d|\b\d[\d,.]*\d\s?(?:pounds|dollars|euros)\b", re.I)),
    (re.compile(r"\b(?:phone|mobile|cell|number)\b", re.I),
     re.compile(r"\+?\d[\d\s().-]{5,}\d")),
)


def values_meant(request: ForgetRequest, sessions: list[Session]) -> list[str]:
    """The values a forget request names by their kind (an amount for "the salary", a
    number for "my phone number"), found in its user's turns of ``sessions`` other than the
    request itself; ``[]`` when it names no such kind."""
    kinds = [values for words, values in _KINDS if words.search(request.target)]
    found: dict[str, None] = {}
    for session in sessions:
        if session.user_id != request.user_id:
            continue
        for m in session.messages:
            if m.role == "user" and m.content != request.text:
                for values in kinds:
                    found.update(dict.fromkeys(v.strip() for v in values.findall(m.content)))
    return list(found)


def verbatim_chunks(session: Session, long_chars: int = 600) -> list[FactChunk]:
    """Chunks of every turn that holds verbatim material (code, URLs, JSON, long pastes,
    numbers-heavy text), with session, turn, user and time."""
    chunks = []
    for m in session.messages:
        kinds = is_verbatim(m.content, long_chars=long_chars)
        if not kinds:
            continue
        for i, text in enumerate(chunk_verbatim(m.content)):
            chunks.append(FactChunk(id=f"{session.user_id}:{session.session_id}:{m.turn_id}:{i}",
                                    user_id=session.user_id, session_id=session.session_id,
                                    turn_id=m.turn_id, time=m.timestamp or session.started_at,
                                    kinds=kinds, text=text))
    return chunks
