"""Memory formation against capability: which forge settings make facts stick and keep the mind.

The night's own forge pieces (``reverie.training.dataset.curate`` and ``complete`` with the chat's frame, the model's
own rehearsal answers, ``reverie.training.lora.train_adapter``, ``fuse``, ``reverie.training.gate``) on 20
invented facts about a user (``benchmarks/data/facts20.jsonl``: a question, a short answer
and nine more phrasings each; the gate asks the last, checkpoint selection the next to
last, training uses the rest), one setting at a time from the same base model. Each row:
held-out recall (the gate's questions, never trained or tuned on), the gate probe kept
(121 general questions answered right by the base model through the chat path), the
held-out loss change, and whether the gate would promote.

    .venv/bin/python benchmarks/bench_retention.py --chat-path        # the prompt's cost
    .venv/bin/python benchmarks/bench_retention.py base select middle  # settings by name
    .venv/bin/python benchmarks/bench_retention.py --list

Results: one JSON line per run in ``benchmarks/results/retention.jsonl``; the Markdown table
of every run so far is rewritten to ``benchmarks/results/retention.md`` (``--chat-path``:
``chat-path.md``). Uses the ``forge`` config as the starting point of every setting.
"""

from __future__ import annotations

import argparse
import json
import math
import sys
import time
from datetime import date
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))
sys.path.insert(0, str(ROOT / "benchmarks"))
RESULTS = ROOT / "benchmarks" / "results"
FACTS = ROOT / "benchmarks" / "data" / "facts20.jsonl"

# Overrides of the forge config, in the order they were tried.
SETTINGS: dict[str, dict] = {
    "base": {},
    "select": {"select_every": 25},
    "middle": {"placement": "middle", "select_every": 25},
    "phrasings8": {"phrasings": 8, "select_every": 25},
    "lr2e-4": {"learning_rate": 2e-4, "select_every": 25},
    "middle8": {"placement": "middle", "num_layers": 8, "select_every": 25},
    "attn": {"keys": ["self_attn.q_proj", "self_attn.k_proj", "self_attn.v_proj",
                           "self_attn.o_proj"], "select_every": 25},
    "rank4": {"rank": 4, "select_every": 25},
    "nokl": {"kl_weight": 0.0, "select_every": 25},
    "context": {"context_weight": 1.0, "select_every": 25},
    "self": {"self_targets": True, "select_every": 25},
    "self+context": {"self_targets": True, "context_weight": 1.0, "select_every": 25},
    # 100 steps, scored every 25: the trajectory at a third of the cost
    "short-middle": {"placement": "middle", "max_iters": 100, "select_every": 25},
    "short-context": {"context_weight": 1.0, "max_iters": 100, "select_every": 25},
    "short-id5": {"identity_share": 0.05, "max_iters": 100, "select_every": 25},
    "short-self": {"self_targets": True, "max_iters": 100, "select_every": 25},
    # mechanics only (seconds of training), not a result
    "smoke": {"max_iters": 5, "min_iters": 1, "epochs": 0.01, "select_every": 5},
}


from bench_extraction import cpu_model  # noqa: E402


def facts() -> list:
    """The 20 facts as night memories (short answers, as the dreamer writes them)."""
    from reverie.memory.records import Memory

    rows = [json.loads(line) for line in FACTS.read_text().splitlines() if line.strip()]
    return [Memory(id=f"bench-{i:02d}", user_id="me", kind="fact", text=r["answer"],
                   question=r["question"], answer=r["key"], phrasings=r["phrasings"],
                   status="verified") for i, r in enumerate(rows)]


def load(settings):
    from reverie.runtime import sources

    source = settings.models.chat[settings.forge.model]
    loaded = sources.load_source(source, settings.paths.model_cache, "float32")
    return loaded.model, loaded.tokenizer, source


def frame_and_identity():
    from reverie.memory.identity import DEFAULT, load_identity
    from reverie.prompts import load_chat_frame

    identity = load_identity(DEFAULT)
    return load_chat_frame(identity.system_prompt()), identity


def chat_path(settings) -> None:
    """The shipped probe pool asked bare (the template's own system prompt) and through the
    chat's frame."""
    from reverie.training import gate

    model, tokenizer, source = load(settings)
    frame, identity = frame_and_identity()
    pool = [(r["question"], r["answers"]) for r in gate.load_jsonl(gate.DATA / "probe_pool.jsonl")]
    rows = []
    for name, f in (("bare chat template", None), ("chat path (identity.system_prompt)", frame)):
        t0 = time.perf_counter()
        share, _ = gate.recall(model, tokenizer, pool, f)
        rows.append((name, round(share * len(pool)), len(pool), time.perf_counter() - t0))
    head = (f"## Chat path vs bare template, {source}, {date.today()}, {cpu_model()}\n\n"
            "| prompt | right | of | s |\n|---|---|---|---|\n")
    table = head + "".join(f"| {n} | {r} | {t} | {s:.0f} |\n" for n, r, t, s in rows)
    print(table)
    with open(RESULTS / "chat-path.md", "a") as out:
        out.write(table + "\n")


def run_setting(name: str, overrides: dict, settings, base_cache: dict) -> dict:
    from reverie.training import dataset, forge

    cfg = settings.forge.model_copy(update=overrides)
    t0 = time.perf_counter()
    model, tokenizer, source = load(settings)
    frame, identity = frame_and_identity()
    # every setting starts from the same base: its gate report and dev count are reused
    curated = dataset.curate(facts(), [], identity.core, cfg, frame)
    trial = forge.train_and_gate(model, tokenizer, curated, cfg, frame,
                                 ROOT / "data" / "bench-adapters" / name,
                                 pre=base_cache.get("pre"), dev_base=base_cache.get("dev"))
    base_cache["pre"] = trial.pre
    if trial.dev_base is not None:
        base_cache["dev"] = trial.dev_base
    ts, pre, post, result = trial.training_set, trial.pre, trial.post, trial.result
    promote, reasons = trial.promote, trial.reasons
    row = {"setting": name, "overrides": overrides, "model": source, "date": str(date.today()),
           "processor": cpu_model(), "rows": ts.counts, "iterations": result.iterations,
           "kept_step": result.kept_step,
           "checkpoints": [{"step": c.step, "recall": c.recall, "holds": c.holds,
                            **c.figures} for c in result.checkpoints],
           "recall": post.new_recall, "recall_pre": pre.new_recall,
           "probe_pre": pre.capability, "probe_post": post.capability,
           "probe_total": post.capability_total,
           "loss_pre": pre.heldout_loss, "loss_post": post.heldout_loss,
           "promote": promote, "reasons": reasons,
           "probe_lost": [{"question": a["question"], "output": b["output"]}
                          for a, b in zip(pre.details["probe"], post.details["probe"])
                          if a["correct"] and not b["correct"]],
           "train_s": round(result.seconds, 1),
           "total_s": round(time.perf_counter() - t0, 1)}
    print(json.dumps({k: row[k] for k in ("setting", "recall", "probe_post", "probe_total",
                                          "loss_post", "kept_step", "iterations", "promote",
                                          "total_s")}), flush=True)
    return row


def table(rows: list[dict]) -> str:
    out = ["| setting | overrides | held-out recall | probe kept | loss Δ (nats) | steps (kept/run) "
           "| gate | min | processor |",
           "|---|---|---|---|---|---|---|---|---|"]
    for r in rows:
        kept = r["probe_post"] / r["probe_pre"] if r["probe_pre"] else math.nan
        over = ", ".join(f"{k}={v}" for k, v in r["overrides"].items()) or "defaults"
        out.append(f"| {r['setting']} | {over} | {r['recall']:.2f} | {r['probe_post']}/{r['probe_pre']} "
                   f"({kept:.1%}) | {r['loss_post'] - r['loss_pre']:+.3f} | "
                   f"{r['kept_step']}/{r['iterations']} | {'promote' if r['promote'] else 'roll back'} | "
                   f"{r['total_s'] / 60:.1f} | {r['processor']} |")
    return "\n".join(out)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("settings", nargs="*", help="names from --list (default: all)")
    parser.add_argument("--config", default=str(ROOT / "config.yaml"))
    parser.add_argument("--chat-path", action="store_true", help="the chat prompt's cost only")
    parser.add_argument("--list", action="store_true")
    args = parser.parse_args()
    if args.list:
        for name, over in SETTINGS.items():
            print(f"{name:12} {over}")
        return
    from reverie.config import load_settings

    settings = load_settings(args.config)
    RESULTS.mkdir(parents=True, exist_ok=True)
    if args.chat_path:
        chat_path(settings)
        return
    log = RESULTS / "retention.jsonl"
    base_cache: dict = {}
    for name in args.settings or list(SETTINGS):
        row = run_setting(name, SETTINGS[name], settings, base_cache)
        with open(log, "a") as f:
            f.write(json.dumps(row) + "\n")
        rows = [json.loads(line) for line in log.read_text().splitlines() if line.strip()]
        (RESULTS / "retention.md").write_text(
            "# Retention sweep (benchmarks/bench_retention.py)\n\n20 invented facts, one night, "
            "SmolLM2-135M-Instruct unless the model column says otherwise; every run so far.\n\n"
            + table(rows) + "\n")


if __name__ == "__main__":
    main()
