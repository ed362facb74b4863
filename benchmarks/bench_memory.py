"""Memory formation on the default model: what the forge learns and what it costs.

Two parts, both through the real forge (training set, LoRA, gate) on SmolLM2-135M:

1. ``--sweep``: 20 invented personal facts (3 phrasings each; one held out), trained with
   several settings; closed-book recall on the held-out phrasings, the 25-question
   capability probe, held-out loss on general chat: the trade-off curve.
2. ``--nights DATA_DIR``: the experiment log (``experiments.jsonl``) of real nights run with
   ``reverie night`` (e.g. LoCoMo sessions), as a before / after table.

    .venv/bin/python benchmarks/bench_memory.py --sweep          # ~3 min per setting
    .venv/bin/python benchmarks/bench_memory.py --nights /tmp/loc

Prints Markdown tables and writes them to benchmarks/results/memory.md.
"""

from __future__ import annotations

import argparse
import json
import tempfile
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
RESULTS = ROOT / "benchmarks" / "results"

FACTS = [
    ("What is the name of the user's dog?", "Biscuit", ["What is the user's dog called?", "What name does the user's dog have?"]),
    ("Where does the user work?", "Tidewater Labs", ["Which company does the user work for?", "Who employs the user?"]),
    ("When is the user's birthday?", "14 March", ["On what date was the user born?", "What day is the user's birthday?"]),
    ("What is the user's favourite drink?", "green tea", ["What does the user like to drink most?", "Which drink does the user prefer?"]),
    ("Which city does the user live in?", "Lisbon", ["Where does the user live?", "In what city is the user's home?"]),
    ("What instrument does the user play?", "cello", ["Which instrument can the user play?", "What does the user play in the orchestra?"]),
    ("What is the name of the user's sister?", "Marta", ["What is the user's sister called?", "Who is the user's sister?"]),
    ("What car does the user drive?", "a blue Fiat", ["Which car does the user own?", "What does the user drive?"]),
    ("What is the user allergic to?", "peanuts", ["Which food allergy does the user have?", "What can the user not eat?"]),
    ("What sport does the user play on Sundays?", "padel", ["Which sport does the user play at the weekend?", "What does the user play every Sunday?"]),
    ("What is the user's cat called?", "Miso", ["What is the name of the user's cat?", "What name does the user's cat have?"]),
    ("What language is the user learning?", "Japanese", ["Which language does the user study?", "What language is the user trying to learn?"]),
    ("What is the user's favourite book?", "Dune", ["Which book does the user like best?", "What book is the user's favourite?"]),
    ("Where did the user go on holiday last summer?", "Crete", ["Where was the user's last summer holiday?", "Which island did the user visit last summer?"]),
    ("What is the user's job title?", "data engineer", ["What does the user do for a living?", "What is the user's role at work?"]),
    ("What time does the user wake up?", "6:30", ["When does the user get up?", "At what time does the user wake?"]),
    ("What is the user's favourite colour?", "orange", ["Which colour does the user like most?", "What colour does the user prefer?"]),
    ("What is the user's son called?", "Tiago", ["What is the name of the user's son?", "Who is the user's son?"]),
    ("Which team does the user support?", "Benfica", ["What football club does the user follow?", "Which club is the user a fan of?"]),
    ("What did the user study at university?", "physics", ["What was the user's degree?", "Which subject did the user major in?"]),
]

SETTINGS = [  # (label, overrides of config.forge)
    ("A: lr 1e-4, 4 layers, rank 16, 4 epochs, rehearsal 1:1", {"epochs": 4.0}),
    ("B: lr 1e-4, 4 layers, rank 16, 2 epochs, rehearsal 1:1", {"epochs": 2.0}),
    ("C: lr 5e-5, 2 layers, rank 8, 2 epochs, rehearsal 1:1",
     {"epochs": 2.0, "learning_rate": 5e-5, "num_layers": 2, "rank": 8}),
    ("D: lr 1e-4, 4 layers, rank 16, 2 epochs, no rehearsal", {"epochs": 2.0, "rehearsal_ratio": 0.0}),
    ("E: lr 1e-4, 4 layers, rank 16, 2 epochs, rehearsal 1:1, identity 5%",
     {"epochs": 2.0, "identity_share": 0.05}),
    # after the rehearsal prompts gained 60 short factual questions (disjoint from the probe)
    # and cut-off rehearsal answers were dropped:
    ("G: defaults (lr 1e-4, 4 layers, rank 16, 4 epochs, rehearsal 1:1)", {}),
    ("H: as G, rehearsal by KL to the base (weight 1)", {"kl_weight": 1.0}),
    ("I: as H, identity 5%", {"kl_weight": 1.0, "identity_share": 0.05}),
    ("K: as I, KL weight 3", {"kl_weight": 3.0, "identity_share": 0.05}),
    ("J: as I, attention only (q, v)", {"kl_weight": 1.0, "identity_share": 0.05,
                                        "lora_keys": ["self_attn.q_proj", "self_attn.v_proj"]}),
]


def memories():
    from memory.records import Memory

    return [Memory(id=f"f{i}", user_id="me", kind="fact", question=q, answer=a, phrasings=p,
                   status="verified") for i, (q, a, p) in enumerate(FACTS)]


def sweep(labels: list[str] | None) -> str:
    import reverie  # noqa: F401
    from memory.identity import load_identity
    from reverie.config import load_settings
    from training.forge import learn_in_thread

    rows = []
    for label, overrides in SETTINGS:
        if labels and not any(l in label for l in labels):
            continue
        with tempfile.TemporaryDirectory() as tmp:
            settings = load_settings(ROOT / "config.yaml", data_dir=Path(tmp))
            settings.models.cache_dir = ROOT / "data" / "models" / "cache"
            for k, v in overrides.items():
                setattr(settings.forge, k, v)
            identity = load_identity(settings.paths.identity)
            t = time.perf_counter()
            out = learn_in_thread(settings, "sweep", memories(), [], identity.core)
            rows.append((label, out, time.perf_counter() - t))
            print(label, out.pre, out.post, out.reasons, flush=True)
    lines = [f"20 invented facts, SmolLM2-135M float32 on 2 CPU cores; {time.strftime('%Y-%m-%d')}",
             "", "| setting | iterations | recall held-out (pre → post) | probe /25 (pre → post) "
             "| held-out loss (pre → post) | gate | minutes |", "|---|---|---|---|---|---|---|"]
    for label, o, secs in rows:
        lines.append(f"| {label} | {o.train.get('iterations')} | {o.pre['new_recall']:.2f} → "
                     f"{o.post['new_recall']:.2f} | {o.pre['capability']} → {o.post['capability']} "
                     f"| {o.pre['heldout_loss']:.2f} → {o.post['heldout_loss']:.2f} | "
                     f"{'promote' if o.promoted else 'roll back'} | {secs / 60:.1f} |")
    return "\n".join(lines)


def nights(data_dir: Path) -> str:
    lines = ["| night | facts trained | held-out recall (pre → post) | earlier facts (pre → post) "
             "| probe /25 (pre → post) | held-out loss (pre → post) | outcome |",
             "|---|---|---|---|---|---|---|"]
    for line in (data_dir / "experiments.jsonl").read_text().splitlines():
        e = json.loads(line)
        pre, post = e["pre"], e["post"]
        if not pre:
            continue
        f = lambda x: "n/a" if x is None or x != x else f"{x:.2f}"  # noqa: E731
        lines.append(f"| {e['night_id']} | {e['counts'].get('facts')} | {f(pre['new_recall'])} → "
                     f"{f(post['new_recall'])} | {f(pre['regression_recall'])} → "
                     f"{f(post['regression_recall'])} | {pre['capability']} → {post['capability']} | "
                     f"{pre['heldout_loss']:.2f} → {post['heldout_loss']:.2f} | "
                     f"{'promoted ' + str(e['version']) if e['promoted'] else 'rolled back: ' + '; '.join(e['reasons'])} |")
    return "\n".join(lines)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--sweep", action="store_true")
    ap.add_argument("--only", nargs="*", help="run only settings whose label contains these")
    ap.add_argument("--nights", type=Path)
    args = ap.parse_args()
    parts = []
    if args.sweep:
        parts.append("## Sweep\n\n" + sweep(args.only))
    if args.nights:
        parts.append("## Nights\n\n" + nights(args.nights))
    text = "\n\n".join(parts)
    print(text)
    RESULTS.mkdir(parents=True, exist_ok=True)
    out = RESULTS / "memory.md"
    out.write_text((out.read_text() + "\n\n" if out.exists() else "") + text + "\n")


if __name__ == "__main__":
    main()
