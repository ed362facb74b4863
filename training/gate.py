"""The validation gate: closed-book checks before a new model version becomes active.

Closed book means no memories and no retrieval in the prompt, greedy decoding; the
question is framed the way the day chat frames it (:class:`reverie.prompts.ChatFrame`: the chat's
system prompt and template), so the gate measures the model the user talks to. Four
measures, each taken before and after a night's training:

- recall of tonight's facts on held-out phrasings (never trained on);
- recall of earlier nights' learned facts (the regression set: sequential edits erode
  earlier ones, SEAL reports 38.3 -> 18.9 after 8 more; Zweiger et al. 2025);
- a capability probe: general questions with checkable answers that the base model gets
  right through the chat path (``training/data/probe.jsonl``, shipped): its ``gate`` part
  decides, its ``dev`` part is for training decisions (checkpoint selection) only;
- held-out loss on general chat text (``training/data/general_chat.jsonl``).

A fifth, ``forgotten_recall``, is taken when the night unlearns facts the user asked to
forget: recall of their forgotten answers on held-out phrasings, which should fall to 0.
It does not block a promotion unless it rose (the active version knows the fact as well):
the forge keeps a fact waiting to be unlearned until a promoted version stops answering it.
"""

from __future__ import annotations

import json
import math
import re
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Sequence

from reverie.runtime import blas  # noqa: F401  (OpenBLAS before mlx)

import mlx.core as mx

from reverie.prompts import question_turns

DATA = Path(__file__).resolve().parent / "data"
_STOP = set("a an the of to in on at is are was were and or for with my your his her their "
            "it its be by as from that this".split())


def load_jsonl(path: Path) -> list[dict]:
    return [json.loads(line) for line in Path(path).read_text().splitlines() if line.strip()]


PROBE_SPLITS = ("gate", "dev")


def probe_items(split: str = "gate") -> list[tuple[str, list[str]]]:
    """The shipped capability probe's ``split`` part ("gate": what the gate decides on,
    nothing is tuned on it; "dev": for training decisions): (question, accepted answers).

    Raises:
        ValueError: an unknown split."""
    if split not in PROBE_SPLITS:
        raise ValueError(f"probe split must be one of {PROBE_SPLITS}, got {split!r}")
    return [(r["question"], r["answers"]) for r in load_jsonl(DATA / "probe.jsonl")
            if r["split"] == split]


def general_rows() -> list[dict]:
    """Shipped general chat examples for the held-out loss."""
    return load_jsonl(DATA / "general_chat.jsonl")


def matches(output: str, expected: str) -> bool:
    """Whole-word, case-insensitive: every content word of ``expected`` is in ``output``
    (``expected`` itself when it has none, e.g. "4")."""
    words = [w for w in re.findall(r"[\w'-]+", expected.lower()) if w not in _STOP] or \
        [expected.lower().strip()]
    text = output.lower()
    return all(re.search(rf"(?<![\w]){re.escape(w)}(?![\w])", text) for w in words if w)


def answer(model, tokenizer, questions: Sequence[str], max_tokens: int = 48,
           frame=None) -> list[str]:
    """Greedy closed-book answers (batched with mlx-lm's ``batch_generate``), each question
    framed by ``frame`` (a :class:`reverie.prompts.ChatFrame`; None: a bare user turn)."""
    from mlx_lm.generate import batch_generate

    prompts = [tokenizer.encode(tokenizer.apply_chat_template(
        question_turns(q, frame), add_generation_prompt=True, tokenize=False),
        add_special_tokens=False) for q in questions]
    if not prompts:
        return []
    return batch_generate(model, tokenizer, prompts, max_tokens=max_tokens).texts


def recall(model, tokenizer, items: Sequence[tuple[str, Sequence[str]]],
           frame=None) -> tuple[float, list[dict]]:
    """Share of ``(question, accepted answers)`` answered right, and the details per item.
    An empty set scores ``nan``."""
    outputs = answer(model, tokenizer, [q for q, _ in items], frame=frame)
    details = [{"question": q, "expected": list(a), "output": o,
                "correct": any(matches(o, x) for x in a)} for (q, a), o in zip(items, outputs)]
    score = sum(d["correct"] for d in details) / len(details) if details else float("nan")
    return score, details


def heldout_loss(model, tokenizer, rows: list[dict], batch_size: int = 8, frame=None) -> float:
    """Mean per-token loss (nats) on the assistant answers of chat rows (their user turn
    framed by ``frame`` when given)."""
    from reverie.training.lora import encode_examples, masked_loss

    examples = encode_examples(tokenizer, frame.reframe(rows) if frame is not None else rows)
    total, count = 0.0, 0
    for i in range(0, len(examples), batch_size):
        chunk = examples[i:i + batch_size]
        width = max(len(ids) for ids, _ in chunk)
        batch = mx.array([ids + [0] * (width - len(ids)) for ids, _ in chunk])
        lengths = mx.array([[off, len(ids)] for ids, off in chunk])
        loss, ntoks = masked_loss(model, batch, lengths)
        total += loss.item() * ntoks.item()
        count += ntoks.item()
    return total / max(count, 1)


@dataclass
class GateReport:
    """Closed-book figures for one model: recalls in [0, 1] (nan when the set is empty),
    ``capability`` as a count of gate-probe questions right (of ``capability_total``),
    loss in nats per token; ``forgotten_recall`` the share of forgotten facts still
    answered (nan when none is being unlearned)."""

    new_recall: float
    regression_recall: float
    capability: int
    capability_total: int
    heldout_loss: float
    details: dict = field(default_factory=dict)
    forgotten_recall: float = float("nan")

    def figures(self) -> dict:
        return {k: v for k, v in asdict(self).items() if k != "details"}


def evaluate(model, tokenizer, new_items, regression_items, probe, general,
             frame=None, forgotten_items=()) -> GateReport:
    """The measures for one model (see the module's docstring).

    Args:
        new_items, regression_items, probe, forgotten_items: ``(question, accepted
            answers)`` lists (``forgotten_items``: the answers that should be gone).
        general: chat rows for the held-out loss.
        frame: the chat's :class:`reverie.prompts.ChatFrame` every question is asked in (None: a
            bare user turn, the chat template's own default system prompt).
    """
    new, new_d = recall(model, tokenizer, new_items, frame)
    old, old_d = recall(model, tokenizer, regression_items, frame)
    cap, cap_d = recall(model, tokenizer, probe, frame)
    gone, gone_d = recall(model, tokenizer, forgotten_items, frame)
    loss = heldout_loss(model, tokenizer, general, frame=frame)
    return GateReport(new, old, round(cap * len(probe)) if probe else 0, len(probe), loss,
                      {"new": new_d, "regression": old_d, "probe": cap_d, "forgotten": gone_d},
                      forgotten_recall=gone)


def allowed_loss(share: float, total: int) -> int:
    """Questions of a ``total``-question probe that may be lost when ``share`` may be
    (rounded down: 3% of 99 is 2; the epsilon keeps 0.03 * 100 at 3 despite floating point)."""
    return math.floor(share * total + 1e-9)


def decide(pre: GateReport, post: GateReport, cfg) -> tuple[bool, list[str]]:
    """Promote or not, with the reasons. ``cfg`` has ``max_capability_loss`` (share of the
    gate probe that may be lost, :func:`allowed_loss`: 0.03 of 99 questions allows 2), ``min_regression_keep``
    (share of the pre recall kept), ``max_loss_increase`` (nats) and ``min_new_recall``
    (share). Forgotten facts' recall may not rise (it should fall to 0)."""
    reasons = []
    allowed = allowed_loss(cfg.max_capability_loss, post.capability_total)
    if pre.capability - post.capability > allowed:
        reasons.append(f"capability probe fell {pre.capability} -> {post.capability} of "
                       f"{post.capability_total} (at most {allowed} allowed: "
                       f"{cfg.max_capability_loss:.0%})")
    if pre.regression_recall == pre.regression_recall and pre.regression_recall > 0 and \
            post.regression_recall < cfg.min_regression_keep * pre.regression_recall:
        reasons.append(f"earlier facts' recall fell {pre.regression_recall:.2f} -> "
                       f"{post.regression_recall:.2f} (keep at least {cfg.min_regression_keep:.0%})")
    if not math.isfinite(post.heldout_loss):
        reasons.append(f"held-out loss is {post.heldout_loss} after training (diverged)")
    elif post.heldout_loss - pre.heldout_loss > cfg.max_loss_increase:
        reasons.append(f"held-out loss rose {pre.heldout_loss:.3f} -> {post.heldout_loss:.3f} "
                       f"(at most +{cfg.max_loss_increase})")
    if pre.forgotten_recall == pre.forgotten_recall and \
            post.forgotten_recall > pre.forgotten_recall:
        reasons.append(f"facts the user asked to forget are recalled more: "
                       f"{pre.forgotten_recall:.2f} -> {post.forgotten_recall:.2f}")
    if post.new_recall == post.new_recall and post.new_recall < cfg.min_new_recall:
        reasons.append(f"tonight's facts recalled {post.new_recall:.2f} on held-out phrasings "
                       f"(at least {cfg.min_new_recall} needed)")
    return not reasons, reasons
