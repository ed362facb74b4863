"""The dream diary: every agent step of a night, for people to read.

``diary/<night-id>/`` holds ``steps.jsonl`` (one :class:`DiaryStep` per line, appended as
the night runs), ``transcript.md`` (the same steps as Markdown: appended step by step as the
night runs, so ``tail -f`` follows it, then rewritten whole, with the summary on top, when
the night ends) and ``summary.json`` (counts, time and tokens per agent; written last, so
a night without one is unfinished). A resumed night appends to the same files, each
``step_id`` (deterministic) once: a step recorded before the kill is not recorded again,
and an agent step's line carries what it produced (``produced``), so a resumed night takes
that from the diary instead of calling the agent a second time (:meth:`Diary.recorded`). A
line cut off by the kill is dropped when the night resumes. ``reverie diary html`` renders a night as one web page
(:mod:`reverie.memory.diary_html`).
"""

from __future__ import annotations

import json
import threading
from collections import defaultdict
from datetime import datetime
from pathlib import Path
from typing import Any, Iterable, Optional

from pydantic import BaseModel, Field, ValidationError

from reverie.files import atomic_write_text
from reverie.memory.records import now


class DiaryStep(BaseModel):
    """One agent step. ``prompt`` is the rendered messages ``[{role, content}]``;
    ``raw_output`` the model's text; ``parsed`` what was read from it; ``verdict`` e.g.
    ``pass``/``fail``/``approve``/``veto``/``routed``; ``duration_s`` wall seconds."""

    step_id: str
    night_id: str
    agent: str
    at: datetime = Field(default_factory=now)
    model: str = ""
    temperature: Optional[float] = None
    prompt: list[dict] = Field(default_factory=list)
    raw_output: str = ""
    parsed: Any = None
    scores: dict = Field(default_factory=dict)
    verdict: str = ""
    reasons: list[str] = Field(default_factory=list)
    round: int = 0
    candidate_id: str = ""
    memory_id: str = ""
    session_id: str = ""
    duration_s: float = 0.0
    input_tokens: int = 0
    output_tokens: int = 0
    attempts: int = 1
    error: str = ""
    # what was dropped or changed after the call, for a model that was not grammar-bound
    checks: list[str] = Field(default_factory=list)
    # what the step put into the night's state (an agent step: the candidates it returned,
    # as JSON), written in the same line as the step: a resumed night reuses it rather than
    # calling the agent again (graphs/night.py); not shown in the transcript
    produced: Any = None


class Diary:
    """Appends the steps of one night and renders them (thread-safe).

    Args:
        root: the diary folder (``paths.diary``).
        night_id: the night's id; its files live in ``root/night_id``.
    """

    def __init__(self, root: Path, night_id: str):
        self.dir = Path(root) / night_id
        self.night_id = night_id
        self._lock = threading.Lock()
        self._known: Optional[dict[str, DiaryStep]] = None  # step_id -> step, once read

    def _recorded_steps(self) -> dict[str, DiaryStep]:
        """The steps already in ``steps.jsonl`` by id (read once, under the lock). A last
        line without its newline was cut off by a kill: it is truncated away, so the next
        step starts a line of its own."""
        if self._known is None:
            if self.steps_file.exists():
                data = self.steps_file.read_bytes()
                if data and not data.endswith(b"\n"):
                    with open(self.steps_file, "r+b") as f:
                        f.truncate(data.rfind(b"\n") + 1)
            self._known = {s.step_id: s for s in read_steps(self.steps_file)}
        return self._known

    @property
    def steps_file(self) -> Path:
        return self.dir / "steps.jsonl"

    @property
    def transcript_file(self) -> Path:
        return self.dir / "transcript.md"

    def record(self, step: DiaryStep) -> None:
        """Append one step to ``steps.jsonl`` and, as Markdown, to ``transcript.md`` (each
        flushed at once, so a killed night keeps what it did and ``tail -f`` follows it).
        A step whose ``step_id`` is recorded already (a resumed night doing a step again)
        is not written twice: the first record stands."""
        line = step.model_dump_json() + "\n"
        with self._lock:
            known = self._recorded_steps()
            if step.step_id in known:
                return
            known[step.step_id] = step
            self.dir.mkdir(parents=True, exist_ok=True)
            with open(self.steps_file, "a", encoding="utf-8") as f:
                f.write(line)
            fresh = not self.transcript_file.exists()
            with open(self.transcript_file, "a", encoding="utf-8") as f:
                f.write((live_head(self.night_id) if fresh else "") + render_step(step) + "\n")

    def steps(self) -> list[DiaryStep]:
        return read_steps(self.steps_file)

    def recorded(self, step_id: str) -> Optional[DiaryStep]:
        """Step ``step_id`` if this night recorded it already (before a kill), else None."""
        with self._lock:
            return self._recorded_steps().get(step_id)

    def finish(self, extra: dict) -> dict:
        """Rewrite ``transcript.md`` whole (summary on top, steps in time order, each once),
        then write ``summary.json`` (``extra`` plus per-agent time and tokens), each
        atomically; returns the summary. ``summary.json`` goes last: it marks the night
        finished, so a crash before it leaves a night that resumes."""
        steps = self.steps()
        summary = {"night_id": self.night_id, **extra, "agents": per_agent(steps)}
        atomic_write_text(self.transcript_file, render_markdown(self.night_id, steps, summary))
        atomic_write_text(self.dir / "summary.json",
                          json.dumps(summary, indent=1, default=str) + "\n")
        return summary


def read_steps(path: Path) -> list[DiaryStep]:
    """Steps of a ``steps.jsonl`` file, each ``step_id`` once (the last record wins). A
    last line without its newline that does not parse was cut off by a kill: skipped.

    Raises:
        ValueError: a line is not a diary step (the message names the file and line).
    """
    if not Path(path).exists():
        return []
    by_id: dict[str, DiaryStep] = {}
    text = Path(path).read_text(encoding="utf-8", errors="replace")
    # newlines only: splitlines would also split at U+2028, U+2029 and NEL, which a step's
    # JSON holds raw inside its strings (a day's text, a model's answer)
    lines = text.split("\n")
    for n, line in enumerate(lines, 1):
        if line.strip():
            try:
                step = DiaryStep.model_validate_json(line)
            except ValidationError as exc:
                if n == len(lines) and not text.endswith("\n"):
                    break
                raise ValueError(f"{path}:{n}: not a diary step: "
                                 f"{exc.errors()[0].get('msg', exc)}") from None
            by_id.pop(step.step_id, None)
            by_id[step.step_id] = step
    return list(by_id.values())


def per_agent(steps: Iterable[DiaryStep]) -> dict:
    """``{agent: {steps, call_seconds, input_tokens, output_tokens}}``; ``call_seconds`` adds
    up each call's wall time, so concurrent calls can sum to more than the night took."""
    table: dict[str, dict] = defaultdict(lambda: {"steps": 0, "call_seconds": 0.0,
                                                  "input_tokens": 0, "output_tokens": 0})
    for s in steps:
        row = table[s.agent]
        row["steps"] += 1
        row["call_seconds"] = round(row["call_seconds"] + s.duration_s, 2)
        row["input_tokens"] += s.input_tokens
        row["output_tokens"] += s.output_tokens
    return dict(table)


def filter_steps(steps: list[DiaryStep], agent: str | None = None, memory: str | None = None,
                 status: str | None = None) -> list[DiaryStep]:
    """Steps of one agent, about one candidate or memory id, and/or with one verdict."""
    out = steps
    if agent:
        out = [s for s in out if s.agent == agent]
    if memory:
        out = [s for s in out if memory in (s.candidate_id, s.memory_id)]
    if status:
        out = [s for s in out if s.verdict == status]
    return out


def _quote(text: str, limit: int = 1200) -> str:
    text = text if len(text) <= limit else text[:limit] + f" … ({len(text)} chars)"
    # two trailing spaces keep the quoted lines apart in rendered Markdown
    return "\n".join("> " + line + "  " for line in text.splitlines()) or "> (empty)"


def render_step(s: DiaryStep) -> str:
    """One step as Markdown."""
    head = f"### {s.at:%H:%M:%S} {s.agent}"
    if s.verdict:
        head += f" — **{s.verdict}**"
    meta = [f"model `{s.model}`" if s.model else "", f"temperature {s.temperature}"
            if s.temperature is not None else "", f"round {s.round}" if s.round else "",
            f"candidate `{s.candidate_id}`" if s.candidate_id else "",
            f"memory `{s.memory_id}`" if s.memory_id else "",
            f"session `{s.session_id}`" if s.session_id else "",
            f"{s.duration_s:.1f} s" if s.duration_s else "",
            f"{s.input_tokens}+{s.output_tokens} tokens" if s.input_tokens or s.output_tokens else "",
            f"{s.attempts} attempts" if s.attempts > 1 else ""]
    parts = [head, " · ".join(m for m in meta if m)]
    if s.prompt:
        last_user = next((m["content"] for m in reversed(s.prompt) if m.get("role") in ("user", "human")), "")
        parts.append("Asked:\n\n" + _quote(last_user, 600))
    if s.raw_output:
        parts.append("Said:\n\n" + _quote(s.raw_output))
    if s.scores:
        parts.append("Scores: " + ", ".join(f"{k} {v:.2f}" if isinstance(v, float) else f"{k} {v}"
                                           for k, v in s.scores.items()))
    if s.reasons:
        parts.append("Reasons:\n" + "\n".join(f"- {r}" for r in s.reasons))
    if s.checks:
        parts.append("Checked after the call:\n" + "\n".join(f"- {c}" for c in s.checks))
    if s.error:
        parts.append(f"Error: {s.error}")
    return "\n\n".join(p for p in parts if p) + "\n"


def live_head(night_id: str) -> str:
    """The top of ``transcript.md`` while the night runs (:func:`render_markdown`'s title
    and a note; the finished night's summary replaces the note)."""
    return (f"# Dream diary — night {night_id}\n\n_The night is running or was stopped: steps "
            "are added as they happen; the summary comes when it ends._\n\n")


def render_markdown(night_id: str, steps: list[DiaryStep], summary: dict | None = None) -> str:
    """The whole night as Markdown: a summary table, then every step in order."""
    lines = [f"# Dream diary — night {night_id}", ""]
    if summary:
        lines += ["| | |", "|---|---|"]
        lines += [f"| {k} | {v} |" for k, v in summary.items() if not isinstance(v, (dict, list))]
        lines += ["", "| agent | steps | call seconds (summed over concurrent calls) | tokens in "
                  "| tokens out |", "|---|---|---|---|---|"]
        for agent, row in summary.get("agents", {}).items():
            lines.append(f"| {agent} | {row['steps']} | {row['call_seconds']} | {row['input_tokens']} "
                         f"| {row['output_tokens']} |")
        lines.append("")
    for s in sorted(steps, key=lambda s: s.at):
        lines.append(render_step(s))
    return "\n".join(lines)


def list_nights(root: Path) -> list[dict]:
    """Every night in the diary folder with its summary (or ``unfinished``), oldest first."""
    out = []
    for d in sorted(Path(root).glob("*/")) if Path(root).exists() else []:
        summary_file = d / "summary.json"
        if summary_file.exists():
            out.append(json.loads(summary_file.read_text()))
        elif (d / "steps.jsonl").exists() or (d / "started.json").exists():
            # started.json alone: killed before its first step, it resumes from the start
            out.append({"night_id": d.name, "status": "unfinished",
                        "steps": len(read_steps(d / "steps.jsonl"))})
    return out
