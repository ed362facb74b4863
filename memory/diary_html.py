"""The dream diary as one web page: ``reverie diary html NIGHT``.

The page is self-contained (inline CSS and JavaScript, no network): the night's summary,
then one *thread* per candidate memory (its steps in order: dream, verify, reshape,
consult, consolidate, park) and one thread for the night's other steps (gather, route,
hand-off, forge, ...). Checkboxes filter threads by outcome and steps by agent; the
filter lives in the address's fragment (``diary.html#outcome=vetoed,rejected&agent=verifier``)
so a filtered view can be bookmarked. Every diary text is model output or user text, and
the template escapes all of it (Jinja2 autoescape). The template is
``memory/templates/diary.html.j2``.
"""

from __future__ import annotations

import hashlib
import json
from dataclasses import dataclass, field
from datetime import datetime
from pathlib import Path
from typing import Optional

import jinja2

from reverie.files import atomic_write_text
from reverie.memory.diary import DiaryStep, per_agent, read_steps

TEMPLATES = Path(__file__).resolve().parent / "templates"
NIGHT = "night"  # the thread of the steps tied to no candidate

# Where a step sits in a candidate's life, for steps recorded in the same instant.
_STAGE = {"subconscious": 0, "notetaker": 1, "verifier": 2, "reshaper": 3, "dreamer": 4,
          "persona": 5, "consolidate": 6}
# The agents in the order a night runs them (others follow, by name).
AGENTS = ["gather", "subconscious", "router", "notetaker", "verifier", "reshaper", "dreamer",
          "persona",
          "consolidate", "handoff", "forge"]
# Outcomes in the filter's order; a candidate's first outcome is its main one.
OUTCOMES = ["kept", "duplicate", "dropped", "approved", "rejected", "vetoed", "unsettled",
            "reshaped", "parked", "revisited"]
_GOOD = {"passed", "approve", "add", "supersede", "revived", "kept", "routed"}
_BAD = {"rejected", "veto", "dropped", "delete", "expired", "forgotten", "error"}
_WARN = {"failed", "reshaped", "parked", "duplicate", "known", "revisit"}


@dataclass
class StepView:
    """One step as the page shows it: ``tone`` colours its verdict (good, bad, warn,
    plain); ``draft`` is, on a dream step in a candidate's thread, that candidate's draft
    from the dream's parsed output."""

    step: DiaryStep
    tone: str
    parsed_json: str = ""
    draft: Optional[dict] = None


@dataclass
class Thread:
    """A candidate's steps (``candidate_id`` set) or the night's other steps (``""``).
    ``outcomes`` are filter tags, the main one first; ``title`` is what the candidate says."""

    candidate_id: str
    steps: list[StepView] = field(default_factory=list)
    outcomes: list[str] = field(default_factory=list)
    title: str = ""

    @property
    def agents(self) -> list[str]:
        return sorted({v.step.agent for v in self.steps}, key=_agent_rank)


def _agent_rank(agent: str) -> tuple:
    return (AGENTS.index(agent), "") if agent in AGENTS else (len(AGENTS), agent)


def tone(verdict: str) -> str:
    """``good``, ``bad``, ``warn`` or ``plain``: how a verdict is coloured."""
    v = verdict.strip().lower()
    if v in _GOOD or v.startswith("promoted"):
        return "good"
    if v in _BAD or v.startswith("rolled back"):
        return "bad"
    return "warn" if v in _WARN else "plain"


def memory_id_of(candidate_id: str) -> str:
    """The memory id consolidation gives a candidate (``reverie.graphs.night.memory_id``;
    tests hold the two equal): ties the consolidation steps of diaries written before
    those steps carried the candidate's id to their candidate."""
    return "mem-" + hashlib.sha1(candidate_id.encode()).hexdigest()[:12]


def _split(candidate_id: str) -> tuple[str, Optional[int]]:
    """``(dream prefix, draft number)`` of a dreamed candidate's id ``<prefix>:<n>``."""
    prefix, _, n = candidate_id.rpartition(":")
    return (prefix, int(n)) if prefix and n.isdigit() else ("", None)


def _draft(dream: DiaryStep, n: Optional[int], mine: list[DiaryStep]) -> Optional[dict]:
    """The candidate's draft in the dream's parsed output. Its number ``n`` counts the
    drafts the dreamer kept, which can be fewer than the model wrote, so the draft is the
    one (``n``-th first) whose statement or question the candidate's first prompt quotes;
    with no prompt yet (a night stopped early), the ``n``-th."""
    memories = dream.parsed.get("memories") if isinstance(dream.parsed, dict) else None
    if not isinstance(memories, list):
        return None
    drafts = [m for m in memories if isinstance(m, dict)]
    probe = next((m.get("content", "") for s in mine for m in s.prompt[-1:]), None)
    if probe is None:
        return drafts[n] if n is not None and 0 <= n < len(drafts) else None
    first = [drafts[n]] if n is not None and 0 <= n < len(drafts) else []
    for d in first + drafts:
        key = str(d.get("statement") or d.get("question") or "").strip()
        if key and key in str(probe):
            return d
    return None


def _say(draft: dict) -> str:
    """One line for a draft or a candidate: the note first (its statement or text), then
    its question and answer ("The user's dog is called Biscuit. — What's my dog called?
    → Your dog is called Biscuit.")."""
    note = str(draft.get("statement") or draft.get("text") or "")
    qa = " → ".join(str(draft[k]) for k in ("question", "answer") if draft.get(k))
    return " — ".join(x for x in (note, qa) if x)


def _split_note(candidate_id: str) -> tuple[str, Optional[int]]:
    """``(read prefix, note number)`` of a note's candidate id ``<session>:<turn>:n<k>``."""
    prefix, _, n = candidate_id.rpartition(":n")
    return (prefix, int(n)) if prefix and n.isdigit() else ("", None)


def _latest(mine: list[DiaryStep]) -> Optional[dict]:
    """The candidate as the last of its steps left it (a step's ``produced``)."""
    for s in reversed(mine):
        if isinstance(s.produced, list) and s.produced and isinstance(s.produced[-1], dict):
            return s.produced[-1]
    return None


def _outcomes(steps: list[DiaryStep]) -> list[str]:
    """A candidate's filter tags from its steps, the main outcome first."""
    last = {}
    for s in steps:
        last[s.agent] = s.verdict
    ops = [s.verdict for s in steps if s.agent == "consolidate"]
    review = [s.verdict for s in steps if s.agent in ("verifier", "reshaper")]
    if any(op in ("add", "supersede") for op in ops):
        main = "kept"
    elif "duplicate" in ops:
        main = "duplicate"
    elif "dropped" in ops:
        main = "dropped"
    elif last.get("persona") == "veto":
        main = "vetoed"
    elif last.get("persona") == "approve":
        main = "approved"
    elif review and review[-1] == "rejected":
        main = "rejected"
    else:
        main = "unsettled"
    tags = [main]
    tags += ["reshaped"] if any(s.agent == "reshaper" for s in steps) else []
    tags += ["parked"] if any(s.agent == "subconscious" and s.verdict == "parked"
                              for s in steps) else []
    tags += ["revisited"] if any(s.agent == "subconscious" and s.verdict == "revisit"
                                 for s in steps) else []
    return tags


def _view(step: DiaryStep, draft: Optional[dict] = None) -> StepView:
    parsed = ""
    if step.parsed not in (None, "", [], {}):
        parsed = json.dumps(step.parsed, indent=1, ensure_ascii=False, default=str)
    return StepView(step=step, tone="bad" if step.error else tone(step.verdict),
                    parsed_json=parsed, draft=draft)


def threads(steps: list[DiaryStep]) -> list[Thread]:
    """The night's steps as threads: one per candidate (in the order they appear), each
    with its steps in time order, then the night's thread (steps tied to no candidate;
    left out when empty).

    A step belongs to a candidate by its ``candidate_id``; a dream step
    (``dream:<prefix>``) to every candidate ``<prefix>:<n>`` it produced; a consolidation
    step without a candidate id (older diaries) by its ``memory_id``."""
    ordered = sorted(steps, key=lambda s: s.at)  # stable: the file's order breaks ties
    ids = list(dict.fromkeys(s.candidate_id for s in ordered if s.candidate_id))
    by_memory = {memory_id_of(c): c for c in ids}
    # a window's dream (older diaries) and a turn's reading produce several candidates
    dreams = {s.step_id.removeprefix("dream:"): s for s in ordered
              if s.agent == "dreamer" and s.step_id.startswith("dream:") and not s.candidate_id}
    reads = {s.step_id.removeprefix("read:"): s for s in ordered if s.agent == "notetaker"}
    owned: dict[str, list[DiaryStep]] = {c: [] for c in ids}
    night, used_dreams = [], set()
    for s in ordered:
        if s.agent in ("dreamer", "notetaker") and not s.candidate_id:
            continue  # placed below, beside each candidate it produced
        owner = s.candidate_id or (by_memory.get(s.memory_id, "") if s.agent == "consolidate"
                                   and s.verdict in ("add", "supersede", "dropped") else "")
        (owned[owner] if owner else night).append(s)
    out = []
    for c in ids:
        prefix, n = _split(c)
        dream = dreams.get(prefix)
        mine = sorted(owned[c], key=lambda s: (s.at, s.round, _STAGE.get(s.agent, 9)))
        views = [_view(s) for s in mine]
        draft = _draft(dream, n, mine) if dream else None
        if dream is not None:
            used_dreams.add(dream.step_id)
            views.insert(0, _view(dream, draft))
        read = reads.get(_split_note(c)[0])
        if read is not None:
            used_dreams.add(read.step_id)
            views.insert(0, _view(read))
        revisit = next((s for s in mine if s.verdict == "revisit"), None)
        latest = _latest(mine)
        title = (_say(latest) if latest else _say(draft) if draft else
                 revisit.raw_output if revisit else "")
        out.append(Thread(candidate_id=c, steps=views, outcomes=_outcomes(mine), title=title))
    night += [s for s in [*dreams.values(), *reads.values()] if s.step_id not in used_dreams]
    if night:
        out.append(Thread(candidate_id="", outcomes=[NIGHT], title="Steps tied to no candidate",
                          steps=[_view(s) for s in sorted(night, key=lambda s: s.at)]))
    return out


def _environment() -> jinja2.Environment:
    return jinja2.Environment(loader=jinja2.FileSystemLoader(TEMPLATES), autoescape=True,
                              undefined=jinja2.StrictUndefined, trim_blocks=True,
                              lstrip_blocks=True)


def render_html(night_id: str, steps: list[DiaryStep], summary: Optional[dict] = None,
                started: Optional[dict] = None) -> str:
    """The night's page (one HTML document, nothing fetched).

    Args:
        summary: the night's ``summary.json``; ``None``: the page says the night is
            unfinished and counts from the steps.
        started: the night's ``started.json`` (its user), when there is one.
    """
    all_threads = threads(steps)
    candidates = [t for t in all_threads if t.candidate_id]
    counts = {o: sum(o in t.outcomes for t in candidates) for o in OUTCOMES}
    scalars, nested = {}, {}
    for k, v in (summary or {}).items():
        if k in ("night_id", "agents"):
            continue
        (nested if isinstance(v, (dict, list)) else scalars)[k] = v
    return _environment().get_template("diary.html.j2").render(
        night_id=night_id, summary=summary, scalars=scalars,
        nested={k: json.dumps(v, ensure_ascii=False, default=str) for k, v in nested.items()},
        agents_table=(summary or {}).get("agents") or per_agent(steps),
        started=started or {}, threads=all_threads, candidates=candidates,
        outcomes=[(o, n) for o, n in counts.items() if n],
        has_night=any(not t.candidate_id for t in all_threads),
        agents=sorted({s.agent for s in steps}, key=_agent_rank),
        step_count=len(steps), written=f"{datetime.now():%Y-%m-%d %H:%M}")


def _read_json(path: Path) -> Optional[dict]:
    if not path.exists():
        return None
    try:
        data = json.loads(path.read_text(encoding="utf-8"))
    except json.JSONDecodeError as exc:
        raise ValueError(f"{path}:{exc.lineno}: not JSON: {exc.msg}") from None
    if not isinstance(data, dict):
        raise ValueError(f"{path}: expected a JSON object")
    return data


def write_html(night_dir: Path, out: Optional[Path] = None) -> Path:
    """Render the night in ``night_dir`` (a diary folder) to ``out`` (default
    ``night_dir/diary.html``), atomically; returns the path written.

    Raises:
        FileNotFoundError: ``night_dir`` has no ``steps.jsonl``.
        ValueError: ``steps.jsonl``, ``summary.json`` or ``started.json`` is malformed
            (the message names the file and line).
        OSError: ``out`` could not be written.
    """
    night_dir = Path(night_dir)
    if not (night_dir / "steps.jsonl").exists():
        raise FileNotFoundError(f"no diary for night {night_dir.name!r} in {night_dir.parent}")
    steps = read_steps(night_dir / "steps.jsonl")
    page = render_html(night_dir.name, steps, _read_json(night_dir / "summary.json"),
                       _read_json(night_dir / "started.json"))
    out = Path(out) if out else night_dir / "diary.html"
    try:
        atomic_write_text(out, page)
    except OSError as exc:
        raise OSError(f"cannot write {out}: {exc.strerror or exc}") from exc
    return out
