"""LoRA training of a night's adapter through mlx-lm's Python API.

The night's handoff writes chat-format examples (``{"messages": [...]}``, one user question
and one assistant answer each). This module turns them into ``(token_ids, offset)`` pairs
rendered with the model's own chat template, trains LoRA layers on the last ``num_layers``
blocks with a loss on the answer tokens only, and writes the adapter (``adapters.safetensors``
+ ``adapter_config.json``) atomically: into a hidden temporary folder first, moved into place
when complete, so a crash never leaves half an adapter.

Sources and measured facts (the team's FINDINGS, ``shared/FINDINGS.md`` beside the checkout):

- mlx-lm 0.32: ``linear_to_lora_layers(model, num_layers, {"rank", "scale", "dropout"})``
  (the key is ``scale``, not ``alpha``), ``mlx_lm.tuner.trainer.train`` with a plain list of
  ``(token_ids, offset)`` as the dataset; ``train()`` writes ``adapters.safetensors`` but not
  ``adapter_config.json``.
- mlx-lm's ``default_loss`` counts one padding token per padded row (its mask uses ``<=`` on
  the lengths): a tiny model learns to emit the pad id. :func:`masked_loss` fixes that.
- SmolLM2-135M, float32 + OpenBLAS, batch 4, loss on answers only: lr 1e-4, rank 16, last 8
  layers, 150 steps learned 20/20 facts but collapsed general answers (2/25); the same with
  the base model's own answers to other prompts mixed in 1:1 kept 20/25 (17/20 facts);
  100 steps on the last 4 layers: 17/20 facts, 21/25 general. Mixing in those replay
  answers is the caller's job (the training set), not this module's.
- Iterations must scale with the data; a dangling generation prompt with no answer taught a
  model to output nothing (the anchors' reports), so :func:`encode_examples` refuses rows
  without an answer.
"""

from __future__ import annotations

import contextlib
import json
import logging
import math
import shutil
import tempfile
import time
from dataclasses import asdict, dataclass, field, fields
from datetime import datetime, timezone
from pathlib import Path
from typing import Any, Callable, Iterable, Sequence

from reverie.config import ForgeConfig
from reverie.files import replace_folder
from reverie.runtime import blas  # noqa: F401  (OpenBLAS before mlx)

import mlx.core as mx
import mlx.nn as nn
import mlx.optimizers as optim
import numpy as np

log = logging.getLogger(__name__)

ADAPTER_WEIGHTS = "adapters.safetensors"
ADAPTER_CONFIG = "adapter_config.json"

Progress = Callable[[int, int, float, float], None]
"""``progress(step, total, loss, tokens_per_s)``: called after every optimizer step."""


# The forge's config holds the defaults of every hyper-parameter it shares with LoraArgs.
_FORGE = ForgeConfig()


@dataclass
class LoraArgs:
    """Hyper-parameters of one night's LoRA run; all of them are saved with the adapter.
    Those that ``config.yaml``'s ``forge`` section sets have the same names there and take
    their defaults from :class:`reverie.config.ForgeConfig` (:meth:`from_config`); the
    numbers below are where those defaults came from.

    Attributes:
        rank: LoRA rank r (16: FINDINGS' run that learned 20/20 facts).
        scale: LoRA scaling of the low-rank update, ``y = W x + scale * B A x``. This IS
            mlx-lm's ``lora_parameters.scale`` (other frameworks call the equivalent
            ``alpha / r``; mlx-lm has no ``alpha``). Default 20.0, mlx-lm's own default
            (``mlx_lm/lora.py`` CONFIG_DEFAULTS), which FINDINGS' measured runs used.
        dropout: dropout on the LoRA input (0.0).
        num_layers: LoRA on N transformer blocks (4; FINDINGS: 4 forgot slightly less than
            8, 21/25 vs 20/25 general answers, and learned as many facts, 17/20).
        learning_rate: peak AdamW learning rate (1e-4: FINDINGS and the anchors; 2e-4 and
            above destroyed a 3B model, 5e-5 learned nothing, 3e-5 learned 4/20 facts).
        warmup: linear warm-up steps from 0 to ``learning_rate``, then cosine decay to
            ``final_learning_rate`` (capped at half the iterations for short runs).
        final_learning_rate: end of the cosine decay (0.0, mlx's ``cosine_decay`` default).
        weight_decay: AdamW weight decay (0.01, mlx's default).
        batch_size: examples per step (4, as measured).
        epochs: passes over the data; iterations = ceil(epochs * examples / batch_size),
            clamped to [min_iters, max_iters] (see :func:`iterations`).
        min_iters: lower bound on iterations, so a tiny night still moves the weights.
        max_iters: upper bound (time: about 1.5 s per step for SmolLM2-135M on 2 CPU cores).
        max_seq_length: tokens per example; longer examples are truncated, examples whose
            prompt alone fills it are skipped (their answer would be cut entirely).
        seed: seeds the LoRA initialisation (``mx.random``) and the batch order.
        report_every: steps between progress reports (5; a report synchronises, which
            stalls mlx-lm's pipelined steps: every step cost ~15% of throughput here).
        kl_weight: 0 trains every row with cross-entropy. Above 0 (1.0: held-out loss rose
            +0.14 nats with it, +0.80 without, on 20 facts, README), rows whose ``kind`` is
            ``"rehearsal"`` are instead pulled toward the frozen base model's whole next-token
            distribution (forward KL(base || adapted) on their answer tokens, times this
            weight): distillation to the model's own outputs as a guard against forgetting
            (Hinton et al. 2015; Li & Hoiem, "Learning without Forgetting", 2016). Costs one
            extra forward pass per step (the base is the same model with LoRA scaled to 0).
        keys: the linear layers in each block that get LoRA, as mlx-lm's
            ``lora_parameters.keys`` (e.g. ``["self_attn.q_proj", "self_attn.v_proj"]``);
            None: mlx-lm's default, every linear layer of the block.
        grad_checkpoint: gradient checkpointing (less memory, ~30% slower); note that
            mlx-lm patches the transformer block class for the rest of the process.
        placement: which ``num_layers`` blocks get LoRA: ``"last"`` (mlx-lm's choice) or
            ``"middle"`` (centred on the middle of the stack, where factual associations
            are stored in the MLPs: Meng et al. 2022, "Locating and Editing Factual
            Associations in GPT", ROME).
        context_weight: above 0, rows that carry ``"teacher"`` messages (a fact's question
            with the fact in the system prompt, as retrieval would put it) add this weight
            times KL(teacher || student) per answer token to their cross-entropy, where the
            teacher is the frozen model reading the fact in context: the student learns the
            whole next-token distribution the model has when it knows the fact, not only the
            written tokens. Self-distillation from an in-context teacher, as in SDFT
            (Shenfeld et al. 2026, arXiv 2601.19897), here offline: the teacher scores the
            target tokens once, before training, not the student's own samples.
        teacher_top_k: the teacher's distribution is kept as its ``k`` most likely tokens per
            position (renormalised), so a night's teacher fits in memory.
        select_every: above 0, every this many steps (rounded up to a multiple of
            ``report_every``) and at the end, the ``select`` function given to
            :func:`train_adapter` scores the model and the best checkpoint is restored at
            the end (early stopping with checkpoint selection); 0: keep the last.
    """

    rank: int = _FORGE.rank
    scale: float = _FORGE.scale
    dropout: float = 0.0
    num_layers: int = _FORGE.num_layers
    learning_rate: float = _FORGE.learning_rate
    warmup: int = _FORGE.warmup
    final_learning_rate: float = 0.0
    weight_decay: float = 0.01
    batch_size: int = _FORGE.batch_size
    epochs: float = _FORGE.epochs
    min_iters: int = _FORGE.min_iters
    max_iters: int = _FORGE.max_iters
    max_seq_length: int = _FORGE.max_seq_length
    seed: int = _FORGE.seed
    grad_checkpoint: bool = False
    report_every: int = 5
    kl_weight: float = _FORGE.kl_weight
    keys: list[str] | None = _FORGE.keys
    placement: str = _FORGE.placement
    select_every: int = _FORGE.select_every
    context_weight: float = _FORGE.context_weight
    teacher_top_k: int = 32

    def lora_parameters(self) -> dict:
        """mlx-lm's ``lora_parameters`` block: ``{"rank", "scale", "dropout"}`` (+ ``keys``)."""
        params = {"rank": self.rank, "scale": self.scale, "dropout": self.dropout}
        if self.keys:
            params["keys"] = list(self.keys)
        return params

    @classmethod
    def from_config(cls, cfg: ForgeConfig, **overrides) -> "LoraArgs":
        """The run's arguments from the ``forge`` config: every field of the same name is
        taken from ``cfg``, the rest keep their defaults; ``overrides`` replace either."""
        shared = {f.name for f in fields(cls)} & set(type(cfg).model_fields)
        return cls(**({name: getattr(cfg, name) for name in shared} | overrides))


PLACEMENTS = ("last", "middle")


def lora_blocks(n_blocks: int, num_layers: int, placement: str) -> range:
    """Indices of the transformer blocks that get LoRA (see ``LoraArgs.placement``).

    Raises:
        ValueError: an unknown placement."""
    if placement not in PLACEMENTS:
        raise ValueError(f"placement must be one of {PLACEMENTS}, got {placement!r}")
    k = max(0, min(num_layers, n_blocks))
    start = n_blocks - k if placement == "last" else (n_blocks - k) // 2
    return range(start, start + k)


def add_lora(model: nn.Module, args: LoraArgs) -> list[int]:
    """Put LoRA layers on the blocks :func:`lora_blocks` picks, through mlx-lm's
    ``linear_to_lora_layers`` (given a view holding only those blocks). Returns their
    indices."""
    from mlx_lm.tuner.utils import linear_to_lora_layers

    blocks = lora_blocks(len(model.layers), args.num_layers, args.placement)

    class _Blocks(nn.Module):  # the same block objects: converted in place
        def __init__(self, layers):
            super().__init__()
            self.layers = layers

    linear_to_lora_layers(_Blocks([model.layers[i] for i in blocks]), len(blocks),
                          args.lora_parameters())
    return list(blocks)


@dataclass
class Checkpoint:
    """One scored checkpoint: the step, the ``select`` function's figures, and whether it
    holds (keeps the capability the selector asks for)."""

    step: int
    recall: float
    holds: bool
    figures: dict = field(default_factory=dict)


Select = Callable[[nn.Module, int], Checkpoint]
"""``select(model, step) -> Checkpoint``: score the model as it is at ``step`` (dev
questions only: never the gate's)."""


def best_checkpoint(checkpoints: Sequence[Checkpoint]) -> Checkpoint:
    """The checkpoint to keep: the highest recall among those that hold (the earliest of
    equals: less drift for the same recall); if none holds, the last one (the gate will
    then say why it rolls back).

    Raises:
        ValueError: no checkpoints."""
    if not checkpoints:
        raise ValueError("no checkpoints to choose from")
    holding = [c for c in checkpoints if c.holds]
    if not holding:
        return checkpoints[-1]
    return max(holding, key=lambda c: (c.recall, -c.step))


@dataclass
class TrainResult:
    """What one training run did.

    Attributes:
        adapter_dir: the finished adapter folder (``adapters.safetensors``,
            ``adapter_config.json``).
        iterations: optimizer steps taken.
        train_loss: mean answer-token cross-entropy (nats/token) of the last step.
        val_loss: mean answer-token cross-entropy over the validation rows after training
            (None without validation rows).
        val_loss_before: the same before training (None without validation rows).
        tokens_per_second: answer (trained) tokens per second of training-step time,
            leaving out the first report (it holds the compile);
            prompt tokens are computed but not counted, as in mlx-lm's report.
        trained_tokens: answer tokens seen in all steps.
        seconds: wall-clock seconds of the whole call (validation and saving included).
        losses: the training loss at every report (every ``report_every`` steps), in order.
        learning_rates: the learning rate at every report.
        n_examples: training examples used (after skipping over-long ones).
        checkpoints: the scored checkpoints (``select_every`` above 0), in order.
        kept_step: the step whose weights were kept (``iterations`` without selection).
    """

    adapter_dir: Path
    iterations: int
    train_loss: float
    val_loss: float | None
    val_loss_before: float | None
    tokens_per_second: float
    trained_tokens: int
    seconds: float
    losses: list[float] = field(default_factory=list)
    learning_rates: list[float] = field(default_factory=list)
    n_examples: int = 0
    checkpoints: list[Checkpoint] = field(default_factory=list)
    kept_step: int = 0


# --------------------------------------------------------------------------- data


def _eos_ids(tokenizer) -> list[int]:
    ids = getattr(tokenizer, "eos_token_ids", None)
    if ids:
        return sorted(int(i) for i in ids)
    eos = getattr(tokenizer, "eos_token_id", None)
    return [int(eos)] if eos is not None else []


def _messages(row: Any, index: int) -> list[dict]:
    messages = row.get("messages") if isinstance(row, dict) else row
    if not isinstance(messages, list) or not messages:
        raise ValueError(f"row {index}: expected {{'messages': [...]}} with at least one turn")
    for turn in messages:
        if not isinstance(turn, dict) or not isinstance(turn.get("role"), str) \
                or not isinstance(turn.get("content"), str):
            raise ValueError(f"row {index}: every turn needs a string 'role' and 'content'")
    last = messages[-1]
    if last["role"] != "assistant" or not last["content"].strip():
        # FINDINGS: a dangling generation prompt with no answer taught a model to say nothing.
        raise ValueError(f"row {index}: the last turn must be a non-empty assistant answer "
                         f"(got role {last['role']!r}, {len(last['content'])} characters)")
    if len(messages) < 2 or all(t["role"] == "system" for t in messages[:-1]):
        raise ValueError(f"row {index}: an assistant answer needs a user turn before it")
    return messages


def encode_examples(tokenizer, rows: Iterable[Any],
                    max_seq_length: int = 512) -> list[tuple[list[int], int]]:
    """Chat-format rows -> ``(token_ids, offset)`` pairs for :func:`train_adapter`.

    Each row is ``{"messages": [{"role", "content"}, ...]}`` (optionally a system turn, then
    user/assistant turns) whose last turn is the assistant answer to learn. The prompt (all
    turns but the last, with the template's generation prompt) and the answer are rendered
    with the tokenizer's chat template (``apply_chat_template(..., tokenize=False)``) and
    encoded with ``add_special_tokens=False``, prompt and answer separately, so the token ids
    are exactly those the model sees when it generates the answer. The answer keeps its
    end-of-turn token (the first end-of-sequence id, e.g. ``<|im_end|>``) and nothing after it;
    if the template emits none, ``tokenizer.eos_token_id`` is appended.

    Args:
        tokenizer: mlx-lm ``TokenizerWrapper`` or a transformers tokenizer with a chat
            template.
        rows: the examples.
        max_seq_length: examples are truncated to this many tokens; an example whose prompt
            alone has ``max_seq_length`` tokens or more is skipped with a warning.

    Returns:
        One ``(ids, offset)`` per kept row: ``offset`` is the number of prompt tokens, i.e.
        the index of the first answer token; the loss covers ``ids[offset:]``.

    Raises:
        ValueError: a row is not chat-format, its last turn is not a non-empty assistant
            answer, it has no user turn, or the template renders the prompt differently from
            the start of the whole conversation (the offset would be wrong).
    """
    return [pair for pair, _ in _encode(tokenizer, rows, max_seq_length)]


def _encode(tokenizer, rows: Iterable[Any], max_seq_length: int):
    """:func:`encode_examples`, each kept pair with its source row."""
    eos = _eos_ids(tokenizer)
    out: list[tuple[tuple[list[int], int], Any]] = []
    for i, row in enumerate(rows):
        messages = _messages(row, i)
        prompt = tokenizer.apply_chat_template(messages[:-1], tokenize=False,
                                               add_generation_prompt=True)
        full = tokenizer.apply_chat_template(messages, tokenize=False)
        if not full.startswith(prompt):
            raise ValueError(f"row {i}: the chat template renders the prompt differently "
                             "from the start of the conversation; cannot locate the answer")
        prompt_ids = list(tokenizer.encode(prompt, add_special_tokens=False))
        answer_ids = list(tokenizer.encode(full[len(prompt):], add_special_tokens=False))
        end = next((k for k, t in enumerate(answer_ids) if t in eos), None)
        if end is not None:
            answer_ids = answer_ids[:end + 1]
        elif eos:
            answer_ids.append(eos[0])
        if len(prompt_ids) >= max_seq_length:
            log.warning("row %d skipped: its prompt has %d tokens (max_seq_length %d)",
                        i, len(prompt_ids), max_seq_length)
            continue
        out.append((((prompt_ids + answer_ids)[:max_seq_length], len(prompt_ids)), row))
    return out


@dataclass
class TeacherTable:
    """The in-context teacher's top-k next-token log-probabilities on each row's answer
    tokens: ``index`` and ``logprob`` ``[rows, L, k]``, ``length`` ``[rows]`` (answer tokens
    scored per row, at most ``L``). Row 0 is an empty row for rows without a teacher."""

    index: mx.array
    logprob: mx.array
    length: mx.array


def teacher_table(model: nn.Module, tokenizer, rows: Sequence[Any],
                  pairs: Sequence[tuple[list[int], int]], top_k: int = 32) -> tuple[TeacherTable, list[int]]:
    """Score each row's answer tokens with the model reading the row's ``"teacher"``
    messages (its prompt; the answer tokens are the row's own), before any training.

    Returns the table and, per row, its index in the table (0: no teacher)."""
    entries, slots = [], []
    for row, (ids, off) in zip(rows, pairs):
        teacher = row.get("teacher") if isinstance(row, dict) else None
        if not teacher:
            slots.append(0)
            continue
        prompt = tokenizer.apply_chat_template(teacher, tokenize=False, add_generation_prompt=True)
        t_ids = list(tokenizer.encode(prompt, add_special_tokens=False))
        answer = list(ids[off:])
        logits = model(mx.array([t_ids + answer[:-1]]))[0, len(t_ids) - 1:].astype(mx.float32)
        logp = logits - mx.logsumexp(logits, axis=-1, keepdims=True)
        idx = mx.argpartition(-logp, kth=top_k - 1, axis=-1)[:, :top_k]
        entries.append((np.array(idx), np.array(mx.take_along_axis(logp, idx, axis=-1))))
        slots.append(len(entries))
    width = max([len(i) for i, _ in entries] or [1])
    index = np.zeros((len(entries) + 1, width, top_k), np.int32)
    logprob = np.full((len(entries) + 1, width, top_k), -1e9, np.float32)
    length = np.zeros((len(entries) + 1,), np.int32)
    for n, (i, lp) in enumerate(entries, start=1):
        index[n, :len(i)], logprob[n, :len(i)], length[n] = i, lp, len(i)
    return TeacherTable(mx.array(index), mx.array(logprob), mx.array(length)), slots


def iterate_batches(dataset: Sequence[tuple[Sequence[int], int]], batch_size: int,
                    max_seq_length: int, loop: bool = False, seed: int | None = None,
                    comm_group=None):
    """Batches for mlx-lm's ``train``/``evaluate`` (same signature and output as
    ``mlx_lm.tuner.trainer.iterate_batches``).

    Unlike mlx-lm's, it uses every example: mlx-lm sorts by length and drops the remainder
    that does not fill a batch (always the longest examples). Here, with ``loop=True``
    (training), batches are cut from a stream of seeded random permutations, so every example
    is seen once per epoch and a short last batch borrows from the next epoch; with
    ``loop=False`` (validation) each example is used once in order and the last batch may be
    smaller.

    Dataset items are ``(ids, offset)``, ``(ids, offset, distil)`` or ``(ids, offset,
    distil, teacher)``; ``distil`` (0 or 1) marks rows trained toward the base model's
    outputs, ``teacher`` is the row's slot in a :class:`TeacherTable` (0: none); see
    :func:`distil_loss`.

    Yields:
        ``(batch, lengths)``: ``batch`` int32 ``[B, T]`` zero-padded with
        ``T = min(1 + 32 * ceil(max_len / 32), max_seq_length)`` (mlx-lm's padding rule, which
        bounds recompiles), ``lengths`` int32 ``[B, 4]`` holding ``(offset, length, distil,
        teacher)``
        per row.

    Raises:
        ValueError: empty dataset; NotImplementedError: distributed training.
    """
    if comm_group is not None and comm_group.size() > 1:
        raise NotImplementedError("distributed training is not supported")
    n = len(dataset)
    if n == 0:
        raise ValueError("no examples to batch")

    def make(indices):
        rows = [dataset[j] for j in indices]
        lengths = [min(len(row[0]), max_seq_length) for row in rows]
        width = min(1 + 32 * ((max(lengths) + 31) // 32), max_seq_length)
        arr = np.zeros((len(rows), width), np.int32)
        for r, (row, length) in enumerate(zip(rows, lengths)):
            arr[r, :length] = row[0][:length]
        meta = [(int(row[1]), length, int(row[2]) if len(row) > 2 else 0,
                 int(row[3]) if len(row) > 3 else 0) for row, length in zip(rows, lengths)]
        return mx.array(arr), mx.array(np.array(meta, np.int32))

    if not loop:
        for start in range(0, n, batch_size):
            yield make(range(start, min(start + batch_size, n)))
        return
    rng = np.random.default_rng(seed)
    pending: list[int] = []
    while True:
        while len(pending) < batch_size:
            pending.extend(int(k) for k in rng.permutation(n))
        indices, pending = pending[:batch_size], pending[batch_size:]
        yield make(indices)


def _answer_mask(width: int, lengths: mx.array) -> mx.array:
    """Bool ``[B, width]``: target position ``t`` (predicting token ``t + 1``) is an answer
    token of its row, ``offset <= t + 1 < length``."""
    position = mx.arange(1, width + 1)[None, :]
    return mx.logical_and(position >= lengths[:, 0:1], position < lengths[:, 1:2])


def masked_loss(model: nn.Module, batch: mx.array, lengths: mx.array):
    """Mean cross-entropy over answer tokens only; padding is never counted.

    mlx-lm's trainer calls ``loss(model, *batch)`` with the output of ``iterate_batches``.
    Position ``t`` of ``logits = model(batch[:, :-1])`` predicts token ``t + 1``; it counts
    when ``offset <= t + 1 < length``. mlx-lm's ``default_loss`` uses ``<= length`` and so
    also trains one padding token per padded row (FINDINGS).

    Args:
        model: a causal LM returning logits ``[B, T - 1, V]`` for inputs ``[B, T - 1]``.
        batch: int token ids ``[B, T]`` (padding beyond each row's length, any id).
        lengths: int ``[B, 2]`` or ``[B, 3]``, ``(offset, length[, distil])`` per row:
            ``offset`` = index of the first answer token, ``length`` = real tokens in the row
            (a ``distil`` column is ignored here).

    Returns:
        ``(loss, ntoks)``: scalar float32 mean cross-entropy in nats per answer token, and the
        number of answer tokens (int scalar). With no answer token the loss is 0.
    """
    inputs, targets = batch[:, :-1], batch[:, 1:]
    logits = model(inputs)
    mask = _answer_mask(targets.shape[1], lengths)
    ce = nn.losses.cross_entropy(logits, targets).astype(mx.float32) * mask
    ntoks = mask.sum()
    return ce.sum() / mx.maximum(ntoks, 1).astype(mx.float32), ntoks


def lora_layers(model: nn.Module) -> list[nn.Module]:
    """The model's LoRA modules (mlx-lm's ``LoRALinear`` and kin: they have ``lora_a`` and
    ``scale``)."""
    return [m for _, m in model.named_modules() if hasattr(m, "lora_a") and hasattr(m, "scale")]


@contextlib.contextmanager
def base_outputs(model: nn.Module):
    """Inside the block the model computes as its base: every LoRA ``scale`` is 0 (the
    low-rank update vanishes); restored on exit. Works inside ``mx.compile`` traces: the
    scale is a Python constant of the traced graph."""
    layers = lora_layers(model)
    scales = [m.scale for m in layers]
    for m in layers:
        m.scale = 0.0
    try:
        yield model
    finally:
        for m, scale in zip(layers, scales):
            m.scale = scale


def distil_loss(kl_weight: float, context_weight: float = 0.0,
                teacher: TeacherTable | None = None) -> Callable:
    """A loss for mlx-lm's trainer that mixes cross-entropy and distillation per row.

    Rows with ``distil = 0`` (the third column of ``lengths``) get cross-entropy on their
    answer tokens, as in :func:`masked_loss`. Rows with ``distil = 1`` get
    ``kl_weight * KL(p_base || p_model)`` per answer token, where ``p_base`` is the next-token
    distribution of the same model with its LoRA update switched off
    (:func:`base_outputs`, gradient stopped): the adapted model is pulled back to the base
    model's whole distribution on general prompts, not only to its sampled answer.
    Sources: knowledge distillation (Hinton, Vinyals & Dean 2015), applied against
    forgetting as in "Learning without Forgetting" (Li & Hoiem 2016).

    With ``teacher`` (a :class:`TeacherTable`) and ``context_weight`` above 0, rows with a
    teacher slot (the fourth column of ``lengths``) add ``context_weight * KL(p_teacher ||
    p_model)`` on each answer token to their cross-entropy, the teacher's top-k renormalised
    (self-distillation from the model with the fact in context, ``LoraArgs.context_weight``).

    Returns:
        ``loss(model, batch, lengths) -> (loss, ntoks)``: the mean over all answer tokens
        (nats), and their count.

    Raises:
        ValueError: ``kl_weight`` is negative.
    """
    if kl_weight < 0 or context_weight < 0:
        raise ValueError(f"kl_weight and context_weight must be >= 0, got {kl_weight}, "
                         f"{context_weight}")
    use_teacher = teacher is not None and context_weight > 0

    def loss(model: nn.Module, batch: mx.array, lengths: mx.array):
        inputs, targets = batch[:, :-1], batch[:, 1:]
        logits = model(inputs).astype(mx.float32)
        mask = _answer_mask(targets.shape[1], lengths)
        log_p = logits - mx.logsumexp(logits, axis=-1, keepdims=True)
        ce = -mx.take_along_axis(log_p, targets[..., None], axis=-1).squeeze(-1)
        per_token = ce
        if kl_weight > 0:
            with base_outputs(model):
                base = mx.stop_gradient(model(inputs).astype(mx.float32))
            log_q = base - mx.logsumexp(base, axis=-1, keepdims=True)
            kl = (mx.exp(log_q) * (log_q - log_p)).sum(axis=-1)
            distil = lengths[:, 2:3] > 0 if lengths.shape[1] > 2 else mx.zeros_like(mask)
            per_token = mx.where(distil, kl_weight * kl, ce)
        total = (per_token * mask).sum()
        if use_teacher and lengths.shape[1] > 3:
            total = total + context_weight * _context_kl(log_p, lengths, teacher)
        ntoks = mask.sum()
        return total / mx.maximum(ntoks, 1).astype(mx.float32), ntoks

    return loss


def _context_kl(log_p: mx.array, lengths: mx.array, teacher: TeacherTable) -> mx.array:
    """Sum over the batch's answer tokens of KL(teacher top-k || model) (see distil_loss)."""
    slot = lengths[:, 3]
    t_idx, t_lp, t_len = teacher.index[slot], teacher.logprob[slot], teacher.length[slot]
    width = t_idx.shape[1]
    # answer token j of a row is predicted at position offset - 1 + j
    pos = mx.clip(lengths[:, 0:1] - 1 + mx.arange(width)[None, :], 0, log_p.shape[1] - 1)
    rows = mx.arange(log_p.shape[0])[:, None]
    student = mx.take_along_axis(log_p[rows, pos], t_idx, axis=-1)     # [B, L, k]
    t_lp = t_lp - mx.logsumexp(t_lp, axis=-1, keepdims=True)
    kl = (mx.exp(t_lp) * (t_lp - student)).sum(axis=-1)                 # [B, L]
    valid = mx.arange(width)[None, :] < t_len[:, None]
    return mx.where(valid, kl, 0.0).sum()


def iterations(n_examples: int, batch_size: int, epochs: float,
               min_iters: int = 1, max_iters: int | None = None) -> int:
    """Optimizer steps for ``epochs`` passes: ``ceil(epochs * n_examples / batch_size)``,
    clamped to ``[min_iters, max_iters]`` (iterations must scale with the data: the anchors).

    Raises:
        ValueError: ``n_examples``, ``batch_size`` or ``epochs`` not positive, or
            ``max_iters < min_iters``.
    """
    if n_examples <= 0 or batch_size <= 0 or epochs <= 0:
        raise ValueError(f"need positive n_examples, batch_size and epochs, got "
                         f"{n_examples}, {batch_size}, {epochs}")
    if max_iters is not None and max_iters < min_iters:
        raise ValueError(f"max_iters {max_iters} < min_iters {min_iters}")
    steps = math.ceil(epochs * n_examples / batch_size - 1e-9)
    steps = max(steps, min_iters)
    return min(steps, max_iters) if max_iters is not None else steps


def learning_rate_schedule(args: LoraArgs, iters: int) -> tuple[Callable, int]:
    """Linear warm-up from 0 to ``args.learning_rate`` then cosine decay to
    ``args.final_learning_rate`` at step ``iters`` (mlx-lm's ``build_schedule``).

    Returns ``(schedule, warmup_steps)``; the warm-up is capped at ``iters // 2``."""
    from mlx_lm.tuner.utils import build_schedule

    warmup = max(0, min(args.warmup, iters // 2))
    schedule = build_schedule({
        "name": "cosine_decay",
        "arguments": [args.learning_rate, max(iters - warmup, 1), args.final_learning_rate],
        "warmup": warmup,
        "warmup_init": 0.0,
    })
    return schedule, warmup


# --------------------------------------------------------------------------- training


class _QuietUI:
    """Stands in for mlx-lm's rich ``TrainUI`` (which prints a line per report): Reverie
    shows its own progress through the ``progress`` callback."""

    def __init__(self, *args, **kwargs):
        pass

    def __enter__(self):
        return self

    def __exit__(self, *exc):
        return False

    def advance(self, *args, **kwargs):
        pass

    def report_train(self, *args, **kwargs):
        pass

    def report_val(self, *args, **kwargs):
        pass

    def report_save(self, *args, **kwargs):
        pass

    @contextlib.contextmanager
    def val_task(self, *args, **kwargs):
        yield lambda: None


@contextlib.contextmanager
def _quiet_trainer():
    from mlx_lm.tuner import trainer

    original = getattr(trainer, "TrainUI", None)
    if original is None:
        yield
        return
    trainer.TrainUI = _QuietUI
    try:
        yield
    finally:
        trainer.TrainUI = original


def _now() -> str:
    return datetime.now(timezone.utc).isoformat(timespec="seconds")


def _versions() -> dict:
    from importlib.metadata import PackageNotFoundError, version

    out = {}
    for pkg in ("mlx", "mlx-lm"):
        try:
            out[pkg] = version(pkg)
        except PackageNotFoundError:
            pass
    return out


def encode_train_set(model: nn.Module, tokenizer, rows: Sequence[Any], args: LoraArgs
                     ) -> tuple[list[tuple[list[int], int, int, int]], TeacherTable | None]:
    """The training examples ``(token ids, answer offset, distil flag, teacher slot)`` of
    the usable ``rows`` (:func:`encode_examples`), and the in-context teacher's table when
    ``args.context_weight`` is above 0 (scored by ``model`` as it is now, before any LoRA).
    The distil flag marks rehearsal rows when ``args.kl_weight`` is above 0."""
    encoded = _encode(tokenizer, rows, args.max_seq_length)
    teacher, slots = None, [0] * len(encoded)
    if args.context_weight > 0:
        teacher, slots = teacher_table(model, tokenizer, [row for _, row in encoded],
                                       [pair for pair, _ in encoded], args.teacher_top_k)
    distil = args.kl_weight > 0
    return [(ids, off, int(distil and isinstance(row, dict) and row.get("kind") == "rehearsal"),
             slot) for ((ids, off), row), slot in zip(encoded, slots)], teacher


class CheckpointSelector:
    """Early stopping with checkpoint selection: ``select`` scores the model every
    ``every`` steps (and at the end); a copy of the LoRA weights of the best checkpoint so
    far (:func:`best_checkpoint`) is kept and restored by :meth:`finish`."""

    def __init__(self, select: Select | None, every: int):
        self.select, self.every = select, every if select is not None else 0
        self.checkpoints: list[Checkpoint] = []
        self.kept_step: int | None = None
        self._weights: list = []

    def after_step(self, model: nn.Module, step: int, last: int) -> None:
        """Score ``model`` at ``step`` (1-based) when it is a multiple of ``every`` or the
        ``last`` step; no-op without selection."""
        if self.every and (step % self.every == 0 or step == last):
            self._score(model, step)

    def _score(self, model: nn.Module, step: int) -> None:
        from mlx.utils import tree_flatten

        model.eval()
        self.checkpoints.append(self.select(model, step))
        model.train()
        if best_checkpoint(self.checkpoints) is self.checkpoints[-1]:  # copy only a new best
            self.kept_step = step
            self._weights = [(k, mx.array(v)) for k, v in tree_flatten(model.trainable_parameters())]
            mx.eval([v for _, v in self._weights])

    def finish(self, model: nn.Module, last: int, weights_file: Path) -> int:
        """Score the last step if it was not, restore the best weights into ``model`` and
        ``weights_file``; returns the kept step (``last`` without selection)."""
        if not self.every:
            return last
        if not self.checkpoints or self.checkpoints[-1].step != last:
            self._score(model, last)
        if self.kept_step != last:
            model.load_weights(self._weights, strict=False)
            mx.save_safetensors(str(weights_file), dict(self._weights))
        return self.kept_step


def _reporter(iters: int, report_every: int, progress: Progress | None,
              selector: CheckpointSelector, model: nn.Module):
    """mlx-lm's training callback: records each report's loss and learning rate, answer
    tokens and step time (leaving out the first report, which holds the compile), calls
    ``progress`` and lets ``selector`` score the step."""
    from mlx_lm.tuner.callbacks import TrainingCallback

    class Reporter(TrainingCallback):
        def __init__(self):
            self.losses: list[float] = []
            self.rates: list[float] = []
            self.seconds, self.tokens, self.counted_tokens, self.step = 0.0, 0, 0, 0

        @property
        def tokens_per_second(self) -> float:
            return self.counted_tokens / self.seconds if self.seconds else 0.0

        def on_train_loss_report(self, info: dict):
            self.losses.append(float(info["train_loss"]))
            self.rates.append(float(info["learning_rate"]))
            tokens, step = int(info["trained_tokens"]), int(info["iteration"])
            if len(self.losses) > 1 or iters <= report_every:
                self.seconds += (step - self.step) / max(float(info["iterations_per_second"]), 1e-12)
                self.counted_tokens += tokens - self.tokens
            self.tokens, self.step = tokens, step
            if progress is not None:
                progress(step, iters, self.losses[-1], float(info["tokens_per_second"]))
            selector.after_step(model, step, iters)

    return Reporter()


def adapter_config(args: LoraArgs, result: TrainResult, blocks: list[int], warmup: int,
                   counts: dict, started: str) -> dict:
    """``adapter_config.json``: mlx-lm's keys (``fine_tune_type``, ``num_layers``,
    ``lora_parameters``), so ``mlx_lm.load(model, adapter_path=...)`` reads it, plus a
    ``"reverie"`` block with every hyper-parameter, the run's counts, losses and times."""
    distil = args.kl_weight > 0
    return {
        "fine_tune_type": "lora",
        "num_layers": args.num_layers,
        "lora_parameters": args.lora_parameters(),
        "reverie": {
            **asdict(args),
            "iterations": result.iterations,
            "lora_blocks": blocks,
            "checkpoints": [asdict(c) for c in result.checkpoints],
            "kept_step": result.kept_step,
            "warmup_steps": warmup,
            "schedule": "linear warm-up from 0, then cosine decay",
            "optimizer": {"name": "AdamW", "betas": [0.9, 0.999], "eps": 1e-8,
                          "weight_decay": args.weight_decay},
            "loss": ("cross-entropy on answer tokens; rehearsal rows: kl_weight x "
                     "KL(base || adapted) (reverie.training.lora.distil_loss)") if distil else
                    "cross-entropy on answer tokens only (reverie.training.lora.masked_loss)",
            **counts,
            "train_loss": result.train_loss,
            "val_loss_before": result.val_loss_before,
            "val_loss": result.val_loss,
            "trained_tokens": result.trained_tokens,
            "tokens_per_second": result.tokens_per_second,
            "losses": result.losses,
            "started_at": started,
            "finished_at": _now(),
            "versions": _versions(),
        },
    }


def train_adapter(model: nn.Module, tokenizer, train_rows: Sequence[Any],
                  val_rows: Sequence[Any], args: LoraArgs, out_dir: Path,
                  progress: Progress | None = None, overwrite: bool = False,
                  quiet: bool = True, select: Select | None = None) -> TrainResult:
    """Train a LoRA adapter on chat-format rows and save it atomically to ``out_dir``.

    Steps: encode the rows (:func:`encode_train_set`); freeze ``model`` and add LoRA layers
    (:func:`add_lora`); train them with AdamW (warm-up then cosine decay,
    :func:`learning_rate_schedule`) through ``mlx_lm.tuner.trainer.train`` for
    :func:`iterations` steps, with :func:`masked_loss` (answer tokens only) or
    :func:`distil_loss` and :func:`iterate_batches` (every example, seeded order); restore
    the best checkpoint (:class:`CheckpointSelector`); write the adapter and its
    :func:`adapter_config` into a hidden folder beside ``out_dir`` and move it into place
    only when complete (:func:`reverie.files.replace_folder`). The model is modified in
    place and left in eval mode with its trained LoRA layers
    (``reverie.training.versions.fuse`` merges them).

    Args:
        model: an mlx-lm model (float or quantized: QLoRA) without LoRA layers.
        tokenizer: its tokenizer (chat template used by :func:`encode_examples`).
        train_rows: chat-format rows (``{"messages": [...]}``).
        val_rows: rows for the validation loss before and after training (may be empty).
        args: hyper-parameters.
        out_dir: the adapter folder to create (its parent is created if needed).
        progress: ``progress(step, total, loss, answer_tokens_per_s)`` after every report.
        overwrite: replace an existing ``out_dir`` (after the new adapter is complete).
        quiet: hide mlx-lm's own console progress output.
        select: scores a checkpoint (:data:`Select`); with ``args.select_every`` above 0
            the best one (:func:`best_checkpoint`) is restored and saved at the end.

    Returns:
        :class:`TrainResult`.

    Raises:
        FileExistsError: ``out_dir`` exists and ``overwrite`` is False (checked first).
        ValueError: malformed rows (see :func:`encode_examples`) or no usable example.
        Whatever ``progress`` raises (the run stops, nothing is written to ``out_dir``).
    """
    from mlx_lm.tuner.trainer import TrainingArgs, evaluate, train

    out_dir = Path(out_dir)
    if out_dir.exists() and not overwrite:
        raise FileExistsError(f"adapter folder {out_dir} already exists")
    started, tic = _now(), time.perf_counter()
    train_set, teacher = encode_train_set(model, tokenizer, train_rows, args)
    val_set = encode_examples(tokenizer, val_rows, args.max_seq_length)
    if not train_set:
        raise ValueError("no usable training example")
    iters = iterations(len(train_set), args.batch_size, args.epochs,
                       args.min_iters, args.max_iters)
    schedule, warmup = learning_rate_schedule(args, iters)

    mx.random.seed(args.seed)
    model.freeze()
    blocks = add_lora(model, args)
    optimizer = optim.AdamW(learning_rate=schedule, weight_decay=args.weight_decay)
    loss = (distil_loss(args.kl_weight, args.context_weight, teacher)
            if args.kl_weight > 0 or teacher is not None else masked_loss)

    def batches(dataset, batch_size, max_seq_length, loop=False, seed=None, comm_group=None):
        return iterate_batches(dataset, batch_size, max_seq_length, loop=loop,
                               seed=args.seed if seed is None else seed,
                               comm_group=comm_group)

    def val_loss() -> float | None:
        if not val_set:
            return None
        return float(evaluate(model, val_set, args.batch_size, num_batches=-1,
                              max_seq_length=args.max_seq_length, loss=masked_loss,
                              iterate_batches=batches))

    every = args.report_every * math.ceil(args.select_every / args.report_every)
    selector = CheckpointSelector(select, every)
    reporter = _reporter(iters, args.report_every, progress, selector, model)
    out_dir.parent.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(prefix=f".tmp-{out_dir.name}-", dir=out_dir.parent))
    try:
        before = val_loss()
        training_args = TrainingArgs(
            batch_size=args.batch_size, iters=iters, val_batches=-1,
            # every few steps: a report synchronises, which stalls mlx-lm's pipelined steps
            steps_per_report=args.report_every,
            steps_per_eval=iters + 1,         # validation is done here, before and after
            steps_per_save=iters + 1,         # train() saves the final weights anyway
            max_seq_length=args.max_seq_length,
            adapter_file=str(tmp / ADAPTER_WEIGHTS),
            grad_checkpoint=args.grad_checkpoint,
        )
        with _quiet_trainer() if quiet else contextlib.nullcontext():
            train(model, optimizer, train_set, None, args=training_args, loss=loss,
                  iterate_batches=batches, training_callback=reporter)
        kept = selector.finish(model, iters, tmp / ADAPTER_WEIGHTS)
        after = val_loss()
        model.eval()
        result = TrainResult(
            adapter_dir=out_dir, iterations=iters,
            train_loss=reporter.losses[-1] if reporter.losses else float("nan"),
            val_loss=after, val_loss_before=before,
            tokens_per_second=reporter.tokens_per_second, trained_tokens=reporter.tokens,
            seconds=0.0, losses=reporter.losses, learning_rates=reporter.rates,
            n_examples=len(train_set), checkpoints=selector.checkpoints, kept_step=kept)
        counts = {"n_distil_examples": sum(row[2] for row in train_set),
                  "n_teacher_examples": sum(1 for row in train_set if row[3]),
                  "n_rows": len(train_rows), "n_examples": len(train_set),
                  "n_val_rows": len(val_rows), "n_val_examples": len(val_set)}
        config = adapter_config(args, result, blocks, warmup, counts, started)
        (tmp / ADAPTER_CONFIG).write_text(json.dumps(config, indent=2) + "\n")
        if not (tmp / ADAPTER_WEIGHTS).is_file():
            raise RuntimeError(f"mlx-lm did not write {ADAPTER_WEIGHTS}")
        replace_folder(tmp, out_dir)
    finally:
        if tmp.exists():
            shutil.rmtree(tmp, ignore_errors=True)
    result.seconds = time.perf_counter() - tic
    return result


def load_adapter(model: nn.Module, adapter_dir: Path) -> nn.Module:
    """Apply a saved adapter to ``model`` in place (``mlx_lm.tuner.utils.load_adapters``):
    LoRA layers as described by ``adapter_config.json``, weights from
    ``adapters.safetensors``. Returns the model, evaluated, in eval mode.

    Raises:
        FileNotFoundError: the folder or one of its two files is missing.
        ValueError: the adapter's tensors do not fit the model (mlx-lm's check).
    """
    from mlx_lm.tuner.utils import load_adapters

    adapter_dir = Path(adapter_dir)
    for name in (ADAPTER_CONFIG, ADAPTER_WEIGHTS):
        if not (adapter_dir / name).is_file():
            raise FileNotFoundError(f"{adapter_dir / name} not found")
    config = json.loads((adapter_dir / ADAPTER_CONFIG).read_text())
    saved = config.get("reverie", {})
    if saved.get("placement", "last") != "last":  # mlx-lm knows only the last blocks
        known = {k: saved[k] for k in ("rank", "scale", "dropout", "num_layers", "keys",
                                       "placement") if k in saved}
        model.freeze()
        add_lora(model, LoraArgs(**known))
        model.load_weights(str(adapter_dir / ADAPTER_WEIGHTS), strict=False)
    else:
        load_adapters(model, str(adapter_dir))
    mx.eval(model.parameters())
    model.eval()
    return model
