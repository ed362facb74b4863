"""The persona consultant: the student (day) model reviews passed memories against its
identity; it may annotate or veto (with a reason) and proposes identity reinforcement items."""

from __future__ import annotations

from pydantic import BaseModel, Field

from reverie.runtime.structured import json_schema
from reverie.agents.common import AgentCall, call
from reverie.memory.identity import Identity
from reverie.memory.records import Candidate, IdentityItem, neutralise

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
        status = "approved" if review.keep else "vetoed"
        return candidate.model_copy(update={
            "status": status, "persona_note": review.note, "identity_items": items,
            "reasons": candidate.reasons + ([f"vetoed by the persona consultant: {review.note}"]
                                            if not review.keep else []),
            "history": candidate.history + [{"agent": "persona", "status": status,
                                             "note": review.note}]}), result
