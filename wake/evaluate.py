"""Capability evaluation (``reverie eval``): closed-book questions with checkable answers.

Shipped items (``wake/data/eval_items.jsonl``) cover seven categories (math, reasoning,
factual, format, summarization, style, context), 8 items each; :func:`memory_items` adds
recall of a user's learned facts. Each item is asked once, the way the day chat asks it
(its system prompt and template, a :class:`reverie.prompts.ChatFrame`) but with no memories and no
retrieval, and scored by a deterministic check (no judge model), so a
report taken before a night and one taken after can be compared (:func:`compare`).

Scoring is deliberately literal: a check says what a right answer must contain or look like,
and anything else (a refusal, a ramble that never states the answer) is wrong.
"""

from __future__ import annotations

import asyncio
import json
import re
import time
from datetime import datetime, timezone
from pathlib import Path
from typing import Annotated, Any, Iterable, Iterator, Literal, Optional, Union

from langchain_core.messages import HumanMessage
from pydantic import (BaseModel, ConfigDict, Field, ValidationError, field_validator,
                      model_validator)

from reverie.files import atomic_write_text
from reverie.training.gate import matches

DATA = Path(__file__).resolve().parent / "data"
ITEMS_FILE = DATA / "eval_items.jsonl"
CATEGORIES: tuple[str, ...] = ("math", "reasoning", "factual", "format", "summarization",
                               "style", "context")
MEMORY = "memory"


class EvalDataError(ValueError):
    """An items file that cannot be used; the message names file, line and field."""


# ---------------------------------------------------------------- text helpers

_QUOTES = "\"'`“”‘’*"  # '*': small models like to **bold** a one-word answer
_NUMBER_WORDS = {w: i for i, w in enumerate(
    "zero one two three four five six seven eight nine ten eleven twelve thirteen fourteen"
    " fifteen sixteen seventeen eighteen nineteen twenty".split())}
_TENS = {"twenty": 20, "thirty": 30, "forty": 40, "fifty": 50, "sixty": 60, "seventy": 70,
         "eighty": 80, "ninety": 90}
_UNITS = "one|two|three|four|five|six|seven|eight|nine"
# Digits (optionally "1,000"-grouped, signed, decimal) or a number word; compounds such as
# "twenty-four" are read whole so they do not count as "twenty".
_NUMBER_RE = re.compile(
    r"(?<![\w.])(?P<digits>-?(?:\d{1,3}(?:,\d{3})+(?!\d)|\d+)(?:\.\d+)?)"
    rf"|\b(?P<compound>(?:{'|'.join(_TENS)})-(?:{_UNITS}))\b"
    rf"|\b(?P<word>{'|'.join(sorted(_NUMBER_WORDS, key=len, reverse=True))})\b(?!-)",
    re.IGNORECASE)


def numbers(text: str) -> Iterator[float]:
    """The numbers in ``text``, in order: digits ("1,000", "-3", "2.5") or number words
    (zero..twenty, or a hyphenated compound like "twenty-four")."""
    for m in _NUMBER_RE.finditer(text):
        if m["digits"]:
            yield float(m["digits"].replace(",", ""))
        elif m["compound"]:
            tens, unit = m["compound"].lower().split("-")
            yield float(_TENS[tens] + _NUMBER_WORDS[unit])
        else:
            yield float(_NUMBER_WORDS[m["word"].lower()])


def first_number(text: str, skip: Iterable[float] = ()) -> Optional[float]:
    """The first number in ``text`` (see :func:`numbers`) that is not in ``skip``; None
    when there is none."""
    skip = set(skip)
    return next((n for n in numbers(text) if n not in skip), None)


def bare(text: str) -> str:
    """``text`` without surrounding whitespace, quotes, asterisks and trailing punctuation,
    lower-cased (what an "exact" answer is compared on)."""
    prev = None
    while prev != text:
        prev = text
        text = text.strip().strip(_QUOTES).rstrip(".!?,;:")
    return text.lower()


def json_array(text: str) -> Optional[list]:
    """The first JSON array in ``text`` (code fences and prose around it allowed): each
    ``[`` in turn is matched to its closing ``]`` (brackets inside strings ignored) and
    parsed; None when no candidate parses to a list."""
    for start in (i for i, c in enumerate(text) if c == "["):
        depth, in_str, esc = 0, False, False
        for end in range(start, len(text)):
            c = text[end]
            if in_str:
                esc, in_str = (False, in_str) if esc else (c == "\\", c != '"')
            elif c == '"':
                in_str = True
            elif c == "[":
                depth += 1
            elif c == "]":
                depth -= 1
                if depth == 0:
                    try:
                        value = json.loads(text[start:end + 1])
                    except ValueError:
                        break
                    if isinstance(value, list):
                        return value
                    break
    return None


def any_match(output: str, answers: Iterable[str]) -> bool:
    """Any accepted answer in ``output`` as whole words (:func:`reverie.training.gate.matches`)."""
    return any(matches(output, a) for a in answers)


# ---------------------------------------------------------------- checks

class _Check(BaseModel):
    model_config = ConfigDict(extra="forbid", frozen=True)


class Contains(_Check):
    """Right when any accepted answer's content words all appear as whole words
    (case-insensitive)."""

    type: Literal["contains"] = "contains"
    answers: list[str] = Field(min_length=1)

    def correct(self, output: str) -> bool:
        return any_match(output, self.answers)


class Number(_Check):
    """Right when the first number in the output, not counting those in ``skip``, equals
    ``value``. ``skip`` lists a question's own numbers (the operands of "What is 7 + 5?"):
    small models echo the question ("7 + 5 = 12") before answering."""

    type: Literal["number"] = "number"
    value: float
    skip: list[float] = Field(default_factory=list)

    @model_validator(mode="after")
    def _answerable(self) -> "Number":
        if self.value in self.skip:
            raise ValueError(f"value {self.value:g} is also in skip")
        return self

    def correct(self, output: str) -> bool:
        n = first_number(output, self.skip)
        return n is not None and abs(n - self.value) < 1e-9


class Exact(_Check):
    """Right when the output, bare (see :func:`bare`), equals one answer (case-insensitive)."""

    type: Literal["exact"] = "exact"
    answers: list[str] = Field(min_length=1)

    def correct(self, output: str) -> bool:
        return bare(output) in {bare(a) for a in self.answers}


class Regex(_Check):
    """Right when ``re.search(pattern, output, IGNORECASE)`` matches (use ``(?-i:...)`` for
    a case-sensitive part)."""

    type: Literal["regex"] = "regex"
    pattern: str

    @field_validator("pattern")
    @classmethod
    def _compiles(cls, v: str) -> str:
        try:
            re.compile(v)
        except re.error as e:
            raise ValueError(f"not a regular expression: {e}") from None
        return v

    def correct(self, output: str) -> bool:
        return re.search(self.pattern, output, re.IGNORECASE) is not None


class JsonList(_Check):
    """Right when the output holds a JSON array of exactly ``length`` strings and each word
    of ``contains`` appears among them (whole word, case-insensitive)."""

    type: Literal["json_list"] = "json_list"
    length: int = Field(ge=0)
    contains: list[str] = Field(default_factory=list)

    def correct(self, output: str) -> bool:
        items = json_array(output)
        if items is None or len(items) != self.length \
                or not all(isinstance(x, str) for x in items):
            return False
        return all(any(matches(x, w) for x in items) for w in self.contains)


class MaxWords(_Check):
    """Right when the output has 1..``n`` words (split on whitespace) and, if ``answers``
    are given, contains one (as :class:`Contains`)."""

    type: Literal["max_words"] = "max_words"
    n: int = Field(ge=1)
    answers: list[str] = Field(default_factory=list)

    def correct(self, output: str) -> bool:
        return 1 <= len(output.split()) <= self.n and \
            (not self.answers or any_match(output, self.answers))


class Lowercase(_Check):
    """Right when the output is non-empty, has no uppercase letter and, if ``answers`` are
    given, contains one."""

    type: Literal["lowercase"] = "lowercase"
    answers: list[str] = Field(default_factory=list)

    def correct(self, output: str) -> bool:
        return bool(output.strip()) and not any(c.isupper() for c in output) and \
            (not self.answers or any_match(output, self.answers))


class StartsWith(_Check):
    """Right when the output (leading whitespace, quotes and asterisks removed) starts with
    ``prefix`` (case-insensitive) and, if ``answers`` are given, contains one."""

    type: Literal["starts_with"] = "starts_with"
    prefix: str = Field(min_length=1)
    answers: list[str] = Field(default_factory=list)

    def correct(self, output: str) -> bool:
        head = output.lstrip().lstrip(_QUOTES).lstrip()
        return head.lower().startswith(self.prefix.lower()) and \
            (not self.answers or any_match(output, self.answers))


class Choice(_Check):
    """Right when ``answer`` appears and none of the ``wrong`` options do (whole words,
    case-insensitive): for questions whose options are all named in the prompt, where an
    answer that repeats every option must not count."""

    type: Literal["choice"] = "choice"
    answer: str = Field(min_length=1)
    wrong: list[str] = Field(min_length=1)

    def correct(self, output: str) -> bool:
        return matches(output, self.answer) and not any_match(output, self.wrong)


Check = Annotated[Union[Contains, Number, Exact, Regex, JsonList, MaxWords, Lowercase,
                        StartsWith, Choice], Field(discriminator="type")]
CHECK_TYPES: tuple[str, ...] = ("contains", "number", "exact", "regex", "json_list",
                                "max_words", "lowercase", "starts_with", "choice")


def score(check: Check, output: str) -> bool:
    """Whether ``output`` (a model's whole answer) is right by ``check``."""
    return check.correct(output)


# ---------------------------------------------------------------- items

class EvalItem(BaseModel):
    """One question. ``id`` is unique within a set; ``category`` names the report row."""

    model_config = ConfigDict(extra="forbid")

    id: str = Field(min_length=1)
    category: str = Field(min_length=1)
    prompt: str = Field(min_length=1)
    check: Check


def _field(err: dict) -> str:
    """A pydantic error's location as ``check.answers`` (the union's tag dropped)."""
    loc = [str(x) for x in err["loc"]]
    if err["type"].startswith("union_tag"):
        loc.append("type")
    elif len(loc) > 1 and loc[0] == "check" and loc[1] in CHECK_TYPES:
        del loc[1]
    return ".".join(loc) or "(record)"


def load_items(path: Optional[Path] = None) -> list[EvalItem]:
    """Items from a JSONL file, one object per line (blank lines skipped).

    Args:
        path: the file; default the shipped ``wake/data/eval_items.jsonl``.

    Raises:
        EvalDataError: the file is missing, a line is not a JSON object, a record is
            invalid (``eval_items.jsonl:12: check.answers: Field required``), or an id is
            repeated (both line numbers named).
    """
    path = Path(path) if path is not None else ITEMS_FILE
    try:
        lines = path.read_text(encoding="utf-8").splitlines()
    except OSError as e:
        raise EvalDataError(f"{path}: cannot read: {e.strerror or e}") from None
    items, seen = [], {}
    for no, line in enumerate(lines, 1):
        if not line.strip():
            continue
        where = f"{path.name}:{no}"
        try:
            raw = json.loads(line)
        except ValueError as e:
            raise EvalDataError(f"{where}: not JSON: {e}") from None
        if not isinstance(raw, dict):
            raise EvalDataError(f"{where}: expected a JSON object, got {type(raw).__name__}")
        try:
            item = EvalItem.model_validate(raw)
        except ValidationError as e:
            err = e.errors()[0]
            raise EvalDataError(f"{where}: {_field(err)}: {err['msg']}") from None
        if item.id in seen:
            raise EvalDataError(f"{where}: id {item.id!r} already used on line {seen[item.id]}")
        seen[item.id] = no
        items.append(item)
    return items


def memory_items(store, user_id: str, phrasings: int = 5) -> list[EvalItem]:
    """Closed-book recall items for ``user_id``'s learned facts (current versions only).

    Args:
        store: a :class:`reverie.memory.store.MemoryStore`.
        user_id: whose facts.
        phrasings: training phrasings per fact, as the forge uses
            (:func:`reverie.training.dataset.phrasings_for`); the item asks the held-out one, the
            wording the model was not trained on.

    Returns:
        one ``memory`` item per fact, id ``memory-<memory id>``, right when the answer is
        in the output (:class:`Contains`), oldest fact first.
    """
    from reverie.training.dataset import phrasings_for

    out = []
    for m in store.list(user_id=user_id, status="learned", kind="fact"):
        if not (m.question and m.answer):
            continue  # nothing to ask or nothing to check
        held_out = phrasings_for(m, phrasings)[1] or m.question
        out.append(EvalItem(id=f"memory-{m.id}", category=MEMORY, prompt=held_out,
                            check=Contains(answers=[m.answer])))
    return out


# ---------------------------------------------------------------- reports

class CategoryScore(BaseModel):
    correct: int
    total: int
    score: float  # correct / total; 0.0 when total is 0


class ItemResult(BaseModel):
    id: str
    category: str
    prompt: str
    output: str
    correct: bool


class EvalReport(BaseModel):
    """One evaluation run. ``at`` is an ISO time (UTC); ``seconds`` the wall time of the
    generation; ``categories`` in report order (see :func:`arun_eval`)."""

    tag: str = ""
    at: str
    model: str
    user_id: Optional[str] = None
    categories: dict[str, CategoryScore]
    items: list[ItemResult]
    seconds: float

    def overall(self) -> float:
        """Mean of the category scores (each category weighs the same whatever its size),
        categories with no items left out; 0.0 when there are none."""
        scores = [c.score for c in self.categories.values() if c.total]
        return sum(scores) / len(scores) if scores else 0.0


def _text(message: Any) -> str:
    """A chat model reply's text (content may be a string or a list of parts)."""
    content = getattr(message, "content", message)
    if isinstance(content, str):
        return content
    return "".join(p if isinstance(p, str) else str(p.get("text", "")) for p in content)


def _model_name(model: Any) -> str:
    params = getattr(model, "_identifying_params", {}) or {}
    return str(params.get("model_name") or params.get("model")
               or getattr(model, "model_name", None) or getattr(model, "_llm_type", "")
               or type(model).__name__)


def _categories(results: list[ItemResult], with_memory: bool) -> dict[str, CategoryScore]:
    """Scores per category: the seven always (total 0 when absent), then ``memory`` when
    memory items were asked, then any other category in first-seen order."""
    names = list(CATEGORIES) + ([MEMORY] if with_memory else [])
    names += [c for c in dict.fromkeys(r.category for r in results) if c not in names]
    out = {}
    for name in names:
        rs = [r for r in results if r.category == name]
        right = sum(r.correct for r in rs)
        out[name] = CategoryScore(correct=right, total=len(rs),
                                  score=right / len(rs) if rs else 0.0)
    return out


async def arun_eval(model, items: list[EvalItem], *, tag: str = "",
                    user_id: Optional[str] = None, max_concurrency: int = 8,
                    model_name: Optional[str] = None, frame: Any = None) -> EvalReport:
    """Ask every item closed-book and score the answers.

    Args:
        model: a langchain-core ``BaseChatModel``, configured by the caller (greedy
            decoding, a max_tokens limit).
        items: from :func:`load_items` and/or :func:`memory_items`.
        tag: a label for the report ("pre", "post", a night id ...).
        user_id: whose memory items these are (recorded only).
        max_concurrency: calls in flight at once (``abatch``'s config).
        model_name: named in the report; default from the model's identifying params.
        frame: the chat's :class:`reverie.prompts.ChatFrame` each item is asked in (None: a bare
            user message).

    Returns:
        the report; its categories are the seven in fixed order, then ``memory`` if any
        item has that category, then any others.

    Raises:
        whatever the model raises (one failed call fails the run: a partial report would
        compare wrongly with a whole one).
    """
    prompts = [frame.render(i.prompt) if frame is not None else [HumanMessage(content=i.prompt)]
               for i in items]
    started = time.perf_counter()
    replies = await model.abatch(prompts, config={"max_concurrency": max_concurrency}) \
        if prompts else []
    seconds = time.perf_counter() - started
    results = []
    for item, reply in zip(items, replies):
        output = _text(reply)
        results.append(ItemResult(id=item.id, category=item.category, prompt=item.prompt,
                                  output=output, correct=score(item.check, output)))
    return EvalReport(tag=tag, at=datetime.now(timezone.utc).isoformat(timespec="seconds"),
                      model=model_name or _model_name(model), user_id=user_id,
                      categories=_categories(results, any(i.category == MEMORY for i in items)),
                      items=results, seconds=round(seconds, 3))


def run_eval(model, items: list[EvalItem], **kwargs: Any) -> EvalReport:
    """:func:`arun_eval` from synchronous code (not from inside a running event loop)."""
    return asyncio.run(arun_eval(model, items, **kwargs))


def save_report(report: EvalReport, folder: Path) -> Path:
    """Write ``report`` as ``<folder>/<tag or "eval">-<YYYYmmdd-HHMMSS>.json`` (its ``at``
    time, UTC), atomically; ``-2``, ``-3`` ... are appended rather than overwrite a report
    of the same second. Characters other than letters, digits, ``.``, ``_`` and ``-`` in
    the tag become ``-``. Returns the path written."""
    folder = Path(folder)
    stamp = datetime.fromisoformat(report.at).astimezone(timezone.utc).strftime("%Y%m%d-%H%M%S")
    stem = f"{re.sub(r'[^A-Za-z0-9._-]', '-', report.tag) or 'eval'}-{stamp}"
    path, n = folder / f"{stem}.json", 1
    while path.exists():
        n += 1
        path = folder / f"{stem}-{n}.json"
    atomic_write_text(path, report.model_dump_json(indent=2) + "\n")
    return path


def load_report(path: Path) -> EvalReport:
    """A report written by :func:`save_report`.

    Raises:
        OSError: it cannot be read. pydantic.ValidationError: it is not a report.
    """
    return EvalReport.model_validate_json(Path(path).read_text(encoding="utf-8"))


def compare(pre: EvalReport, post: EvalReport) -> list[dict]:
    """Rows ``{category, pre, post, delta}`` (scores in [0, 1]; ``delta`` = post - pre)
    for every category either report has items in (in ``pre``'s order, then ``post``'s
    new ones), then an ``overall`` row. A category with no items in a report counts as
    missing there: its score and the delta are None."""
    def scored(r: EvalReport) -> dict[str, float]:
        return {k: c.score for k, c in r.categories.items() if c.total}

    a, b = scored(pre), scored(post)
    rows = []
    for cat in dict.fromkeys([*a, *b]):
        x, y = a.get(cat), b.get(cat)
        rows.append({"category": cat, "pre": x, "post": y,
                     "delta": None if x is None or y is None else y - x})
    x, y = (pre.overall() if a else None), (post.overall() if b else None)
    rows.append({"category": "overall", "pre": x, "post": y,
                 "delta": None if x is None or y is None else y - x})
    return rows
