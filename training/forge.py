"""The forge: from a night's verified memories to a promoted model version, or a rollback.

    active version ──rehearsal answers──▶ training set ──pre-gate──▶ LoRA ──fuse (float32)──▶
    staged version ──post-gate──▶ promote (commit + activate atomically) | discard

A crash anywhere leaves the active version untouched: the new version is written into a
staging folder and becomes a version (one rename) and then active (one atomic file
replace) only after the gate passes. The version records the night's outcome, so a night
killed after that rename and run again (``reverie night --resume``) activates the version
it already trained instead of training on top of it (:func:`learn`).
"""

from __future__ import annotations

import json
import threading
import time
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Callable

from reverie.memory.store import MemoryStore
from reverie.prompts import ChatFrame, chat_frame
from reverie.config import Settings
from reverie.runtime import sources
from reverie.training import dataset, gate
from reverie.training.lora import Checkpoint, LoraArgs, TrainResult, train_adapter
from reverie.training.versions import Versions, fuse, save_model_dir


@dataclass
class ForgeOutcome:
    """What the forge did: ``promoted`` with the new ``version``, or not, with ``reasons``.
    ``learned``: tonight's memory ids the promoted version answers; ``unlearned``: ids of
    forgotten facts it no longer answers; ``replayed``: earlier memories trained again."""

    promoted: bool
    version: str | None
    parent: str | None
    reasons: list[str] = field(default_factory=list)
    pre: dict = field(default_factory=dict)
    post: dict = field(default_factory=dict)
    train: dict = field(default_factory=dict)
    counts: dict = field(default_factory=dict)
    learned: list[str] = field(default_factory=list)
    replayed: list[str] = field(default_factory=list)
    seconds: float = 0.0
    unlearned: list[str] = field(default_factory=list)


def dev_selector(tokenizer, dev_items, dev_probe, max_loss: float, frame: ChatFrame | None,
                 base_probe: int):
    """A checkpoint scorer for :func:`reverie.training.lora.train_adapter`: recall of tonight's
    facts on their dev questions, and the dev probe, which holds when it lost at most
    ``max_loss`` of its questions against ``base_probe`` (the count right before training).
    Only dev questions: the gate's held-out questions and probe are never looked at."""
    allowed = gate.allowed_loss(max_loss, len(dev_probe))

    def select(model, step: int) -> Checkpoint:
        recall, _ = gate.recall(model, tokenizer, dev_items, frame)
        probe_share, _ = gate.recall(model, tokenizer, dev_probe, frame)
        right = round(probe_share * len(dev_probe))
        return Checkpoint(step, recall if recall == recall else 0.0, base_probe - right <= allowed,
                          {"dev_recall": recall, "dev_probe": right, "dev_probe_total": len(dev_probe)})

    return select


def ensure_base(settings: Settings, versions: Versions) -> str:
    """Create and activate the ``base`` version from the configured model if there is none
    yet (a float32 mlx-lm folder); returns the active version."""
    if versions.active() is None:
        if "base" not in versions.names():
            model, tokenizer = load_source(settings, settings.models.chat[settings.forge.model])
            versions.save_model("base", model, tokenizer, parent=None,
                                info={"source": settings.models.chat[settings.forge.model]})
        versions.activate("base")
    return versions.active()


def load_source(settings: Settings, source: str):
    """The configured model in float32 (``(model, tokenizer)``), for a base version."""
    loaded = sources.load_source(source, settings.paths.model_cache, "float32",
                                 field=f"models.chat.{settings.forge.model}")
    return loaded.model, loaded.tokenizer


def rehearsal_rows(model, tokenizer, n: int, max_tokens: int = 128,
                   frame: ChatFrame | None = None) -> list[dict]:
    """The model's own greedy answers to the first ``n`` shipped rehearsal prompts, asked
    and returned in ``frame`` (the chat's prompt; None: a bare user turn).

    Answers cut off at ``max_tokens`` are left out: trained with an end-of-turn token after
    them, they would teach the model to stop mid-sentence."""
    prompts = [r["prompt"] for r in gate.load_jsonl(gate.DATA / "rehearsal_prompts.jsonl")][:n]
    answers = gate.answer(model, tokenizer, prompts, max_tokens=max_tokens, frame=frame)
    return [dataset.chat_row(p, a.strip(), "rehearsal", frame=frame) for p, a in zip(prompts, answers)
            if a.strip() and len(tokenizer.encode(a, add_special_tokens=False)) < max_tokens - 1]


def self_targets(model, tokenizer, rows: list[dict], max_tokens: int = 48) -> tuple[list[dict], int]:
    """Rows whose fact answer is replaced by the model's own greedy answer given the fact
    in its prompt (the row's ``"teacher"`` messages), where that answer states the written
    one (:func:`reverie.training.gate.matches`) and was not cut off; other rows are kept as they
    are. Returns ``(rows, replaced)``: targets in the model's own words, which move its
    weights less than someone else's (self-distillation: SDFT, arXiv 2601.19897)."""
    from mlx_lm.generate import batch_generate

    todo = [i for i, r in enumerate(rows) if r.get("kind") == "fact" and r.get("teacher")]
    if not todo:
        return list(rows), 0
    prompts = [tokenizer.encode(tokenizer.apply_chat_template(
        rows[i]["teacher"], add_generation_prompt=True, tokenize=False), add_special_tokens=False)
        for i in todo]
    texts = batch_generate(model, tokenizer, prompts, max_tokens=max_tokens).texts
    out, replaced = list(rows), 0
    for i, text in zip(todo, texts):
        written = rows[i]["messages"][-1]["content"]
        text = text.strip()
        cut = len(tokenizer.encode(text, add_special_tokens=False)) >= max_tokens - 1
        if text and not cut and gate.matches(text, written):
            out[i] = {**rows[i], "messages": rows[i]["messages"][:-1] +
                      [{"role": "assistant", "content": text}], "written": written}
            replaced += 1
    return out, replaced


@dataclass
class Trial:
    """One training run and its gate: the training set, the gate's reports before and
    after (``pre``, ``post``), the :class:`~reverie.training.lora.TrainResult`, the decision and its
    reasons, and the dev probe's count right before training (None without selection).
    The model is left fused with the kept adapter."""

    training_set: dataset.TrainingSet
    pre: gate.GateReport
    post: gate.GateReport
    result: TrainResult
    promote: bool
    reasons: list[str]
    dev_base: int | None = None


def train_and_gate(model, tokenizer, curated: dataset.TrainingSet, cfg, frame: ChatFrame,
                   adapter_dir, progress=None, pre: gate.GateReport | None = None,
                   dev_base: int | None = None, path=None) -> Trial:
    """Complete the training set (rehearsal answers, self targets), the gate before, LoRA
    (with checkpoint selection when ``cfg.select_every``), fuse, the gate after, decide.

    Args:
        curated: the night's hand-off (:func:`reverie.training.dataset.curate`); a set
            already complete (a resumed night's) is trained as it is.
        cfg: the ``forge`` config.
        adapter_dir: where the adapter is written (replaced if present).
        pre, dev_base: the gate's report and the dev probe's count on this very model, when
            the caller already has them (a benchmark trying settings from one base); None:
            measured here.
        path: the hand-off file: the completed set is written back to it and trained as
            read from it, so the file is what the model learned from.

    Returns:
        :class:`Trial`; nothing is promoted here (:func:`learn` does that).
    """
    ts = curated
    if ts.stage == "handoff":
        taught = ts.counts["facts"] + ts.counts.get("unlearn", 0)
        rehearsal = rehearsal_rows(model, tokenizer, dataset.rehearsal_count(taught, cfg),
                                   frame=frame)
        ts = dataset.complete(ts, rehearsal, cfg, cfg.seed)
        if cfg.self_targets:
            ts.rows, ts.counts["self_targets"] = self_targets(model, tokenizer, ts.rows)
        if path is not None:
            ts = dataset.TrainingSet.load(ts.save(path))
    probe, general = gate.probe_items("gate"), gate.general_rows()
    if pre is None:
        pre = gate.evaluate(model, tokenizer, ts.new_items, ts.regression_items, probe, general,
                            frame, ts.forgotten_items)
    select = None
    if cfg.select_every:
        dev_probe = gate.probe_items("dev")
        if dev_base is None:
            dev_base = round(gate.recall(model, tokenizer, dev_probe, frame)[0] * len(dev_probe))
        select = dev_selector(tokenizer, ts.dev_items, dev_probe, cfg.max_capability_loss, frame,
                              dev_base)
    result = train_adapter(model, tokenizer, ts.rows, frame.reframe(general[:8]), LoraArgs.from_config(cfg),
                           adapter_dir, progress=progress, overwrite=True, select=select)
    fuse(model)
    post = gate.evaluate(model, tokenizer, ts.new_items, ts.regression_items, probe, general,
                         frame, ts.forgotten_items)
    promote, reasons = gate.decide(pre, post, cfg)
    return Trial(ts, pre, post, result, promote, reasons, dev_base)


def learn(settings: Settings, night_id: str, training_set: Path,
          progress: Callable[[int, int, float, float], None] | None = None) -> ForgeOutcome:
    """Train on the night's hand-off and promote the result if the gate passes.

    Args:
        training_set: the hand-off file (:meth:`reverie.training.dataset.TrainingSet.save`);
            completed in place with the rehearsal rows before training.
        progress: ``(step, total, loss, tokens_per_s)`` during training.

    Memories deleted since the hand-off was written (``reverie memories forget`` while
    the night ran) are taken out of it first (:meth:`~reverie.training.dataset.TrainingSet.without`).

    Run again for a night that was killed (a resumed night), it repeats only what was not
    done: a version ``night-<night_id>`` already committed is activated (if it is not yet)
    and its recorded outcome returned, with no training; before the commit everything is
    done again from the same training set (completed in place, so the same rows).

    Returns:
        The outcome; ``learned`` lists tonight's memory ids answered right on their
        held-out questions after promotion, ``unlearned`` the forgotten facts' ids no
        longer answered on theirs.
    """
    t0 = time.perf_counter()
    cfg = settings.forge
    versions = Versions(settings.paths.versions)
    name = f"night-{night_id}"
    if name in versions.names():  # committed by a run of this night that was then killed
        return _promote(settings, versions, night_id, _committed_outcome(versions, name))
    parent = ensure_base(settings, versions)
    with MemoryStore(settings.paths.memories_db) as store:
        deleted = {d["id"] for d in store.deletions()}
    curated = dataset.TrainingSet.load(training_set).without(deleted)
    if not curated.counts.get("facts") and not curated.counts.get("unlearn"):
        return ForgeOutcome(False, None, parent, reasons=["no new memories tonight: nothing to learn"])
    model, tokenizer = versions.load(parent)
    adapter_dir = settings.paths.adapters / night_id
    trial = train_and_gate(model, tokenizer, curated, cfg, chat_frame(settings), adapter_dir,
                           progress=progress, path=training_set)
    ts, pre, post, result, promote, reasons = (trial.training_set, trial.pre, trial.post,
                                               trial.result, trial.promote, trial.reasons)
    outcome = ForgeOutcome(False, None, parent, counts=ts.counts, replayed=ts.replayed)
    outcome.pre, outcome.post, outcome.reasons = pre.figures(), post.figures(), reasons
    outcome.train = {k: v for k, v in asdict(result).items()
                     if k not in ("losses", "learning_rates", "checkpoints")}
    outcome.train["checkpoints"] = [asdict(c) for c in result.checkpoints]
    outcome.train["adapter_dir"] = str(result.adapter_dir)
    outcome.train["losses"] = result.losses
    if promote:
        outcome.promoted, outcome.version = True, name
        right = {d["question"] for d in post.details["new"] if d["correct"]}
        outcome.learned = [memory_id for (question, _), memory_id in zip(ts.new_items, ts.new_ids)
                           if question in right]
        still = {d["question"] for d in post.details.get("forgotten", []) if d["correct"]}
        outcome.unlearned = [memory_id for (question, _), memory_id
                             in zip(ts.forgotten_items, ts.forgotten_ids) if question not in still]
        outcome.seconds = round(time.perf_counter() - t0, 1)
        staging = versions.stage(name)
        try:
            save_model_dir(model, tokenizer, staging)
            versions.commit(staging, name, parent, {"night_id": night_id, "adapter": str(adapter_dir),
                                                    "metrics": {"pre": pre.figures(), "post": post.figures()},
                                                    "outcome": asdict(outcome)})
        except BaseException:
            versions.discard(staging)
            raise
        return _promote(settings, versions, night_id, outcome)
    outcome.seconds = round(time.perf_counter() - t0, 1)
    log_experiment(settings, night_id, outcome)
    return outcome


def _committed_outcome(versions: Versions, name: str) -> ForgeOutcome:
    """The outcome a committed night version recorded (:func:`learn` writes it into
    ``version.json``); for a version without one, the gate figures it has."""
    info = versions.info(name)
    if isinstance(info.get("outcome"), dict):
        return ForgeOutcome(**info["outcome"])
    metrics = info.get("metrics") or {}
    return ForgeOutcome(True, name, info.get("parent"), pre=metrics.get("pre", {}),
                        post=metrics.get("post", {}),
                        reasons=["committed before the night was interrupted; no outcome recorded"])


def _promote(settings: Settings, versions: Versions, night_id: str,
             outcome: ForgeOutcome) -> ForgeOutcome:
    """Activate the committed ``outcome.version``, prune, log the experiment: each safe to
    do again when a killed night runs this a second time."""
    if versions.active() != outcome.version:
        versions.activate(outcome.version)
    versions.prune(settings.forge.keep_versions)
    log_experiment(settings, night_id, outcome)
    return outcome


def learn_in_thread(*args, **kwargs) -> ForgeOutcome:
    """:func:`learn` on a fresh thread whose MLX streams are freed when it ends (MLX keeps
    per-thread streams and compiled-function caches; leaving them to process exit aborts
    the process now and then: MLX issue #3126)."""
    import mlx.core as mx

    box: dict = {}

    def run():
        try:
            box["out"] = learn(*args, **kwargs)
        except BaseException as exc:  # re-raised in the caller's thread
            box["err"] = exc
        finally:
            mx.clear_streams()

    thread = threading.Thread(target=run, name="reverie-forge")
    thread.start()
    thread.join()
    if "err" in box:
        raise box["err"]
    return box["out"]


def log_experiment(settings: Settings, night_id: str, outcome: ForgeOutcome) -> None:
    """One JSON line per night in ``experiments.jsonl``: settings, pre, post, deltas (none
    added when the night has a line already: a resumed night)."""
    path = settings.paths.experiments
    text = path.read_text(encoding="utf-8") if path.exists() else ""
    for raw in text.splitlines():
        try:
            if json.loads(raw).get("night_id") == night_id:
                return
        except ValueError:  # a line cut off by a kill
            continue
    deltas = {k: (outcome.post[k] - outcome.pre[k]) for k in outcome.post
              if isinstance(outcome.post.get(k), (int, float)) and isinstance(outcome.pre.get(k), (int, float))}
    line = {"night_id": night_id, "at": time.strftime("%Y-%m-%dT%H:%M:%S"),
            "forge": settings.forge.model_dump(), "promoted": outcome.promoted,
            "version": outcome.version, "parent": outcome.parent, "reasons": outcome.reasons,
            "counts": outcome.counts, "pre": outcome.pre, "post": outcome.post, "deltas": deltas,
            "train": {k: v for k, v in outcome.train.items() if k != "losses"}}
    path.parent.mkdir(parents=True, exist_ok=True)
    with open(path, "a", encoding="utf-8") as f:  # a cut-off last line stays a line of its own
        f.write(("\n" if text and not text.endswith("\n") else "")
                + json.dumps(line, default=str) + "\n")
