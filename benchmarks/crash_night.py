"""Crash test of the night: kill it with SIGKILL, resume it, compare with an unbroken night.

A reference night runs uninterrupted. Then the same night (same day log, same config, a
fresh data directory) is started in a child process and killed with SIGKILL again and again,
each time followed by ``reverie night --resume``, until it finishes. The two are compared:
the memories (ids, contents, status, history), the diary's steps (each ``step_id`` exactly
once in ``steps.jsonl``: no agent call recorded before a kill is made again), the training
set (``data/training/<night>.jsonl``) and the model versions. After every kill the active
model version must be complete: its folder loads and its files are the ones whose sha256
``version.json`` recorded at commit time.

Where the child dies:

* ``point[:n]`` (steered): the child arms itself to SIGKILL its own process at a named
  moment, by wrapping library functions in the child only (nothing in Reverie's code knows
  about it). Points: ``call`` (an agent call finished, its diary line not yet written),
  ``agent`` (right after an agent's diary line), ``consolidate`` (after the n-th memory
  store write of consolidation), ``park``, ``handoff`` (training set written, sessions not
  yet marked consumed), ``handoff-done``, ``base`` (the base version staged, not committed),
  ``rehearsal``, ``train`` (at the first progress report at or after step n), ``gate``
  (the n-th gate run starts; 2 = after training and fusing), ``fuse`` (the new version
  staged, not committed), ``commit-mid`` (its version.json written, folder not renamed),
  ``commit`` (committed, not active), ``activate`` (active, not pruned, the night's forge
  step not recorded), ``forge-step`` (the forge's diary line written, not checkpointed),
  ``finish`` (the graph ended, the summary not written).
* ``after:SECONDS`` (random): the parent kills the child that many seconds after it started.

Usage::

    .venv/bin/python benchmarks/crash_night.py --kills 10 --promote  # default models
    .venv/bin/python benchmarks/crash_night.py --fake --kills 12     # fake agents, tiny forge

The first runs ``reverie night`` itself in the child (the configured models; the engine's
sampling is not seeded, so only invariants can be compared, not contents); ``--fake`` runs
the night with rule-based fake chat models and the forge on a tiny random llama
(deterministic: the crashed night must equal the reference exactly). The day is the shipped
sample day; after the first kill a session is appended to the day log (the night must leave
it for the next one). ``--promote`` loosens the gate so that the forge's fusing, commit and
activation are met; ``--set forge.batch_size=2`` changes any config value;
``--reuse-reference`` keeps the reference night of an earlier run in ``--work``. A steered
point the night is already past is skipped (a child armed for it would finish the night).
Results go to ``--out`` (JSON) and a Markdown table on stdout; the figures of the runs in
``benchmarks/results/crash_night.md``.
"""

from __future__ import annotations

import argparse
import json
import os
import random
import signal
import subprocess
import sys
import time
from collections import Counter
from pathlib import Path

REPO = Path(__file__).resolve().parent.parent
AGENTS = {"dreamer", "verifier", "reshaper", "persona"}

# The stage of the night each steered point stands for (the report's column).
STAGES = {"call": "agents", "agent": "agents", "consolidate": "consolidation",
          "park": "park", "handoff": "hand-off", "handoff-done": "hand-off",
          "base": "forge: base version", "rehearsal": "forge: training set",
          "train": "forge: training", "gate": "forge: gate", "fuse": "forge: fusing",
          "commit-mid": "forge: commit", "commit": "forge: commit",
          "activate": "forge: activation", "forge-step": "forge: done", "finish": "summary"}


# ------------------------------------------------------------------ the child: kill points

def die(point: str) -> None:
    sys.stderr.write(f"crash_night: SIGKILL at {point}\n")
    sys.stderr.flush()
    os.kill(os.getpid(), signal.SIGKILL)


def _inside(*names: str) -> bool:
    """Whether a function of graphs/night.py named one of ``names`` is on the stack."""
    frame = sys._getframe(1)
    while frame is not None:
        if frame.f_code.co_name in names and frame.f_code.co_filename.endswith("night.py"):
            return True
        frame = frame.f_back
    return False


def arm(spec: str) -> None:
    """Wrap the library function that marks kill point ``spec`` (``name[:n]``) so that this
    process SIGKILLs itself there, the n-th time (default 1)."""
    from reverie.memory.diary import Diary
    from reverie.memory.daylog import DayLog
    from reverie.memory.store import MemoryStore

    name, _, n = spec.partition(":")
    if name not in STAGES:
        raise SystemExit(f"unknown kill point {name!r} (known: {', '.join(STAGES)})")
    nth, seen = int(n or 1), Counter()

    def hit(key: str = name) -> bool:
        seen[key] += 1
        return seen[key] == nth

    if name in ("call", "agent", "park", "handoff-done", "forge-step"):
        agents = {"park": {"subconscious"}, "handoff-done": {"handoff"},
                  "forge-step": {"forge"}}.get(name, AGENTS)
        record = Diary.record

        def wrapped(self, step):
            mine = step.agent in agents
            if mine and name == "call" and hit():
                die(spec)
            record(self, step)
            if mine and name != "call" and hit():
                die(spec)
        Diary.record = wrapped
    elif name == "consolidate":
        for method in ("add", "update", "supersede", "delete"):
            def wrapped(self, *a, _original=getattr(MemoryStore, method), **k):
                out = _original(self, *a, **k)
                if _inside("consolidate", "_consolidate") and hit():
                    die(spec)
                return out
            setattr(MemoryStore, method, wrapped)
    elif name == "handoff":
        def mark(self, *a, **k):
            die(spec)
        DayLog.mark_consumed = mark
    elif name == "finish":
        def finish(self, *a, **k):
            die(spec)
        Diary.finish = finish
    else:
        _arm_forge(name, spec, hit)


def _arm_forge(name: str, spec: str, hit) -> None:
    from reverie.training import forge, gate, versions

    def after(module, attr, when=lambda *a, **k: True):
        original = getattr(module, attr)

        def wrapped(*a, **k):
            out = original(*a, **k)
            if when(*a, **k) and hit():
                die(spec)
            return out
        setattr(module, attr, wrapped)

    night = lambda name_: str(name_).startswith("night-")  # noqa: E731
    if name == "base":
        after(versions, "save_model_dir")  # Versions.save_model: only the base goes through it
    elif name == "rehearsal":
        after(forge, "rehearsal_rows")
    elif name == "fuse":
        after(forge, "save_model_dir")
    elif name == "commit-mid":
        after(versions, "atomic_write_json",
              lambda path, data: Path(path).name == versions.VERSION_FILE
              and Path(path).parent.name.startswith(".staging-night-"))
    elif name == "commit":
        after(versions.Versions, "commit", lambda self, staging, vname, *a, **k: night(vname))
    elif name == "activate":
        after(versions.Versions, "activate", lambda self, vname: night(vname))
    elif name == "gate":
        original = gate.evaluate

        def evaluate(*a, **k):
            if hit():
                die(spec)
            return original(*a, **k)
        gate.evaluate = evaluate
    elif name == "train":
        original = forge.train_adapter
        step_at = int(spec.partition(":")[2] or 1)

        def train_adapter(*a, progress=None, **k):
            def report(step, total, loss, tps):
                if step >= step_at:
                    die(spec)
                if progress:
                    progress(step, total, loss, tps)
            return original(*a, progress=report, **k)
        forge.train_adapter = train_adapter


# ------------------------------------------------------------------ the child: the night

def fake_models() -> dict:
    """Rule-based fake chat models for the shipped sample day (langchain-core's
    FakeListChatModel, answering by what the prompt contains): deterministic, so a resumed
    night must produce exactly the reference's memories. They exercise add, supersede
    (Porto, then Lisbon), a failed verification and its reshape (the employer), a note the
    user asked to forget the same day (the phone number, rejected as it is read), and a
    persona veto (parked)."""
    from langchain_core.language_models.fake_chat_models import FakeListChatModel

    class Rules(FakeListChatModel):
        """Answers with the first rule whose key is in the last message (for the
        note-taker, in the turn it reads, after "Message:"; the last rule is the default)."""

        rules: list = []

        def _call(self, messages, *args, **kwargs):
            text = str(getattr(messages[-1], "content", messages[-1])).rsplit("Message:", 1)[-1]
            return next((answer for key, answer in self.rules if key in text),
                        self.rules[-1][1])

    def judged(ok: bool) -> str:
        return json.dumps({"grounded": ok, "importance": 4, "utility": 4,
                           "reason": "stated by the user" if ok else "not stated"})

    def lines(*notes: str) -> str:
        return "\n".join(f"- {n}" for n in notes)

    return {
        "notetaker": Rules(responses=["none"], rules=[
            ("two-year-old beagle", lines("The user's dog is called Biscuit.",
                                          "The user's dog is a two-year-old beagle.")),
            ("Tidewater Labs", lines("The user works at Tidewater Labs.",
                                     "The user lives in Porto.")),
            ("555-0142", lines("The user's birthday is on 14 March.",
                               "The user's phone number is 555-0142.")),
            ("answers short", lines("The user wants the assistant to keep answers short.")),
            ("green tea", lines("The user prefers green tea to coffee.")),
            ("Lisbon", lines("The user lives in Lisbon.")),
            ("", "none")]),
        "dreamer": Rules(responses=["none"], rules=[
            ("called Biscuit", "Q: What's my dog called?\nQ: What is my dog's name?\n"
                               "N: Who owned Snoopy?"),
            ("beagle", "Q: What breed is my dog?\nN: Where do beagles come from?"),
            ("Tidewater", "Q: Where do I work?\nQ: Which company do I work for?"),
            ("lives in", "Q: Where do I live?\nQ: In which city do I live?"),
            ("birthday", "Q: When is my birthday?\nN: What is a birthday?"),
            ("answers", "Q: How short should your answers to me be?"),
            ("green tea", "Q: Which do I prefer, green tea or coffee?"),
            ("", "none")]),
        "verifier": Rules(responses=["{}"], rules=[("works at Tidewater Labs", judged(False)),
                                                   ("", judged(True))]),
        "reshaper": Rules(responses=["none"], rules=[
            ("", lines("The user works as a data engineer at Tidewater Labs."))]),
        "persona": Rules(responses=["{}"], rules=[
            ("coffee", json.dumps({"keep": False, "note": "not about who I am", "reinforce": []})),
            ("", json.dumps({"keep": True, "note": "about the user", "reinforce": []}))]),
    }


FAKE_GATE = 4


def child(config: Path, resume: bool, fake: bool) -> None:
    """One night (or its resumption) in this process, armed by ``REVERIE_CRASH_AT``."""
    import reverie  # noqa: F401  (OpenBLAS before mlx)

    if os.environ.get("REVERIE_CRASH_AT"):
        arm(os.environ["REVERIE_CRASH_AT"])
    if not fake:
        from reverie.cli import app

        app(["--config", str(config), "night", "--json"] + (["--resume"] if resume else []))
        return
    import asyncio

    from reverie.config import load_settings
    from reverie.graphs.run import run_night
    from reverie.runtime.models import Runtime

    from reverie.training import gate

    # the gate's probe and general chat cut to FAKE_GATE items: the forge's mechanics in
    # seconds on the tiny model (its answers are noise either way)
    probe, general = gate.probe_items, gate.general_rows
    gate.probe_items = lambda part: probe(part)[:FAKE_GATE]
    gate.general_rows = lambda: general()[:FAKE_GATE]
    settings = load_settings(config)
    runtime = Runtime(settings)
    try:
        summary = asyncio.run(run_night(settings, models=fake_models(),
                                        embedder=runtime.embedder(), resume=resume))
    finally:
        runtime.close()
    print(json.dumps(summary, default=str))


# ------------------------------------------------------------------ the parent

def settings_of(config: Path):
    from reverie.config import load_settings

    return load_settings(config)


def unfinished(config: Path) -> str | None:
    from reverie.memory.diary import list_nights

    nights = [n for n in list_nights(settings_of(config).paths.diary)
              if n.get("status") == "unfinished"]
    return nights[-1]["night_id"] if nights else None


def run_child(config: Path, resume: bool, fake: bool, kill: str | None, log: Path,
              timeout: float) -> dict:
    """Run one child night; ``kill``: a steered point (armed in the child) or
    ``after:SECONDS`` (killed from here). Returns rc, seconds, whether it was killed."""
    env = dict(os.environ, PYTHONUNBUFFERED="1")
    env.pop("REVERIE_CRASH_AT", None)
    delay = None
    if kill and kill.startswith("after:"):
        delay = float(kill.split(":", 1)[1])
    elif kill:
        env["REVERIE_CRASH_AT"] = kill
    cmd = [sys.executable, str(Path(__file__).resolve()), "child", str(config)]
    cmd += ["--resume"] if resume else []
    cmd += ["--fake"] if fake else []
    t0 = time.perf_counter()
    with open(log, "a") as out:
        out.write(f"\n=== {' '.join(cmd)} (kill: {kill or 'none'})\n")
        out.flush()
        proc = subprocess.Popen(cmd, stdout=out, stderr=subprocess.STDOUT, env=env, cwd=REPO)
        try:
            proc.wait(timeout=delay if delay is not None else timeout)
        except subprocess.TimeoutExpired:
            proc.send_signal(signal.SIGKILL)  # this child only, by its pid
            proc.wait()
    return {"rc": proc.returncode, "seconds": round(time.perf_counter() - t0, 1),
            "killed": proc.returncode == -signal.SIGKILL}


def stage_now(config: Path, night_id: str | None) -> str:
    """Where a night killed from outside stood, from what it left on disk."""
    from reverie.memory.diary import read_steps
    from reverie.training.versions import Versions

    s = settings_of(config)
    if night_id is None:
        return "before the first step"
    steps = read_steps(s.paths.diary / night_id / "steps.jsonl")
    agents = [st.agent for st in steps]
    versions = Versions(s.paths.versions)
    if any(st.agent == "forge" for st in steps):
        return "forge: done"
    if f"night-{night_id}" in versions.names():
        return "forge: activation" if versions.active() == f"night-{night_id}" else "forge: commit"
    if versions.root.is_dir() and any(p.name.startswith(".staging-night-")
                                      for p in versions.root.iterdir()):
        return "forge: fusing"
    if "handoff" in agents:
        ts = s.paths.training_sets / f"{night_id}.jsonl"
        if ts.exists() and '"stage": "forge"' in ts.read_text().split("\n", 1)[0]:
            return "forge: training"
        return "forge: before training"
    for agent, stage in (("subconscious", "park"), ("consolidate", "consolidation")):
        if agent in agents:
            return stage
    return "agents" if AGENTS & set(agents) else "before the agents"


def behind(kill: str, config: Path, night_id: str) -> bool:
    """Whether the unfinished night is already past steered point ``kill`` (from what it
    left on disk): a child armed for it would run the night to its end. A forge point
    before the commit is never behind until the version is committed (a resumed forge
    trains again from the start)."""
    from reverie.memory.diary import read_steps
    from reverie.training.versions import Versions

    name = kill.split(":")[0]
    if name == "after":
        return False
    s = settings_of(config)
    agents = {st.agent for st in read_steps(s.paths.diary / night_id / "steps.jsonl")}
    versions = Versions(s.paths.versions)
    committed = f"night-{night_id}" in versions.names()
    ts = s.paths.training_sets / f"{night_id}.jsonl"
    completed = ts.exists() and '"stage": "forge"' in ts.read_text().split("\n", 1)[0]
    return {"call": bool(agents & {"consolidate", "subconscious", "handoff"}),
            "agent": bool(agents & {"consolidate", "subconscious", "handoff"}),
            "consolidate": bool(agents & {"consolidate", "subconscious", "handoff"}),
            "park": bool(agents & {"subconscious", "handoff"}),
            "handoff": "handoff" in agents, "handoff-done": "handoff" in agents,
            "base": "base" in versions.names(), "rehearsal": completed,
            "activate": versions.active() == f"night-{night_id}",
            "forge-step": "forge" in agents, "finish": False,
            }.get(name, committed)


def check_active(config: Path, load: bool = True) -> list[str]:
    """The active model version is complete: its files are the committed ones (sha256)
    and it loads with mlx-lm. [] when it is, or when there is no version yet."""
    from reverie.training.versions import Versions

    versions = Versions(settings_of(config).paths.versions)
    active = versions.active()
    if active is None:
        return []
    try:
        problems = versions.verify(active) if hasattr(versions, "verify") else []
    except KeyError as exc:
        return [f"active version {active!r} is not a complete version: {exc}"]
    if load and not problems:
        try:
            versions.load(active)
        except Exception as exc:  # noqa: BLE001 - any failure to load is the finding
            problems.append(f"active version {active} does not load: {exc!r}")
    return problems


def _norm(value, night_id: str, root: Path | None = None):
    """``value`` with the night's id (and the data dir ``root``) replaced and times dropped,
    for comparing nights."""
    text = json.dumps(value, sort_keys=True, default=str).replace(night_id, "<night>")
    text = text.replace(str(root), "<data>") if root else text
    data = json.loads(text)

    def strip(x):
        if isinstance(x, dict):
            return {k: strip(v) for k, v in x.items()
                    if k not in ("at", "created_at", "updated_at", "activated_at", "seconds",
                                 "duration_s", "tokens_per_second", "adapter_dir", "path")}
        if isinstance(x, list):
            return [strip(v) for v in x]
        return x
    return strip(data)


def snapshot(config: Path, night_id: str) -> dict:
    """What a finished night left: memories, deletions, parked thoughts, the diary's steps
    (raw counts per step_id and each step's verdict), the training set, the consumed
    sessions, the summary and the model versions, with the night's id normalised away."""
    from reverie.memory.daylog import DayLog
    from reverie.memory.store import MemoryStore
    from reverie.training.versions import Versions

    s = settings_of(config)
    store = MemoryStore(s.paths.memories_db)
    memories = {m.id: m.model_dump(mode="json", exclude={"scores"})
                for m in store.list(include_superseded=True)}
    raw = Counter()
    verdicts = {}
    steps_file = s.paths.diary / night_id / "steps.jsonl"
    for line in steps_file.read_text().splitlines() if steps_file.exists() else []:
        try:
            step = json.loads(line)
        except ValueError:
            continue
        raw[step["step_id"]] += 1
        verdicts[step["step_id"]] = step.get("verdict", "")
    ts = s.paths.training_sets / f"{night_id}.jsonl"
    versions = Versions(s.paths.versions)
    active = versions.active()
    summary_file = s.paths.diary / night_id / "summary.json"
    summary = json.loads(summary_file.read_text()) if summary_file.exists() else None
    out = {
        "night_id": night_id,
        "memories": _norm(memories, night_id),
        "deleted": sorted(d["id"] for d in store.deletions()),
        "parked": sorted(p.id for p in store.parked()),
        "steps": dict(raw),
        "verdicts": _norm(verdicts, night_id),
        "training": _norm([json.loads(x) for x in ts.read_text().splitlines()], night_id)
        if ts.exists() else None,
        "unconsumed": sorted(x.session_id for x in DayLog(s.paths.days).unconsumed()),
        "summary": _norm({k: v for k, v in (summary or {}).items() if k != "agents"}, night_id,
                         s.paths.data_dir),
        "active": _norm(active, night_id) if active else None,
        "lineage": _norm(versions.lineage(active), night_id) if active else [],
        "weights": {f: d for f, d in versions.info(active).get("files", {}).items()
                    if f.endswith(".safetensors")} if active else {},
    }
    store.close()
    return out


def invariants(snap: dict, config: Path) -> list[str]:
    """What must hold of any finished night, killed or not, exact sampling or not."""
    from reverie.training.dataset import TrainingSet

    problems = [f"step {k} recorded {n} times" for k, n in snap["steps"].items() if n != 1]
    if not snap["summary"]:
        problems.append("the night has no summary (unfinished)")
    current = [m for m in snap["memories"].values() if not m["superseded_by"]]
    keys = Counter((m["user_id"], m["kind"], m["question"].lower(), m["answer"].lower(),
                    m["text"].lower()) for m in current)
    problems += [f"memory {k} stored {n} times" for k, n in keys.items() if n > 1]
    for m in snap["memories"].values():
        reasons = Counter(h.get("reason") for h in m["history"])
        problems += [f"memory {m['id']}: history entry {r!r} {n} times"
                     for r, n in reasons.items() if n > 1 and r != "verified"]
    night = snap["night_id"]
    tonight = {m["id"] for m in current if m["night_id"] == "<night>"}
    ts_file = settings_of(config).paths.training_sets / f"{night}.jsonl"
    if ts_file.exists():
        ts = TrainingSet.load(ts_file)
        trained = {r.get("memory_id") for r in ts.rows if r.get("memory_id")}
        problems += [f"tonight's memory {i} has no training row" for i in sorted(tonight - trained)]
        known = set(snap["memories"]) | set(snap["deleted"])
        problems += [f"training row for unknown memory {i}" for i in sorted(trained - known)]
        problems += [f"held-out question of {i}, not a memory of tonight" for i in ts.new_ids
                     if i not in tonight]
    else:
        problems.append("no training set")
    return problems


def differences(ref: dict, got: dict) -> list[str]:
    """Where a crashed night differs from the reference (exact: deterministic agents)."""
    out = []
    for key in ("memories", "deleted", "parked", "verdicts", "training", "summary", "active",
                "lineage", "weights"):
        if ref[key] != got[key]:
            if isinstance(ref[key], dict) and isinstance(got[key], dict):
                keys = sorted(set(ref[key]) | set(got[key]))
                bad = [k for k in keys if ref[key].get(k) != got[key].get(k)]
                out.append(f"{key} differ: {', '.join(map(str, bad[:6]))}"
                           + (f" (+{len(bad) - 6})" if len(bad) > 6 else ""))
            else:
                out.append(f"{key} differ")
    if set(ref["steps"]) != set(got["steps"]):
        missing, extra = set(ref["steps"]) - set(got["steps"]), set(got["steps"]) - set(ref["steps"])
        out.append(f"diary steps differ: missing {sorted(missing)[:5]}, extra {sorted(extra)[:5]}")
    return out


def latest_night(config: Path) -> str | None:
    from reverie.memory.diary import list_nights

    nights = list_nights(settings_of(config).paths.diary)
    return nights[-1]["night_id"] if nights else None


def crashed_night(config: Path, plan: list[str], fake: bool, log: Path, timeout: float,
                  grow_after: int | None = None, grow=None, load_check: bool = True,
                  max_resumes: int = 20) -> dict:
    """Run ``plan``'s kills against one night (each child after the first resumes it), then
    resume until it finishes. ``grow(config)`` is called after kill ``grow_after`` (0-based)
    to append sessions to the day log between the kill and the resume. Returns the events
    (one per child: kill, stage, seconds, rc, the active version's problems), resumes and
    the night's id."""
    events, t0 = [], time.perf_counter()
    for i, kill in enumerate(plan):
        night = unfinished(config)
        if i and night is None:  # the night finished before this kill point was reached
            events.append({"kill": kill, "stage": "(night already finished)", "killed": False})
            continue
        if night and behind(kill, config, night):  # a child armed for it would not stop
            events.append({"kill": kill, "stage": "(the night is past it: skipped)",
                           "killed": False})
            print(json.dumps(events[-1]), flush=True)
            continue
        result = run_child(config, bool(night), fake, kill, log, timeout)
        night = unfinished(config) or latest_night(config)
        stage = STAGES.get(kill.split(":")[0]) if not kill.startswith("after:") \
            else stage_now(config, night)
        event = {"kill": kill, "stage": stage if result["killed"] else "(finished first)",
                 "resumed": i > 0, **result}
        if result["killed"]:
            event["active_problems"] = check_active(config, load_check)
        elif result["rc"] != 0:
            event["error"] = f"child exited with {result['rc']} (see {log})"
        events.append(event)
        print(json.dumps(event, default=str), flush=True)  # a long run's progress
        if grow is not None and i == grow_after:
            grow(config)
    resumes = sum(1 for e in events if e.get("resumed") and "rc" in e)
    while (night := unfinished(config)) and resumes < max_resumes:
        result = run_child(config, True, fake, None, log, timeout)
        events.append({"kill": None, "stage": "resume to the end", "resumed": True, **result})
        print(json.dumps(events[-1], default=str), flush=True)
        resumes += 1
        if result["rc"] != 0:
            break
    return {"events": events, "resumes": resumes, "night_id": latest_night(config),
            "seconds": round(time.perf_counter() - t0, 1)}


def reference_night(config: Path, fake: bool, log: Path, timeout: float) -> dict:
    result = run_child(config, False, fake, None, log, timeout)
    return {**result, "night_id": latest_night(config)}


def make_config(root: Path, base: Path | None, overrides: dict) -> Path:
    """A config.yaml in ``root`` (data dir ``root/data``): ``base`` (a config file) with
    ``overrides`` (top-level sections, merged one level deep)."""
    import yaml

    data = yaml.safe_load(base.read_text()) if base else {}
    for key, value in overrides.items():
        if isinstance(value, dict) and isinstance(data.get(key), dict):
            data[key] = {**data[key], **value}
        else:
            data[key] = value
    data["data_dir"] = str(root / "data")
    root.mkdir(parents=True, exist_ok=True)
    (root / "config.yaml").write_text(yaml.safe_dump(data, sort_keys=False))
    return root / "config.yaml"


def ingest_sample(config: Path) -> None:
    """The shipped sample day into the day log (what ``reverie ingest --sample`` does; it
    is already in Reverie's own session format)."""
    from reverie.memory.daylog import DayLog
    from reverie.memory.records import Session

    sample = REPO / "reverie" / "samples" / "sample_day.jsonl"
    sessions = [Session.model_validate_json(line) for line in sample.read_text().splitlines()
                if line.strip()]
    DayLog(settings_of(config).paths.days).append(sessions)


def grow_day(config: Path) -> None:
    """A session the user had after the night began (appended between a kill and the
    resume): the night must leave it for the next night."""
    from datetime import datetime, timezone

    from reverie.memory.daylog import DayLog
    from reverie.memory.records import Message, Session

    DayLog(settings_of(config).paths.days).append([Session(
        session_id="late-session", user_id="me",
        started_at=datetime(2026, 11, 20, 23, 50, tzinfo=timezone.utc),
        messages=[Message(turn_id="t1", role="user", content="My sister is called Ines."),
                  Message(turn_id="t2", role="assistant", content="Noted!")])])


# The kills of ``--kills N``, most wanted first: a random moment of the agents' work, then
# a steered point per stage. "after" is a random delay, drawn by :func:`random_delays`.
WANTED = ["call:2", "after", "after", "consolidate:1", "handoff", "train:10", "fuse", "commit",
          "activate", "finish", "agent:2", "gate:2", "commit-mid", "forge-step", "rehearsal",
          "park", "handoff-done"]
# --fake (what tests/test_crash.py runs, then more): the agents take milliseconds there, so
# no random delay, and the tiny forge trains 2 steps
FAKE_WANTED = ["call:3", "consolidate:2", "handoff", "fuse", "commit", "finish", "agent:2",
               "train:1", "activate", "commit-mid", "gate:2", "park", "handoff-done",
               "rehearsal", "forge-step"]
NIGHT_ORDER = ["call", "after", "agent", "consolidate", "park", "handoff", "handoff-done",
               "rehearsal", "train", "gate", "fuse", "commit-mid", "commit", "activate",
               "forge-step", "finish"]


def steered_plan(n: int, fake: bool = False) -> list[str]:
    """The first ``n`` of :data:`WANTED` (:data:`FAKE_WANTED`; more: random delays) in the
    order the night meets them, so that each child's point lies ahead of where the previous
    one stopped."""
    wanted = FAKE_WANTED if fake else WANTED
    chosen = wanted[:n] + ["after"] * max(0, n - len(wanted))
    return sorted(chosen, key=lambda k: NIGHT_ORDER.index(k.split(":")[0]))


def random_delays(plan: list[str], rng: random.Random, startup: float,
                  agents: float) -> list[str]:
    """Each ``after`` of ``plan`` as ``after:SECONDS``: the child's start-up (model loading,
    measured on the reference) plus a uniform share of the reference's agent phase, so the
    kill falls, most likely, among the agent calls of a resumed night, which has fewer
    left than the reference had (where it fell is read from the disk)."""
    return [f"after:{round(startup + rng.uniform(0.05, 0.25) * agents, 1)}" if k == "after"
            else k for k in plan]


def phases(config: Path, ref: dict) -> tuple[float, float]:
    """The reference child's start-up seconds (before the graph ran) and its agent phase
    (first to last agent step), from its summary and diary."""
    from reverie.memory.diary import read_steps

    s = settings_of(config)
    summary = json.loads((s.paths.diary / ref["night_id"] / "summary.json").read_text())
    steps = read_steps(s.paths.diary / ref["night_id"] / "steps.jsonl")
    times = [st.at.timestamp() for st in steps if st.agent in AGENTS]
    agents = (max(times) - min(times)) if times else 0.0
    return max(0.0, ref["seconds"] - summary["seconds"]), agents


def cpu() -> str:
    """``lscpu``'s model name and the core count."""
    try:
        out = subprocess.run(["lscpu"], capture_output=True, text=True).stdout
        name = next((l.split(":", 1)[1].strip() for l in out.splitlines()
                     if l.startswith("Model name")), "?")
    except OSError:
        name = "?"
    return f"{name}, {os.cpu_count()} cores"


def table(record: dict) -> str:
    lines = ["| # | kill | stage | killed | child s | active version after the kill |",
             "|---|---|---|---|---|---|"]
    for i, e in enumerate(record["crash"]["events"], 1):
        active = "-" if not e.get("killed") else ("complete, loads, sha256 ok"
                                                  if not e.get("active_problems")
                                                  else "; ".join(e["active_problems"]))
        lines.append(f"| {i} | {e.get('kill') or '-'} | {e.get('stage')} | "
                     f"{'yes' if e.get('killed') else 'no'} | {e.get('seconds', '-')} | {active} |")
    return "\n".join(lines)


def main(argv=None) -> int:
    if argv is None:
        argv = sys.argv[1:]
    if argv and argv[0] == "child":
        p = argparse.ArgumentParser(prog="crash_night.py child")
        p.add_argument("config", type=Path)
        p.add_argument("--resume", action="store_true")
        p.add_argument("--fake", action="store_true")
        a = p.parse_args(argv[1:])
        child(a.config, a.resume, a.fake)
        return 0
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--config", type=Path, default=REPO / "config.yaml",
                   help="the configuration to crash (its data_dir is replaced)")
    p.add_argument("--kills", type=int, default=10)
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--plan", help="comma-separated kill points instead of a seeded plan")
    p.add_argument("--fake", action="store_true",
                   help="fake agents and the forge on a tiny random llama (exact comparison)")
    p.add_argument("--work", type=Path, default=Path("/tmp/reverie-crash-night"))
    p.add_argument("--max-notes", type=int,
                   help="night.max_notes (default 2: the shipped models; with --fake 8)")
    p.add_argument("--reshape-rounds", type=int, default=1, help="night.reshape_rounds")
    p.add_argument("--promote", action="store_true",
                   help="a gate that always promotes (forge thresholds at their loosest), so "
                        "the kills meet fusing, commit and activation whatever was learned")
    p.add_argument("--set", action="append", default=[], metavar="SECTION.KEY=VALUE",
                   help="another config value (YAML), e.g. forge.batch_size=1")
    p.add_argument("--timeout", type=float, default=3600.0, help="seconds per child")
    p.add_argument("--out", type=Path, help="write the record as JSON here")
    p.add_argument("--reuse-reference", action="store_true",
                   help="keep the reference night already in --work (crash the night again)")
    a = p.parse_args(argv)
    rng = random.Random(a.seed)
    import shutil

    reused = a.work / "reference.json"
    if not (a.reuse_reference and reused.exists()):
        shutil.rmtree(a.work, ignore_errors=True)
    shutil.rmtree(a.work / "crashed", ignore_errors=True)
    a.work.mkdir(parents=True, exist_ok=True)
    cache = Path(os.environ.get("REVERIE_TEST_CACHE", REPO / "data" / "models" / "cache"))
    max_notes = a.max_notes or (8 if a.fake else 2)
    overrides = {"night": {"max_notes": max_notes,
                           "reshape_rounds": a.reshape_rounds},
                 "forge": {"enabled": True, **(LOOSE_GATE if a.promote else {})},
                 "models": {"cache_dir": str(cache)}}
    if a.fake:
        overrides.update(fake_overrides(a.work))
    import yaml

    for item in a.set:
        key, _, value = item.partition("=")
        section, _, field = key.partition(".")
        overrides.setdefault(section, {})[field] = yaml.safe_load(value)
    fresh = ("crashed",) if a.reuse_reference and reused.exists() else ("reference", "crashed")
    configs = {name: make_config(a.work / name, a.config, overrides) for name in fresh}
    configs.setdefault("reference", a.work / "reference" / "config.yaml")
    for name in fresh:
        ingest_sample(configs[name])
    log = a.work / "children.log"
    t0 = time.perf_counter()
    if "reference" in fresh:
        ref = reference_night(configs["reference"], a.fake, log, a.timeout)
        if ref["rc"] != 0:
            print(f"the reference night failed (rc {ref['rc']}); see {log}", file=sys.stderr)
            return 1
        reused.write_text(json.dumps(ref))
    ref = json.loads(reused.read_text())
    ref_snap = snapshot(configs["reference"], ref["night_id"])
    startup, agents = phases(configs["reference"], ref)
    print(json.dumps({"reference": ref, "startup_s": startup, "agents_s": agents}), flush=True)
    plan = random_delays(a.plan.split(",") if a.plan else steered_plan(a.kills, a.fake), rng,
                         startup, agents)
    crash = crashed_night(configs["crashed"], plan, a.fake, log, a.timeout,
                          grow_after=0, grow=grow_day)
    got = snapshot(configs["crashed"], crash["night_id"])
    record = {"fake": a.fake, "seed": a.seed, "plan": plan, "overrides": overrides,
              "reference": ref, "cpu": cpu(),
              "load_average": os.getloadavg(),
              "crash": crash, "reference_invariants": invariants(ref_snap, configs["reference"]),
              "invariants": invariants(got, configs["crashed"]),
              "late_session_left": "late-session" in got["unconsumed"],
              "differences": differences(ref_snap, got),
              "counts": {name: {"memories": len(s_["memories"]),
                                "current": sum(not m["superseded_by"] for m in s_["memories"].values()),
                                "steps": len(s_["steps"]),
                                "training_rows": len(s_["training"] or []),
                                "active": s_["active"]}
                         for name, s_ in (("reference", ref_snap), ("crashed", got))},
              "seconds": round(time.perf_counter() - t0, 1)}
    if a.out:
        a.out.write_text(json.dumps(record, indent=1, default=str))
    print(table(record))
    print(json.dumps({k: record[k] for k in ("invariants", "reference_invariants",
                                              "differences", "late_session_left", "counts",
                                              "seconds")}, indent=1, default=str))
    return 0 if not record["invariants"] and (not a.fake or not record["differences"]) else 1


def fake_overrides(work: Path) -> dict:
    """Config sections for ``--fake``: the forge on a tiny random llama (SmolLM2's
    tokenizer) saved as an mlx-lm folder, with a gate that promotes (what is tested is the
    crash, not the learning), and few training steps."""
    sys.path.insert(0, str(REPO / "tests"))
    from conftest import tiny_llama  # noqa: E402  (the tests' tiny model)

    from reverie.runtime.folders import save_model_dir

    cache = Path(os.environ.get("REVERIE_TEST_CACHE", REPO / "data" / "models" / "cache"))
    folder = work / "tiny-model"
    if not (folder / "config.json").exists():
        save_model_dir(tiny_llama(vocab_size=49152, seed=3), smollm2_tokenizer(cache), folder)
    return {"models": {"cache_dir": str(cache),
                       "chat": {"default": str(folder), "sleep": str(folder)}},
            "forge": TINY_FORGE}


LOOSE_GATE = {"max_capability_loss": 1.0, "max_loss_increase": 100.0,
              "min_regression_keep": 0.0, "min_new_recall": 0.0}
TINY_FORGE = {"enabled": True, "min_iters": 2, "max_iters": 2, "num_layers": 2,
              "batch_size": 4, "rehearsal_min": 2, "learning_rate": 1e-5, "warmup": 0,
              **LOOSE_GATE}


def smollm2_tokenizer(cache: Path):
    """SmolLM2's tokenizer from its GGUF's metadata (no weights loaded)."""
    import mlx.core as mx
    from mlx_lm.tokenizer_utils import TokenizerWrapper

    from reverie.runtime import fetch
    from reverie.runtime.gguf import build_tokenizer

    path = next(fetch.ensure_model(cache, fetch.SMOLLM2).glob("*.gguf"))
    _, meta = mx.load(str(path), return_metadata=True)
    return TokenizerWrapper(build_tokenizer(meta, path))


if __name__ == "__main__":
    sys.exit(main())
