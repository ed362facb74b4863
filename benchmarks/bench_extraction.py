"""Memory extraction against LoCoMo's gold observations: what a night's agents keep.

LoCoMo annotates every session with ``session_N_observation``: facts per speaker with the
dialogue ids of their evidence (conv-30 session 1, Jon: "Jon lost his job as a banker ..."
at D1:2). Nobody here wrote them, so they are an outside yardstick for the dreamer, verifier,
reshaper and persona consultant. ``reverie ingest`` makes speaker_a (Jon in conv-30) the
user, so his observations are the gold.

Two parts:

1. ``--run OUT_DIR``: a fresh data directory; for each session in order, ``reverie ingest
   conv-30.json --user jon --sessions N`` then ``reverie night`` (a subprocess each), timing
   every night. ``--no-forge`` merges ``forge: {enabled: false}`` into a copy of the config
   (pure extraction, no training). Seconds per night, exit codes and each night's summary go
   to ``OUT_DIR/extraction_run.json``; each night's output to ``OUT_DIR/logs/``.
2. ``--score DATA_DIR``: the user's kept memories (verified or learned, not superseded)
   against the speaker's observations for those sessions, by cosine similarity of
   all-MiniLM-L6-v2 embeddings (unless ``--as-written``, the speaker's name in an observation
   and "you"/"your" in a memory both become "the user", so the match is on content, not on
   person: "Jon's favorite dance style ..." against "What is your favorite dance style?").
   Observation recall = the share of observations whose best-matching memory reaches the
   threshold (also at 0.5 / 0.6 / 0.7), plus the share whose evidence turn some kept memory
   cites. Each kept memory is listed with its cited turns and its nearest observation, and a
   blank "judged" column for a person to mark precision by eye.

Reproduce (the LoCoMo file is not shipped; CC BY-NC, see ``../shared/data/locomo/``; a night
takes several minutes of CPU):

    .venv/bin/python benchmarks/bench_extraction.py --run /tmp/ext --sessions 1-3 --no-forge
    .venv/bin/python benchmarks/bench_extraction.py --score /tmp/ext --sessions 1-3 --label smollm2

``--run OUT_DIR --score OUT_DIR`` does both. ``--locomo FILE`` names another copy of the
conversation (default ``../shared/data/locomo/conv-30.json``, beside the repository).
Prints Markdown tables and appends them to benchmarks/results/extraction.md (``--results``;
``--no-write`` appends nothing); the full score goes to ``DATA_DIR/extraction_score.json``.
"""

from __future__ import annotations

import argparse
import json
import platform
import re
import subprocess
import sys
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
RESULTS = ROOT / "benchmarks" / "results"
LOCOMO = ROOT.parent / "shared" / "data" / "locomo" / "conv-30.json"
THRESHOLDS = (0.5, 0.6, 0.7)
KEPT = ("verified", "learned")
RUN_FILE = "extraction_run.json"
SCORE_FILE = "extraction_score.json"


# -- helpers -----------------------------------------------------------------------------


def parse_sessions(text: str) -> list[int]:
    """``"1-3"``, ``"1,3"``, ``"2"`` -> sorted session numbers."""
    from reverie.cli.ingest import parse_session_numbers

    numbers = parse_session_numbers(text)
    if not numbers:
        raise ValueError(f"no sessions in {text!r}")
    return sorted(numbers)


def cpu_model() -> str:
    try:
        out = subprocess.run(["lscpu"], capture_output=True, text=True, timeout=10).stdout
        for line in out.splitlines():
            if line.lower().startswith("model name"):
                return line.split(":", 1)[1].strip()
    except (OSError, subprocess.SubprocessError):
        pass
    return platform.processor() or platform.machine()


def publish(text: str, name: str) -> None:
    """Print a benchmark's table and append it to ``benchmarks/results/<name>`` (results
    are kept in the repository, newest last)."""
    print(text)
    RESULTS.mkdir(parents=True, exist_ok=True)
    with open(RESULTS / name, "a", encoding="utf-8") as f:
        f.write(text + "\n")


def git_commit() -> str:
    try:
        return subprocess.run(["git", "rev-parse", "--short", "HEAD"], cwd=ROOT,
                              capture_output=True, text=True, timeout=10).stdout.strip()
    except (OSError, subprocess.SubprocessError):
        return ""


def cell(text: object, limit: int = 0) -> str:
    """Text safe in a Markdown table cell (one line, pipes escaped), cut to ``limit``."""
    s = " ".join(str(text).split())
    if limit and len(s) > limit:
        s = s[:limit - 1] + "…"
    return s.replace("|", "\\|")


def load_conversation(path: Path) -> dict:
    """The LoCoMo conversation object (the file's, or its ``conversation`` field)."""
    doc = json.loads(Path(path).read_text())
    if isinstance(doc, list):
        if len(doc) != 1:
            raise ValueError(f"{path}: {len(doc)} conversations; give a file with one")
        doc = doc[0]
    conv = doc["conversation"] if isinstance(doc.get("conversation"), dict) else doc
    # observations sit beside the sessions (conv-30.json) or at the sample's top level
    for key, value in doc.items():
        if key.endswith("_observation") and key not in conv:
            conv = {**conv, key: value}
    if isinstance(doc.get("observation"), dict):
        conv = {**conv, **{k: v for k, v in doc["observation"].items() if k not in conv}}
    return conv


def observations(conv: dict, sessions: list[int]) -> tuple[str, list[dict]]:
    """speaker_a (the speaker ``reverie ingest`` makes the user) and their observations for
    ``sessions``: ``{"session", "fact", "evidence": [dia_id, ...]}`` in file order."""
    speaker = conv["speaker_a"]
    out = []
    for n in sessions:
        per_speaker = conv.get(f"session_{n}_observation") or {}
        for item in per_speaker.get(speaker, []):
            fact, evidence = item[0], item[1] if len(item) > 1 else []
            evidence = [evidence] if isinstance(evidence, str) else list(evidence)
            out.append({"session": n, "fact": fact, "evidence": [str(e) for e in evidence]})
    return speaker, out


def as_user(fact: str, speaker: str) -> str:
    """The observation as a memory would say it: the speaker's name becomes "the user"."""
    fact = re.sub(rf"\b{re.escape(speaker)}'s\b", "the user's", fact)
    return re.sub(rf"\b{re.escape(speaker)}\b", "the user", fact)


_SECOND_PERSON = [(r"\byou're\b", "the user is"), (r"\byou've\b", "the user has"),
                  (r"\byours\b", "the user's"), (r"\byour\b", "the user's"),
                  (r"\byourself\b", "the user"), (r"\byou\b", "the user")]


def memory_as_user(statement: str) -> str:
    """A memory in the third person: a dreamer's "What is your favourite dance?" becomes
    "What is the user's favourite dance?" (observations speak of the user by name)."""
    for pattern, repl in _SECOND_PERSON:
        statement = re.sub(pattern, repl, statement, flags=re.IGNORECASE)
    return statement


def locomo_turns(conv: dict) -> dict[str, str]:
    """dia_id -> "speaker: text" for every turn of the conversation."""
    out = {}
    for key, turns in conv.items():
        if re.fullmatch(r"session_\d+", key) and isinstance(turns, list):
            for t in turns:
                text = t.get("text", "")
                if t.get("blip_caption"):
                    text = f"{text} [image: {t['blip_caption']}]"
                out[t.get("dia_id", "")] = f"{t.get('speaker', '?')}: {text}"
    return out


def session_number(session_id: str) -> int | None:
    """``locomo-conv-30-s2`` -> 2 (the id ``reverie ingest`` gives a LoCoMo session)."""
    m = re.search(r"-s(\d+)$", session_id or "")
    return int(m.group(1)) if m else None


def model_cache(config: Path | None) -> Path:
    """The model cache the config names, resolved as for the repository's own data folder
    (so a fresh data dir reuses the models ``reverie models pull`` fetched)."""
    from reverie.config import load_settings

    return load_settings(config).paths.model_cache.resolve()


# -- the run -----------------------------------------------------------------------------


def _merge(base: dict, extra: dict) -> dict:
    out = dict(base)
    for k, v in extra.items():
        out[k] = _merge(out[k], v) if isinstance(v, dict) and isinstance(out.get(k), dict) else v
    return out


def bench_config(config: Path, out_dir: Path, forge: bool) -> Path:
    """A copy of ``config`` in ``out_dir`` with absolute paths (the copy lives elsewhere, and
    the models stay in the config's own cache) and, unless ``forge``, the forge off."""
    import yaml

    from reverie.config import load_settings

    raw = yaml.safe_load(config.read_text()) or {}
    settings = load_settings(config)
    extra: dict = {"data_dir": str(out_dir), "models": {"cache_dir": str(model_cache(config))}}
    if settings.prompts.dir is not None:
        extra["prompts"] = {"dir": str(settings.prompts.dir)}
    if settings.identity_file is not None:
        extra["identity_file"] = str(settings.identity_file)
    if not forge:
        extra["forge"] = {"enabled": False}
    path = out_dir / "bench-config.yaml"
    path.write_text("# written by benchmarks/bench_extraction.py from " + str(config) + "\n"
                    + yaml.safe_dump(_merge(raw, extra), sort_keys=False))
    load_settings(path)  # fails here, not in the night, if the merge is invalid
    return path


def _reverie(config: Path, out_dir: Path, *args: str, log: Path) -> tuple[int, float, str]:
    """Run ``reverie --config C --data-dir D ARGS`` (this interpreter's ``reverie.cli``);
    output goes through to ours and to ``log``. Returns (exit code, wall seconds, last line)."""
    cmd = [sys.executable, "-m", "reverie", "--config", str(config), "--data-dir",
           str(out_dir), *args]
    log.parent.mkdir(parents=True, exist_ok=True)
    last = ""
    t = time.perf_counter()
    with open(log, "a") as fh:
        fh.write("$ " + " ".join(cmd) + "\n")
        proc = subprocess.Popen(cmd, cwd=ROOT, stdout=subprocess.PIPE, stderr=subprocess.STDOUT,
                                text=True, bufsize=1)
        assert proc.stdout is not None
        for line in proc.stdout:
            fh.write(line)
            sys.stdout.write(line)
            if line.strip():
                last = line.strip()
        code = proc.wait()
    return code, time.perf_counter() - t, last


def _latest_summary(out_dir: Path, before: set[str]) -> dict:
    """The summary.json of the night the last ``reverie night`` wrote (a new diary folder)."""
    diary = out_dir / "diary"
    new = sorted(d for d in diary.glob("*/") if d.name not in before) if diary.exists() else []
    for d in reversed(new):
        if (d / "summary.json").exists():
            return json.loads((d / "summary.json").read_text())
    return {}


def run(out_dir: Path, config: Path, sessions: list[int], user: str, locomo: Path,
        forge: bool) -> dict:
    """Ingest and sleep each session in order into a fresh ``out_dir``; returns (and writes
    to ``out_dir/extraction_run.json``) the timings."""
    out_dir = out_dir.resolve()
    if out_dir.exists() and any(out_dir.iterdir()):
        raise SystemExit(f"{out_dir} is not empty: --run needs a fresh data directory")
    out_dir.mkdir(parents=True, exist_ok=True)
    cfg = bench_config(config.resolve(), out_dir, forge)
    record = {"locomo": str(locomo), "config": str(config.resolve()), "bench_config": str(cfg),
              "forge": forge, "user": user, "sessions": sessions, "machine": cpu_model(),
              "commit": git_commit(), "started": time.strftime("%Y-%m-%d %H:%M:%S"),
              "nights": []}
    out_file = out_dir / RUN_FILE
    for n in sessions:
        log = out_dir / "logs" / f"session-{n}.log"
        code, secs, last = _reverie(cfg, out_dir, "ingest", str(locomo), "--user", user,
                                    "--sessions", str(n), log=log)
        entry: dict = {"session": n, "ingest_exit": code, "ingest_seconds": round(secs, 1)}
        record["nights"].append(entry)
        if code != 0:
            out_file.write_text(json.dumps(record, indent=1) + "\n")
            raise SystemExit(f"ingest of session {n} failed ({code}): {last}; see {log}")
        before = {d.name for d in (out_dir / "diary").glob("*/")} \
            if (out_dir / "diary").exists() else set()
        print(f"--- night after session {n} ---", flush=True)
        code, secs, last = _reverie(cfg, out_dir, "night", "--user", user, log=log)
        summary = _latest_summary(out_dir, before)
        entry.update({"night_exit": code, "night_seconds": round(secs, 1),
                      "night_id": summary.get("night_id"),
                      "graph_seconds": summary.get("seconds"),
                      "summary": {k: v for k, v in summary.items()
                                  if not isinstance(v, (dict, list))}})
        out_file.write_text(json.dumps(record, indent=1) + "\n")
        print(f"session {n}: night {secs:.0f} s (exit {code})", flush=True)
        if code != 0:
            raise SystemExit(f"night after session {n} failed ({code}): {last}; see {log}")
    record["finished"] = time.strftime("%Y-%m-%d %H:%M:%S")
    out_file.write_text(json.dumps(record, indent=1) + "\n")
    return record


# -- the score ---------------------------------------------------------------------------


def kept_memories(data_dir: Path, user: str):
    """The user's current memories that a night kept: verified or learned, not superseded."""
    from reverie.memory.store import MemoryStore
    from reverie.paths import Paths

    db = Paths(data_dir).memories_db
    if not db.exists():
        return []
    with MemoryStore(db) as store:
        return [m for m in store.list(user_id=user, status=list(KEPT)) if m.superseded_by is None]


def day_turns(data_dir: Path, user: str) -> dict[tuple[str, str], str]:
    """(session_id, turn_id) -> "role: text" from the data dir's day log."""
    from reverie.memory.daylog import DayLog
    from reverie.paths import Paths

    out = {}
    for s in DayLog(Paths(data_dir).days).sessions(user):
        for m in s.messages:
            out[(s.session_id, m.turn_id)] = f"{m.role}: {m.content}"
    return out


def score(data_dir: Path, sessions: list[int], user: str, locomo: Path, embedder,
          threshold: float = 0.6, as_written: bool = False) -> dict:
    """Match the kept memories of ``user`` in ``data_dir`` against the observations of the
    speaker ``reverie ingest`` made the user, for ``sessions``.

    Args:
        embedder: anything with ``embed(list[str]) -> (n, d) array`` (an
            :class:`~reverie.runtime.embeddings.Embedder`).

    Returns:
        ``{"speaker", "threshold", "recall": {t: share}, "evidence_recall", "observations":
        [{"session", "fact", "evidence", "best_memory", "similarity", "cited"}], "memories":
        [{"id", "kind", "statement", "session", "turns": [[id, text]], "best_observation",
        "similarity"}]}``.
    """
    import numpy as np

    conv = load_conversation(locomo)
    speaker, obs = observations(conv, sessions)
    memories = kept_memories(data_dir, user)
    log_turns = day_turns(data_dir, user)
    gold_turns = locomo_turns(conv)

    def unit(x):
        x = np.asarray(x, dtype=np.float32)
        return x / np.maximum(np.linalg.norm(x, axis=1, keepdims=True), 1e-12)

    obs_texts = [o["fact"] if as_written else as_user(o["fact"], speaker) for o in obs]
    mem_texts = [m.statement() for m in memories]
    mem_embedded = [t if as_written else memory_as_user(t) for t in mem_texts]
    sim = np.zeros((len(obs), len(memories)), dtype=np.float32)
    if obs and memories:  # cosine similarity of unit vectors
        sim = unit(embedder.embed(obs_texts)) @ unit(embedder.embed(mem_embedded)).T

    cites = {(session_number(m.source_session), t) for m in memories for t in m.source_turns}
    obs_rows = []
    for i, o in enumerate(obs):
        j = int(sim[i].argmax()) if memories else None
        cited = any((o["session"], e) in cites for e in o["evidence"])
        obs_rows.append({**o, "text_embedded": obs_texts[i],
                         "best_memory": memories[j].id if j is not None else None,
                         "best_statement": mem_texts[j] if j is not None else "",
                         "similarity": float(sim[i, j]) if j is not None else 0.0,
                         "cited": cited})
    mem_rows = []
    for j, m in enumerate(memories):
        i = int(sim[:, j].argmax()) if obs else None
        turns = []
        for t in m.source_turns:
            text = log_turns.get((m.source_session, t)) or gold_turns.get(t) or "(not found)"
            turns.append([t, text])
        mem_rows.append({"id": m.id, "kind": m.kind, "status": m.status,
                         "statement": m.statement(), "text_embedded": mem_embedded[j],
                         "session": m.source_session,
                         "night": m.night_id, "turns": turns,
                         "best_observation": obs[i]["fact"] if i is not None else "",
                         "similarity": float(sim[i, j]) if i is not None else 0.0})
    levels = sorted({*THRESHOLDS, threshold})
    n = len(obs)
    return {"speaker": speaker, "user": user, "sessions": sessions, "threshold": threshold,
            "as_written": as_written, "n_observations": n, "n_memories": len(memories),
            "recall": {f"{t:.2f}": (sum(r["similarity"] >= t for r in obs_rows) / n if n else 0.0)
                       for t in levels},
            "evidence_recall": sum(r["cited"] for r in obs_rows) / n if n else 0.0,
            "observations": obs_rows, "memories": mem_rows}


def render(result: dict, label: str, run_info: dict | None) -> str:
    """The score as a Markdown section."""
    sessions = result["sessions"]
    contiguous = sessions == list(range(sessions[0], sessions[-1] + 1))
    span = f"{sessions[0]}-{sessions[-1]}" if contiguous else ",".join(map(str, sessions))
    head = (f"## {time.strftime('%Y-%m-%d %H:%M')} · {label or 'unlabelled'} · {cpu_model()} · "
            f"conv-30 sessions {span} · speaker {result['speaker']} as user "
            f"`{result['user']}`")
    lines = [head, ""]
    if run_info:
        per = [f"s{e['session']} {e['night_seconds']:.0f} s" for e in run_info.get("nights", [])
               if e.get("night_seconds") is not None]
        lines += [f"Seconds per night (wall, `reverie night`): {', '.join(per) or 'n/a'}; forge "
                  f"{'on' if run_info.get('forge') else 'off'}; commit "
                  f"{run_info.get('commit') or '?'}; run on {run_info.get('machine', '?')}.", ""]
    levels = list(result["recall"])
    how = ("both as written" if result["as_written"] else
           "the speaker's name and you/your both read as \"the user\"")
    lines += [f"Similarity: cosine of all-MiniLM-L6-v2 embeddings, observation against the "
              f"memory's statement ({how}); threshold {result['threshold']:.2f}. "
              "\"evidence cited\": some kept memory cites the observation's evidence turn.", "",
              "| memories kept | observations | " + " | ".join(f"recall ≥ {t}" for t in levels)
              + " | evidence cited |",
              "|---|---|" + "---|" * len(levels) + "---|",
              f"| {result['n_memories']} | {result['n_observations']} | "
              + " | ".join(f"{result['recall'][t]:.2f}" for t in levels)
              + f" | {result['evidence_recall']:.2f} |", "",
              "### Observations → best memory", "",
              "| session | observation (LoCoMo) | evidence | best memory | similarity | ≥ threshold "
              "| evidence cited |",
              "|---|---|---|---|---|---|---|"]
    for r in result["observations"]:
        lines.append(f"| {r['session']} | {cell(r['fact'], 140)} | {', '.join(r['evidence'])} | "
                     f"{cell(r['best_statement'] or '—', 120)} | {r['similarity']:.2f} | "
                     f"{'yes' if r['similarity'] >= result['threshold'] else 'no'} | "
                     f"{'yes' if r['cited'] else 'no'} |")
    lines += ["", "### Kept memories (judge precision by eye: true, grounded, about the user?)", "",
              "| memory | kind | statement | cited turns | best observation | similarity | judged |",
              "|---|---|---|---|---|---|---|"]
    for m in result["memories"]:
        turns = "<br>".join(f"[{t}] {cell(text, 160)}" for t, text in m["turns"]) or "—"
        lines.append(f"| {m['id']} | {m['kind']} | {cell(m['statement'], 160)} | "
                     f"{m['session']}: {turns} | {cell(m['best_observation'] or '—', 120)} | "
                     f"{m['similarity']:.2f} |  |")
    if not result["memories"]:
        lines.append("| — | | no memory kept | | | | |")
    return "\n".join(lines)


def load_embedder(config: Path | None):
    from reverie.config import load_settings
    from reverie.runtime.embeddings import Embedder
    from reverie.runtime.sources import embedding_folder

    settings = load_settings(config)
    return Embedder.load(embedding_folder(settings.models.embedding, model_cache(config)))


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--run", type=Path, metavar="OUT_DIR",
                    help="ingest and sleep each session into this fresh data directory")
    ap.add_argument("--score", type=Path, metavar="DATA_DIR",
                    help="score the kept memories in this data directory")
    ap.add_argument("--config", type=Path, default=ROOT / "config.yaml")
    ap.add_argument("--locomo", type=Path, default=LOCOMO, help="the LoCoMo conversation file")
    ap.add_argument("--sessions", default="1-3", help="LoCoMo sessions, e.g. 1-3 or 1,3")
    ap.add_argument("--user", default="jon",
                    help="the Reverie user the conversation is ingested for")
    ap.add_argument("--no-forge", action="store_true",
                    help="--run with forge.enabled false (pure extraction, no training)")
    ap.add_argument("--threshold", type=float, default=0.6)
    ap.add_argument("--as-written", action="store_true",
                    help="embed both sides as written (default: the speaker's name in an "
                         "observation and 'you'/'your' in a memory both become 'the user')")
    ap.add_argument("--label", default="", help="names the scored run in the results file")
    ap.add_argument("--results", type=Path, default=RESULTS / "extraction.md",
                    help="Markdown file the score section is appended to")
    ap.add_argument("--no-write", action="store_true", help="print only; append nothing")
    args = ap.parse_args()
    if not (args.run or args.score):
        ap.error("give --run OUT_DIR and/or --score DATA_DIR")
    if not args.locomo.exists():
        ap.error(f"{args.locomo}: no such file (the LoCoMo file is not shipped; see README)")
    sessions = parse_sessions(args.sessions)

    import reverie  # noqa: F401  (OpenBLAS before mlx)

    if args.run:
        run(args.run, args.config, sessions, args.user, args.locomo.resolve(), not args.no_forge)
    if args.score:
        data_dir = args.score.resolve()
        result = score(data_dir, sessions, args.user, args.locomo, load_embedder(args.config),
                       args.threshold, args.as_written)
        run_file = data_dir / RUN_FILE
        run_info = json.loads(run_file.read_text()) if run_file.exists() else None
        text = render(result, args.label, run_info)
        print(text)
        (data_dir / SCORE_FILE).write_text(json.dumps(result, indent=1) + "\n")
        if not args.no_write:
            args.results.parent.mkdir(parents=True, exist_ok=True)
            old = args.results.read_text() if args.results.exists() else (
                "# Extraction against LoCoMo observations\n\nWritten by "
                "`benchmarks/bench_extraction.py --score`; see its docstring to reproduce. "
                "Observations are short LoCoMo quotes (CC BY-NC), for evaluation only.\n")
            args.results.write_text(old.rstrip("\n") + "\n\n" + text + "\n")


if __name__ == "__main__":
    main()
