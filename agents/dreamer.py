"""The dreamer: dreams on one verified note, at high temperature, in several bursts.

For a note ("The user's dog is called Biscuit.") it writes, in the user's own voice, the
questions and requests that the note answers ("What's my dog called?", "Remind me of my
dog's name."), and a few **neighbour questions**: general questions near the fact that are
not about the user ("What breed of dog is Snoopy?"). The phrasings teach the student to
find the fact however it is asked (a fact seen in one phrasing is memorised but not
extractable: Allen-Zhu & Li, "Physics of Language Models 3.1", 2023); the neighbour
questions are the locality set of model editing (ROME/MEMIT's neighbourhood prompts), which
the forge uses to keep the model's general answers where they were.

The answer is not sampled: it is the note itself turned to the second person by
:func:`second_person` ("Your dog is called Biscuit."), so it says whose fact it is and
cannot drift from what the verifier checked. The model answers in plain lines ("Q: ...",
"S: ...", "N: ..."); the verifier then checks every line against the note
(:meth:`reverie.agents.verifier.Verifier.check_dream`).
"""

from __future__ import annotations

import asyncio
import re

from reverie.agents.common import AgentCall, call_text
from reverie.memory.records import Candidate, neutralise

VARIABLES = frozenset({"note", "kind"})

_LINE = re.compile(r"^\s*(?:[-*\u2022]\s*)?(?:\d{1,2}[.)]\s*)?(Q|S|N)\s*[:.)-]\s*(.+?)\s*$", re.I)


def parse_dream(text: str) -> dict[str, list[str]]:
    """A dream's lines by tag: ``{"Q": questions, "S": requests, "N": neighbours}`` in the
    order written, each stripped of quotes; lines without a tag are ignored.

    ``"Q: What's my dog called?\\nN: Who owned Snoopy?"`` ->
    ``{"Q": ["What's my dog called?"], "S": [], "N": ["Who owned Snoopy?"]}``."""
    out: dict[str, list[str]] = {"Q": [], "S": [], "N": []}
    for line in text.splitlines():
        m = _LINE.match(line)
        if m:
            body = m.group(2).strip().strip('"\u201c\u201d').strip()
            if body:
                out[m.group(1).upper()].append(body)
    return out


# Words that may stand between "The user" and its verb ("The user often plays ...").
_ADVERBS = frozenset("""also always usually often sometimes never really recently just still
currently now already rarely mostly only once""".split())
_IRREGULAR = {"is": "are", "was": "were", "has": "have", "does": "do", "doesn't": "don't",
              "isn't": "aren't", "wasn't": "weren't", "hasn't": "haven't"}


def _base_verb(word: str) -> str:
    """A third-person verb in its base form: ``"lives"`` -> ``"live"``, ``"studies"`` ->
    ``"study"``, ``"watches"`` -> ``"watch"``; a word that is not one (``"moved"``) as is."""
    low = word.lower()
    if low in _IRREGULAR:
        return _IRREGULAR[low]
    if len(low) > 3 and low.endswith("ies"):
        return word[:-3] + "y"
    if low.endswith(("sses", "shes", "ches", "xes", "zes", "oes")):
        return word[:-2]
    if low.endswith("s") and not low.endswith(("ss", "us", "is")) and len(low) > 2:
        return word[:-1]
    return word


def second_person(note: str) -> str:
    """A note about the user said to the user: ``"The user's dog is called Biscuit."`` ->
    ``"Your dog is called Biscuit."``, ``"The user lives in Lisbon."`` -> ``"You live in
    Lisbon."``, ``"The user wants the assistant to keep answers short."`` -> ``"You want me
    to keep answers short."``. Text that does not start with "The user" keeps its words,
    with any later "the user" said to the user."""
    words = note.strip().split()
    if len(words) >= 2 and words[0].lower() == "the" and words[1].lower() in ("user's", "users'"):
        words = ["Your"] + words[2:]
    elif len(words) >= 2 and words[0].lower() == "the" and words[1].lower() == "user":
        rest, i = words[2:], 0
        while i < len(rest) and rest[i].lower() in _ADVERBS:
            i += 1
        if i < len(rest):
            rest[i] = _base_verb(rest[i])
        words = ["You"] + rest
    text = " ".join(words)
    text = re.sub(r"\bthe user's\b", "your", text, flags=re.I)
    text = re.sub(r"\bthe user\b", "you", text, flags=re.I)
    text = re.sub(r"\bthe assistant's\b", "my", text, flags=re.I)
    text = re.sub(r"\bthe assistant\b", "me", text, flags=re.I)
    text = re.sub(r"\bthemsel(?:f|ves)\b", "yourself", text, flags=re.I)
    return text[:1].upper() + text[1:]


class Dreamer:
    """Args: model (the dreamer role's: high temperature), prompt (the ``dreamer``
    template), night (``NightConfig``: ``dream_bursts``), attempts (tries on a model
    error)."""

    def __init__(self, model, prompt, night, attempts: int = 2):
        self.model, self.prompt, self.night, self.attempts = model, prompt, night, attempts

    async def dream(self, candidate: Candidate) -> tuple[Candidate, list[AgentCall]]:
        """``night.dream_bursts`` dreams on the candidate's note, side by side (they batch on
        a local model). Returns the candidate with every line the bursts wrote, unchecked
        and deduplicated (``question`` the first question, ``phrasings`` the other questions
        and requests, ``neighbours`` the neighbour questions), its ``answer`` the note in
        the second person; and each burst's call for the diary."""
        note = candidate.text or candidate.statement()  # a memory from before notes: Q and A
        variables = {"note": neutralise(note), "kind": candidate.kind}
        calls = await asyncio.gather(*(
            call_text(self.model, self.prompt, variables, "dreamer", self.attempts,
                      parse=parse_dream) for _ in range(self.night.dream_bursts)))
        questions: dict[str, str] = {}
        neighbours: dict[str, str] = {}
        for c in calls:
            for line in (c.parsed or {}).get("Q", []) + (c.parsed or {}).get("S", []):
                questions.setdefault(_key(line), line)
            for line in (c.parsed or {}).get("N", []):
                neighbours.setdefault(_key(line), line)
        lines = list(questions.values())
        answer = second_person(candidate.text) if candidate.text else candidate.answer
        dreamt = candidate.model_copy(update={
            "question": lines[0] if lines else "", "phrasings": lines[1:],
            "neighbours": list(neighbours.values()), "answer": answer})
        return dreamt, list(calls)


def _key(line: str) -> str:
    """Two lines are the same phrasing when their words are (case and punctuation aside)."""
    return " ".join(re.findall(r"[a-z0-9']+", line.lower()))
