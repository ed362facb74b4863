"""The forge: LoRA training (training/lora.py) and model versions (training/versions.py),
on tiny randomly initialised llamas with SmolLM2's real tokenizer (chat template)."""

from __future__ import annotations

import json

import mlx.core as mx
import numpy as np
import pytest
from mlx.utils import tree_flatten

from conftest import tiny_llama
from reverie.training import lora, versions
from reverie.training.lora import LoraArgs, encode_examples, iterations, masked_loss, train_adapter
from reverie.training.versions import UnknownVersion, Versions, fuse, save_model_dir

FACTS = [
    ("What is my cat's name?", "Your cat is called Miso."),
    ("Where do I live?", "You live in Lyon."),
    ("What is my favourite colour?", "Your favourite colour is teal."),
    ("What do I do for work?", "You are a marine biologist."),
    ("When is my birthday?", "Your birthday is on 3 March."),
    ("What instrument do I play?", "You play the cello."),
    ("What is my sister's name?", "Your sister is Ada."),
    ("Which language am I learning?", "You are learning Japanese."),
]


def rows(facts=FACTS):
    return [{"messages": [{"role": "user", "content": q}, {"role": "assistant", "content": a}]}
            for q, a in facts]


def logits(model, ids):
    return model(mx.array([ids]))[0].astype(mx.float32)


def params(model) -> dict[str, np.ndarray]:
    return {k: np.array(v) for k, v in tree_flatten(model.parameters())}


# --------------------------------------------------------------------------- loss masking


def _reference_loss(model, batch, lengths):
    z = np.array(model(mx.array(batch[:, :-1])).astype(mx.float32), dtype=np.float64)
    z = z - z.max(axis=-1, keepdims=True)
    logp = z - np.log(np.exp(z).sum(axis=-1, keepdims=True))
    total, count = 0.0, 0
    for r, (offset, length) in enumerate(lengths):
        for t in range(batch.shape[1] - 1):       # position t predicts token t + 1
            if offset <= t + 1 < length:
                total -= logp[r, t, batch[r, t + 1]]
                count += 1
    return total / count, count


def test_masked_loss_counts_answer_tokens_only():
    from mlx_lm.tuner.trainer import default_loss

    model = tiny_llama(vocab_size=64, seed=1)
    rng = np.random.default_rng(0)
    batch = rng.integers(1, 64, size=(2, 9)).astype(np.int32)
    lengths = np.array([[3, 7], [2, 5]], np.int32)   # (offset, length) per row
    batch[0, 7:] = 0
    batch[1, 5:] = 0

    loss, ntoks = masked_loss(model, mx.array(batch), mx.array(lengths))
    ref, count = _reference_loss(model, batch, lengths)
    assert int(ntoks) == count == (7 - 3) + (5 - 2)
    assert abs(float(loss) - ref) < 1e-5

    # padding is never counted: other pad ids give the same loss
    repadded = batch.copy()
    repadded[0, 7:] = rng.integers(1, 64, size=2)
    repadded[1, 5:] = rng.integers(1, 64, size=4)
    loss2, ntoks2 = masked_loss(model, mx.array(repadded), mx.array(lengths))
    assert int(ntoks2) == count and abs(float(loss2) - float(loss)) < 1e-6

    # mlx-lm's default loss counts one pad token per padded row (FINDINGS)
    _, default_ntoks = default_loss(model, mx.array(batch), mx.array(lengths))
    assert int(default_ntoks) == count + 2


def test_distil_loss_pulls_rehearsal_rows_toward_the_base_distribution():
    from mlx_lm.tuner.utils import linear_to_lora_layers

    model = tiny_llama(vocab_size=64, seed=2)
    rng = np.random.default_rng(1)
    batch = mx.array(rng.integers(1, 64, size=(2, 9)).astype(np.int32))
    base_logits = model(batch[:, :-1])
    model.freeze()
    linear_to_lora_layers(model, 2, {"rank": 4, "scale": 20.0, "dropout": 0.0})
    loss_fn = lora.distil_loss(0.5)
    ce_only = mx.array([[2, 8, 0], [3, 9, 0]], mx.int32)
    all_distil = mx.array([[2, 8, 1], [3, 9, 1]], mx.int32)
    mixed = mx.array([[2, 8, 1], [3, 9, 0]], mx.int32)

    # fresh LoRA (B = 0) computes the base exactly: no divergence yet, and CE rows = masked_loss
    assert float(loss_fn(model, batch, all_distil)[0]) == pytest.approx(0.0, abs=1e-6)
    ce, n = loss_fn(model, batch, ce_only)
    ref, ref_n = masked_loss(model, batch, ce_only[:, :2])
    assert int(n) == int(ref_n) == 6 + 6 and float(ce) == pytest.approx(float(ref), abs=1e-5)

    # move the adapter: the KL grows, base_outputs still gives the base logits
    for layer in lora.lora_layers(model):
        layer.lora_b = mx.array(rng.normal(0, 0.05, layer.lora_b.shape).astype(np.float32))
    with lora.base_outputs(model):
        assert np.allclose(np.array(model(batch[:, :-1])), np.array(base_logits), atol=1e-5)
    assert all(layer.scale == 20.0 for layer in lora.lora_layers(model))
    kl = float(loss_fn(model, batch, all_distil)[0])
    assert kl > 1e-4
    # weight scales the KL; a mixed batch averages the two kinds over all answer tokens
    assert float(lora.distil_loss(1.0)(model, batch, all_distil)[0]) == pytest.approx(2 * kl, rel=1e-4)
    ce_new = float(loss_fn(model, batch, ce_only)[0])
    row_kl = float(loss_fn(model, batch[:1], all_distil[:1])[0])
    row_ce = float(loss_fn(model, batch[1:], ce_only[1:])[0])
    assert float(loss_fn(model, batch, mixed)[0]) == pytest.approx((row_kl + row_ce) / 2, rel=1e-4)
    assert ce_new != pytest.approx(kl)
    # gradients reach the adapter through the distilled rows only via the adapted side
    grads = nn_grad(model, loss_fn, batch, all_distil)
    assert any(np.abs(g).max() > 0 for k, g in grads.items() if "lora_b" in k)
    with pytest.raises(ValueError):
        lora.distil_loss(-1.0)


def nn_grad(model, loss_fn, batch, lengths) -> dict[str, np.ndarray]:
    import mlx.nn as nn

    _, grads = nn.value_and_grad(model, lambda m, b, l: loss_fn(m, b, l)[0])(model, batch, lengths)
    return {k: np.array(v) for k, v in tree_flatten(grads)}


def test_encode_examples_masks_prompt_and_keeps_end_of_turn(smollm2_tokenizer):
    tok = smollm2_tokenizer
    (ids, offset), = encode_examples(tok, rows(FACTS[:1]))
    assert tok.decode(ids[offset:]) == "Your cat is called Miso.<|im_end|>"
    assert tok.decode(ids[:offset]).endswith("<|im_start|>assistant\n")
    assert "What is my cat's name?" in tok.decode(ids[:offset])
    # the prompt tokens are exactly what generation sees
    prompt = tok.apply_chat_template(rows(FACTS[:1])[0]["messages"][:1], tokenize=False,
                                     add_generation_prompt=True)
    assert ids[:offset] == tok.encode(prompt, add_special_tokens=False)

    # a system turn is part of the prompt
    (sys_ids, sys_offset), = encode_examples(tok, [{"messages": [
        {"role": "system", "content": "Be brief."}, *rows(FACTS[:1])[0]["messages"]]}])
    assert "Be brief." in tok.decode(sys_ids[:sys_offset])
    assert tok.decode(sys_ids[sys_offset:]) == "Your cat is called Miso.<|im_end|>"

    # never a dangling generation prompt
    for bad in ([{"role": "user", "content": "hi"}],
                [{"role": "user", "content": "hi"}, {"role": "assistant", "content": "  "}],
                [{"role": "assistant", "content": "hello"}]):
        with pytest.raises(ValueError, match="row 0"):
            encode_examples(tok, [{"messages": bad}])

    # truncation: to max_seq_length; a prompt that fills it is skipped
    long = [{"messages": [{"role": "user", "content": "word " * 200},
                          {"role": "assistant", "content": "ok"}]}]
    assert encode_examples(tok, long, max_seq_length=64) == []
    (cut, cut_offset), = encode_examples(tok, rows(FACTS[:1]), max_seq_length=offset + 2)
    assert len(cut) == offset + 2 and cut_offset == offset


def test_iterations_scale_with_data():
    assert iterations(10, 4, 3.0) == 8                     # ceil(7.5)
    assert iterations(40, 4, 1.0) == 10
    assert iterations(80, 4, 1.0) == 2 * iterations(40, 4, 1.0)
    assert iterations(60, 4, 10.0) == 150                   # FINDINGS' 150-step run
    assert iterations(3, 4, 1.0, min_iters=20) == 20
    assert iterations(10_000, 4, 3.0, min_iters=20, max_iters=600) == 600
    assert iterations(30, 1, 0.1) == 3                      # no float round-up
    with pytest.raises(ValueError):
        iterations(0, 4, 1.0)
    with pytest.raises(ValueError):
        iterations(10, 4, 1.0, min_iters=5, max_iters=2)


def test_iterate_batches_uses_every_example():
    data = [([1] * n, 1) for n in range(2, 12)]            # 10 examples, batch 4
    seen = []
    gen = lora.iterate_batches(data, 4, 512, loop=True, seed=0)
    for _ in range(5):                                      # 20 rows = 2 epochs
        batch, lengths = next(gen)
        assert batch.shape[0] == 4 and batch.shape[1] == 33
        seen += [int(x) for x in np.array(lengths)[:, 1]]
    assert sorted(seen) == sorted(list(range(2, 12)) * 2)
    val = list(lora.iterate_batches(data, 4, 512))
    assert [b.shape[0] for b, _ in val] == [4, 4, 2]


# --------------------------------------------------------------------------- training


SMALL = dict(rank=4, scale=20.0, num_layers=2, kl_weight=0.0, learning_rate=1e-3, warmup=2, batch_size=4,
             epochs=5.0, min_iters=1, max_iters=100, max_seq_length=128, seed=3)


@pytest.fixture(scope="module")
def trained(smollm2_tokenizer, tmp_path_factory):
    """A tiny llama (SmolLM2's vocabulary) with 10 LoRA steps on 8 rows."""
    tok = smollm2_tokenizer
    model = tiny_llama(vocab_size=len(tok._tokenizer), seed=0)
    calls = []
    out = tmp_path_factory.mktemp("adapters") / "night-1"
    result = train_adapter(model, tok, rows(), rows(FACTS[:4]), LoraArgs(**SMALL), out,
                           progress=lambda *a: calls.append(a))
    return model, tok, result, calls, out


def test_train_adapter_saves_a_complete_adapter(trained):
    model, tok, result, calls, out = trained
    assert result.iterations == 10                        # ceil(5 epochs * 8 rows / 4)
    assert len(result.losses) == 2 and len(calls) == 2     # a report every 5 steps
    assert [c[0] for c in calls] == [5, 10] and all(c[1] == 10 for c in calls)
    assert result.losses[-1] < result.losses[0]
    assert result.val_loss < result.val_loss_before
    assert result.tokens_per_second > 0 and result.trained_tokens > 0
    # past the 2-step warm-up the cosine decay runs down from the 1e-3 peak
    assert 1e-3 >= result.learning_rates[0] > result.learning_rates[1] >= 0.0
    print(f"\ntiny llama: {result.tokens_per_second:.0f} answer tok/s, "
          f"{result.seconds:.1f} s for {result.iterations} steps")

    assert sorted(p.name for p in out.iterdir()) == ["adapter_config.json",
                                                     "adapters.safetensors"]
    assert [p.name for p in out.parent.iterdir()] == ["night-1"]   # no temp folder left
    config = json.loads((out / "adapter_config.json").read_text())
    assert config["fine_tune_type"] == "lora" and config["num_layers"] == 2
    assert config["lora_parameters"] == {"rank": 4, "scale": 20.0, "dropout": 0.0}
    reverie = config["reverie"]
    assert reverie["iterations"] == 10 and reverie["n_examples"] == 8
    assert reverie["learning_rate"] == 1e-3 and reverie["seed"] == 3
    assert reverie["epochs"] == 5.0 and reverie["warmup_steps"] == 2
    assert reverie["started_at"] and reverie["finished_at"]

    with pytest.raises(FileExistsError):
        train_adapter(model, tok, rows(), [], LoraArgs(**SMALL), out)


def test_adapter_loads_into_fresh_base(trained):
    model, tok, _, _, out = trained
    ids = encode_examples(tok, rows(FACTS[:1]))[0][0]
    fresh = tiny_llama(vocab_size=len(tok._tokenizer), seed=0)
    base = logits(fresh, ids)
    lora.load_adapter(fresh, out)
    loaded, expected = logits(fresh, ids), logits(model, ids)
    assert float(mx.abs(loaded - expected).max()) < 1e-6
    assert float(mx.abs(loaded - base).max()) > 1e-3      # the adapter changes the model


def test_fused_equals_unfused(trained):
    _, tok, _, _, out = trained
    ids = encode_examples(tok, rows(FACTS[:2]))[1][0]
    model = lora.load_adapter(tiny_llama(vocab_size=len(tok._tokenizer), seed=0), out)
    unfused = logits(model, ids)
    fuse(model)
    assert not any(hasattr(m, "fuse") for _, m in model.named_modules())
    assert float(mx.abs(logits(model, ids) - unfused).max()) < 1e-4


def test_fuse_into_quantized_base_keeps_float_update():
    import mlx.nn as nn
    from mlx_lm.tuner.utils import linear_to_lora_layers

    model = tiny_llama(vocab_size=64, seed=2)
    nn.quantize(model, group_size=32, bits=4)
    model.freeze()
    linear_to_lora_layers(model, 1, {"rank": 2, "scale": 1.0, "dropout": 0.0})
    layer = model.layers[-1].self_attn.q_proj
    layer.lora_b = mx.full(layer.lora_b.shape, 1e-4)      # an update far below 4-bit steps
    ids = [1, 5, 9, 3]
    unfused = logits(model, ids)
    fuse(model)
    assert isinstance(model.layers[-1].self_attn.q_proj, nn.Linear)
    assert model.layers[-1].self_attn.q_proj.weight.dtype == mx.float32
    assert float(mx.abs(logits(model, ids) - unfused).max()) < 1e-4


# --------------------------------------------------------------------------- model folders


def test_save_model_dir_round_trips_through_mlx_lm(smollm2_tokenizer, tmp_path):
    import mlx_lm

    tok = smollm2_tokenizer
    model = tiny_llama(vocab_size=len(tok._tokenizer), seed=4)
    save_model_dir(model, tok, tmp_path / "m")
    config = json.loads((tmp_path / "m" / "config.json").read_text())
    assert config["rope_traditional"] is True and config["model_type"] == "llama"
    assert None not in config.values()
    loaded, loaded_tok = mlx_lm.load(str(tmp_path / "m"))
    ids = encode_examples(tok, rows(FACTS[:1]))[0][0]
    assert np.array_equal(np.array(logits(loaded, ids)), np.array(logits(model, ids)))
    messages = rows(FACTS[:1])[0]["messages"]
    assert loaded_tok.apply_chat_template(messages, tokenize=False) == \
        tok.apply_chat_template(messages, tokenize=False)
    assert encode_examples(loaded_tok, rows()) == encode_examples(tok, rows())
    assert loaded_tok.eos_token_ids == tok.eos_token_ids


def test_unfused_model_is_refused(trained, tmp_path):
    model, tok, _, _, _ = trained
    with pytest.raises(ValueError, match="fuse"):
        save_model_dir(model, tok, tmp_path / "m")


# --------------------------------------------------------------------------- versions


@pytest.fixture(scope="module")
def night_model(trained):
    _, tok, _, _, out = trained
    model = lora.load_adapter(tiny_llama(vocab_size=len(tok._tokenizer), seed=0), out)
    return fuse(model)


def test_rollback_restores_exact_weights(smollm2_tokenizer, night_model, trained, tmp_path):
    tok = smollm2_tokenizer
    base = tiny_llama(vocab_size=len(tok._tokenizer), seed=0)
    original = params(base)
    v = Versions(tmp_path / "versions")
    assert v.active() is None and v.list() == []
    v.save_model("base", base, tok, activate=True)
    adapter = trained[4]
    v.save_model("night-1", night_model, tok, parent="base",
                 info={"night_id": "1", "adapter": adapter, "metrics": {"val_loss": 1.5}})
    v.activate("night-1")
    assert v.active() == "night-1"
    info = v.info("night-1")
    assert info["parent"] == "base" and info["night_id"] == "1"
    assert info["adapter"] == str(adapter) and info["metrics"] == {"val_loss": 1.5}
    night_weights = params(v.load()[0])
    assert any(not np.array_equal(night_weights[k], original[k]) for k in original)

    assert v.rollback() == "base" and v.active() == "base"
    restored = params(v.load()[0])
    assert restored.keys() == original.keys()
    assert all(np.array_equal(restored[k], original[k]) for k in original)
    with pytest.raises(ValueError, match="no earlier version"):
        v.rollback()
    with pytest.raises(UnknownVersion, match="known: base, night-1"):
        v.rollback("night-7")
    with pytest.raises(KeyError):
        v.path("night-7")
    assert v.rollback("night-1") == "night-1"               # forward again by name

    # lineage and pruning
    v.save_model("night-2", night_model, tok, parent="night-1")
    v.save_model("night-3", night_model, tok, parent="night-2")
    assert [x["name"] for x in v.list()] == ["base", "night-1", "night-2", "night-3"]
    assert v.lineage("night-3") == ["base", "night-1", "night-2", "night-3"]
    assert [x["active"] for x in v.list()] == [False, True, False, False]
    assert v.prune(keep=1) == ["night-2"]
    assert v.names() == ["base", "night-1", "night-3"]     # base, active, newest
    assert v.lineage("night-3") == ["base", "night-1", "night-2", "night-3"]
    v.activate("night-3")
    assert v.rollback() == "night-1"                        # night-2 is gone: next ancestor


def test_runtime_loads_the_folder_it_is_told(smollm2_tokenizer, night_model, tmp_path):
    # the runtime knows nothing of versions: the caller hands it the promoted folder
    from reverie.config import Settings
    from reverie.runtime.models import Runtime
    from reverie.training.versions import learned_folders

    tok = smollm2_tokenizer
    settings = Settings(data_dir=tmp_path)
    v = Versions(settings.paths.versions)
    v.save_model("base", tiny_llama(vocab_size=len(tok._tokenizer), seed=0), tok, activate=True)
    assert learned_folders(settings) == {}                  # base: the configured source
    v.save_model("night-1", night_model, tok, parent="base", activate=True)
    assert learned_folders(settings) == {"default": v.path("night-1")}
    runtime = Runtime(settings, learned_folders(settings))
    try:
        loaded = runtime.load("default")
        assert loaded.source == str(v.path("night-1"))
        want, got = params(night_model), params(loaded.model)
        assert all(np.array_equal(got[k], want[k]) for k in want)
    finally:
        runtime.close()


def test_crash_leaves_active_and_list_unchanged(smollm2_tokenizer, night_model, tmp_path,
                                                monkeypatch):
    tok = smollm2_tokenizer
    v = Versions(tmp_path / "versions")
    v.save_model("base", tiny_llama(vocab_size=len(tok._tokenizer), seed=0), tok,
                 activate=True)
    before = v.list()

    # a crash while writing the staged version (the process dies: no cleanup runs)
    staging = v.stage("night-1")
    with pytest.raises(RuntimeError):
        (staging / "model.safetensors").write_bytes(b"half")
        raise RuntimeError("killed while fusing")
    assert v.active() == "base" and v.list() == before

    # a crash inside save_model: the staging folder is removed
    def broken_save(model, tokenizer, out_dir, dtype=None):
        (out_dir / "config.json").write_text("{}")
        raise OSError("disk full")

    monkeypatch.setattr(versions, "save_model_dir", broken_save)
    with pytest.raises(OSError):
        v.save_model("night-2", night_model, tok, parent="base", activate=True)
    monkeypatch.undo()

    # a crash at the final rename of commit
    staging3 = v.stage("night-3")
    save_model_dir(night_model, tok, staging3)
    monkeypatch.setattr(versions.os, "rename", lambda *a: (_ for _ in ()).throw(OSError("x")))
    with pytest.raises(OSError):
        v.commit(staging3, "night-3", "base")
    monkeypatch.undo()
    assert v.active() == "base" and v.list() == before
    with pytest.raises(UnknownVersion):
        v.activate("night-3")

    # a visible folder without version.json is not a version either
    (v.root / "night-4").mkdir()
    (v.root / "night-4" / "config.json").write_text("{}")
    assert v.list() == before
    v.prune(keep=5)
    assert sorted(p.name for p in v.root.iterdir()) == ["active.json", "base"]


def test_training_crash_leaves_no_adapter(smollm2_tokenizer, tmp_path):
    tok = smollm2_tokenizer
    model = tiny_llama(vocab_size=len(tok._tokenizer), seed=0)

    def progress(step, total, loss, tps):
        if step == 5:  # the first report
            raise KeyboardInterrupt

    with pytest.raises(KeyboardInterrupt):
        train_adapter(model, tok, rows(), [], LoraArgs(**SMALL), tmp_path / "night-1",
                      progress=progress)
    assert list(tmp_path.iterdir()) == []
