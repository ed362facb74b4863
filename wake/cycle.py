"""One day-night cycle, measured: evaluate, sleep, evaluate again, compare.

``reverie cycle --tag T``:

1. pre-eval: the capability items (:mod:`reverie.wake.evaluate`) plus recall of the user's learned
   facts, on the active model version, closed book and greedy;
2. the night for the user (the ``sleep`` callable the CLI hands in), forge included;
3. post-eval on the version active afterwards (the new one if the gate promoted it);
4. one JSON line in ``cycles.jsonl`` (hyper-parameters, pre, post, deltas, the forge's
   gate figures), a comparison table, and a PNG beside the night's diary: pre vs post per
   category, and the night's training loss curve.
"""

from __future__ import annotations

import json
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Callable

from reverie.memory.store import MemoryStore
from reverie.config import Settings
from reverie.training.versions import Versions, learned_folders
from reverie.wake.evaluate import EvalReport, compare, load_items, memory_items, run_eval, save_report


def evaluate(settings: Settings, runtime, user_id: str | None,
             tag: str = "") -> tuple[EvalReport, Path]:
    """Run the shipped capability items and the user's memory recall on the ``wake.role``
    model (temperature 0, ``wake.eval_max_tokens``), each asked in the chat's prompt; save
    the report in ``paths.evals``.
    Returns ``(report, path)``."""
    model = runtime.chat_model(settings.wake.role, temperature=0.0,
                               max_tokens=settings.wake.eval_max_tokens)
    items = load_items()
    if user_id:
        with MemoryStore(settings.paths.memories_db) as store:
            items += memory_items(store, user_id, settings.forge.phrasings)
    from reverie.prompts import chat_frame

    report = run_eval(model, items, tag=tag, user_id=user_id,
                      max_concurrency=settings.night.max_concurrency, frame=chat_frame(settings))
    return report, save_report(report, settings.paths.evals)


@dataclass
class CycleResult:
    """What one cycle measured. ``rows`` are :func:`reverie.wake.evaluate.compare` rows; ``forge``
    the night's forge outcome (pre/post gate figures, promoted, reasons, train)."""

    tag: str
    night_id: str
    pre: EvalReport
    post: EvalReport
    rows: list[dict]
    forge: dict
    summary: dict
    plot: Path | None = None
    log_line: dict = field(default_factory=dict)


def training_losses(forge: dict) -> tuple[list[int], list[float]]:
    """``(steps, losses)`` of the night's training run, read from its adapter's
    ``adapter_config.json`` (``[], []`` when nothing was trained)."""
    adapter = (forge.get("train") or {}).get("adapter_dir")
    path = Path(adapter) / "adapter_config.json" if adapter else None
    if path is None or not path.is_file():
        return [], []
    info = json.loads(path.read_text()).get("reverie", {})
    losses, every = info.get("losses", []), int(info.get("report_every", 1))
    return [every * (i + 1) for i in range(len(losses))], [float(x) for x in losses]


def plot_cycle(result: CycleResult, path: Path) -> Path:
    """A PNG: grouped bars of pre vs post score per category (left), the night's training
    loss per step (right). Written atomically (temp file, then rename)."""
    import matplotlib

    matplotlib.use("Agg")  # no display: files only
    import matplotlib.pyplot as plt

    rows = [r for r in result.rows if r["category"] != "overall"]
    steps, losses = training_losses(result.forge)
    fig, (bars, curve) = plt.subplots(1, 2, figsize=(12, 4.5),
                                      gridspec_kw={"width_ratios": [2, 1]})
    x = range(len(rows))
    pre = [r["pre"] if r["pre"] is not None else 0.0 for r in rows]
    post = [r["post"] if r["post"] is not None else 0.0 for r in rows]
    bars.bar([i - 0.2 for i in x], pre, width=0.4, label="before the night")
    bars.bar([i + 0.2 for i in x], post, width=0.4, label="after the night")
    bars.set_xticks(list(x), [r["category"] for r in rows], rotation=30, ha="right")
    bars.set_ylim(0, 1)
    bars.set_ylabel("score (share right)")
    bars.set_title(f"cycle {result.tag}: night {result.night_id}")
    bars.legend()
    if losses:
        curve.plot(steps, losses, marker=".")
        curve.set_xlabel("training step")
        curve.set_ylabel("loss (nats per answer token)")
        curve.set_title("the night's training loss")
    else:
        curve.text(0.5, 0.5, "no training tonight", ha="center", va="center")
        curve.set_axis_off()
    fig.tight_layout()
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(f".{path.stem}.tmp.png")
    fig.savefig(tmp, dpi=100)
    plt.close(fig)
    tmp.replace(path)
    return path


def log_cycle(settings: Settings, result: CycleResult) -> dict:
    """Append the cycle to ``paths.cycles`` (JSON Lines) and return the line."""
    deltas = {r["category"]: r["delta"] for r in result.rows}
    line = {"tag": result.tag, "at": time.strftime("%Y-%m-%dT%H:%M:%S"),
            "night_id": result.night_id, "user_id": result.pre.user_id,
            "hyperparameters": {"forge": settings.forge.model_dump(mode="json"),
                                "night": settings.night.model_dump(mode="json")},
            "pre": {c: s.score for c, s in result.pre.categories.items()},
            "post": {c: s.score for c, s in result.post.categories.items()},
            "deltas": deltas,
            "forge": {k: result.forge.get(k) for k in ("promoted", "version", "parent",
                                                       "reasons", "pre", "post")},
            "plot": str(result.plot) if result.plot else None}
    path = settings.paths.cycles
    path.parent.mkdir(parents=True, exist_ok=True)
    with open(path, "a", encoding="utf-8") as fh:
        fh.write(json.dumps(line, default=str) + "\n")
    return line


def run_cycle(settings: Settings, runtime, tag: str, user_id: str,
              sleep: Callable[[str], dict]) -> CycleResult:
    """Pre-eval, night, post-eval, log and plot (see the module docstring).

    Args:
        runtime: a :class:`~reverie.runtime.models.Runtime`; reloaded after the night if it
            promoted a version, so the post-eval runs on the new weights.
        sleep: ``sleep(user_id)`` runs the night and returns its summary (the CLI's, as for
            :class:`reverie.wake.app.Day`).
    """
    versions = Versions(settings.paths.versions)
    before = versions.active()
    pre, _ = evaluate(settings, runtime, user_id, f"{tag}-pre")
    summary = sleep(user_id)
    if versions.active() != before:
        runtime.reload(learned_folders(settings))
    post, _ = evaluate(settings, runtime, user_id, f"{tag}-post")
    result = CycleResult(tag, summary["night_id"], pre, post, compare(pre, post),
                         summary.get("forge", {}), summary)
    result.plot = plot_cycle(result, settings.paths.diary / result.night_id / f"cycle-{tag}.png")
    result.log_line = log_cycle(settings, result)
    return result
