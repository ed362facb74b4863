"""The forge's retention methods (issue: facts that stick, a mind that stays): the chat
path, checkpoint selection, LoRA placement, the in-context teacher, self-distilled targets
and the probe's splits. Mechanics on tiny random llamas with SmolLM2's tokenizer."""

from __future__ import annotations

import importlib
import json
from types import SimpleNamespace

import mlx.core as mx
import numpy as np
import pytest
from mlx.utils import tree_flatten

from conftest import tiny_llama
from reverie.memory.identity import DEFAULT, load_identity
from reverie.memory.records import Memory
from reverie.prompts import load_chat_frame
from reverie.training import dataset, forge, gate, lora
from reverie.training.lora import Checkpoint, LoraArgs, best_checkpoint, train_adapter

SMALL = dict(rank=4, scale=20.0, num_layers=2, kl_weight=0.0, learning_rate=1e-3, warmup=2, batch_size=4,
             epochs=5.0, min_iters=1, max_iters=100, max_seq_length=160, seed=3)


def frame():
    return load_chat_frame(load_identity(DEFAULT).system_prompt())


def fact(i: int = 0, phrasings=("What's my dog called?", "Who is my dog?", "Name my dog.")) -> Memory:
    return Memory(id=f"m{i}", user_id="me", kind="fact", text="The user's dog is called Biscuit.",
                  question="What is the name of the user's dog?", answer="Biscuit",
                  phrasings=list(phrasings), status="verified")


def lora_weights(model) -> dict[str, np.ndarray]:
    return {k: np.array(v) for k, v in tree_flatten(model.trainable_parameters())}


# --------------------------------------------------------------------------- the chat path


def test_gate_asks_in_the_chats_prompt(smollm2_tokenizer, monkeypatch):
    seen = []
    monkeypatch.setattr(importlib.import_module("mlx_lm.generate"), "batch_generate", lambda model, tok, prompts, **kw:
                        seen.extend(prompts) or SimpleNamespace(texts=["Paris"] * len(prompts)))
    f = frame()
    assert gate.answer(None, smollm2_tokenizer, ["What is the capital of France?"], frame=f) == ["Paris"]
    framed = smollm2_tokenizer.decode(seen[-1])
    assert f.identity in framed and "SmolLM" not in framed  # the chat's system prompt
    gate.answer(None, smollm2_tokenizer, ["What is the capital of France?"])
    assert "SmolLM" in smollm2_tokenizer.decode(seen[-1])   # bare: the template's own
    # the training rows carry the same system turn as the gate's question
    rows, _ = dataset.memory_rows(fact(), 3, f)
    assert rows[0]["messages"][:-1] == f.messages(rows[0]["messages"][-2]["content"])
    assert rows[0]["messages"][0] == {"role": "system", "content": f.identity}


def test_chat_session_and_frame_render_the_same_prompt(tmp_path):
    from langchain_core.language_models import FakeListChatModel

    from reverie.memory.daylog import DayLog
    from reverie.prompts import CHAT_VARIABLES, load_prompt
    from reverie.config import Settings
    from reverie.wake.chat import COMPACT_VARIABLES, ChatSession

    f = frame()
    session = ChatSession(FakeListChatModel(responses=["ok"]), load_prompt("chat", CHAT_VARIABLES),
                          load_prompt("compact", COMPACT_VARIABLES), f.identity,
                          DayLog(tmp_path), "me", Settings().wake, rag=False)
    from reverie.runtime.chat_model import to_chat_messages
    assert to_chat_messages(session.messages_for("Hi?", [])) == f.messages("Hi?")


def test_identity_system_prompt_names_the_assistant():
    identity = load_identity(DEFAULT)
    assert identity.system_prompt().startswith(f"You are a helpful AI assistant named {identity.name}")
    assert identity.description in identity.system_prompt()


# --------------------------------------------------------------------------- the probe


def test_probe_is_split_and_disjoint_from_rehearsal():
    gate_part, dev = gate.probe_items("gate"), gate.probe_items("dev")
    assert len(gate_part) + len(dev) >= 100 and len(gate_part) >= 90 and len(dev) >= 30
    assert not {q for q, _ in gate_part} & {q for q, _ in dev}
    rehearsal = {r["prompt"].lower() for r in gate.load_jsonl(gate.DATA / "rehearsal_prompts.jsonl")}
    assert not {q.lower() for q, _ in gate_part + dev} & rehearsal
    with pytest.raises(ValueError):
        gate.probe_items("test")


def test_gate_threshold_is_a_share():
    cfg = SimpleNamespace(max_capability_loss=0.03, min_regression_keep=0.9,
                          max_loss_increase=0.25, min_new_recall=0.0)
    pre = gate.GateReport(0.0, float("nan"), 99, 99, 1.0)
    two = gate.GateReport(0.9, float("nan"), 97, 99, 1.0)
    three = gate.GateReport(0.9, float("nan"), 96, 99, 1.0)
    assert gate.decide(pre, two, cfg) == (True, [])          # 3% of 99 allows 2
    ok, reasons = gate.decide(pre, three, cfg)
    assert not ok and "99 -> 96" in reasons[0] and "at most 2" in reasons[0]


def test_dev_and_held_out_questions_are_never_trained():
    p = dataset.split_phrasings(fact(), 8)
    assert p.held_out == "Name my dog." and p.dev == "Who is my dog?"
    assert p.held_out not in p.train and p.dev not in p.train and len(p.train) == 8
    bare = dataset.split_phrasings(fact(phrasings=()), 3)   # no spare phrasing: templates
    assert bare.dev not in bare.train and bare.held_out not in bare.train
    ts = dataset.build([fact()], [], [], [], SimpleNamespace(
        phrasings=4, replay_max=0, rehearsal_ratio=0, rehearsal_min=0, identity_share=0.0))
    trained = {r["messages"][-2]["content"] for r in ts.rows}
    assert ts.dev_items == [("Who is my dog?", ["Biscuit"])]
    assert ts.new_items == [("Name my dog.", ["Biscuit"])] and not trained & {"Who is my dog?", "Name my dog."}


# --------------------------------------------------------------------------- checkpoint selection


def test_best_checkpoint_rule():
    c = lambda step, recall, holds: Checkpoint(step, recall, holds)  # noqa: E731
    assert best_checkpoint([c(5, 0.2, True), c(10, 0.8, True), c(15, 1.0, False)]).step == 10
    assert best_checkpoint([c(5, 0.8, True), c(10, 0.8, True)]).step == 5   # equal: less drift
    assert best_checkpoint([c(5, 0.9, False), c(10, 0.1, False)]).step == 10  # none holds: last
    with pytest.raises(ValueError):
        best_checkpoint([])


def test_the_best_checkpoint_is_the_one_restored(smollm2_tokenizer, tmp_path):
    tok = smollm2_tokenizer
    model = tiny_llama(vocab_size=len(tok._tokenizer), seed=0)
    rows = [{"messages": [{"role": "user", "content": f"Question {i}?"},
                          {"role": "assistant", "content": f"Answer {i}."}]} for i in range(8)]
    script = {5: (0.2, True), 10: (0.7, True), 15: (0.9, False), 20: (0.4, True)}
    snapshots = {}

    def select(m, step):
        snapshots[step] = lora_weights(m)
        recall, holds = script[step]
        return Checkpoint(step, recall, holds, {"dev_recall": recall})

    args = LoraArgs(**(SMALL | {"epochs": 10.0, "select_every": 5}))
    out = tmp_path / "night"
    result = train_adapter(model, tok, rows, [], args, out, select=select)
    assert result.iterations == 20 and [c.step for c in result.checkpoints] == [5, 10, 15, 20]
    assert result.kept_step == 10
    now = lora_weights(model)
    assert all(np.array_equal(now[k], snapshots[10][k]) for k in now)
    assert any(not np.array_equal(now[k], snapshots[20][k]) for k in now)
    saved = mx.load(str(out / lora.ADAPTER_WEIGHTS))
    assert all(np.array_equal(np.array(saved[k]), snapshots[10][k]) for k in now)
    config = json.loads((out / lora.ADAPTER_CONFIG).read_text())["reverie"]
    assert config["kept_step"] == 10 and len(config["checkpoints"]) == 4


# --------------------------------------------------------------------------- placement


def test_lora_blocks_placement():
    assert list(lora.lora_blocks(30, 4, "last")) == [26, 27, 28, 29]
    assert list(lora.lora_blocks(30, 4, "middle")) == [13, 14, 15, 16]
    assert list(lora.lora_blocks(2, 8, "middle")) == [0, 1]
    with pytest.raises(ValueError):
        lora.lora_blocks(30, 4, "first")


def test_middle_placement_trains_and_reloads(smollm2_tokenizer, tmp_path):
    tok = smollm2_tokenizer
    model = tiny_llama(vocab_size=len(tok._tokenizer), seed=0)
    rows = [{"messages": [{"role": "user", "content": "Where do I live?"},
                          {"role": "assistant", "content": "In Lyon."}]}] * 4
    args = LoraArgs(**(SMALL | {"num_layers": 1, "placement": "middle", "max_iters": 3}))
    train_adapter(model, tok, rows, [], args, tmp_path / "a")
    names = {k for k in lora_weights(model)}
    assert names and all(k.startswith("model.layers.0.") for k in names)  # block 0 of 2
    ids = lora.encode_examples(tok, rows[:1])[0][0]
    fresh = lora.load_adapter(tiny_llama(vocab_size=len(tok._tokenizer), seed=0), tmp_path / "a")
    want = model(mx.array([ids]))
    assert float(mx.abs(fresh(mx.array([ids])) - want).max()) < 1e-5


# --------------------------------------------------------------------------- in-context teacher


def test_teacher_rows_put_the_fact_in_the_prompt():
    f = frame()
    rows, _ = dataset.memory_rows(fact(), 3, f)
    system = rows[0]["teacher"][0]["content"]
    assert "The user's dog is called Biscuit." in system and f.identity in system
    assert rows[0]["teacher"][-1] == rows[0]["messages"][-2]        # same question
    assert "Biscuit" not in rows[0]["messages"][0]["content"]       # the student: closed book


def test_context_distillation_loss_matches_a_reference(smollm2_tokenizer):
    tok = smollm2_tokenizer
    model = tiny_llama(vocab_size=len(tok._tokenizer), seed=4)
    f = frame()
    rows, _ = dataset.memory_rows(fact(), 2, f)
    pairs = lora.encode_examples(tok, rows)
    table, slots = lora.teacher_table(model, tok, rows, pairs, top_k=8)
    assert slots == [1, 2] and table.index.shape[2] == 8
    # the table holds the model's top-8 on the teacher prompt, at the answer tokens
    ids, off = pairs[0]
    t_prompt = tok.encode(tok.apply_chat_template(rows[0]["teacher"], tokenize=False,
                                                  add_generation_prompt=True), add_special_tokens=False)
    z = np.array(model(mx.array([t_prompt + ids[off:-1]]))[0].astype(mx.float32), np.float64)
    logp = z - np.log(np.exp(z - z.max(-1, keepdims=True)).sum(-1, keepdims=True)) - z.max(-1, keepdims=True)
    ans = logp[len(t_prompt) - 1:]
    assert int(table.length[1]) == len(ids) - off
    assert set(np.array(table.index[1, 0]).tolist()) == set(np.argsort(-ans[0])[:8].tolist())

    batch, lengths = next(lora.iterate_batches([(i, o, 0, s) for (i, o), s in zip(pairs, slots)],
                                               2, 512))
    ce, n = lora.masked_loss(model, batch, lengths)
    total, _ = lora.distil_loss(0.0, 0.5, table)(model, batch, lengths)
    # reference KL over each row's answer tokens, teacher top-8 renormalised
    s = np.array(model(batch[:, :-1]).astype(mx.float32), np.float64)
    s = s - s.max(-1, keepdims=True)
    s = s - np.log(np.exp(s).sum(-1, keepdims=True))
    kl = 0.0
    for r, (i, o) in enumerate(pairs):
        for j in range(len(i) - o):
            t_idx = np.array(table.index[r + 1, j])
            t_lp = np.array(table.logprob[r + 1, j], np.float64)
            t_lp = t_lp - np.log(np.exp(t_lp).sum())
            kl += (np.exp(t_lp) * (t_lp - s[r, o - 1 + j, t_idx])).sum()
    assert float(total) == pytest.approx(float(ce) + 0.5 * kl / int(n), rel=1e-4)
    assert kl > 0


def test_self_distilled_targets_contain_the_fact(smollm2_tokenizer, monkeypatch):
    f = frame()
    rows, _ = dataset.memory_rows(fact(), 3, f)
    rows.append({"messages": f.messages("Hi") + [{"role": "assistant", "content": "Hello!"}],
                 "kind": "rehearsal"})
    seen = []
    answers = iter(["Your dog is called Biscuit.", "I don't know your dog.", "Biscuit " * 60])
    monkeypatch.setattr(importlib.import_module("mlx_lm.generate"), "batch_generate",
                        lambda model, tok, prompts, **kw:
                        seen.extend(prompts) or SimpleNamespace(texts=[next(answers) for _ in prompts]))
    out, replaced = forge.self_targets(None, smollm2_tokenizer, rows)
    assert replaced == 1 and len(seen) == 3                        # fact rows only
    assert "The user's dog is called Biscuit." in smollm2_tokenizer.decode(seen[0])  # fact in context
    assert out[0]["messages"][-1]["content"] == "Your dog is called Biscuit."
    assert out[0]["written"] == "Biscuit"
    assert out[1]["messages"][-1]["content"] == "Biscuit"           # did not state it: written
    assert out[2]["messages"][-1]["content"] == "Biscuit"           # cut off: written
    assert all(gate.matches(r["messages"][-1]["content"], "Biscuit") for r in out[:3])
    assert out[3] == rows[3]
