"""The reshaper: rewrites a note that failed verification, from the verifier's reasons and
the turns it was written from, in the note-taker's plain form ("- The user ..." or "none")."""

from __future__ import annotations

from reverie.agents.common import AgentCall, call_text
from reverie.agents.notetaker import note_kind, parse_notes
from reverie.agents.verifier import evidence
from reverie.memory.records import Candidate, Session, neutralise, transcript_of

VARIABLES = frozenset({"transcript", "note", "reasons"})


class Reshaper:
    """Args: model (the reshaper role's), prompt, night (``NightConfig``:
    ``note_context_turns``), attempts (tries on a model error)."""

    def __init__(self, model, prompt, night, attempts: int = 2):
        self.model, self.prompt, self.night, self.attempts = model, prompt, night, attempts

    async def reshape(self, candidate: Candidate, session: Session) -> tuple[Candidate, AgentCall]:
        """The rewritten note (``pending``, next round, its kind decided again from its
        words); when the model gives no note ("none", or nothing usable) the candidate is
        ``rejected`` with that reason. The cited turns stay: a note is about its turn."""
        shown = evidence(session, candidate.cites, self.night.note_context_turns)
        result = await call_text(
            self.model, self.prompt,
            {"transcript": transcript_of(shown), "note": neutralise(candidate.statement()),
             "reasons": neutralise("; ".join(candidate.reasons) or "none given")},
            "reshaper", self.attempts, parse=lambda text: parse_notes(text, 1))
        notes, result.checks = result.parsed if result.parsed is not None else ([], [])
        result.parsed = notes
        history = candidate.history + [{"agent": "reshaper", "round": candidate.round,
                                        "before": candidate.content()}]
        if not notes:
            return candidate.model_copy(update={
                "status": "rejected", "history": history,
                "reasons": candidate.reasons + ["the reshaper gave no usable rewrite"]}), result
        return candidate.model_copy(update={
            "kind": note_kind(notes[0]), "text": notes[0], "question": "", "answer": "",
            "phrasings": [], "neighbours": [], "round": candidate.round + 1,
            "status": "pending", "reasons": [], "history": history}), result
