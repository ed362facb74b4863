"""The night's training set: facts under several phrasings, identity, replay, rehearsal.

One builder, two stages, one file (``<data_dir>/training/<night>.jsonl``): the night's
hand-off node writes what it curated (:func:`curate`), the forge completes it with the
model's own rehearsal answers (:func:`complete`), writes it back and trains on exactly
what the file then holds; held-out, dev and regression questions are in the file, marked
and never trained on.

- Facts: each under its question and phrasings (the dreamer's, then templated rewordings up
  to ``forge.phrasings``); one of the dreamer's phrasings is held out for validation and
  never trained on. Several phrasings are needed for a fact to be extractable, not just
  memorised (Allen-Zhu & Li, Physics of Language Models 3.1, 2023).
- Identity: the identity file's core Q&A and the persona consultant's items, repeated to
  ``forge.identity_share`` of the set (the "old core" that keeps the persona).
- Replay: earlier nights' memories, by priority ``(2 if not learned else 1) / (1 + replays)``:
  unlearned facts come back sooner, and each replay halves, thirds... the next chance.
- Rehearsal: the current model's own answers to shipped general prompts, ``rehearsal_ratio``
  per fact example (FINDINGS: without it the probe fell 25/25 -> 2/25; with 1:1, 20/25),
  and at least ``rehearsal_min`` rows (see :func:`rehearsal_count`).
- Unlearning: facts the user asked to forget that a promoted version had learned (the
  store's ``unlearning`` table), each under its training phrasings with the shipped
  answer of ``prompts/unlearn.yaml`` ("I don't know that about you.", the user's copy in
  ``prompts.dir`` first); their held-out question is the gate's ``forgotten`` check
  (recall should fall to 0). Preferences and rules get no unlearning rows: their one
  question ("What should you remember about me?") is shared with every other one.
"""

from __future__ import annotations

import json
import random
from dataclasses import dataclass, field, replace
from pathlib import Path

import yaml

from reverie.files import atomic_write_jsonl
from reverie.memory.records import IdentityItem, Memory
from reverie.prompts import PromptError, locate, question_turns

TEMPLATES = ["Quick question: {q}", "{q} Answer briefly.", "Do you remember? {q}",
             "Tell me again: {q}", "I forgot, {q_lower}", "Remind me, {q_lower}"]
# Held out when the dreamer wrote no rephrasing: never among the training templates.
HELD_OUT_TEMPLATE = "Can you tell me this: {q_lower}"


# A dev check for checkpoint selection when the dreamer left no spare phrasing: never
# trained on, never the gate's held-out question.
DEV_TEMPLATE = "One more thing: {q_lower}"


@dataclass
class Phrasings:
    """One fact's questions: ``train`` (trained on), ``held_out`` (the gate's, never trained
    on or tuned on), ``dev`` (checkpoint selection, never trained on)."""

    train: list[str]
    held_out: str
    dev: str


def split_phrasings(memory: Memory, n: int) -> Phrasings:
    """The fact's own questions (its question, then the dreamer's phrasings) give the
    held-out question (the last one besides the question, else a held-out template: a
    weaker test, the wording around the question changes, the question not), then the dev
    question (the next to last, else :data:`DEV_TEMPLATE`); the rest, topped up with
    templated rewordings of the question, are trained, ``n`` at most."""
    own = list(dict.fromkeys([memory.question, *memory.phrasings]))
    q = memory.question
    low = q[:1].lower() + q[1:]
    held_out = own.pop() if len(own) > 1 else HELD_OUT_TEMPLATE.format(q=q, q_lower=low)
    dev = own.pop() if len(own) > 1 else DEV_TEMPLATE.format(q=q, q_lower=low)
    train = list(own)
    for t in TEMPLATES:
        if len(train) >= n:
            break
        train.append(t.format(q=q, q_lower=low))
    return Phrasings(train[:max(n, 1)], held_out, dev)


def phrasings_for(memory: Memory, n: int) -> tuple[list[str], str]:
    """``(training questions, held-out question)`` of :func:`split_phrasings`."""
    p = split_phrasings(memory, n)
    return p.train, p.held_out


def chat_row(question: str, answer: str, kind: str, memory_id: str = "", frame=None) -> dict:
    """A training row ``{"messages": [..., assistant], "kind"[, "memory_id"]}``: the
    question as :func:`reverie.prompts.question_turns` puts it (in ``frame``, or a bare user turn),
    then ``answer``."""
    extra = {"kind": kind} | ({"memory_id": memory_id} if memory_id else {})
    return {"messages": question_turns(question, frame) + [{"role": "assistant", "content": answer}],
            **extra}


def memory_rows(memory: Memory, n: int, frame=None) -> tuple[list[dict], str | None]:
    """Training rows of one memory and its held-out question (facts only). ``frame``: the
    chat's :class:`reverie.prompts.ChatFrame` the questions are asked in (None: a bare user turn)."""
    if memory.kind == "fact":
        train, held = phrasings_for(memory, n)
        rows = [chat_row(q, memory.answer, "fact", memory.id, frame) for q in train]
        if frame is not None:  # the in-context teacher's prompt (LoraArgs.context_weight)
            for row, q in zip(rows, train):
                row["teacher"] = frame.messages(q, remembered=[memory.statement()])
        return rows, held
    return [chat_row("What should you remember about me?", memory.text, memory.kind, memory.id,
                 frame)], None


def unlearn_answer(override_dir: Path | None = None) -> str:
    """The answer unlearning rows teach for a forgotten fact's questions: ``answer`` of
    ``unlearn.yaml`` (the user's copy in ``override_dir``, config ``prompts.dir``, first).

    Raises:
        PromptError: the file is not YAML or has no non-empty ``answer`` string (names it).
    """
    source = locate("unlearn", override_dir)
    try:
        data = yaml.safe_load(source.path.read_text(encoding="utf-8"))
    except yaml.YAMLError as exc:
        raise PromptError(f"{source.path}: not valid YAML: {exc}") from exc
    answer = data.get("answer") if isinstance(data, dict) else None
    if not isinstance(answer, str) or not answer.strip():
        raise PromptError(f"{source.path}: needs a non-empty 'answer' string")
    return answer.strip()


def unlearn_rows(memory: Memory, n: int, answer: str, frame=None
                 ) -> tuple[list[dict], tuple[str, list[str]] | None]:
    """Rows that teach ``answer`` (e.g. "I don't know that about you.") for a forgotten
    fact's training phrasings, kind ``"unlearn"``, and its held-out question with the
    forgotten answer (the gate's ``forgotten`` item: answering it right means it is still
    known). Not a fact: ``([], None)``."""
    if memory.kind != "fact":
        return [], None
    p = split_phrasings(memory, n)
    return ([chat_row(q, answer, "unlearn", memory.id, frame) for q in p.train],
            (p.held_out, [memory.answer]))


def replay_priority(memory: Memory) -> float:
    return (1.0 if memory.status == "learned" else 2.0) / (1 + memory.replays)


def choose_replay(earlier: list[Memory], k: int) -> list[Memory]:
    """The ``k`` earlier memories most due for replay (ties: oldest first)."""
    return sorted(earlier, key=lambda m: (-replay_priority(m), m.created_at))[:k]


def rehearsal_count(n_fact_rows: int, cfg) -> int:
    """Rehearsal rows for a night with ``n_fact_rows`` fact examples:
    ``max(round(rehearsal_ratio * n_fact_rows), rehearsal_min)``, 0 when the ratio is 0.
    The floor matters on small nights: with 2 facts (10 rows) the minimum iterations would
    otherwise repeat the same dozen rows many times (measured on the sample day: the loss
    fell to 0.16 in 25 steps and the probe from 25 to 13)."""
    if cfg.rehearsal_ratio <= 0:
        return 0
    return max(round(cfg.rehearsal_ratio * n_fact_rows), cfg.rehearsal_min)


SPLITS = ("train", "heldout", "dev", "regression", "forgotten")


@dataclass
class TrainingSet:
    """One night's training set, as the hand-off file holds it.

    Attributes:
        rows: chat rows ``{"messages", "kind"[, "memory_id", "teacher", "replay",
            "written"]}``, in training order once complete.
        new_items: ``(held-out question, [answer])`` of tonight's facts: the gate's recall
            test, never trained on; ``new_ids`` are their memory ids, in the same order.
        dev_items: ``(dev question, [answer])`` of the same facts, for checkpoint selection.
        regression_items: ``(question, [answer])`` of earlier learned facts.
        forgotten_items: ``(held-out question, [forgotten answer])`` of the facts being
            unlearned (right answers mean still known); ``forgotten_ids`` their memory ids.
        replayed: ids of the earlier memories replayed tonight.
        stage: ``"handoff"`` (curated by the night: facts, replay, identity once each) or
            ``"forge"`` (completed: rehearsal added, identity repeated, shuffled: exactly
            what was trained).
        counts: rows per part (facts, replay, rehearsal, identity, unlearn, held_out,
            regression, forgotten).
    """

    rows: list[dict]
    new_items: list[tuple[str, list[str]]]
    regression_items: list[tuple[str, list[str]]]
    dev_items: list[tuple[str, list[str]]] = field(default_factory=list)
    replayed: list[str] = field(default_factory=list)
    counts: dict = field(default_factory=dict)
    new_ids: list[str] = field(default_factory=list)
    stage: str = "handoff"
    forgotten_items: list[tuple[str, list[str]]] = field(default_factory=list)
    forgotten_ids: list[str] = field(default_factory=list)

    def lines(self) -> list[dict]:
        """The file's lines: a ``"meta"`` line (stage, counts, replayed), then every row
        with ``"split": "train"``, then the held-out, dev, regression and forgotten
        questions, each ``{"split", "question", "answers"[, "memory_id"]}``: never trained
        on."""
        out = [{"split": "meta", "stage": self.stage, "counts": self.counts,
                "replayed": self.replayed}]
        out += [{"split": "train", **r} for r in self.rows]
        for split, items, ids in (("heldout", self.new_items, self.new_ids),
                                  ("dev", self.dev_items, self.new_ids),
                                  ("regression", self.regression_items, []),
                                  ("forgotten", self.forgotten_items, self.forgotten_ids)):
            for n, (question, answers) in enumerate(items):
                extra = {"memory_id": ids[n]} if n < len(ids) else {}
                out.append({"split": split, "question": question, "answers": answers, **extra})
        return out

    def save(self, path: Path) -> Path:
        """Write the set to ``path`` (JSON Lines, atomically); returns ``path``."""
        atomic_write_jsonl(Path(path), self.lines())
        return Path(path)

    @classmethod
    def load(cls, path: Path) -> "TrainingSet":
        """Read a set written by :meth:`save`.

        Raises:
            ValueError: a line is not JSON or has no known ``split``; names file and line.
        """
        ts = cls([], [], [])
        items = {"heldout": ts.new_items, "dev": ts.dev_items, "regression": ts.regression_items,
                 "forgotten": ts.forgotten_items}
        ids = {"heldout": ts.new_ids, "forgotten": ts.forgotten_ids}
        # newlines only: splitlines would also split at U+2028, U+2029 and NEL, which
        # atomic_write_jsonl writes raw inside strings
        for number, text in enumerate(Path(path).read_text(encoding="utf-8").split("\n"), 1):
            if not text.strip():
                continue
            try:
                line = json.loads(text)
                split = line.pop("split")
            except (ValueError, KeyError, AttributeError) as exc:
                raise ValueError(f"{path}:{number}: not a training-set line ({exc})") from exc
            if split == "meta":
                ts.stage, ts.counts = line.get("stage", "handoff"), line.get("counts", {})
                ts.replayed = list(line.get("replayed", []))
            elif split == "train":
                ts.rows.append(line)
            elif split in items:
                try:
                    items[split].append((line["question"], list(line["answers"])))
                except (KeyError, TypeError) as exc:
                    raise ValueError(f"{path}:{number}: a {split} line needs question and "
                                     f"answers ({exc!r} missing or wrong)") from exc
                if split in ids and "memory_id" in line:
                    ids[split].append(line["memory_id"])
            else:
                raise ValueError(f"{path}:{number}: unknown split {split!r} "
                                 f"(known: meta, {', '.join(SPLITS)})")
        return ts

    def without(self, memory_ids) -> "TrainingSet":
        """This set less everything of ``memory_ids`` (memories deleted since it was
        written): their fact and replay rows, held-out and dev questions, replay ids.
        Unlearning rows and forgotten items stay (they are about deleted memories).
        ``counts`` are recounted for facts, replay and held_out."""
        gone = set(memory_ids)
        rows = [r for r in self.rows
                if r.get("kind") == "unlearn" or r.get("memory_id") not in gone]
        # new_items, dev_items and new_ids are parallel (an item past new_ids has no id)
        keep = [i for i in range(len(self.new_items))
                if i >= len(self.new_ids) or self.new_ids[i] not in gone]
        new_items = [self.new_items[i] for i in keep]
        dev_items = [self.dev_items[i] for i in keep if i < len(self.dev_items)]
        counts = dict(self.counts)
        if self.stage == "handoff":
            counts["facts"] = sum(r["kind"] not in ("identity", "unlearn") and not r.get("replay")
                                  for r in rows)
            counts["replay"] = sum(bool(r.get("replay")) for r in rows)
        counts["held_out"] = len(new_items)
        return replace(self, rows=rows, new_items=new_items, dev_items=dev_items,
                       new_ids=[self.new_ids[i] for i in keep if i < len(self.new_ids)],
                       replayed=[m for m in self.replayed if m not in gone], counts=counts)


def curate(tonight: list[Memory], earlier: list[Memory], identity: list[IdentityItem], cfg,
           frame=None, forgotten: list[Memory] = (), answer: str | None = None) -> TrainingSet:
    """What the night hands the forge (stage ``"handoff"``): tonight's memories under their
    training phrasings (held-out and dev questions apart), the earlier memories most due
    for replay, each identity item once (duplicates dropped), and unlearning rows for the
    ``forgotten`` memories (:func:`unlearn_rows`, teaching ``answer``, default
    :func:`unlearn_answer`). A forgotten memory is never trained, replayed or checked for
    recall, even if it is passed in ``tonight`` or ``earlier`` too. ``cfg`` is the
    ``forge`` config; ``frame`` the chat's :class:`reverie.prompts.ChatFrame` every question
    is put in, so the model learns in the prompt it is asked in.

    Raises:
        PromptError: ``answer`` is None, there are forgotten facts, and ``unlearn.yaml`` is
            bad (:func:`unlearn_answer`).
    """
    gone = {m.id for m in forgotten}
    tonight = [m for m in tonight if m.id not in gone]
    earlier = [m for m in earlier if m.id not in gone]
    unlearn, forgotten_items, forgotten_ids = [], [], []
    if any(m.kind == "fact" for m in forgotten):
        answer = unlearn_answer() if answer is None else answer
    for m in forgotten:
        rows, item = unlearn_rows(m, cfg.phrasings, answer, frame)
        unlearn += rows
        if item:
            forgotten_items.append(item)
            forgotten_ids.append(m.id)
    fact_rows, new_items, dev_items, new_ids = [], [], [], []
    for m in tonight:
        rows, held = memory_rows(m, cfg.phrasings, frame)
        fact_rows += rows
        if held:
            new_items.append((held, [m.answer]))
            dev_items.append((split_phrasings(m, cfg.phrasings).dev, [m.answer]))
            new_ids.append(m.id)
    replayed = choose_replay(earlier, cfg.replay_max)
    replay_rows = [{**r, "replay": True} for m in replayed
                   for r in memory_rows(m, cfg.phrasings, frame)[0]]
    regression = [(m.question, [m.answer]) for m in earlier
                  if m.kind == "fact" and m.status == "learned"]
    unique = {(i.question, i.answer): i for i in identity}.values()
    core = [chat_row(i.question, i.answer, "identity", frame=frame) for i in unique]
    return TrainingSet(fact_rows + unlearn + replay_rows + core, new_items, regression,
                       dev_items, [m.id for m in replayed],
                       {"facts": len(fact_rows), "replay": len(replay_rows), "rehearsal": 0,
                        "identity": len(core), "unlearn": len(unlearn),
                        "held_out": len(new_items), "regression": len(regression),
                        "forgotten": len(forgotten_items)}, new_ids,
                       forgotten_items=forgotten_items, forgotten_ids=forgotten_ids)


def complete(curated: TrainingSet, rehearsal: list[dict], cfg, seed: int = 0) -> TrainingSet:
    """The set the forge trains on (stage ``"forge"``): ``curated``'s rows, the first
    :func:`rehearsal_count` of the ``rehearsal`` rows (the model's own chat answers, already
    framed), identity rows repeated to ``cfg.identity_share`` of the whole, shuffled with
    ``seed``.

    Raises:
        ValueError: ``curated`` is already complete (its identity rows would be repeated
            twice).
    """
    if curated.stage != "handoff":
        raise ValueError(f"the training set is already complete (stage {curated.stage!r})")
    core = [r for r in curated.rows if r["kind"] == "identity"]
    replay_rows = [r for r in curated.rows if r.get("replay")]
    fact_rows = [r for r in curated.rows if r["kind"] != "identity" and not r.get("replay")]
    rehearsal_rows = rehearsal[:min(len(rehearsal), rehearsal_count(len(fact_rows), cfg))]
    body = len(fact_rows) + len(replay_rows) + len(rehearsal_rows)
    n_identity = round(cfg.identity_share * body / (1 - cfg.identity_share)) if core else 0
    identity_rows = [core[i % len(core)] for i in range(n_identity)]
    rows = fact_rows + replay_rows + rehearsal_rows + identity_rows
    random.Random(seed).shuffle(rows)
    counts = {**curated.counts, "rehearsal": len(rehearsal_rows), "identity": len(identity_rows)}
    return replace(curated, rows=rows, counts=counts, stage="forge")


def build(tonight: list[Memory], earlier: list[Memory], identity: list[IdentityItem],
          rehearsal: list[dict], cfg, seed: int = 0, frame=None) -> TrainingSet:
    """:func:`curate` then :func:`complete`, in one call."""
    return complete(curate(tonight, earlier, identity, cfg, frame), rehearsal, cfg, seed)
