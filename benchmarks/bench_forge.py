"""Forge benchmark: training tokens/s of Reverie's trainer against `python -m mlx_lm lora`
on the same data, model and settings, in the same process environment (OpenBLAS loaded
first for both), on the default model.

    .venv/bin/python benchmarks/bench_forge.py [--iters 30]

Both count answer tokens only (mlx-lm with --mask-prompt). Prints a Markdown table and
writes it to benchmarks/results/forge.md. Run on an otherwise idle machine.
"""

from __future__ import annotations

import argparse
import json
import re
import subprocess
import sys
import tempfile
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
RESULTS = ROOT / "benchmarks" / "results"


def base_dir(tmp: Path) -> Path:
    """The default model as an mlx-lm folder (float32), for both trainers."""
    import reverie  # noqa: F401
    from reverie.config import load_settings
    from reverie.training.forge import load_source
    from reverie.training.versions import save_model_dir

    settings = load_settings(ROOT / "config.yaml")
    model, tokenizer = load_source(settings, settings.models.chat["default"])
    return save_model_dir(model, tokenizer, tmp / "base")


def ours(model_dir: Path, rows: list[dict], iters: int, out: Path) -> float:
    import mlx_lm

    import reverie  # noqa: F401
    from reverie.training.lora import LoraArgs, train_adapter

    model, tokenizer = mlx_lm.load(str(model_dir))
    args = LoraArgs(rank=16, scale=20.0, num_layers=4, learning_rate=1e-4, warmup=0,
                    batch_size=4, min_iters=iters, max_iters=iters)
    result = train_adapter(model, tokenizer, rows, [], args, out)
    return result.tokens_per_second


def theirs(model_dir: Path, data: Path, iters: int, out: Path) -> float:
    config = out.parent / "mlx_lm_lora.yaml"
    config.write_text(json.dumps({"lora_parameters": {"rank": 16, "scale": 20.0, "dropout": 0.0}}))
    code = ("import sys, reverie; from mlx_lm import lora; sys.argv = ['mlx_lm.lora'] + "
            f"{['--model', str(model_dir), '--train', '--data', str(data), '--iters', str(iters), '--batch-size', '4', '--num-layers', '4', '--learning-rate', '1e-4', '--mask-prompt', '--adapter-path', str(out), '--steps-per-report', '5', '--steps-per-eval', '100000', '--val-batches', '1', '-c', str(config)]!r}; lora.main()")
    proc = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True)
    if proc.returncode != 0:
        raise SystemExit(f"mlx_lm lora failed:\n{proc.stderr[-3000:]}")
    text = re.sub(r"\x1b\[[0-9;]*m", "", proc.stdout + proc.stderr)
    # mlx-lm 0.32 reports "iter  train_loss  tok/s  tokens" rows (older versions: "Tokens/sec N")
    rates = [float(m) for m in re.findall(r"^\s*\d+\s+[\d.]+\s*[▼▲]?\s+([\d.]+)\s+[\d.]+k?\s*$",
                                          text, flags=re.M)]
    rates = rates or [float(x) for x in re.findall(r"Tokens/sec ([\d.]+)", text)]
    if not rates:
        raise SystemExit(f"no Tokens/sec in mlx_lm output:\n{proc.stdout[-2000:]}")
    return sum(rates[1:]) / len(rates[1:]) if len(rates) > 1 else rates[0]  # skip warm-up report


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--iters", type=int, default=30)
    args = ap.parse_args()
    from reverie.training.gate import general_rows, load_jsonl, DATA

    rows = general_rows()
    with tempfile.TemporaryDirectory() as tmp:
        tmp = Path(tmp)
        model_dir = base_dir(tmp)
        data = tmp / "data"
        data.mkdir()
        (data / "train.jsonl").write_text("".join(json.dumps({"messages": r["messages"]}) + "\n" for r in rows))
        (data / "valid.jsonl").write_text("".join(json.dumps({"messages": r["messages"]}) + "\n" for r in rows[:4]))
        t = time.perf_counter()
        mine = ours(model_dir, rows, args.iters, tmp / "ours")
        t_mine = time.perf_counter() - t
        t = time.perf_counter()
        ref = theirs(model_dir, data, args.iters, tmp / "theirs")
        t_ref = time.perf_counter() - t
    table = "\n".join([
        f"SmolLM2-135M float32, LoRA rank 16 scale 20 on the last 4 layers, batch 4, "
        f"{args.iters} iterations, answer tokens only, {len(rows)} chat rows; {time.strftime('%Y-%m-%d')}",
        "", "| trainer | answer tokens/s | wall s (incl. load) |", "|---|---|---|",
        f"| Reverie `reverie.training.lora.train_adapter` | {mine:.1f} | {t_mine:.0f} |",
        f"| `python -m mlx_lm lora --mask-prompt` | {ref:.1f} | {t_ref:.0f} |",
        "", f"ratio (Reverie / mlx-lm): {mine / ref:.2f}"])
    print(table)
    RESULTS.mkdir(parents=True, exist_ok=True)
    (RESULTS / "forge.md").write_text(table + "\n")


if __name__ == "__main__":
    main()
