"""Two nights on real input: does a night teach the model, and does the next night keep it?

LoCoMo conv-30 (not shipped; ``../shared/data/locomo/conv-30.json`` in development): its
sessions 1-3 are ingested for the user (Jon by default) and slept on as night 1, then
sessions 4-6 as night 2, with the forge on, every figure from the night's own gate (the
chat's prompt, closed book): tonight's facts on held-out phrasings, earlier nights' facts
(the regression set), the probe, the held-out loss. Then LoCoMo's own questions (``qa``,
category 4 single-hop and 2 temporal) whose evidence lies in the slept sessions and names
the user, asked three ways on the model the nights left active: closed book, with
retrieval (as the chat does), and with the evidence sessions in the prompt (the
reference). Scored by LoCoMo's token F1 and by "contains every content word of the gold
answer" (``reverie.training.gate.matches``).

    .venv/bin/python benchmarks/bench_nights.py --run /tmp/nights     # both nights + QA
    .venv/bin/python benchmarks/bench_nights.py --qa /tmp/nights      # QA only, again

Appends a section to ``benchmarks/results/nights.md``.
"""

from __future__ import annotations

import argparse
import json
import re
import string
import sys
import time
from collections import Counter
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))
sys.path.insert(0, str(ROOT / "benchmarks"))
LOCOMO = ROOT.parent / "shared" / "data" / "locomo" / "conv-30.json"
NIGHTS = [("1-3", [1, 2, 3]), ("4-6", [4, 5, 6])]


def f1(prediction: str, gold: str) -> float:
    """LoCoMo's token F1 (SQuAD normalisation: lower case, no punctuation or articles)."""
    def norm(s: str) -> list[str]:
        s = "".join(c for c in s.lower() if c not in set(string.punctuation))
        return [w for w in s.split() if w not in ("a", "an", "the", "and")]

    p, g = norm(prediction), norm(str(gold))
    common = sum((Counter(p) & Counter(g)).values())
    if not p or not g or not common:
        return 0.0
    precision, recall = common / len(p), common / len(g)
    return 2 * precision * recall / (precision + recall)


def run_nights(out_dir: Path, config: Path, user: str, locomo: Path) -> list[dict]:
    from bench_extraction import _latest_summary, _reverie, bench_config

    out_dir = out_dir.resolve()
    if out_dir.exists() and any(out_dir.iterdir()):
        raise SystemExit(f"{out_dir} is not empty: --run needs a fresh data directory")
    out_dir.mkdir(parents=True)
    cfg = bench_config(config.resolve(), out_dir, forge=True)
    nights = []
    for label, _ in NIGHTS:
        log = out_dir / "logs" / f"night-{label}.log"
        code, _, last = _reverie(cfg, out_dir, "ingest", str(locomo), "--user", user,
                                 "--sessions", label, log=log)
        if code:
            raise SystemExit(f"ingest {label} failed: {last}")
        before = {d.name for d in (out_dir / "diary").glob("*/")} if (out_dir / "diary").exists() else set()
        t0 = time.perf_counter()
        code, _, last = _reverie(cfg, out_dir, "night", "--user", user, log=log)
        summary = _latest_summary(out_dir, before)
        forge = summary.get("forge", {})
        nights.append({"sessions": label, "exit": code, "minutes": round((time.perf_counter() - t0) / 60, 1),
                       "memories": summary.get("memories_added"), "promoted": forge.get("promoted"),
                       "reasons": forge.get("reasons"), "pre": forge.get("pre"), "post": forge.get("post"),
                       "counts": forge.get("counts"), "kept_step": forge.get("train", {}).get("kept_step"),
                       "forge_seconds": forge.get("seconds")})
        (out_dir / "nights.json").write_text(json.dumps(nights, indent=1) + "\n")
        if code:
            raise SystemExit(f"night {label} failed: {last}")
    return nights


def questions(locomo: Path, user_name: str, sessions: list[int]) -> list[dict]:
    """LoCoMo qa of categories 4 and 2 whose evidence is all in ``sessions`` and that name
    the user."""
    conv = json.loads(locomo.read_text())
    conv = conv[0] if isinstance(conv, list) else conv
    conv = conv.get("conversation", conv)
    qa = json.loads(locomo.read_text())
    qa = (qa[0] if isinstance(qa, list) else qa).get("qa", [])
    out = []
    for q in qa:
        ev = [int(m.group(1)) for e in q.get("evidence", []) for m in [re.match(r"D(\d+):", e)] if m]
        if q.get("category") in (2, 4) and ev and all(s in sessions for s in ev) \
                and user_name.lower() in q["question"].lower():
            q = dict(q, sessions=sorted(set(ev)))
            q["transcript"] = [f"{t['speaker']}: {t['text']}" for s in q["sessions"]
                               for t in conv.get(f"session_{s}", [])]
            out.append(q)
    return out


def qa(out_dir: Path, config: Path, user: str, locomo: Path) -> dict:
    """Ask the questions three ways on the active version of ``out_dir``."""
    from reverie.prompts import memories_section
    from reverie.config import load_settings
    from reverie.training.gate import matches
    from reverie.wake.app import Day

    cfg = out_dir / "bench-config.yaml"
    settings = load_settings(cfg)
    items = questions(locomo, user, [s for _, ss in NIGHTS for s in ss])
    day = Day(settings, user)
    try:
        model = day.runtime.chat_model(settings.wake.role, temperature=0.0, max_tokens=48)
        session = day.chat(rag=True)
        ways = {
            "closed book": lambda q: session.frame.render(q["question"]),
            "retrieval": lambda q: session.messages_for(q["question"], session.retrieve(q["question"])),
            "sessions in context": lambda q: session.frame.render(
                q["question"], memories=memories_section(q["transcript"][-60:])),
        }
        result = {"n": len(items), "version": day.version(), "ways": {}}
        for name, build in ways.items():
            t0 = time.perf_counter()
            replies = model.batch([build(q) for q in items])
            outs = [str(r.content) for r in replies]
            result["ways"][name] = {
                "f1": sum(f1(o, q["answer"]) for o, q in zip(outs, items)) / max(len(items), 1),
                "contains": sum(matches(o, str(q["answer"])) for o, q in zip(outs, items)),
                "seconds": round(time.perf_counter() - t0, 1),
                "answers": [{"q": q["question"], "gold": q["answer"], "out": o}
                            for q, o in zip(items, outs)]}
    finally:
        day.close()
    (out_dir / "qa.json").write_text(json.dumps(result, indent=1) + "\n")
    return result


def render(nights: list[dict], result: dict, machine: str) -> str:
    lines = [f"## Two nights, LoCoMo conv-30, {time.strftime('%Y-%m-%d')}, {machine}", "",
             "| night (sessions) | memories | tonight's recall pre → post | earlier facts pre → post "
             "| probe pre → post | loss pre → post | gate | kept step | minutes |",
             "|---|---|---|---|---|---|---|---|---|"]
    fmt = lambda v: "-" if v is None or v != v else f"{v:.2f}"  # noqa: E731
    for n in nights:
        pre, post = n.get("pre") or {}, n.get("post") or {}
        lines.append(
            f"| {n['sessions']} | {n['memories']} | {fmt(pre.get('new_recall'))} → {fmt(post.get('new_recall'))} "
            f"| {fmt(pre.get('regression_recall'))} → {fmt(post.get('regression_recall'))} "
            f"| {pre.get('capability', '-')} → {post.get('capability', '-')} of {post.get('capability_total', '-')} "
            f"| {fmt(pre.get('heldout_loss'))} → {fmt(post.get('heldout_loss'))} "
            f"| {'promote' if n['promoted'] else 'roll back: ' + '; '.join(n.get('reasons') or [])} "
            f"| {n.get('kept_step', '-')} | {n['minutes']} |")
    if result:
        lines += ["", f"LoCoMo questions (categories 4 and 2, evidence in sessions 1-6, naming the "
                      f"user): {result['n']}, on version {result['version']}", "",
                  "| asked | token F1 | contains the gold answer |", "|---|---|---|"]
        for name, w in result["ways"].items():
            lines.append(f"| {name} | {w['f1']:.3f} | {w['contains']}/{result['n']} |")
    return "\n".join(lines) + "\n"


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--run", type=Path, metavar="OUT_DIR", help="both nights, then the questions")
    ap.add_argument("--qa", type=Path, metavar="DATA_DIR", help="the questions only")
    ap.add_argument("--config", type=Path, default=ROOT / "config.yaml")
    ap.add_argument("--locomo", type=Path, default=LOCOMO)
    ap.add_argument("--user", default="jon")
    args = ap.parse_args()
    if not args.locomo.exists():
        ap.error(f"{args.locomo}: no such file (LoCoMo is not shipped; see README)")
    import reverie  # noqa: F401  (OpenBLAS before mlx)
    from bench_extraction import cpu_model, publish

    out = args.run or args.qa
    if not out:
        ap.error("give --run OUT_DIR or --qa DATA_DIR")
    nights = run_nights(args.run, args.config, args.user, args.locomo) if args.run else \
        json.loads((out / "nights.json").read_text())
    result = qa(out.resolve(), args.config, args.user, args.locomo)
    publish(render(nights, result, cpu_model()), "nights.md")


if __name__ == "__main__":
    main()
