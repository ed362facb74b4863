"""The capability evaluation harness (wake/evaluate.py) and its shipped items, with fakes."""

from __future__ import annotations

import asyncio
import json
from collections import Counter
from typing import Any

import pytest
from langchain_core.language_models.chat_models import BaseChatModel
from langchain_core.messages import AIMessage, HumanMessage
from langchain_core.outputs import ChatGeneration, ChatResult

from reverie.memory.records import Memory
from reverie.memory.store import MemoryStore
from reverie.training.dataset import phrasings_for
from reverie.wake.evaluate import (CATEGORIES, CategoryScore, Choice, Contains, EvalDataError,
                           EvalItem, EvalReport, Exact, JsonList, Lowercase, MaxWords, Number,
                           Regex, StartsWith, arun_eval, compare, first_number, load_items,
                           load_report, memory_items, run_eval, save_report, score)

from conftest import REPO


class DictChat(BaseChatModel):
    """Answers each prompt from a dict (``default`` for unknown ones) and records what it
    was sent."""

    answers: dict[str, str]
    default: str = "I don't know."
    seen: list = []

    @property
    def _llm_type(self) -> str:
        return "dict-chat"

    def _generate(self, messages, stop=None, run_manager=None, **kwargs: Any) -> ChatResult:
        self.seen.append(messages)
        text = self.answers.get(messages[-1].content, self.default)
        return ChatResult(generations=[ChatGeneration(message=AIMessage(content=text))])


# ------------------------------------------------------------------------ checks


@pytest.mark.parametrize("check, right, wrong", [
    (Contains(answers=["Jane Austen", "Austen"]), "It was written by Austen.", "Dickens wrote it."),
    (Contains(answers=["cat"]), "A CAT.", "A category."),  # whole words only
    (Number(value=12), "The answer is 12.", "The answer is 13, not 12."),  # the first number
    (Number(value=1000), "That is 1,000 metres.", "That is 100 metres."),
    (Number(value=-3.5), "It is -3.5 degrees.", "It is 3.5 degrees."),
    (Number(value=7), "Seven.", "Eleven."),
    (Number(value=24), "twenty-four eggs", "twenty eggs"),
    (Number(value=0), "zero", "no number here"),
    (Number(value=12, skip=[7, 5]), "7 + 5 = 12", "7 + 5 = 13"),  # the question's numbers
    (Number(value=12), "12 = 7 + 5", "7 + 5 = 12"),  # ... count unless skipped
    (Exact(answers=["yes"]), ' "Yes." \n', "Yes, of course."),
    (Exact(answers=["tac"]), "**tac**", "cat"),
    (Regex(pattern=r"\b2024-01-01\b"), "It is 2024-01-01.", "It is 01/01/2024."),
    (Regex(pattern=r"^[\s*]*(?-i:HELLO)[\s.!]*$"), "HELLO!", "Hello!"),  # case-sensitive part
    (JsonList(length=3), 'Here:\n```json\n["apple", "pear", "plum"]\n```', '["apple", "pear"]'),
    (JsonList(length=2), 'Sure [see below]: ["red", "blue"]', "red, blue"),
    (JsonList(length=2), '["a]b", "c"]', '["a", 2]'),  # brackets in strings; items are strings
    (JsonList(length=3, contains=["Monday", "tuesday"]), '["monday", "Tuesday", "Wednesday"]',
     '["Monday", "Wednesday", "Friday"]'),
    (MaxWords(n=3), "Short and sweet", "This one is too long"),
    (MaxWords(n=1), "Cow.", ""),  # empty is never right
    (MaxWords(n=5, answers=["sit"]), "For people to sit.", "For resting on it."),
    (Lowercase(), "blue sky", "Blue sky"),
    (Lowercase(answers=["red"]), "it is red.", "it is green."),
    (Lowercase(), "ok", "   "),
    (StartsWith(prefix="Sure"), '  "Sure, a cow."', "Of course, sure."),
    (StartsWith(prefix="sure", answers=["cow"]), "Sure! A cow.", "Sure! A lion."),
    (Choice(answer="Carl", wrong=["Anna", "Ben"]), "Carl is the shortest.", "Anna, Ben or Carl."),
    (Choice(answer="yes", wrong=["no"]), "Yes.", "No."),
])
def test_checks(check, right, wrong):
    assert score(check, right) is True
    assert score(check, wrong) is False


def test_first_number_reads_digits_and_words():
    assert first_number("about 1,234,567.5 of them") == 1234567.5
    assert first_number("Twelve, or 13") == 12
    assert first_number("ninety-nine") == 99
    assert first_number("eight-legged") is None  # "eight-" is not a standalone number word
    assert first_number("nothing") is None


# ------------------------------------------------------------------------ items


def test_shipped_items_load_balanced_and_unique():
    items = load_items()
    assert Counter(i.category for i in items) == {c: 8 for c in CATEGORIES}
    assert len({i.id for i in items}) == len(items) == 56


def test_shipped_items_do_not_repeat_gate_or_rehearsal_prompts():
    data = REPO / "training" / "data"
    used = {json.loads(line)["question"] for line in (data / "probe.jsonl").read_text().splitlines()
            if line.strip()}
    used |= {json.loads(line)["prompt"] for line in
             (data / "rehearsal_prompts.jsonl").read_text().splitlines() if line.strip()}
    norm = lambda s: " ".join(s.lower().split())  # noqa: E731
    used = {norm(u) for u in used}
    clash = [i.id for i in load_items() if norm(i.prompt) in used or
             any(norm(i.prompt).startswith(u) for u in used)]
    assert clash == []


@pytest.mark.parametrize("record, field", [
    ({"id": "x-1", "category": "math", "prompt": "p", "check": {"type": "contains"}},
     "check.answers: Field required"),
    ({"id": "x-1", "category": "math", "prompt": "p", "check": {"type": "bogus"}},
     "check.type:"),
    ({"id": "x-1", "category": "math", "check": {"type": "number", "value": 1}},
     "prompt: Field required"),
    ({"id": "x-1", "category": "math", "prompt": "p", "check": {"type": "regex", "pattern": "("}},
     "check.pattern:"),
    ({"id": "x-1", "category": "math", "prompt": "p", "check": {"type": "number", "value": 2,
                                                                 "skip": [1, 2]}},
     "check: Value error, value 2 is also in skip"),
])
def test_bad_items_file_names_line_and_field(tmp_path, record, field):
    good = {"id": "ok-1", "category": "math", "prompt": "1+1?",
            "check": {"type": "number", "value": 2}}
    path = tmp_path / "items.jsonl"
    path.write_text(json.dumps(good) + "\n\n" + json.dumps(record) + "\n")
    with pytest.raises(EvalDataError) as e:
        load_items(path)
    assert str(e.value).startswith(f"items.jsonl:3: {field}")


def test_duplicate_ids_and_bad_json_are_errors(tmp_path):
    rec = {"id": "a", "category": "math", "prompt": "1+1?", "check": {"type": "number", "value": 2}}
    path = tmp_path / "items.jsonl"
    path.write_text(json.dumps(rec) + "\n" + json.dumps(rec) + "\n")
    with pytest.raises(EvalDataError, match=r"items.jsonl:2: id 'a' already used on line 1"):
        load_items(path)
    path.write_text(json.dumps(rec) + "\n{not json\n")
    with pytest.raises(EvalDataError, match=r"items.jsonl:2: not JSON"):
        load_items(path)
    with pytest.raises(EvalDataError, match="cannot read"):
        load_items(tmp_path / "missing.jsonl")


# ------------------------------------------------------------------------ memory items


def test_memory_items_ask_learned_facts_on_the_held_out_phrasing(tmp_path):
    store = MemoryStore(tmp_path / "m.sqlite")
    def fact(q, a, status, user="u1", **kw):
        return Memory(user_id=user, kind="fact", status=status, question=q, answer=a, **kw)

    learned = fact("What is the user's dog called?", "Biscuit", "learned",
                   phrasings=["What's the name of the user's dog?", "How is the user's dog named?"])
    verified = fact("Where does the user work?", "the bakery", "verified")
    old = fact("Where does the user live?", "Porto", "learned")
    other_user = fact("Q?", "A", "learned", user="u2")
    for m in (learned, verified, old, other_user):
        store.add(m)
    store.supersede(old.id, fact("Where does the user live now?", "Lisbon", "verified"), "moved")

    items = memory_items(store, "u1")
    assert [i.id for i in items] == [f"memory-{learned.id}"]
    (item,) = items
    assert item.category == "memory"
    assert item.prompt == "How is the user's dog named?" == phrasings_for(learned, 5)[1]
    assert score(item.check, "It's Biscuit.") and not score(item.check, "It's Rex.")
    store.close()


# ------------------------------------------------------------------------ running


def _items() -> list[EvalItem]:
    return [
        EvalItem(id="m1", category="math", prompt="1+1?", check=Number(value=2)),
        EvalItem(id="m2", category="math", prompt="2+2?", check=Number(value=4)),
        EvalItem(id="f1", category="format", prompt="Say yes.", check=Exact(answers=["yes"])),
        EvalItem(id="s1", category="style", prompt="lower: sky?",
                 check=Lowercase(answers=["blue"])),
        EvalItem(id="s2", category="style", prompt="Start with Sure.",
                 check=StartsWith(prefix="Sure")),
        EvalItem(id="k1", category="memory", prompt="Dog?", check=Contains(answers=["Biscuit"])),
    ]


def test_arun_eval_scores_per_category_and_overall():
    model = DictChat(answers={"1+1?": "2", "2+2?": "5", "Say yes.": "Yes.",
                              "lower: sky?": "blue", "Start with Sure.": "OK."}, seen=[])
    report = asyncio.run(arun_eval(model, _items(), tag="pre", user_id="u1", max_concurrency=2))
    assert list(report.categories) == [*CATEGORIES, "memory"]
    got = {k: (c.correct, c.total) for k, c in report.categories.items() if c.total}
    assert got == {"math": (1, 2), "format": (1, 1), "style": (1, 2), "memory": (0, 1)}
    assert report.categories["reasoning"] == CategoryScore(correct=0, total=0, score=0.0)
    assert report.overall() == pytest.approx((0.5 + 1.0 + 0.5 + 0.0) / 4)
    assert (report.tag, report.user_id, report.model) == ("pre", "u1", "dict-chat")
    assert [r.correct for r in report.items] == [True, False, True, True, False, False]
    assert report.items[1].output == "5"
    # closed book: one user message, no system prompt
    assert all(len(m) == 1 and isinstance(m[0], HumanMessage) for m in model.seen)


def test_run_eval_without_memory_items_has_no_memory_row():
    items = [i for i in _items() if i.category != "memory"]
    report = run_eval(DictChat(answers={"1+1?": "two"}, seen=[]), items)
    assert "memory" not in report.categories
    assert report.categories["math"].correct == 1
    assert report.overall() == pytest.approx((0.5 + 0.0 + 0.0) / 3)


# ------------------------------------------------------------------------ reports


def _report(tag: str, scores: dict[str, tuple[int, int]]) -> EvalReport:
    cats = {k: CategoryScore(correct=c, total=t, score=c / t if t else 0.0)
            for k, (c, t) in scores.items()}
    return EvalReport(tag=tag, at="2025-03-04T05:06:07+00:00", model="m", categories=cats,
                      items=[], seconds=1.5)


def test_save_and_load_report_round_trip(tmp_path):
    report = run_eval(DictChat(answers={"1+1?": "2"}, seen=[]), _items(), tag="post night/1")
    path = save_report(report, tmp_path / "evals")
    stamp = report.at[:19].replace("-", "").replace(":", "").replace("T", "-")
    assert path.name == f"post-night-1-{stamp}.json"
    assert load_report(path) == report
    again = save_report(report, tmp_path / "evals")  # same second: not overwritten
    assert again != path and again.exists() and path.exists()
    assert save_report(_report("", {"math": (1, 2)}), tmp_path).name == "eval-20250304-050607.json"


def test_compare_gives_deltas_and_none_where_missing():
    pre = _report("pre", {"math": (2, 4), "format": (1, 2), "style": (0, 0)})
    post = _report("post", {"math": (3, 4), "format": (1, 2), "memory": (1, 1)})
    rows = {r["category"]: r for r in compare(pre, post)}
    assert list(rows) == ["math", "format", "memory", "overall"]
    assert rows["math"] == {"category": "math", "pre": 0.5, "post": 0.75, "delta": 0.25}
    assert rows["format"]["delta"] == 0.0
    assert rows["memory"] == {"category": "memory", "pre": None, "post": 1.0, "delta": None}
    assert rows["overall"]["pre"] == pytest.approx(0.5)
    assert rows["overall"]["post"] == pytest.approx((0.75 + 0.5 + 1.0) / 3)
    assert rows["overall"]["delta"] == pytest.approx((0.75 + 0.5 + 1.0) / 3 - 0.5)
