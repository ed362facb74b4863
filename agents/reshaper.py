"""The reshaper: rewrites a failed candidate from the verifier's reasons and the source."""

from __future__ import annotations

from reverie.runtime.structured import constrains_decoding, json_schema
from reverie.agents.common import AgentCall, call
from reverie.agents.dreamer import (DreamedMemory, answer_spans, cites_of, clean_phrasings,
                                    conform, context, narrow, note_text, user_turn_ids)
from reverie.agents.verifier import note
from reverie.memory.records import Candidate, Session, neutralise, transcript_of

VARIABLES = frozenset({"transcript", "kind", "memory", "reasons"})


def grammar(turn_ids: list[str], phrasings: int, spans: list[str] | None = None) -> dict:
    """DreamedMemory's schema with turn ids limited to the session's own (and, with
    ``spans``, answers limited to the user's words, as for the dreamer)."""
    return narrow(json_schema(DreamedMemory), turn_ids, phrasings, spans)


class Reshaper:
    """Args: model (the reshaper role's), prompt, night (``NightConfig``), attempts."""

    def __init__(self, model, prompt, night, attempts: int = 3):
        self.model, self.prompt, self.night, self.attempts = model, prompt, night, attempts

    async def reshape(self, candidate: Candidate, session: Session) -> tuple[Candidate, AgentCall]:
        """The rewritten candidate (``pending``, next round); if the model gives nothing
        usable, the candidate is ``rejected`` with that reason."""
        shown = context(session, candidate.cites, self.night.window_turns)
        spans = answer_spans(shown) if self.night.extractive_answers else None
        schema = grammar(user_turn_ids(shown), self.night.phrasings, spans)
        result = await call(self.model, self.prompt,
                            {"transcript": transcript_of(shown), "kind": candidate.kind,
                             "memory": neutralise(note(candidate)),
                             "reasons": neutralise("; ".join(candidate.reasons) or "none given")},
                            DreamedMemory, "reshaper", self.attempts, schema)
        new = result.parsed
        if new is not None and not constrains_decoding(self.model):  # the grammar's checks
            kept, result.checks = conform([new], schema, spans)
            new = kept[0] if kept else None
        history = candidate.history + [{"agent": "reshaper", "round": candidate.round,
                                        "before": candidate.content()}]
        usable = new is not None and ((new.question and new.answer) if new.kind == "fact"
                                      else (new.statement or new.answer))
        if not usable:
            return candidate.model_copy(update={
                "status": "rejected", "history": history,
                "reasons": candidate.reasons + ["the reshaper gave no usable rewrite"]}), result
        return candidate.model_copy(update={
            "kind": new.kind, "question": new.question.strip(), "answer": new.answer.strip(),
            "phrasings": clean_phrasings(new.question, new.phrasings),
            "text": note_text(new), "cites": cites_of(new, shown),
            "round": candidate.round + 1,
            "status": "pending", "reasons": [], "history": history}), result
