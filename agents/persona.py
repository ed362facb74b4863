"""The persona consultant: the student (day) model reviews passed memories against its
identity; it may annotate or veto (with a reason) and proposes identity reinforcement items.

A proposed identity item must be about the assistant: a question put to it ("you") that
neither speaks of the user nor repeats the memory's names or numbers. Measured
(``benchmarks/bench_injection.py``, 2026-12-07): SmolLM2-135M proposed "What city does the
user live in? Bergen" and "What is shellfish? Shrimp" while reviewing the user's memories;
as identity items they were trained with no memory behind them, so no user owned them and
``reverie memories forget`` could not unlearn them."""

from __future__ import annotations

import re

from pydantic import BaseModel, Field

from reverie.runtime.structured import json_schema
from reverie.agents.common import AgentCall, call
from reverie.agents.verifier import salient
from reverie.memory.identity import Identity
from reverie.memory.records import Candidate, IdentityItem, neutralise

_YOU = re.compile(r"\byou(?:r|rs|rself)?\b", re.I)
_USER = re.compile(r"\busers?\b", re.I)

VARIABLES = frozenset({"identity", "memory"})


class Review(BaseModel):
    keep: bool
    note: str = Field(max_length=200)
    reinforce: list[IdentityItem] = Field(default_factory=list, max_length=1)


def grammar() -> dict:
    schema = json_schema(Review)
    item = schema["$defs"]["IdentityItem"]
    item["properties"]["question"]["maxLength"] = 120
    item["properties"]["answer"]["maxLength"] = 200
    return schema


def not_identity(item: IdentityItem, candidate: Candidate) -> str:
    """Why ``item``, proposed while reviewing ``candidate``, is not about the assistant
    (``""`` when it is): it speaks of the user, its question is not put to the assistant,
    or it repeats a name or number of the memory (it restates the user's memory)."""
    text = f"{item.question} {item.answer}"
    if _USER.search(text):
        return f"identity item dropped, it speaks of the user: {item.question!r}"
    if not _YOU.search(item.question):
        return f"identity item dropped, not a question to the assistant: {item.question!r}"
    words = {w.lower() for w in re.findall(r"[\w'-]+", text)}
    shared = sorted(w for w in salient(candidate)[0] if w.lower() in words)
    if shared:
        return (f"identity item dropped, it repeats the memory ({', '.join(shared)}): "
                f"{item.question!r}")
    return ""


class PersonaConsultant:
    """Args: model (the persona role's: the student model itself), prompt, identity, attempts."""

    def __init__(self, model, prompt, identity: Identity, attempts: int = 3):
        self.model, self.prompt, self.identity, self.attempts = model, prompt, identity, attempts

    async def review(self, candidate: Candidate) -> tuple[Candidate, AgentCall]:
        """The candidate ``approved`` or ``vetoed`` with the consultant's note. A consultant
        that gives no valid review leaves the verified memory approved (noted as such)."""
        memory = (f"Q: {candidate.question} A: {candidate.answer}" if candidate.kind == "fact"
                  else candidate.text)
        result = await call(self.model, self.prompt,
                            {"identity": self.identity.text(), "memory": neutralise(memory)},
                            Review, "persona", self.attempts, grammar())
        review = result.parsed
        if review is None:
            review = Review(keep=True, note="no review (consultant gave no valid answer)")
        items = [i for i in review.reinforce if i.question.strip() and i.answer.strip()]
        checked = [(i, not_identity(i, candidate)) for i in items]
        result.checks += [why for _, why in checked if why]
        items = [i for i, why in checked if not why]
        status = "approved" if review.keep else "vetoed"
        return candidate.model_copy(update={
            "status": status, "persona_note": review.note, "identity_items": items,
            "reasons": candidate.reasons + ([f"vetoed by the persona consultant: {review.note}"]
                                            if not review.keep else []),
            "history": candidate.history + [{"agent": "persona", "status": status,
                                             "note": review.note}]}), result
