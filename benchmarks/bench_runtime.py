"""Runtime benchmark: prefill and decode tokens/s of the default chat model for 1, 8 and 32
concurrent requests (through the batching engine), with and without OpenBLAS, float32 and
quantized weights; peak resident memory; embeddings per second.

Each configuration runs in a fresh child process (OpenBLAS must be chosen before MLX is
imported, and peak memory is per process). Run on an otherwise idle machine:

    .venv/bin/python benchmarks/bench_runtime.py            # full table (~5 min on 2 cores)
    .venv/bin/python benchmarks/bench_runtime.py --quick    # float32 + OpenBLAS only

Prints a Markdown table and writes it, with the raw JSON, to benchmarks/results/.
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import resource
import subprocess
import sys
import threading
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
RESULTS = ROOT / "benchmarks" / "results"
NEW_TOKENS = 64
# Registered models measured beside the configured ones (``--model NAME``).
EXTRA = {"sleep-1.5b": "embedded:qwen2.5-coder-1.5b-instruct"}
SENTENCES = [f"Sentence number {i} talks about the weather, dogs and a trip to Lisbon." for i in range(512)]


def child(args) -> dict:
    os.environ["REVERIE_OPENBLAS"] = "auto" if args.openblas == "on" else "off"
    import reverie  # noqa: F401
    from reverie.config import load_settings
    from reverie.runtime.blas import openblas_path
    from reverie.runtime.engine import Engine
    from reverie.runtime.models import Runtime

    import mlx.core as mx

    settings = load_settings(ROOT / "config.yaml")
    settings.runtime.weights = args.weights
    configured = list(settings.models.chat)
    settings.models.chat.update(EXTRA)
    runtime = Runtime(settings)
    out = {"openblas": openblas_path() is not None, "weights": args.weights}
    if args.embeddings:
        embedder = runtime.embedder()
        embedder.embed(SENTENCES[:64])
        t = time.perf_counter()
        embedder.embed(SENTENCES)
        out["embeddings_per_s"] = len(SENTENCES) / (time.perf_counter() - t)
        out["peak_rss_mb"] = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024
        return out
    if args.both:  # the day and the sleep model loaded at once, as during a night
        for name in configured:
            runtime.load(name)
        out["models"] = configured
        out["peak_rss_mb"] = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024
        runtime.close()
        return out
    loaded = runtime.load(args.model)
    model = loaded.model
    if args.prefix:
        out.update(shared_prefix(loaded))
        runtime.close()
        return out

    # prefill: one 256-token prompt, one forward pass (after a warm-up pass)
    text = " ".join(["The night consolidates what the day has taught."] * 40)
    ids = loaded.tokenizer.encode(text, add_special_tokens=False)[:256]
    from mlx_lm.models.cache import make_prompt_cache
    for _ in range(2):
        cache = make_prompt_cache(model)
        t = time.perf_counter()
        mx.eval(model(mx.array([ids]), cache=cache))
        prefill = time.perf_counter() - t
    out["prefill_tok_s"] = len(ids) / prefill

    prompt = loaded.encode_chat([{"role": "user", "content": "Write a long story about a dragon."}])
    for n in args.concurrency:
        engine = Engine(model, eos_token_ids=[], completion_batch_size=max(n, 1),
                        prefill_batch_size=min(n, settings.runtime.prefill_batch_size))
        engine.generate(prompt, 2)  # warm-up
        firsts, ends = [], []

        def consume(handle):
            for i, _ in enumerate(handle):
                if i == 0:
                    firsts.append(time.perf_counter())
            ends.append(time.perf_counter())

        t0 = time.perf_counter()
        handles = [engine.submit(prompt, NEW_TOKENS) for _ in range(n)]
        threads = [threading.Thread(target=consume, args=(h,)) for h in handles]
        for th in threads:
            th.start()
        for th in threads:
            th.join()
        engine.close()
        first_all, end = max(firsts), max(ends)
        out[f"c{n}"] = {
            "decode_tok_s": n * (NEW_TOKENS - 1) / (end - first_all),
            "end_to_end_tok_s": n * NEW_TOKENS / (end - t0),
            "time_to_first_token_s": first_all - t0,
        }
    out["peak_rss_mb"] = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024
    runtime.close()
    return out


def shared_prefix(loaded) -> dict:
    """8 agent-like calls sharing a ~1,000-token head (instructions + transcript), 16 new
    tokens each: seconds without and with the engine's prefix caches."""
    from reverie.runtime.engine import Engine

    head = "You check notes about a user against a conversation.\n" + "\n".join(
        f"[D1:{i}] user: I rehearsed with my group {i} times and my cat Tom{i} watched." for i in range(40))
    prompts = [loaded.encode_chat([{"role": "user", "content": f"{head}\n\nNote {q}: the user has a cat."}])
               for q in range(8)]
    out = {"prefix_prompt_tokens": len(prompts[0])}
    for budget in (0, 16384):
        engine = Engine(loaded.model, list(loaded.tokenizer.eos_token_ids), prefix_cache_tokens=budget)
        t = time.perf_counter()
        for h in [engine.submit(p, 16) for p in prompts]:
            list(h)
        out[f"prefix_{budget}_s"] = time.perf_counter() - t
        engine.close()
    return out


def run_child(*extra) -> dict:
    cmd = [sys.executable, __file__, "--child", *extra]
    proc = subprocess.run(cmd, capture_output=True, text=True)
    if proc.returncode != 0:
        raise SystemExit(f"{' '.join(cmd)} failed:\n{proc.stderr[-2000:]}")
    return json.loads(proc.stdout.strip().splitlines()[-1])


def machine() -> str:
    cpu = platform.processor() or platform.machine()
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                cpu = line.split(":", 1)[1].strip()
                break
    except OSError:
        pass
    mem = os.sysconf("SC_PAGE_SIZE") * os.sysconf("SC_PHYS_PAGES") / 2**30
    return f"{platform.system()} {platform.machine()}, {cpu}, {os.cpu_count()} cores, {mem:.0f} GiB"


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--child", action="store_true", help=argparse.SUPPRESS)
    ap.add_argument("--openblas", choices=["on", "off"], default="on")
    ap.add_argument("--weights", choices=["float32", "quantized"], default="float32")
    ap.add_argument("--concurrency", type=int, nargs="+", default=[1, 8, 32])
    ap.add_argument("--embeddings", action="store_true")
    ap.add_argument("--quick", action="store_true")
    ap.add_argument("--model", default="default", help="a key of models.chat (child)")
    ap.add_argument("--prefix", action="store_true", help=argparse.SUPPRESS)
    ap.add_argument("--both", action="store_true", help=argparse.SUPPRESS)
    ap.add_argument("--sleep", action="store_true",
                    help="the sleep model: throughput, shared-prefix caching, both models' memory")
    args = ap.parse_args()
    if args.child:
        print(json.dumps(child(args)))
        return
    if args.sleep:
        sleep_table()
        return

    configs = [("on", "float32", [1, 8, 32])]
    if not args.quick:
        configs += [("off", "float32", [1, 8, 32]), ("on", "quantized", [1, 8])]
    rows = []
    for blas, weights, conc in configs:
        print(f"running: OpenBLAS {blas}, {weights} weights ...", file=sys.stderr)
        rows.append(run_child("--openblas", blas, "--weights", weights,
                              "--concurrency", *map(str, conc)))
    emb = [run_child("--embeddings", "--openblas", b) for b in (["on"] if args.quick else ["on", "off"])]

    lines = [f"Machine: {machine()}; {time.strftime('%Y-%m-%d')}; "
             f"SmolLM2-135M-Instruct, prompt {NEW_TOKENS} new tokens per request", "",
             "| OpenBLAS | weights | prefill tok/s (1x256) | decode tok/s, 1 | decode tok/s, 8 (aggregate) "
             "| decode tok/s, 32 (aggregate) | end-to-end tok/s, 32 | peak RSS MB |",
             "|---|---|---|---|---|---|---|---|"]
    for r in rows:
        def cell(n, key="decode_tok_s"):
            return f"{r[f'c{n}'][key]:.1f}" if f"c{n}" in r else "-"
        lines.append(f"| {'yes' if r['openblas'] else 'no'} | {r['weights']} | {r['prefill_tok_s']:.0f} "
                     f"| {cell(1)} | {cell(8)} | {cell(32)} | {cell(32, 'end_to_end_tok_s')} "
                     f"| {r['peak_rss_mb']:.0f} |")
    lines += ["", "| OpenBLAS | embeddings/s (all-MiniLM-L6-v2, 512 short sentences, batch 64) | peak RSS MB |",
              "|---|---|---|"]
    for e in emb:
        lines.append(f"| {'yes' if e['openblas'] else 'no'} | {e['embeddings_per_s']:.0f} | {e['peak_rss_mb']:.0f} |")
    table = "\n".join(lines)
    print(table)
    RESULTS.mkdir(parents=True, exist_ok=True)
    (RESULTS / "runtime.md").write_text(table + "\n")
    (RESULTS / "runtime.json").write_text(json.dumps({"machine": machine(), "rows": rows,
                                                      "embeddings": emb}, indent=1) + "\n")


def sleep_table() -> None:
    """The sleep model beside the day model (float32, OpenBLAS): throughput for 1/8/32
    requests, 8 calls sharing a ~1k-token head with and without prefix caches, and the
    peak memory of both models loaded at once. Written to results/runtime-sleep.md."""
    rows = []
    for name in ("default", "sleep", *EXTRA):
        print(f"running: {name} ...", file=sys.stderr)
        r = run_child("--model", name, "--concurrency", "1", "8", "32")
        r.update(run_child("--model", name, "--prefix"))
        rows.append((name, r))
    both = run_child("--both")
    lines = [f"Machine: {machine()}; {time.strftime('%Y-%m-%d')}; float32 weights, OpenBLAS, "
             f"{NEW_TOKENS} new tokens per request", "",
             "| model | prefill tok/s (1x256) | decode tok/s, 1 | decode tok/s, 8 (aggregate) "
             "| decode tok/s, 32 (aggregate) | 8 calls sharing a head: s without / with prefix cache "
             "| peak RSS MB |", "|---|---|---|---|---|---|---|"]
    for name, r in rows:
        lines.append(f"| {name} | {r['prefill_tok_s']:.0f} | {r['c1']['decode_tok_s']:.1f} "
                     f"| {r['c8']['decode_tok_s']:.1f} | {r['c32']['decode_tok_s']:.1f} "
                     f"| {r['prefix_0_s']:.1f} / {r['prefix_16384_s']:.1f} "
                     f"({r['prefix_prompt_tokens']} prompt tokens each) | {r['peak_rss_mb']:.0f} |")
    lines += ["", f"Both models loaded at once ({', '.join(both['models'])}): peak RSS "
              f"{both['peak_rss_mb']:.0f} MB"]
    table = "\n".join(lines)
    print(table)
    RESULTS.mkdir(parents=True, exist_ok=True)
    (RESULTS / "runtime-sleep.md").write_text(table + "\n")


if __name__ == "__main__":
    main()
