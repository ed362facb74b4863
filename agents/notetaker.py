"""The note-taker: reads each user turn, greedily, and writes down what it says about the user.

One call per user turn, with the turn or two before it as context (so "she" and "we"
resolve), answered in plain lines, one fact per line ("- The user's dog is called
Biscuit.") or "none". Reading is extraction: short, greedy and per turn. A prototype on an
invented day of 20 facts found 12 of them this way on Qwen2.5-Coder-0.5B and all 20 on the
1.5B, where one constrained JSON object per six-turn window at temperature 1.0 found 9
(issue 19). The model writes free text; structure (the memory's kind, the names and
numbers in it) is added afterwards by code, never forced onto the small model's first draft
("Let Me Speak Freely?", arXiv 2408.02442, measured the cost of format restrictions on
extraction). A note cites the turn it was written from; no turn id is left to the model.
"""

from __future__ import annotations

import re

from reverie.agents.common import AgentCall, call_text
from reverie.agents.verifier import stem, salient
from reverie.memory.records import Candidate, Message, Session, transcript_of

VARIABLES = frozenset({"context", "turn"})

# "- The user ...", "* The user ...", "1. The user ...", "The user ..."
_BULLET = re.compile(r"^\s*(?:[-*\u2022]|\d{1,2}[.)])?\s*")
_USER_START = re.compile(r"^(?:the\s+)?user(?:'s|s')?\b", re.I)
# "The rabbit Clementine is eight." (measured, Qwen2.5-Coder-0.5B): the user's rabbit, said
# without the user; "The user's" is put back in front.
_OTHERS_START = re.compile(
    r"^(?:the|my|our)\s+((?:sister|brother|mother|mum|mom|father|dad|parents|son|daughter|"
    r"kids?|children|child|baby|wife|husband|partner|boyfriend|girlfriend|fianc[eé]e?|friend|"
    r"neighbou?r|colleague|co-?worker|boss|manager|roommate|flatmate|cousin|aunt|uncle|"
    r"grandma|grandmother|grandpa|grandfather|niece|nephew|dog|cat|puppy|kitten|pet|horse|"
    r"bird|parrot|rabbit|hamster|fish|tortoise|turtle|snake|ferret)s?\b)", re.I)
# Lines that end the notes: the model going on to write another example's frame.
_FRAME = re.compile(r"^\s*(?:example\s+\d+|earlier\s*:|message\s*:|notes\s*:|<)", re.I)
# A turn's request or courtesy restated is no fact about the user ("The user asks for a
# leap-year function", "The user thanks the assistant"); a request about how to answer
# ("The user asks the assistant to keep answers short") is a rule and stays.
_NOT_A_FACT = re.compile(
    r"^The user(?:'s)? (?:thanks|greets|says (?:hi|hello|good\b|goodbye|bye)|"
    r"wants to know|would like to know|is asking|asks (?!the assistant to\b)|requests (?!that\b)"
    r"|question\b|message\b|request\b|(?:wants|asks|would like) to forget\b"
    r"|(?:wants|needs|asks for|would like|is looking for) (?:a |an |some |the )?(?:python |"
    r"quick |short |simple )?(?:function|script|code|program|recipe|summary|email|letter|poem|"
    r"story|tips?|advice|suggestions?|recommendations?|help|explanation|example|translation|"
    r"answer|list)\b)", re.I)

_RULE = re.compile(r"\b(?:the assistant|answers?|repl(?:y|ies)|responses?|respond|"
                   r"explanations?)\b", re.I)
_WANTS = re.compile(r"\b(?:wants?|asks?|prefers?|likes?|would like|needs?|expects?|"
                    r"do(?:es)?n't want|do(?:es)? not want)\b", re.I)
_PREFERENCE = re.compile(
    r"^The user (?:really |also |always |usually |often |)(?:likes|loves|enjoys|prefers|"
    r"hates|dislikes|adores|can't stand|cannot stand|does not like|doesn't like|is (?:a )?"
    r"(?:big |huge )?fan of|is (?:not )?(?:fond of|into))\b|^The user's favou?rite\b", re.I)


def parse_notes(text: str, most: int = 8) -> tuple[list[str], list[str]]:
    """The notes in a note-taker's answer and what was dropped, each with why.

    Args:
        text: the model's answer: lines "- The user ...", or "none".
        most: at most this many notes are kept (the first ones).

    Returns:
        ``(notes, dropped)``: each note one sentence starting "The user", ending in a full
        stop, at most 240 characters, distinct (case and spacing aside); ``dropped`` says
        which lines were left out and why. "none" (or no note line) gives ``[]``.
    """
    notes, dropped, seen = [], [], set()
    for line in text.splitlines():
        if _FRAME.match(line):
            break
        body = _BULLET.sub("", line, count=1).strip().strip('"').strip()
        if not body or body.lower().rstrip(".") in ("none", "nothing", "n/a"):
            continue
        body = _OTHERS_START.sub(r"The user's \1", body, count=1)
        if not _USER_START.match(body):
            dropped.append(f"not a note about the user: {body[:80]!r}")
            continue
        body = _USER_START.sub(lambda m: "The user's" if "'" in m.group() else "The user",
                               body, count=1)
        body = " ".join(body.split()).rstrip(" ,;:")
        if not body.endswith((".", "!", "?")):
            body += "."
        if len(body) > 240:
            dropped.append(f"too long ({len(body)} characters): {body[:80]!r}")
            continue
        if len(body.split()) < 4:
            dropped.append(f"says nothing: {body!r}")
            continue
        if _NOT_A_FACT.match(body):
            dropped.append(f"a request or courtesy, not a fact: {body!r}")
            continue
        key = body.lower().rstrip(".!?")
        if key in seen:
            continue
        seen.add(key)
        if len(notes) == most:
            dropped.append(f"more than {most} notes: {body[:80]!r}")
            continue
        notes.append(body)
    return notes, dropped


def note_kind(note: str) -> str:
    """``"rule"`` (how the assistant should answer), ``"preference"`` (a like, dislike or
    favourite of the user's own) or ``"fact"``; decided by code from the note's words."""
    if _RULE.search(note) and _WANTS.search(note):
        return "rule"
    if _PREFERENCE.search(note):
        return "preference"
    return "fact"


def restates_context(note: str, turn: Message, earlier: list[Message]) -> list[str]:
    """What of ``note`` its turn lacks but the turns before it hold: its names and numbers,
    or, when most of its words are missing from the turn, those words. The note restates
    the context ("The user's name is Maya." written again under the next turn by
    Qwen2.5-Coder-1.5B, "The user's dog is a two-year-old beagle." by the 0.5B, both on the
    sample day); ``[]`` when it does not."""
    here = turn.content.lower()
    before = "\n".join(m.content for m in earlier).lower()
    probe = Candidate(id="-", night_id="-", user_id="-", session_id="-", kind="fact", text=note)
    must, content = salient(probe)
    names = sorted(w for w in must if w.lower() not in here and w.lower() in before)
    if names:
        return names
    missing = sorted(w for w in content if w not in here and stem(w) not in here)
    if content and len(missing) > len(content) / 2 and all(w in before for w in missing):
        return missing
    return []


# A sentence restating what the user said before ("Earlier I said we live in Porto."), and a
# sentence opening a correction of the sentence before it ("Actually, we moved ...").
_RECALLED = re.compile(r"\b(?:earlier|before|yesterday|last time) I (?:said|told you|mentioned|wrote)"
                       r"|\bI (?:said|told you|mentioned|wrote) (?:earlier|before)\b", re.I)
_CORRECTS = re.compile(r"^\W*(?:actually|sorry|correction|no,|wait|scratch that|I was wrong|"
                       r"I meant|I misspoke)\b", re.I)
# a value named as the old one inside the correction ("moved from Porto to Lisbon")
_AS_OLD = r"\b(?:from|not|instead of|no longer|used to|formerly|previously|rather than)\s+(?:\w+\s+)?"


def corrected(note: str, turn: Message) -> list[str]:
    """The names and numbers of ``note`` that its turn gives only as what it corrects:
    found in a sentence that recalls an earlier statement ("Earlier I said we live in
    Porto.") or that the next sentence corrects ("Actually, ..."), and nowhere else in the
    turn except as the old value ("moved from Porto to Lisbon"). Measured on the sample
    day: "The user lives in Porto." written under the turn that moves the user to Lisbon.
    ``[]`` when the note states what the turn says now."""
    sentences = re.split(r"(?<=[.!?])\s+", turn.content.strip())
    old = {i for i, x in enumerate(sentences) if _RECALLED.search(x)}
    old |= {i - 1 for i, x in enumerate(sentences) if i and _CORRECTS.search(x)}
    if not old:
        return []
    probe = Candidate(id="-", night_id="-", user_id="-", session_id="-", kind="fact", text=note)
    values = sorted(salient(probe)[0])
    then = " ".join(sentences[i] for i in sorted(old)).lower()
    now = " ".join(x for i, x in enumerate(sentences) if i not in old)
    if not values or not all(v.lower() in then for v in values):
        return []

    def said_now(value: str) -> bool:
        return any(not re.search(_AS_OLD + "$", now[:m.start()], re.I)
                   for m in re.finditer(rf"\b{re.escape(value)}\b", now, re.I))

    return [] if any(map(said_now, values)) else values


def context_of(session: Session, turn_id: str, turns: int) -> list[Message]:
    """The ``turns`` messages before ``turn_id`` in ``session`` (fewer at its start)."""
    ids = [m.turn_id for m in session.messages]
    i = ids.index(turn_id)
    return session.messages[max(0, i - turns):i]


class NoteTaker:
    """Args: model (the notetaker role's: the sleep model, greedy), prompt (the
    ``notetaker`` template), night (``NightConfig``: ``note_context_turns``,
    ``max_notes``), attempts (tries on a model error)."""

    def __init__(self, model, prompt, night, attempts: int = 2):
        self.model, self.prompt, self.night, self.attempts = model, prompt, night, attempts

    async def read(self, session: Session, turn_id: str,
                   night_id: str) -> tuple[list[Candidate], AgentCall]:
        """Notes on user turn ``turn_id`` of ``session``, as ``pending`` candidates citing
        that turn, with ids ``<session>:<turn>:n<k>`` (deterministic, for resumable nights).

        Raises:
            KeyError: ``turn_id`` is not a turn of ``session``.
        """
        turn = session.turn(turn_id)
        if turn is None:
            raise KeyError(f"{session.session_id} has no turn {turn_id}")
        earlier = context_of(session, turn_id, self.night.note_context_turns)
        result = await call_text(
            self.model, self.prompt,
            {"context": transcript_of(earlier) if earlier else "(none)",
             "turn": transcript_of([turn])},
            "notetaker", self.attempts,
            parse=lambda text: parse_notes(text, self.night.max_notes))
        if result.parsed is None:
            return [], result
        notes, result.checks = result.parsed
        for text in list(notes):  # notes come from the turn itself; the context only resolves it
            if echoed := restates_context(text, turn, earlier):
                notes.remove(text)
                result.checks.append(f"restates the earlier turns ({', '.join(echoed)}): {text!r}")
            elif old := corrected(text, turn):
                notes.remove(text)
                result.checks.append(f"states what the turn corrects ({', '.join(old)}): {text!r}")
        result.parsed = notes
        out = [Candidate(id=f"{session.session_id}:{turn_id}:n{k}", night_id=night_id,
                         user_id=session.user_id, session_id=session.session_id,
                         kind=note_kind(text), text=text, cites=[turn_id],
                         history=[{"agent": "notetaker", "note": text}])
               for k, text in enumerate(notes)]
        return out, result
