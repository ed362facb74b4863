"""Memory quality on invented days with hand-written gold lists: what a night keeps.

The days (``benchmarks/data/days/``) are Reverie day logs of a person chatting with the
assistant: ``dev1.jsonl`` and ``dev2.jsonl`` for development, ``heldout.jsonl`` kept untouched
for a final check (do not tune on it), and ``sample`` (the sample day shipped with Reverie,
``reverie ingest --sample``). Beside each is a gold list ``<day>.gold.json``:

* ``facts``: what a good note-taker keeps (facts about the user, their family, friends and
  pets, their rules for the assistant; a corrected fact in its new value), each with the turn
  that states it (``session_id/turn_id``) and ``keys``: groups of lower-case alternative
  substrings. A kept memory matches a fact when every group has an alternative in the
  memory's text + question + answer (lower-cased; "you"/"your" also read as "the user");
* ``forbidden``: what must never be kept (the target of the day's "Please forget ...", an old
  value the day says no longer holds), matched the same way and also against phrasings;
* ``misattribution_traps``: a relative's or pet's attribute written as the user's ("the user
  is a dentist" when the wife is).

The automatic score (recall, forbidden kept, traps hit) is a substring rule, so it is a guide:
the kept-memories table has an empty "judged" column to mark each memory by eye (true,
grounded, about the right person?), which is what decides precision.

Two parts:

1. ``--run OUT_DIR --day DAY``: a fresh data directory ``OUT_DIR``; ``reverie ingest DAY
   --user me`` (``--day sample``: ``reverie ingest --sample``; ``--day dev1`` names
   ``benchmarks/data/days/dev1.jsonl``, any other value is a file), then ``reverie night
   --json --user me`` with a copy of the config in which the forge is off (pure extraction)
   and every ``--set KEY=VALUE`` is merged (dotted key, YAML value). Wall seconds, exit codes,
   the night's JSON summary, the commit (and whether the work tree had changes), the CPU go
   to ``OUT_DIR/days_run.json``; the commands' output to ``OUT_DIR/logs/``.
2. ``--score OUT_DIR [--gold GOLD]``: the kept memories of user ``me`` (verified or learned,
   not superseded) against the gold list (``--gold dev1`` names
   ``benchmarks/data/days/dev1.gold.json``; default: the gold of the day the run ingested).
   Prints Markdown and appends it to ``benchmarks/results/days.md`` (``--results``;
   ``--no-write`` appends nothing); the full score goes to ``OUT_DIR/days_score.json``.

Reproduce (a night takes minutes of CPU; do not run two at once on a small machine):

    .venv/bin/python benchmarks/bench_days.py --run /tmp/days-dev1 --day dev1
    .venv/bin/python benchmarks/bench_days.py --score /tmp/days-dev1 --label baseline

    .venv/bin/python benchmarks/bench_days.py --run /tmp/days-dev2-big --day dev2 \\
        --set roles.notetaker.model=big \\
        --set models.chat.big=embedded:qwen2.5-coder-1.5b-instruct
    .venv/bin/python benchmarks/bench_days.py --score /tmp/days-dev2-big --gold dev2 \\
        --label "note-taker on 1.5B"

``--run OUT_DIR --day DAY --score OUT_DIR`` does both in one call.
"""

from __future__ import annotations

import argparse
import json
import re
import subprocess
import sys
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT / "benchmarks"))
DAYS = ROOT / "benchmarks" / "data" / "days"
RESULTS = ROOT / "benchmarks" / "results" / "days.md"
USER = "me"
RUN_FILE = "days_run.json"
SCORE_FILE = "days_score.json"
SAMPLE = "sample"

from bench_extraction import (  # noqa: E402  (benchmarks/ is not a package)
    _latest_summary,
    _merge,
    _reverie,
    bench_config,
    cell,
    cpu_model,
    day_turns,
    git_commit,
    kept_memories,
    memory_as_user,
)

# -- days, gold lists, settings ----------------------------------------------------------


def _named(name: str, suffix: str, what: str) -> Path:
    """``DAYS/<name><suffix>`` when ``name`` is a bare name of a shipped file there, else
    ``name`` as a path. Raises FileNotFoundError naming both places."""
    named = DAYS / f"{name}{suffix}"
    if "/" not in name and named.exists():
        return named
    path = Path(name)
    if not path.exists():
        raise FileNotFoundError(f"{name}: neither a {what} in {DAYS} nor a file")
    return path.resolve()


def day_file(day: str) -> Path | None:
    """The day log ``--day`` names: None for ``sample`` (``reverie ingest --sample``), a
    shipped day by name (``dev1`` -> ``benchmarks/data/days/dev1.jsonl``), else a path."""
    return None if day == SAMPLE else _named(day, ".jsonl", "day")


def gold_file(gold: str) -> Path:
    """The gold list ``--gold`` names: ``dev1`` -> ``benchmarks/data/days/dev1.gold.json``
    (``sample`` -> ``sample.gold.json``), else a path."""
    return _named(gold, ".gold.json", "gold list")


def gold_for_day(day: str) -> Path:
    """The gold list beside a day: ``sample`` or ``.../dev1.jsonl`` -> ``dev1.gold.json``."""
    name = SAMPLE if day == SAMPLE else Path(day).name.removesuffix(".jsonl")
    return gold_file(name)


def gold_day_file(gold: dict) -> Path:
    """The day log a gold list describes (its ``day``: a file in ``benchmarks/data/days``,
    or ``sample_day.jsonl``, the shipped sample day)."""
    path = DAYS / gold["day"]
    if path.exists():
        return path
    from reverie.memory.ingest import sample_day_path

    sample = sample_day_path()
    if gold["day"] == sample.name:
        return sample
    raise FileNotFoundError(f"{gold['day']}: not in {DAYS} and not the sample day")


def load_gold(path: Path) -> dict:
    """A gold list: ``{"day", "user", "facts", "forbidden", "misattribution_traps"}``."""
    gold = json.loads(Path(path).read_text(encoding="utf-8"))
    for section in ("facts", "forbidden", "misattribution_traps"):
        gold.setdefault(section, [])
    return gold


def read_day(path: Path) -> dict[tuple[str, str], dict]:
    """(session_id, turn_id) -> the message (``role``, ``content``, ...) of a day log."""
    out = {}
    for line in Path(path).read_text(encoding="utf-8").splitlines():
        if line.strip():
            session = json.loads(line)
            for m in session["messages"]:
                out[(session["session_id"], m["turn_id"])] = m
    return out


def parse_set(item: str) -> tuple[str, object]:
    """``"roles.notetaker.model=big"`` -> ``("roles.notetaker.model", "big")``; the value
    is read as YAML (``3`` an int, ``false`` a bool, ``embedded:x`` a string)."""
    import yaml

    key, sep, value = item.partition("=")
    key = key.strip()
    if not sep or not key or any(not part for part in key.split(".")):
        raise ValueError(f"--set {item!r}: expected KEY=VALUE with a dotted KEY")
    return key, yaml.safe_load(value)


def apply_sets(raw: dict, sets: list[tuple[str, object]]) -> dict:
    """``raw`` (a config mapping) with each dotted key set to its value (missing levels
    created); ``raw`` itself is not changed."""
    out = json.loads(json.dumps(raw, default=str))
    for key, value in sets:
        *parents, last = key.split(".")
        extra: dict = {last: value}
        for part in reversed(parents):
            extra = {part: extra}
        out = _merge(out, extra)
    return out


def days_config(config: Path, out_dir: Path, sets: list[tuple[str, object]]) -> Path:
    """bench_extraction's config copy (absolute paths, the config's model cache, forge off)
    in ``out_dir`` with ``sets`` merged in; validated here, so a bad key fails before a
    night starts."""
    import yaml

    from reverie.config import load_settings

    out_dir.mkdir(parents=True, exist_ok=True)
    path = bench_config(config, out_dir, forge=False)
    raw = apply_sets(yaml.safe_load(path.read_text()) or {}, sets)
    shown = ", ".join(f"{k}={json.dumps(v)}" for k, v in sets) or "none"
    path.write_text(f"# written by benchmarks/bench_days.py from {config}\n"
                    f"# forge off; --set: {shown}\n" + yaml.safe_dump(raw, sort_keys=False))
    load_settings(path)
    return path


def git_dirty() -> bool | None:
    """Whether the work tree has uncommitted changes to tracked files (None: unknown), so a
    run on uncommitted code is not mistaken for the commit's."""
    try:
        out = subprocess.run(["git", "status", "--porcelain", "--untracked-files=no"],
                             cwd=ROOT, capture_output=True, text=True, timeout=10, check=False)
    except (OSError, subprocess.SubprocessError):
        return None
    return bool(out.stdout.strip()) if out.returncode == 0 else None


# -- the run -----------------------------------------------------------------------------


def night_json(config: Path, out_dir: Path, user: str, log: Path) -> tuple[int, float, dict]:
    """Run ``reverie night --json --user USER``: its progress (stderr) goes through to ours
    and to ``log``, its JSON summary (stdout) is parsed. Returns (exit code, wall seconds,
    summary); the summary falls back to the new diary folder's ``summary.json`` when stdout
    holds no JSON (a failed night)."""
    cmd = [sys.executable, "-m", "reverie", "--config", str(config), "--data-dir",
           str(out_dir), "night", "--json", "--user", user]
    diary = out_dir / "diary"
    before = {d.name for d in diary.glob("*/")} if diary.exists() else set()
    log.parent.mkdir(parents=True, exist_ok=True)
    stdout_file = log.with_suffix(".stdout.json")
    t = time.perf_counter()
    with open(log, "a") as fh, open(stdout_file, "w") as out:
        fh.write("$ " + " ".join(cmd) + "\n")
        fh.flush()
        proc = subprocess.Popen(cmd, cwd=ROOT, stdout=out, stderr=subprocess.PIPE, text=True,
                                bufsize=1)
        assert proc.stderr is not None
        for line in proc.stderr:
            fh.write(line)
            sys.stderr.write(line)
        code = proc.wait()
    secs = time.perf_counter() - t
    try:
        summary = json.loads(stdout_file.read_text())
    except (OSError, ValueError):
        summary = _latest_summary(out_dir, before)
    return code, secs, summary if isinstance(summary, dict) else {}


def run(out_dir: Path, config: Path, day: str, sets: list[tuple[str, object]],
        user: str = USER) -> dict:
    """Ingest ``day`` into a fresh ``out_dir`` and sleep on it once (forge off, ``sets``
    merged into the config); returns (and writes to ``out_dir/days_run.json``) the record."""
    out_dir = out_dir.resolve()
    if out_dir.exists() and any(out_dir.iterdir()):
        raise SystemExit(f"{out_dir} is not empty: --run needs a fresh data directory")
    path = day_file(day)
    out_dir.mkdir(parents=True, exist_ok=True)
    cfg = days_config(config.resolve(), out_dir, sets)
    record: dict = {"day": SAMPLE if path is None else path.name,
                    "day_file": "reverie ingest --sample" if path is None else str(path),
                    "config": str(config.resolve()), "bench_config": str(cfg), "forge": False,
                    "sets": dict(sets), "user": user, "machine": cpu_model(),
                    "commit": git_commit(), "dirty": git_dirty(),
                    "started": time.strftime("%Y-%m-%d %H:%M:%S")}
    out_file = out_dir / RUN_FILE
    log = out_dir / "logs" / "ingest.log"
    what = ["--sample"] if path is None else [str(path)]
    code, secs, last = _reverie(cfg, out_dir, "ingest", *what, "--user", user, log=log)
    record.update({"ingest_exit": code, "ingest_seconds": round(secs, 1)})
    out_file.write_text(json.dumps(record, indent=1) + "\n")
    if code != 0:
        raise SystemExit(f"ingest of {day} failed ({code}): {last}; see {log}")
    print(f"--- night on {record['day']} ---", flush=True)
    log = out_dir / "logs" / "night.log"
    code, secs, summary = night_json(cfg, out_dir, user, log)
    record.update({"night_exit": code, "night_seconds": round(secs, 1),
                   "night_id": summary.get("night_id"), "graph_seconds": summary.get("seconds"),
                   "summary": summary, "finished": time.strftime("%Y-%m-%d %H:%M:%S")})
    out_file.write_text(json.dumps(record, indent=1) + "\n")
    print(f"night on {record['day']}: {secs:.0f} s (exit {code})", flush=True)
    if code != 0:
        raise SystemExit(f"night on {day} failed ({code}); see {log}")
    return record


# -- the score ---------------------------------------------------------------------------

_YOU = [(r"\byou are\b", "the user is"), (r"\byou were\b", "the user was"),
        (r"\byou have\b", "the user has")]


def normalise(text: str) -> str:
    """Lower-case, straight quotes, single spaces."""
    text = text.replace("\u2019", "'").replace("\u2018", "'").replace("\u201c", '"')
    return " ".join(text.replace("\u201d", '"').lower().split())


def haystack(memory, phrasings: bool = False) -> str:
    """What keys are looked for in: the memory's text, question and answer (and phrasings),
    lower-cased, as written and with "you"/"your" read as "the user"."""
    parts = [memory.text, memory.question, memory.answer]
    if phrasings:
        parts += list(memory.phrasings)
    written = " | ".join(p for p in parts if p)
    third = written
    for pattern, repl in _YOU:
        third = re.sub(pattern, repl, third, flags=re.IGNORECASE)
    third = memory_as_user(third)
    return f" {normalise(written)} || {normalise(third)} "


def matches(keys: list[list[str]], hay: str) -> bool:
    """Every group of ``keys`` has an alternative in ``hay`` (no keys: no match)."""
    return bool(keys) and all(any(alt.lower() in hay for alt in group) for group in keys)


def score(data_dir: Path, gold: dict, user: str = USER) -> dict:
    """The kept memories of ``user`` in ``data_dir`` against a gold list.

    Returns:
        ``{"user", "day", "n_kept", "n_facts", "n_matched", "recall", "forbidden_kept",
        "traps_hit", "unmatched_memories", "facts": [{"id", "fact", "turn", "matched_by",
        "turn_cited"}], "forbidden": [{"id", "what", "kept_by"}], "traps": [{"id", "what",
        "kept_by"}], "memories": [{"id", "kind", "status", "text", "question", "answer",
        "session", "turns": [[turn_id, "role: text"]], "gold", "forbidden", "traps"}]}``.
    """
    kept = kept_memories(Path(data_dir), user)
    try:
        turns = {k: f"{m['role']}: {m['content']}"
                 for k, m in read_day(gold_day_file(gold)).items()}
    except FileNotFoundError:
        turns = {}
    if (Path(data_dir) / "days").exists():
        turns.update(day_turns(Path(data_dir), user))
    plain = {m.id: haystack(m) for m in kept}
    with_phrasings = {m.id: haystack(m, phrasings=True) for m in kept}
    cited = {f"{m.source_session}/{t}" for m in kept for t in m.source_turns}

    def hits(items: list[dict], hays: dict[str, str]) -> list[dict]:
        return [{**{k: v for k, v in item.items() if k != "keys"},
                 "kept_by": [mid for mid, hay in hays.items() if matches(item["keys"], hay)]}
                for item in items]

    facts = [{"id": f["id"], "fact": f["fact"], "turn": f.get("turn", ""),
              "matched_by": [m.id for m in kept if matches(f["keys"], plain[m.id])],
              "turn_cited": f.get("turn", "") in cited} for f in gold["facts"]]
    forbidden = hits(gold["forbidden"], with_phrasings)
    traps = hits(gold["misattribution_traps"], plain)
    memories = []
    for m in kept:
        memories.append({
            "id": m.id, "kind": m.kind, "status": m.status, "text": m.text,
            "question": m.question, "answer": m.answer, "session": m.source_session,
            "turns": [[t, turns.get((m.source_session, t), "")] for t in m.source_turns],
            "gold": [f["id"] for f in facts if m.id in f["matched_by"]],
            "forbidden": [x["id"] for x in forbidden if m.id in x["kept_by"]],
            "traps": [x["id"] for x in traps if m.id in x["kept_by"]]})
    n, matched = len(facts), sum(bool(f["matched_by"]) for f in facts)
    return {"user": user, "day": gold.get("day", ""), "n_kept": len(kept), "n_facts": n,
            "n_matched": matched, "recall": matched / n if n else 0.0,
            "forbidden_kept": sum(bool(x["kept_by"]) for x in forbidden),
            "traps_hit": sum(bool(x["kept_by"]) for x in traps),
            "unmatched_memories": sum(not m["gold"] for m in memories),
            "facts": facts, "forbidden": forbidden, "traps": traps, "memories": memories}


def render(result: dict, label: str, run_info: dict | None) -> str:
    """The score as a Markdown section: header, summary, gold facts, forbidden items and
    traps, kept memories (with an empty "judged" column)."""
    run_info = run_info or {}
    machine = run_info.get("machine") or cpu_model()
    commit = run_info.get("commit") or git_commit() or "?"
    if run_info.get("dirty"):
        commit += " (+ uncommitted changes)"
    head = (f"## {time.strftime('%Y-%m-%d %H:%M')} · {label or 'unlabelled'} · {machine} · "
            f"day {result['day']} · commit {commit}")
    lines = [head, ""]
    if run_info:
        sets = ", ".join(f"`{k}={json.dumps(v)}`" for k, v in run_info.get("sets", {}).items())
        secs = run_info.get("night_seconds")
        night = (f"Night: {f'{secs:.0f} s' if secs is not None else 'n/a'} wall "
                 f"(`reverie night`, exit {run_info.get('night_exit', '?')}); forge off; "
                 f"settings overrides: {sets or 'none'}.")
        lines += [night, ""]
    else:
        lines += ["No run record (days_run.json) in the data directory.", ""]
    summary = (f"| {result['n_kept']} | {result['n_facts']} | {result['n_matched']} | "
               f"{result['recall']:.2f} | {result['forbidden_kept']} of "
               f"{len(result['forbidden'])} | {result['traps_hit']} of {len(result['traps'])} | "
               f"{result['unmatched_memories']} |")
    lines += [("Auto: a memory matches a gold fact when each key group has an alternative in "
               "its text + question + answer (lower-cased). Precision is judged by eye in the "
               "last table."), "",
              ("| kept | gold facts | matched | auto recall | forbidden kept | traps hit "
               "| kept matching no gold |"),
              "|---|---|---|---|---|---|---|", summary, "",
              "### Gold facts", "",
              "| id | fact | turn | matched by | turn cited |", "|---|---|---|---|---|"]
    texts = {m["id"]: m["text"] or f"{m['question']} → {m['answer']}" for m in result["memories"]}
    for f in result["facts"]:
        by = f["matched_by"]
        shown = (f"{by[0]}: {cell(texts.get(by[0], ''), 110)}"
                 + (f" (+{len(by) - 1} more)" if len(by) > 1 else "")) if by else "—"
        lines.append(f"| {f['id']} | {cell(f['fact'], 110)} | {f['turn']} | {shown} | "
                     f"{'yes' if f['turn_cited'] else 'no'} |")
    lines += ["", "### Forbidden and misattribution traps", "",
              "| id | must not be kept | kept by |", "|---|---|---|"]
    for x in result["forbidden"] + result["traps"]:
        lines.append(f"| {x['id']} | {cell(x['what'], 110)} | "
                     f"{', '.join(x['kept_by']) or '—'} |")
    lines += ["", "### Kept memories (judge by eye: true, grounded, about the right person?)", "",
              "| memory | kind | text | question → answer | cited turns | gold | judged |",
              "|---|---|---|---|---|---|---|"]
    for m in result["memories"]:
        qa = f"{m['question']} → {m['answer']}" if m["question"] or m["answer"] else "—"
        turns = "<br>".join(f"[{t}] {cell(text, 140)}" for t, text in m["turns"]) or "—"
        flags = m["gold"] + [f"**{x} FORBIDDEN**" for x in m["forbidden"]] \
            + [f"**{x} TRAP**" for x in m["traps"]]
        lines.append(f"| {m['id']} | {m['kind']} | {cell(m['text'] or '—', 140)} | "
                     f"{cell(qa, 120)} | {m['session']}: {turns} | "
                     f"{', '.join(flags) or 'none'} |  |")
    if not result["memories"]:
        lines.append("| — | | no memory kept | | | | |")
    return "\n".join(lines)


def write_results(text: str, path: Path) -> None:
    """Append a scored section to the results file (created with a heading)."""
    path.parent.mkdir(parents=True, exist_ok=True)
    old = path.read_text() if path.exists() else (
        "# Memory quality on invented days\n\nWritten by `benchmarks/bench_days.py --score`; "
        "see its docstring to reproduce. Gold lists: `benchmarks/data/days/*.gold.json`. "
        "The held-out day is for final checks only.\n")
    path.write_text(old.rstrip("\n") + "\n\n" + text + "\n")


def main(argv: list[str] | None = None) -> None:
    ap = argparse.ArgumentParser(description=__doc__,
                                 formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--run", type=Path, metavar="OUT_DIR",
                    help="ingest --day into this fresh data directory and sleep once")
    ap.add_argument("--day", help="dev1 | dev2 | heldout | sample | a day-log file")
    ap.add_argument("--set", dest="sets", action="append", default=[], metavar="KEY=VALUE",
                    help="config override for --run (dotted key, YAML value); repeatable")
    ap.add_argument("--config", type=Path, default=ROOT / "config.yaml")
    ap.add_argument("--score", type=Path, metavar="OUT_DIR",
                    help="score the kept memories in this data directory")
    ap.add_argument("--gold", help="dev1 | dev2 | heldout | sample | a gold file (default: "
                                   "the gold of the day the run ingested)")
    ap.add_argument("--user", default=USER, help="the Reverie user the day is ingested for")
    ap.add_argument("--label", default="", help="names the scored run in the results file")
    ap.add_argument("--results", type=Path, default=RESULTS,
                    help="Markdown file the score section is appended to")
    ap.add_argument("--no-write", action="store_true", help="print only; append nothing")
    args = ap.parse_args(argv)
    if not (args.run or args.score):
        ap.error("give --run OUT_DIR --day DAY and/or --score OUT_DIR")
    if args.run and not args.day:
        ap.error("--run needs --day (dev1, dev2, heldout, sample or a file)")
    try:
        sets = [parse_set(s) for s in args.sets]
        if args.run:
            day_file(args.day)
    except (ValueError, FileNotFoundError) as exc:
        ap.error(str(exc))

    import reverie  # noqa: F401  (OpenBLAS before mlx)

    if args.run:
        run(args.run, args.config, args.day, sets, args.user)
    if args.score:
        data_dir = args.score.resolve()
        run_file = data_dir / RUN_FILE
        run_info = json.loads(run_file.read_text()) if run_file.exists() else None
        try:
            if args.gold:
                gold_path = gold_file(args.gold)
            elif run_info:
                gold_path = gold_for_day(run_info["day"])
            else:
                ap.error(f"--gold is needed: no {RUN_FILE} in {data_dir}")
        except FileNotFoundError as exc:
            ap.error(str(exc))
        result = score(data_dir, load_gold(gold_path), args.user)
        result["gold_file"] = str(gold_path)
        result["label"] = args.label
        text = render(result, args.label, run_info)
        print(text)
        (data_dir / SCORE_FILE).write_text(json.dumps(result, indent=1, ensure_ascii=False)
                                           + "\n")
        if not args.no_write:
            write_results(text, args.results)


if __name__ == "__main__":
    main()
